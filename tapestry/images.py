"""Images from strangers: size limits, and decoding that refuses bombs and corrupt files.

Below both tapestry.document (which loads the images `from_markup` is given by path) and
tapestry.storage (which reads Documents from disk), so neither imports the other.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tapestry.errors import TapestryError

FORMAT_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
EXTENSION_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}

@dataclass(frozen=True)
class Limits:
    """Bounds every loader enforces before doing real work (DESIGN §13)."""

    max_images: int = 64  # image segments per document
    max_text_chars: int = 200_000  # all text segments of a document together
    max_segments: int = 1024
    max_pixels: int = 36_000_000  # decompression-bomb guard: refuse before decoding
    max_image_bytes: int = 64 * 1024 * 1024
    max_side: int = 16_384
    max_meta_bytes: int = 1_000_000


DEFAULT_LIMITS = Limits()


class ImageRefused(TapestryError):
    """An image file was refused; the message is the reason (the caller adds the location)."""


def decode_image(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    """Bytes -> fully decoded RGB image, or ImageRefused with the reason. Never anything else."""
    if len(data) > limits.max_image_bytes:
        raise ImageRefused(f"file of {len(data)} bytes exceeds the limit of {limits.max_image_bytes}")
    try:
        # Image.open reads the header only, so the size check below runs before decoding.
        # PIL's own bomb warning is silenced: our limit (stricter by default) decides.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            if image.format not in FORMAT_EXTENSIONS:
                raise ImageRefused(
                    f"unsupported image format {image.format or 'unknown'} (use PNG, JPEG or WebP)")
            width, height = image.size
            if width < 1 or height < 1:
                raise ImageRefused(f"image has no pixels ({width}x{height})")
            if width * height > limits.max_pixels or max(width, height) > limits.max_side:
                raise ImageRefused(
                    f"decompression bomb refused: {width}x{height} = {width * height:,} pixels "
                    f"exceeds the limit of {limits.max_pixels:,} pixels / {limits.max_side} per side")
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                # Transparent pixels shown on white, as a viewer would show them.
                rgba = image.convert("RGBA")
                flat = Image.new("RGB", rgba.size, (255, 255, 255))
                flat.paste(rgba, mask=rgba.getchannel("A"))
                return flat
            return image.convert("RGB")
    except ImageRefused:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRefused(f"decompression bomb refused: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types on hostile bytes; this is the edge
        reason = str(e) or type(e).__name__
        if "cannot identify image file" in reason:
            reason = "not an image file PIL can identify"
        raise ImageRefused(f"corrupt or truncated image: {reason}") from None


def load_image(path: str | os.PathLike, limits: Limits = DEFAULT_LIMITS) -> tuple[Image.Image, bytes]:
    """A file the user named explicitly (CLI `--image`): decoded image and its bytes."""
    path = Path(path)
    try:
        if not path.is_file():
            raise TapestryError(f"{path}: image file not found")
        size = path.stat().st_size
        if size > limits.max_image_bytes:
            raise TapestryError(f"{path}: file of {size} bytes exceeds the limit of {limits.max_image_bytes}")
        data = path.read_bytes()
    except OSError as e:
        raise TapestryError(f"{path}: cannot read image: {e.strerror or e}") from None
    try:
        return decode_image(data, limits), data
    except ImageRefused as e:
        raise TapestryError(f"{path}: {e}") from None
