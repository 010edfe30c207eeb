"""Turning HTTP request bodies into Documents and generation options — and refusing bad ones.

Everything a client can get wrong ends here as one `APIError` (HTTP status, OpenAI-style type,
the parameter at fault, a message that says how to fix it), before any generation starts.
Images only ever arrive as bytes (data URIs or multipart files): a request can never name a path
the server would read.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

from tapestry.document import Document, ImageSegment, Limits, TextSegment, from_markup, parse_document
from tapestry.errors import TapestryError
from tapestry.storage import ImageRefused, decode_image


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param, code=code)


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for (DESIGN §13). Every bound is checked before work starts."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_images_in: int = 8  # images attached to one request
    max_pixels_in: int = 4096 * 4096  # per attached image, checked from its header before decoding
    max_image_bytes: int = 8 * 1024 * 1024
    max_side_out: int = 1024  # generated image side
    max_steps: int = 100
    max_new_tokens: int = 1024
    max_images_out: int = 8
    max_n: int = 4  # images per /v1/images request
    max_text_chars: int = 32_000
    max_batch: int = 16  # generations that run (and batch) at once
    max_queue: int = 64  # generations waiting beyond those; more -> 429
    timeout_s: float = 300.0  # per request, queueing included

    def document_limits(self) -> Limits:
        return Limits(max_images=self.max_images_in + self.max_images_out + 1, max_text_chars=self.max_text_chars,
                      max_pixels=self.max_pixels_in, max_image_bytes=self.max_image_bytes)


_DATA_URI = re.compile(r"^data:(image/(?:png|jpeg|jpg|webp));base64,(.*)$", re.S | re.I)


def decode_data_uri(value: Any, param: str, limits: ServeLimits) -> Image.Image:
    """`data:image/png;base64,...` -> RGB image, checked against the pixel and byte limits."""
    if not isinstance(value, str):
        raise bad(f"{param} must be a data URI string (data:image/png;base64,...)", param)
    match = _DATA_URI.match(value.strip())
    if not match:
        if value.startswith(("http://", "https://")):
            raise bad(f"{param}: the server fetches no URLs; send the image as a data URI "
                      "(data:image/png;base64,...)", param)
        raise bad(f"{param}: the server reads no files; send the image as a data URI "
                  "(data:image/png;base64,...) or as a multipart file", param)
    try:
        data = base64.b64decode(match.group(2), validate=False)
    except (binascii.Error, ValueError):
        raise bad(f"{param}: the data URI is not valid base64", param) from None
    return decode_bytes(data, param, limits)


def decode_bytes(data: bytes, param: str, limits: ServeLimits) -> Image.Image:
    try:
        return decode_image(data, limits.document_limits())
    except ImageRefused as e:
        raise bad(f"{param}: {e}", param) from None


def encode_image(image: Image.Image, fmt: str = "png") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format={"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt])
    return buffer.getvalue()


def b64(image: Image.Image, fmt: str = "png") -> str:
    return base64.b64encode(encode_image(image, fmt)).decode("ascii")


def data_uri(image: Image.Image, fmt: str = "png") -> str:
    return f"data:image/{fmt};base64,{b64(image, fmt)}"


# ---------------------------------------------------------------------------- options
# Generation options a request may set, with their JSON types; the server maps them 1:1 onto
# `Pipeline.options` (the same names the CLI spells with dashes).
OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "seed": (int,), "steps": (int,), "guidance": (str,), "guidance_scales": (dict,),
    "temperature": (int, float), "top_p": (int, float), "max_new_tokens": (int,), "max_images": (int,),
    "image_size": (list,), "shift": (int, float),
}


def check_options(raw: dict, limits: ServeLimits, prefix: str = "options") -> dict:
    """A dict of generation options, typed and bounded; unknown keys are refused."""
    if not isinstance(raw, dict):
        raise bad(f"'{prefix}' must be an object", prefix)
    out: dict = {}
    for key, value in raw.items():
        param = f"{prefix}.{key}" if prefix else key
        if key not in OPTION_TYPES:
            raise bad(f"unknown option {key!r} (allowed: {', '.join(sorted(OPTION_TYPES))})", param, "unknown_parameter")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, OPTION_TYPES[key]):
            raise bad(f"{param} must be {'/'.join(t.__name__ for t in OPTION_TYPES[key])}, got {type(value).__name__}", param)
        out[key] = value
    if "steps" in out and not 1 <= out["steps"] <= limits.max_steps:
        raise bad(f"steps must be between 1 and {limits.max_steps}, got {out['steps']}", _p(prefix, "steps"))
    if "max_new_tokens" in out and not 0 <= out["max_new_tokens"] <= limits.max_new_tokens:
        raise bad(f"max_new_tokens must be between 0 and {limits.max_new_tokens}, got {out['max_new_tokens']}",
                  _p(prefix, "max_new_tokens"))
    if "max_images" in out and not 0 <= out["max_images"] <= limits.max_images_out:
        raise bad(f"max_images must be between 0 and {limits.max_images_out}, got {out['max_images']}",
                  _p(prefix, "max_images"))
    if "image_size" in out:
        size = out["image_size"]
        if (len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)
                or not all(1 <= s <= limits.max_side_out for s in size)):
            raise bad(f"image_size must be [height, width], each 1..{limits.max_side_out} pixels", _p(prefix, "image_size"))
        out["image_size"] = tuple(size)
    return out


def _p(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def apply_defaults(pipeline, overrides: dict, limits: ServeLimits) -> dict:
    """Check the merged options the way the engine will (guidance scales, sampling) and bound
    the defaults too: a checkpoint whose default token budget exceeds the server's is capped."""
    try:
        options = pipeline.options(**overrides)
    except TapestryError as e:
        raise bad(str(e), "options") from None
    except TypeError as e:
        raise bad(f"bad generation options: {e}", "options") from None
    fixed = dict(overrides)
    if options.max_new_tokens > limits.max_new_tokens:
        fixed["max_new_tokens"] = limits.max_new_tokens
    if options.max_images > limits.max_images_out:
        fixed["max_images"] = limits.max_images_out
    if options.steps > limits.max_steps:
        raise bad(f"the checkpoint's default of {options.steps} steps exceeds this server's limit of "
                  f"{limits.max_steps}; pass steps", "options.steps")
    return fixed


# -------------------------------------------------------------------------- documents
def document_from_json(obj: Any, limits: ServeLimits, param: str = "document") -> Document:
    """A Document object whose images carry their pixels as data URIs in `src`."""
    if not isinstance(obj, dict):
        raise bad(f"'{param}' must be a Document object ({{\"id\", \"segments\"}})", param)
    raw = dict(obj)
    segments = raw.get("segments")
    images: dict[int, Image.Image] = {}
    if isinstance(segments, list):
        segments = [dict(s) if isinstance(s, dict) else s for s in segments]
        raw["segments"] = segments
        count = 0
        for i, segment in enumerate(segments):
            if isinstance(segment, dict) and segment.get("type") == "image" and "src" in segment:
                count += 1
                if count > limits.max_images_in:
                    raise bad(f"more than {limits.max_images_in} images in one request", f"{param}.segments[{i}]")
                images[i] = decode_data_uri(segment["src"], f"{param}.segments[{i}].src", limits)
                segment["src"] = f"inline-{i}.png"  # validated as a stand-in; the pixels replace it
    doc, problems = parse_document(raw, "<request>", limits.document_limits())
    if problems or doc is None:
        first = problems[0]
        where = param + (f".segments[{first.segment}]" if first.segment is not None else "")
        if first.field:
            where += f".{first.field}"
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise bad(f"{where}: {first.reason}{more}", where)
    for i, image in images.items():
        segment = doc.segments[i]
        segment.src, segment.image = None, image
        segment.width, segment.height = image.width, image.height
    check_targets(doc, limits, param)
    return doc


def check_targets(doc: Document, limits: ServeLimits, param: str = "document") -> None:
    targets = [s for s in doc.images() if s.role == "target"]
    if len(targets) > limits.max_images_out:
        raise bad(f"{len(targets)} target images exceed the limit of {limits.max_images_out}", param)
    for i, segment in enumerate(doc.segments):
        if isinstance(segment, ImageSegment) and segment.role == "target":
            for side in (segment.width, segment.height):
                if side is not None and not 1 <= side <= limits.max_side_out:
                    raise bad(f"target image sides must be 1..{limits.max_side_out} pixels", f"{param}.segments[{i}]")


def document_from_markup(markup: Any, images: list[Image.Image] | dict[str, Image.Image], limits: ServeLimits,
                         param: str = "markup") -> Document:
    if not isinstance(markup, str) or not markup.strip():
        raise bad(f"'{param}' must be a non-empty string", param)
    if len(markup) > limits.max_text_chars:
        raise bad(f"'{param}' is {len(markup)} characters, over the limit of {limits.max_text_chars}", param)
    if len(images) > limits.max_images_in:
        raise bad(f"{len(images)} images exceed the limit of {limits.max_images_in} per request", "images")
    if any(not isinstance(image, Image.Image) for image in (images.values() if isinstance(images, dict) else images)):
        raise bad("images must be decoded pixels", "images")  # never paths: from_markup would read them
    try:
        return from_markup(markup, images, id="request", source="<request>")
    except TapestryError as e:
        raise bad(_strip_source(str(e)), param) from None


def _strip_source(message: str) -> str:
    return message.removeprefix("<request>: ")


def prompt_with_references(prompt: str, images: list[Image.Image], limits: ServeLimits,
                           target: tuple[int, int] | None) -> Document:
    """The images API: a prompt (slots bind the images) or image-first references, then one target."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("'prompt' must be a non-empty string", "prompt")
    if len(prompt) > limits.max_text_chars:
        raise bad(f"'prompt' is {len(prompt)} characters, over the limit of {limits.max_text_chars}", "prompt")
    if len(images) > limits.max_images_in:
        raise bad(f"{len(images)} images exceed the limit of {limits.max_images_in} per request", "image")
    if "[img" in prompt or "<img:" in prompt:
        doc = document_from_markup(prompt, images, limits, "prompt")
    else:
        segments = [ImageSegment("reference", name=f"img{k}", image=image, width=image.width, height=image.height)
                    for k, image in enumerate(images, start=1)]
        doc = Document("request", segments + [TextSegment(prompt)])
    height, width = target if target else (None, None)
    doc.segments.append(ImageSegment("target", name="output", width=width, height=height))
    problems = doc.validate("<request>", limits.document_limits())
    if problems:
        raise bad(_strip_source(str(problems[0])), "prompt")
    return doc


def parse_size(value: Any, limits: ServeLimits, param: str = "size") -> tuple[int, int] | None:
    """OpenAI's "WIDTHxHEIGHT" (or "auto") -> (height, width) or None for the checkpoint's size."""
    if value is None or value == "auto":
        return None
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value) if isinstance(value, str) else None
    if not match:
        raise bad(f"size must be 'WIDTHxHEIGHT' (e.g. '64x64') or 'auto', got {value!r}", param)
    width, height = int(match.group(1)), int(match.group(2))
    if not (1 <= width <= limits.max_side_out and 1 <= height <= limits.max_side_out):
        raise bad(f"size sides must be 1..{limits.max_side_out} pixels, got {value!r}", param)
    return height, width


def document_to_json(doc: Document) -> dict:
    """The Document as JSON with every image's pixels inline as a PNG data URI in `src`."""
    out = doc.to_dict()
    for item, segment in zip(out["segments"], doc.segments):
        if isinstance(segment, ImageSegment) and segment.image is not None:
            item["src"] = data_uri(segment.image)
            item["width"], item["height"] = segment.image.width, segment.image.height
    return out
