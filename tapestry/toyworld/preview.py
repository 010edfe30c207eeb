"""Pictures of ToyWorld Documents for people: one strip per Document (images in reading order,
text wrapped beneath, targets outlined), stacked into a sheet."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

from tapestry.document import Document, ImageSegment, TextSegment

ROLE_COLOURS = {"reference": (70, 130, 220), "context": (120, 120, 120), "target": (220, 120, 30)}


def _pixels(segment: ImageSegment) -> Image.Image | None:
    if segment.image is not None:
        return segment.image.convert("RGB")
    return None


def document_strip(doc: Document, tile: int = 96, width_chars: int = 70) -> Image.Image:
    """Images of `doc` in segment order (border colour = role), its text beneath."""
    images = [s for s in doc.segments if isinstance(s, ImageSegment)]
    texts = [("» " if s.role == "target" else "") + s.text for s in doc.segments if isinstance(s, TextSegment)]
    font = ImageFont.load_default()
    lines = []
    for text in texts:
        lines += textwrap.wrap(text, width_chars) or [""]
    pad, line_h = 6, 12
    width = max(pad + len(images) * (tile + pad), 6 * width_chars + 2 * pad)
    height = pad + tile + pad + 14 + len(lines) * line_h + pad
    sheet = Image.new("RGB", (width, height), (250, 250, 248))
    draw = ImageDraw.Draw(sheet)
    x = pad
    for segment in images:
        pixels = _pixels(segment)
        colour = ROLE_COLOURS.get(segment.role, (0, 0, 0))
        draw.rectangle((x - 3, pad - 3, x + tile + 2, pad + tile + 2), outline=colour, width=3)
        if pixels is not None:
            sheet.paste(pixels.resize((tile, tile), Image.NEAREST), (x, pad))
        draw.text((x, pad + tile + 3), segment.role, fill=colour, font=font)
        x += tile + pad
    y = pad + tile + pad + 14
    for line in lines:
        draw.text((pad, y), line, fill=(20, 20, 20), font=font)
        y += line_h
    return sheet


def sheet(docs: list[Document], tile: int = 96) -> Image.Image:
    """Strips of several Documents stacked vertically."""
    strips = [document_strip(d, tile) for d in docs]
    width = max(s.width for s in strips)
    out = Image.new("RGB", (width, sum(s.height for s in strips) + 2 * len(strips)), (200, 200, 200))
    y = 0
    for s in strips:
        out.paste(s, (0, y))
        y += s.height + 2
    return out


def atlas(side: int = 64) -> Image.Image:
    """Every shape (columns) with every pattern (rows), colours cycling, on each background kind."""
    from tapestry.toyworld.render import render_scene
    from tapestry.toyworld.spec import COLOURS, PATTERNS, SHAPES, Background, Entity, PlacedEntity, Scene

    backgrounds = [Background("plain", ("stone",)), Background("grid", ("slate",)),
                   Background("gradient", ("sand", "dusk"), "diagonal"), Background("noise", ("moss",), seed=3)]
    out = Image.new("RGB", (len(SHAPES) * side, len(PATTERNS) * side))
    for r, pattern in enumerate(PATTERNS):
        for c, shape in enumerate(SHAPES):
            colour = COLOURS[(r * 3 + c) % len(COLOURS)]
            scene = Scene(backgrounds[(r + c) % 4], (PlacedEntity(Entity(shape, colour, pattern), 4, "large"),))
            out.paste(render_scene(scene, side * 3).crop((side, side, 2 * side, 2 * side)), (c * side, r * side))
    return out


def write_doc_images(out_dir: str) -> list[str]:
    """The pictures in docs/toyworld.md: the atlas and a sheet of test documents per task."""
    from pathlib import Path

    from tapestry.toyworld import tasks

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    atlas().save(out / "toyworld-atlas.png", optimize=True)
    written.append(str(out / "toyworld-atlas.png"))
    picks = {"compose": [(0, "inline"), (0, "image-first"), (3, "inline")], "story": [(2, None), (5, None)],
             "edit": [(1, "inline"), (4, "image-first")], "understand": [(0, "inline"), (2, "image-first")],
             "howto": [(0, None), (2, None)]}
    for task, chosen in picks.items():
        docs = [tasks.sample(task, "test", i, layout=layout) for i, layout in chosen]
        path = out / f"toyworld-{task}.png"
        sheet(docs, tile=80).save(path, optimize=True)
        written.append(str(path))
    return written


if __name__ == "__main__":  # python -m tapestry.toyworld.preview docs/img
    import sys

    for path in write_doc_images(sys.argv[1] if len(sys.argv) > 1 else "docs/img"):
        print(path)
