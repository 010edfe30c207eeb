"""What generation reports while it runs: the CLI, the Python API and the server all follow these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class TextDelta:
    text: str
    segment: int  # index of the output segment the text belongs to
    type: str = field(default="text_delta", init=False)


@dataclass
class ImageStarted:
    index: int  # 0-based count of images generated so far in this document
    segment: int
    height: int
    width: int
    steps: int
    type: str = field(default="image_started", init=False)


@dataclass
class ImageProgress:
    index: int
    step: int  # 1-based
    steps: int
    # The clean image predicted at this step, x0 = x_t - t·v, in the runtime's latent shape:
    # `Pipeline.decode_latents(latents, (height, width))` turns it into a preview.
    latents: Any = field(default=None, repr=False)
    type: str = field(default="image_progress", init=False)


@dataclass
class ImageDone:
    index: int
    segment: int
    image: Image.Image = field(repr=False)
    latents: Any = field(default=None, repr=False)  # before decoding, in the runtime's latent shape
    type: str = field(default="image_done", init=False)


@dataclass
class Done:
    document: Any = field(repr=False)  # the finished tapestry.document.Document
    stop_reason: str = "eos"  # eos | max_images | max_tokens | targets_filled
    timings: dict[str, float] = field(default_factory=dict)
    type: str = field(default="done", init=False)


@dataclass
class Error:
    message: str
    type: str = field(default="error", init=False)


Event = TextDelta | ImageStarted | ImageProgress | ImageDone | Done | Error


def event_to_json(event: Event) -> dict[str, Any]:
    """A JSON-safe view (images and documents are referred to, not embedded)."""
    out = {k: v for k, v in event.__dict__.items() if k not in ("image", "latents", "document")}
    if isinstance(event, ImageDone):
        out["size"] = list(event.image.size)
    if isinstance(event, Done):
        out["id"] = event.document.id
    return out
