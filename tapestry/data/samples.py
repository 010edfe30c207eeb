"""Demo inputs for the image and web engines, written locally (nothing downloaded):

    python -m tapestry.data.samples photos DIR   scikit-image photos + a ToyWorld scene with its
                                                 ground-truth sidecar (DIR/toyworld-scene.json)
    python -m tapestry.data.samples pages DIR    how-to pages with the mess of the real web: an HTML
                                                 page, a markdown page and a WARC archive of two more
    python -m tapestry.data.samples tiny-models DIR  tiny random-weight OWLv2, SAM, DINOv2 and CLIP
                                                 checkpoints in their published layouts and a quality
                                                 scorer file (`tapestry.data.tiny_models`)
    python -m tapestry.data.samples seeds FILE   duet-synthetic's built-in seed pool as JSON, to edit

The pages hold what the web engine must clean: navigation and footer, an ad and a tracker pixel,
icons and a logo, a QR code, a scanned document page, a near-duplicate of the image before it,
images placed before the step they show, a broken image link and sign-up prose with links.
Tests, docs/data-image-web.md and benchmarks/data_engines.py all use these.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def write_photos(folder: str | Path, names: tuple[str, ...] = PHOTOS, toyworld: bool = True,
                 scale: float = 0.5) -> list[Path]:
    import json

    from skimage import data

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        image.save(folder / f"{name}.png")
        written.append(folder / f"{name}.png")
    if toyworld:
        from tapestry.data.pipelines.image_inline import toyworld_sidecar
        from tapestry.toyworld import (
            Background,
            Entity,
            PlacedEntity,
            Scene,
            render_scene,
        )

        scene = Scene(Background("plain", ("slate",)), (
            PlacedEntity(Entity("star", "red", "solid"), 0, "large"),
            PlacedEntity(Entity("circle", "yellow", "striped"), 5, "large"),
            PlacedEntity(Entity("square", "blue", "solid"), 7, "small", 30.0)))
        render_scene(scene, 192).save(folder / "toyworld-scene.png")
        (folder / "toyworld-scene.json").write_text(json.dumps(toyworld_sidecar(scene, 192), indent=1) + "\n")
        written.append(folder / "toyworld-scene.png")
    return written


# ------------------------------------------------------------------ pages
def _photo(name: str, size: tuple[int, int], crop: tuple[float, float, float, float] = (0, 0, 1, 1)) -> Image.Image:
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    w, h = image.size
    image = image.crop((round(crop[0] * w), round(crop[1] * h), round(crop[2] * w), round(crop[3] * h)))
    return image.resize(size, Image.LANCZOS)


def _jpeg(image: Image.Image, quality: int = 88) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def qr_code(text: str, module_px: int = 8) -> Image.Image:
    import cv2

    code = cv2.QRCodeEncoder.create().encode(text)
    code = cv2.resize(code, (code.shape[1] * module_px, code.shape[0] * module_px), interpolation=cv2.INTER_NEAREST)
    code = cv2.copyMakeBorder(code, 4 * module_px, 4 * module_px, 4 * module_px, 4 * module_px,
                              cv2.BORDER_CONSTANT, value=255)
    return Image.fromarray(code).convert("RGB")


def icon(colour: tuple[int, int, int], side: int = 96) -> Image.Image:
    image = Image.new("RGB", (side, side), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((8, 8, side - 8, side - 8), fill=colour)
    return image


def document_scan(size: tuple[int, int] = (360, 480)) -> Image.Image:
    """A white page with lines of dark 'text': what a scanned leaflet looks like."""
    image = Image.new("RGB", size, (252, 252, 250))
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(3)
    for y in range(40, size[1] - 40, 22):
        x = 30
        while x < size[0] - 60:
            word = int(rng.integers(18, 60))
            draw.rectangle((x, y, x + word, y + 9), fill=(30, 30, 30))
            x += word + 10
    return image


def page_images() -> dict[str, bytes]:
    step1 = _photo("coffee", (400, 300))
    near_copy = step1.resize((396, 297), Image.LANCZOS)  # re-encoded, a little smaller: the same picture
    return {
        "step1.jpg": _jpeg(step1),
        "step1-copy.jpg": _jpeg(near_copy, 70),
        "step2.jpg": _jpeg(_photo("chelsea", (400, 300))),
        "step3.jpg": _jpeg(_photo("astronaut", (360, 360), (0.1, 0.1, 0.9, 0.9))),
        "tip.png": _png(icon((40, 160, 70))),
        "brand-logo.png": _png(icon((200, 40, 40), 240).resize((300, 100))),
        "app-qr.png": _png(qr_code("https://example.com/get-the-app")),
        "leaflet.png": _png(document_scan()),
        "rocket.jpg": _jpeg(_photo("rocket", (420, 280))),
        "marker.png": _png(icon((90, 90, 220), 40).resize((40, 20))),
        "rocket-launch.jpg": _jpeg(_photo("rocket", (420, 280), (0.2, 0.0, 1.0, 0.8))),
    }


REPOT_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>How to Make Pour-Over Coffee | HomeHowTo</title></head>
<body>
<header><nav><a href="/">Home</a> <a href="/kitchen">Kitchen</a> <a href="/about">About</a>
  <img src="images/brand-logo.png" alt="HomeHowTo"></nav></header>
<main><article>
<h1>How to Make Pour-Over Coffee</h1>
<p>A pour-over brews one clean, bright cup. You need fresh beans, a grinder, a filter cone, a kettle and a
cup. It takes about five minutes from start to finish.</p>
<p><img src="images/brand-logo.png" alt="HomeHowTo logo"></p>
<p><img src="images/tip.png" alt="" width="96" height="96"></p>
<figure><img src="images/step1.jpg" alt="a white cup of freshly brewed coffee on a saucer"></figure>
<h2>Step 1: Heat the water and brew the coffee</h2>
<p>Heat the water to just off the boil, pour it slowly over the grounds in circles, and let the freshly
brewed coffee drip into a white cup on its saucer.</p>
<p><img src="images/step1-copy.jpg" alt="the cup of coffee again"></p>
<div class="ad-slot"><p>Advertisement</p><img src="https://ads.doubleclick.net/ddm/ad/banner-300x250.jpg"
  alt="Advertisement"></div>
<p><img src="https://cdn.example.net/ads/spring-sale.jpg" alt="Spring sale on grinders"></p>
<h2>Step 2: Let it cool while the cat watches</h2>
<p>Give the cup two minutes to cool. Keep it out of reach: a curious cat will sit right beside it and watch.</p>
<p><img src="images/step2.jpg" alt="a curious cat sitting and watching"></p>
<p><img src="images/missing-step.jpg" alt="the finished cup from above"></p>
<p><img src="images/app-qr.png" alt="scan to get our brewing app"></p>
<p>Scan the code to get our app, or visit our shop at https://example.com/shop for filters. Subscribe to our
newsletter for more recipes.</p>
<p><img src="images/leaflet.png" alt="the brewing chart leaflet"></p>
<h2>Step 3: Enjoy it</h2>
<p>Sip slowly and notice the flavour change as the coffee cools. Rinse the cone right away so it stays
clean for tomorrow.</p>
<p><img src="https://tracker.example.com/pixel.gif?id=42" width="1" height="1" alt=""></p>
</article></main>
<footer><p>Copyright 2026 HomeHowTo. All rights reserved.</p><a href="/privacy">Privacy</a></footer>
</body></html>
"""

GUIDE_MD = """# How to Photograph a Rocket Launch

![a rocket standing on the launch pad under a clear sky](images/rocket.jpg)

## Find the pad

![step marker](images/marker.png)

Find a spot with a clear view of the rocket standing on the launch pad, at least a few kilometres away,
and arrive two hours early.

## Frame the launch

Use a long lens and frame the launch tower with room above it for the flame and the trail.

![launch tower framed with room above it](images/rocket-launch.jpg)
![launch tower again](images/rocket-launch.jpg)

![missing picture of the trail](images/trail.jpg)

Read more on [our blog](https://example.com/blog).
"""

WARC_PAGES = {
    "https://howto.example.org/cat-care": """<html><head><title>How to Keep a Cat Calm</title></head><body>
<nav><a href="/">Home</a></nav><article><h1>How to Keep a Cat Calm</h1>
<p>Cats relax when their space is quiet and predictable. A calm cat sits with its eyes half closed.</p>
<h2>Give it a quiet corner</h2>
<p>Put a soft blanket in a quiet corner where the cat can sit and watch the room without being disturbed.</p>
<p><img src="/img/cat.jpg" alt="a cat sitting calmly in its quiet corner"></p>
<h2>Keep a routine</h2><p>Feed and play at the same times each day so the cat knows what comes next.</p>
<p><img src="/img/gone.jpg" alt="a food bowl"></p>
</article></body></html>""",
    "https://howto.example.org/astronaut-suit": """<html><head><title>How to Read a Spacesuit</title></head><body>
<article><h1>How to Read a Spacesuit</h1>
<p>A spacesuit is a small spacecraft. Each part keeps the astronaut alive and able to work outside.</p>
<p><img src="/img/suit.jpg" alt="an astronaut in a white spacesuit holding a helmet"></p>
<h2>Look at the suit and helmet</h2>
<p>The white spacesuit reflects sunlight, and the astronaut holding the helmet shows its gold visor.</p>
<p><img src="/img/ad.gif" alt="Sponsored"></p>
</article></body></html>""",
}


def write_warc(path: Path, pages: dict[str, str], images: dict[str, bytes]) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as stream:
        writer = WARCWriter(stream, gzip=str(path).endswith(".gz"))
        for url, html in pages.items():
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(html.encode()),
                                                          http_headers=headers))
        for url, data in images.items():
            headers = StatusAndHeaders("200 OK", [("Content-Type", "image/jpeg")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(data),
                                                          http_headers=headers))


def write_pages(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images = page_images()
    for name, data in images.items():
        (folder / "images" / name).write_bytes(data)
    (folder / "coffee.html").write_text(REPOT_HTML, encoding="utf-8")
    (folder / "rocket.md").write_text(GUIDE_MD, encoding="utf-8")
    archived = {"https://howto.example.org/img/cat.jpg": _jpeg(_photo("chelsea", (400, 300), (0.1, 0, 1, 1))),
                "https://howto.example.org/img/suit.jpg": _jpeg(_photo("astronaut", (360, 360)))}
    write_warc(folder / "crawl.warc.gz", WARC_PAGES, archived)
    return [folder / "coffee.html", folder / "rocket.md", folder / "crawl.warc.gz"]


def write_seed_pool(path: str | Path) -> list[Path]:
    import json

    from tapestry.atomic import atomic_write_text
    from tapestry.data.operators.duet import DEFAULT_POOL

    atomic_write_text(Path(path), json.dumps(DEFAULT_POOL, indent=1, ensure_ascii=False) + "\n")
    return [Path(path)]


def main(argv: list[str]) -> int:
    kinds = ("photos", "pages", "tiny-models", "seeds")
    if len(argv) != 2 or argv[0] not in kinds:
        print(f"usage: python -m tapestry.data.samples {'|'.join(kinds)} DIR", file=sys.stderr)
        return 2
    if argv[0] == "tiny-models":
        from tapestry.data.tiny_models import write_tiny_models

        written = list(write_tiny_models(argv[1]).values())
    elif argv[0] == "seeds":
        written = write_seed_pool(argv[1])
    else:
        written = write_photos(argv[1]) if argv[0] == "photos" else write_pages(argv[1])
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
