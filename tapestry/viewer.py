"""One self-contained HTML page that shows Documents as a person reads them.

Images bound to slots sit inside their sentence at word height (hover to enlarge); unbound
images stand on their own line. Roles are colour-coded: reference (blue), context (grey),
target (green); a target with no pixels yet is a dashed placeholder. Invalid samples appear as
red cards listing every problem. No scripts, no external files: the page can be mailed.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Iterable

from PIL import Image

from tapestry.document import Document, ImageSegment
from tapestry.storage import Loaded, image_bytes, image_format

MAX_SHOWN_SIDE = 512  # larger images are downscaled for the page only

_CSS = """
body{font:16px/1.6 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f4f5f7;color:#1d1f24}
header{padding:16px 24px;background:#1d1f24;color:#fff}
header h1{margin:0;font-size:20px} header p{margin:4px 0 0;color:#b9bec8;font-size:14px}
.legend span{display:inline-block;margin-right:14px}
.sw{display:inline-block;width:12px;height:12px;border-radius:3px;vertical-align:-1px;margin-right:4px}
main{padding:16px 24px;display:flex;flex-direction:column;gap:16px;max-width:980px}
.doc{background:#fff;border-radius:10px;padding:14px 18px;box-shadow:0 1px 3px rgba(0,0,0,.12)}
.doc h2{margin:0 0 6px;font-size:15px;font-family:ui-monospace,monospace}
.badge{display:inline-block;font-size:12px;padding:1px 8px;border-radius:10px;background:#e8eaef;margin-left:6px;font-family:system-ui,sans-serif}
.source{color:#6b7280;font-size:12px;font-family:ui-monospace,monospace}
.text{white-space:pre-wrap;margin:8px 0}
.text.target{background:#ecfdf3;border-left:4px solid #16a34a;padding:4px 10px}
.text.target::before{content:"target text  ";color:#16a34a;font-size:12px;font-weight:600}
img.slot{height:2.6em;vertical-align:middle;border-radius:4px;border:2px solid;margin:0 2px;
  transition:transform .15s;position:relative;image-rendering:pixelated}
img.slot:hover{transform:scale(4);z-index:10;box-shadow:0 4px 16px rgba(0,0,0,.35)}
figure{display:inline-block;margin:8px 12px 8px 0;vertical-align:top}
figure img{max-width:256px;max-height:256px;border-radius:6px;border:3px solid;image-rendering:pixelated;min-width:96px}
figcaption{font-size:12px;color:#4b5563}
.reference{border-color:#2563eb!important} .context{border-color:#9ca3af!important} .target{border-color:#16a34a!important}
.placeholder{display:inline-flex;align-items:center;justify-content:center;width:128px;height:128px;
  border:3px dashed #16a34a;border-radius:6px;color:#16a34a;font-size:13px;text-align:center}
.slot.placeholder{width:2.6em;height:2.6em;font-size:10px;border-width:2px;vertical-align:middle}
details{margin-top:6px;font-size:12px} pre{white-space:pre-wrap;word-break:break-word;background:#f6f8fa;padding:8px;border-radius:6px}
.invalid{border-left:6px solid #dc2626} .invalid li{color:#991b1b;font-family:ui-monospace,monospace;font-size:13px}
"""


def _data_uri(segment: ImageSegment) -> str | None:
    data = image_bytes(segment)
    if data is None:
        return None
    fmt = image_format(data)
    if segment.image is not None and max(segment.image.size) > MAX_SHOWN_SIDE:
        thumb = segment.image.copy()
        thumb.thumbnail((MAX_SHOWN_SIDE, MAX_SHOWN_SIDE), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        fmt = "JPEG" if fmt == "JPEG" else "PNG"
        thumb.save(buffer, format=fmt)
        data = buffer.getvalue()
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}.get(fmt, "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _label(segment: ImageSegment, index: int) -> str:
    parts = [segment.role]
    if segment.name:
        parts.append(segment.name)
    if segment.width and segment.height:
        parts.append(f"{segment.width}×{segment.height}")
    return f"segments[{index}] · " + " · ".join(parts)


def _image_html(segment: ImageSegment, index: int, inline: bool) -> str:
    label = html.escape(_label(segment, index))
    uri = _data_uri(segment)
    attrs = f'data-segment="{index}" data-role="{segment.role}" title="{label}"'
    if inline:
        if uri is None:
            return f'<span class="slot placeholder" {attrs}>target</span>'
        return f'<img class="slot {segment.role}" src="{uri}" alt="{label}" {attrs}>'
    body = (f'<img class="{segment.role}" src="{uri}" alt="{label}" {attrs}>' if uri is not None
            else f'<span class="placeholder" {attrs}>target<br>(to be generated)</span>')
    return f"<figure>{body}<figcaption>{label}</figcaption></figure>"


def document_html(doc: Document, source: str) -> str:
    bindings = doc.bindings()
    bound = {b.image_segment for b in bindings}
    by_segment: dict[int, list] = {}
    for b in bindings:
        by_segment.setdefault(b.segment, []).append(b)
    body: list[str] = []
    for i, segment in enumerate(doc.segments):
        if isinstance(segment, ImageSegment):
            if i not in bound:
                body.append(_image_html(segment, i, inline=False))
            continue
        pieces: list[str] = []
        cursor = 0
        for b in by_segment.get(i, []):
            pieces.append(html.escape(segment.text[cursor : b.slot.start]))
            image = doc.segments[b.image_segment]
            assert isinstance(image, ImageSegment)
            pieces.append(_image_html(image, b.image_segment, inline=True))
            cursor = b.slot.end
        pieces.append(html.escape(segment.text[cursor:]))
        css = "text target" if segment.role == "target" else "text"
        body.append(f'<p class="{css}" data-segment="{i}">{"".join(pieces)}</p>')
    badges = [f'<span class="badge">{html.escape(doc.layout())}</span>']
    toy = doc.meta.get("toyworld") if isinstance(doc.meta.get("toyworld"), dict) else None
    if toy:
        for key in ("task", "layout", "split"):
            if key in toy:
                badges.append(f'<span class="badge">{html.escape(str(key))}: {html.escape(str(toy[key]))}</span>')
    meta = ""
    if doc.meta:
        meta = ("<details><summary>metadata</summary><pre>"
                f"{html.escape(json.dumps(doc.meta, indent=1, ensure_ascii=False))}</pre></details>")
    return (f'<section class="doc"><h2>{html.escape(doc.id)}{"".join(badges)}</h2>'
            f'<div class="source">{html.escape(source)}</div>{"".join(body)}{meta}</section>')


def invalid_html(loaded: Loaded) -> str:
    items = "".join(f"<li>{html.escape(str(p))}</li>" for p in loaded.problems)
    return (f'<section class="doc invalid"><h2>invalid sample</h2>'
            f'<div class="source">{html.escape(loaded.source)}</div><ul>{items}</ul></section>')


def render_page(samples: Iterable[Loaded], title: str = "tapestry documents") -> str:
    cards: list[str] = []
    shown = invalid = 0
    for loaded in samples:
        if loaded.document is not None and not loaded.problems:
            cards.append(document_html(loaded.document, loaded.source))
            shown += 1
        else:
            cards.append(invalid_html(loaded))
            invalid += 1
    summary = f"{shown} document(s)" + (f", {invalid} invalid" if invalid else "")
    legend = ('<p class="legend"><span><i class="sw" style="background:#2563eb"></i>reference</span>'
              '<span><i class="sw" style="background:#9ca3af"></i>context</span>'
              '<span><i class="sw" style="background:#16a34a"></i>target</span>'
              f"<span>{html.escape(summary)}</span></p>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{html.escape(title)}</h1>{legend}</header>"
            f"<main>{''.join(cards)}</main></body></html>\n")
