"""The web engine (`web-howto`) on pages written with the real web's mess (tapestry.data.samples):
navigation and footer, ads and a tracker pixel, icons and a logo, a QR code, a scanned leaflet, a
near-duplicate image, images before their step, broken links; HTML, markdown and WARC inputs;
rewrite validation and repair, dialogs, bad inputs, resume and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trafilatura")
pytest.importorskip("imagehash")
pytest.importorskip("warcio")

from typer.testing import CliRunner  # noqa: E402

from tapestry.data import samples  # noqa: E402
from tapestry.data.cli import app  # noqa: E402
from tapestry.data.engine import EngineOptions, run  # noqa: E402
from tapestry.data.manifest import STATE_DIR  # noqa: E402
from tapestry.data.operators.base import Rejected  # noqa: E402
from tapestry.data.operators.howto import Rewrite  # noqa: E402
from tapestry.data.operators.web_images import Reorder, WebImageFilter  # noqa: E402
from tapestry.data.operators.webpage import markdown_blocks  # noqa: E402
from tapestry.data.pipelines import build_config  # noqa: E402
from tapestry.data.providers import ProviderConfig  # noqa: E402
from tapestry.document import ImageSegment, TextSegment  # noqa: E402
from tapestry.storage import scan  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    samples.write_pages(root)
    return root


def options(out: Path, overrides=(), **kwargs) -> EngineOptions:
    return EngineOptions("web-howto", build_config("web-howto", overrides=list(overrides)),
                         kwargs.pop("provider", ProviderConfig()), out, workers=kwargs.pop("workers", 1),
                         progress=False, **kwargs)


def documents(out: Path) -> dict:
    docs = {}
    for loaded in scan(out):
        assert not loaded.problems, loaded.problems
        docs[loaded.document.id] = loaded.document
    return docs


def rejection_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / STATE_DIR / "rejections.jsonl").read_text().splitlines()]


def reading(doc) -> list[str]:
    return [f"IMG {s.meta['src']}" if isinstance(s, ImageSegment) else s.text for s in doc.segments]


@pytest.fixture(scope="module")
def howto_run(site, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    summary = run([str(site)], options(out))
    return summary, out


def test_every_mess_of_the_html_page_is_handled(howto_run):
    summary, out = howto_run
    assert summary["exit_code"] == 0 and summary["inputs"]["done"] == 3 and summary["documents"] == 4
    log = [r for r in rejection_log(out) if Path(r["input"]).name == "coffee.html"]
    by_image = {r["record"].split("/")[1]: f"{r['stage']}:{r['code']}" for r in log}
    assert by_image == {
        "img1": "image-filter:icon",  # brand-logo.png, named a logo
        "img2": "image-filter:icon",  # tip.png, 96 px and square
        "img4": "dedupe:near-duplicate",  # step1-copy.jpg, re-encoded smaller
        "img5": "image-filter:ad",  # .../ads/spring-sale.jpg
        "img7": "image-filter:broken",  # missing-step.jpg
        "img8": "image-filter:qr-code",  # app-qr.png
        "img9": "image-captions:category-document",  # leaflet.png, a page of text
        "img10": "image-filter:ad",  # the tracker pixel
    }
    assert not any(r.get("failure") for r in log)  # filters, not failures
    doc = next(d for d in documents(out).values() if d.id.startswith("coffee-"))
    text = " ".join(reading(doc))
    for gone in ("Home", "Privacy", "Copyright", "Advertisement", "https://", "Subscribe", "newsletter"):
        assert gone not in text, gone
    order = reading(doc)
    assert order[0] == "How to Make Pour-Over Coffee" and doc.segments[0].role == "context"
    # step1.jpg stood before "Step 1" on the page: it now follows the step that describes it
    brew = next(i for i, t in enumerate(order) if t.startswith("Heat the water"))
    assert order[brew + 1] == "IMG images/step1.jpg"
    cool = next(i for i, t in enumerate(order) if t.startswith("Let it cool"))
    assert order[cool + 1] == "IMG images/step2.jpg"
    assert doc.meta["images"] == {"found": 10, "kept": 2, "moved": 1}
    images = doc.images()
    assert all(s.role == "target" and s.meta["category"] == "photo" and s.meta["caption"] for s in images)


def test_markdown_and_warc_pages(howto_run):
    _, out = howto_run
    docs = documents(out)
    rocket = next(d for d in docs.values() if d.id.startswith("rocket-"))
    order = reading(rocket)
    pad = next(i for i, t in enumerate(order) if t.startswith("Find the pad"))
    assert order[pad + 1] == "IMG images/rocket.jpg"  # moved from under the title to its step
    assert not any("blog" in t for t in order)
    reasons = {f"{r['stage']}:{r['code']}" for r in rejection_log(out) if Path(r["input"]).name == "rocket.md"}
    assert reasons == {"image-filter:tiny", "dedupe:near-duplicate", "image-filter:broken"}
    warc = sorted(d for d in docs if d.startswith("crawl-"))
    assert len(warc) == 2
    cat = docs[warc[0]]
    assert cat.meta["source"]["url"] == "https://howto.example.org/cat-care"
    assert [s.meta["src"] for s in cat.images()] == ["https://howto.example.org/img/cat.jpg"]
    warc_log = {r["record"]: r["code"] for r in rejection_log(out) if Path(r["input"]).name == "crawl.warc.gz"}
    assert sorted(warc_log.values()) == ["ad", "broken"]  # gone.jpg is not in the archive; "Sponsored"


def test_dialog_turns_steps_into_a_conversation(site, tmp_path):
    out = tmp_path / "out"
    summary = run([str(site / "coffee.html")], options(out, ["dialog.enabled=true"]))
    assert summary["exit_code"] == 0
    [doc] = documents(out).values()
    assert doc.segments[0].text.startswith("User: ") and "pour-over coffee" in doc.segments[0].text.lower()
    assert doc.segments[1].text.startswith("Assistant: ") and doc.segments[1].role == "target"
    assert doc.meta["dialog"]["question"].endswith("?")


# --------------------------------------------------------------- operators
@pytest.mark.parametrize("src, alt, code", [
    ("https://ads.doubleclick.net/x.jpg", "", "ad"), ("https://t.example.com/pixel.gif?id=1", "", "ad"),
    ("images/a.jpg", "Advertisement", "ad"), ("images/a.jpg", "Sponsored content", "ad"),
    ("images/site-logo.png", "", "icon"), ("images/a.png", "share icon", "icon"),
])
def test_filters_by_url_and_alt_text(src, alt, code):
    with pytest.raises(Rejected) as raised:
        WebImageFilter().by_reference(src, alt)
    assert raised.value.rejection.code == code
    WebImageFilter().by_reference("images/step1.jpg", "pouring water over the grounds")  # passes


def test_filters_by_pixels():
    f = WebImageFilter()
    photo = np.asarray(samples._photo("coffee", (320, 240)))
    f.by_pixels(photo)  # a photo passes
    for rgb, code in ((photo[:40, :50], "tiny"), (np.asarray(samples.icon((1, 2, 3), 120)), "icon"),
                      (np.asarray(samples._photo("coffee", (900, 120))), "aspect"),
                      (np.asarray(samples.qr_code("hello")), "qr-code")):
        with pytest.raises(Rejected) as raised:
            f.by_pixels(rgb)
        assert raised.value.rejection.code == code


def test_reorder_moves_an_image_after_the_text_that_describes_it():
    items = [{"kind": "text", "text": "Gather the tools."},
             {"kind": "image", "key": "a", "describe": "pouring hot water over coffee grounds"},
             {"kind": "text", "text": "Pour hot water over the coffee grounds."},
             {"kind": "image", "key": "b", "describe": "a hammer and nails"},
             {"kind": "text", "text": "Serve it."}]
    ordered, moved = Reorder().order(items)
    assert [i.get("key", i.get("text")) for i in ordered] == [
        "Gather the tools.", "Pour hot water over the coffee grounds.", "a", "b", "Serve it."]
    assert moved == 1


def test_markdown_blocks_split_images_out_of_paragraphs():
    blocks = markdown_blocks("# Title\n\nDo this ![alt a](a.png) then [that](http://x.y).\n\n- one\n- two")
    assert [(b.kind, b.text, b.src) for b in blocks] == [
        ("heading", "Title", ""), ("text", "Do this", ""), ("image", "alt a", "a.png"), ("text", "then that.", ""),
        ("text", "one two", "")]


@pytest.mark.parametrize("answer, problem", [
    ({"title": "T", "steps": [{"text": "Do it.", "images": ["img9"]}]}, "which the page does not have"),
    ({"title": "T", "steps": [{"text": "A.", "images": ["img1"]}, {"text": "B.", "images": ["img1"]}]},
     "more than one step"),
    ({"title": "T", "steps": [{"text": "See https://x.example", "images": []}]}, "link or HTML"),
    ({"title": "T", "steps": []}, "non-empty list"),
])
def test_rewrite_check_names_each_mistake(answer, problem):
    with pytest.raises(ValueError) as raised:
        Rewrite().check(["img1", "img2"])(answer)
    assert problem in str(raised.value)


def test_malformed_rewrite_is_repaired_or_rejected_with_reason(site, tmp_path, monkeypatch):
    from tapestry.data.providers.offline import RESPONDERS

    good = RESPONDERS["howto-rewrite"]

    def once_wrong(request, rng):
        if len(request.messages) == 2:
            return '{"title": "x", "steps": [{"text": "Go to http://spam.example", "images": []}]}'
        return good(request, rng)

    monkeypatch.setitem(RESPONDERS, "howto-rewrite", once_wrong)
    repaired = run([str(site / "rocket.md")], options(tmp_path / "a"))
    assert repaired["exit_code"] == 0 and repaired["documents"] == 1
    monkeypatch.setitem(RESPONDERS, "howto-rewrite", lambda request, rng: "I cannot do that.")
    failed = run([str(site / "rocket.md")], options(tmp_path / "b"))
    assert failed["exit_code"] == 1 and failed["documents"] == 0
    assert failed["failures"] == {"rewrite:provider-bad-json": 1}
    entry = next(r for r in rejection_log(tmp_path / "b") if r.get("failure"))
    assert entry["record"].startswith("rocket-") and "holds no JSON" in entry["detail"]


# ----------------------------------------------------- bad inputs, resume, CLI
def test_bad_inputs_are_logged_with_their_reason(site, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.html").write_text("<html><body><nav>Home</nav></body></html>")
    (bad / "text-only.md").write_text("# Notes\n\n" + "Only words here, no pictures at all. " * 5)
    (bad / "garbage.warc.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"not really gzip" * 20)
    (bad / "nothing.warc").write_bytes(b"")
    out = tmp_path / "out"
    summary = run([str(bad)], options(out))
    assert summary["exit_code"] == 1 and summary["documents"] == 0
    reasons = {Path(r["input"]).name: (f"{r['stage']}:{r['code']}", bool(r.get("failure"))) for r in rejection_log(out)}
    assert reasons == {"empty.html": ("extract:too-little-text", False),
                       "text-only.md": ("page:too-few-images", False),
                       "garbage.warc.gz": ("extract:bad-warc", True),
                       "nothing.warc": ("extract:empty", True)}


def test_rerun_resumes_and_cli_prints_json(site, tmp_path):
    out = tmp_path / "out"
    first = CliRunner().invoke(app, ["web", str(site / "rocket.md"), "--out", str(out), "--json", "-w", "1"])
    assert first.exit_code == 0, first.output
    before = {k: d.to_json() for k, d in documents(out).items()}
    again = CliRunner().invoke(app, ["web", str(site / "rocket.md"), str(site / "crawl.warc.gz"), "--out", str(out),
                                     "--json", "-w", "1"])
    summary = json.loads(again.output.strip().splitlines()[-1])
    assert summary["inputs"]["skipped_as_done"] == 1 and summary["documents"] == 3
    after = {k: d.to_json() for k, d in documents(out).items()}
    assert all(after[k] == v for k, v in before.items())
    assert isinstance(documents(out)[next(iter(before))].segments[0], TextSegment)


@pytest.mark.slow
def test_local_and_ray_executors_write_identical_shards(site, tmp_path):
    pytest.importorskip("ray")
    # an input that fails (a symlink loop exists but cannot be opened, root included): both
    # executors must log it alike and exit 1
    loop = tmp_path / "loop.html"
    loop.symlink_to(loop)
    inputs = [str(site), str(loop)]
    local = run(inputs, options(tmp_path / "local", workers=2, shard_size=2))
    remote = run(inputs, options(tmp_path / "ray", workers=2, shard_size=2, executor="ray"))
    assert local["shards"] == remote["shards"] and len(local["shards"]) >= 2
    for name in local["shards"]:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    assert local["rejections"] == remote["rejections"] and remote["exit_code"] == 1


def test_page_images_never_come_from_outside_the_page_folder(tmp_path):
    from tapestry.data.operators.webpage import local_fetcher

    site = tmp_path / "site"
    (site / "images").mkdir(parents=True)
    (site / "images" / "ok.png").write_bytes(b"png bytes")
    (tmp_path / "secret.txt").write_text("secret")
    fetch = local_fetcher(site, max_bytes=1 << 20)
    assert fetch("images/ok.png") == b"png bytes" and fetch("/images/ok.png") == b"png bytes"
    for src in ("../secret.txt", "images/../../secret.txt", "%2e%2e/secret.txt", "https://example.com/a.png",
                "//example.com/a.png", "file:///etc/passwd", "images/missing.png"):
        assert fetch(src) is None, src
    assert fetch("data:image/png;base64,cG5n") == b"png"
