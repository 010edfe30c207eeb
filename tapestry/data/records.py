"""What flows between the parts of a data engine: inputs, jobs for workers, and their results."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from tapestry.data.operators.base import Rejection
from tapestry.document import Document, ImageSegment


def printable(path: str) -> str:
    """`path` as text that can be written anywhere: bytes that are not UTF-8 (possible in Linux
    file names, kept by Python as surrogates) become backslash escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class InputItem:
    """One input file: `path` to open it, `shown` to write it into logs and provenance, and `key`
    (its resolved path, printable) to find it in the resume manifest."""

    index: int
    path: str
    key: str
    shown: str

    @classmethod
    def of(cls, index: int, path: str) -> "InputItem":
        import os

        return cls(index, path, printable(os.path.realpath(path)), printable(path))


@dataclass
class InputResult:
    """Everything a worker returns for one input. `failed` marks inputs that could not be read at
    all (bad files); `stopped` marks inputs left unfinished (the provider budget ran out), which
    are not recorded as done so a rerun picks them up."""

    key: str
    path: str
    docs: list[Document] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    usage: dict[str, float] = field(default_factory=dict)
    video_seconds: float = 0.0
    failed: bool = False
    stopped: str | None = None

    def summary(self) -> dict[str, Any]:
        """The manifest's record of this input (no pixels)."""
        out: dict[str, Any] = {"key": self.key, "path": self.path, "docs": len(self.docs),
                               "video_seconds": round(self.video_seconds, 3),
                               "rejections": [r.to_json() for r in self.rejections],
                               "stats": self.stats, "usage": self.usage}
        if self.failed:
            out["failed"] = True
        return out


@dataclass(frozen=True)
class ImageEncoding:
    """How output images are stored in shards: JPEG (video frames are lossy already; 5-10x smaller
    than PNG and faster to write) or PNG."""

    format: str = "jpeg"  # "jpeg" or "png"
    quality: int = 90

    def __post_init__(self) -> None:
        if self.format not in ("jpeg", "png"):
            raise ValueError(f"image format must be 'jpeg' or 'png', got {self.format!r}")

    def segment(self, pixels: np.ndarray, role: str, name: str | None = None,
                meta: dict[str, Any] | None = None) -> ImageSegment:
        """An image segment holding encoded bytes only (cheap to pickle back from a worker)."""
        image = Image.fromarray(np.ascontiguousarray(pixels))
        buffer = io.BytesIO()
        if self.format == "jpeg":
            image.save(buffer, format="JPEG", quality=self.quality)
        else:
            image.save(buffer, format="PNG")
        return ImageSegment(role=role, name=name, width=image.width, height=image.height,  # type: ignore[arg-type]
                            meta=meta or {}, encoded=buffer.getvalue())


def number_inputs(paths: list[str], noun: str) -> tuple[list[InputItem], list[InputResult]]:
    """Numbers as inputs: key `{noun}:N` (resume skips finished ones), shown `{noun}-NNNNNN`."""
    items: list[InputItem] = []
    failed: list[InputResult] = []
    seen: set[int] = set()
    for raw in paths:
        try:
            number = int(str(raw))
            if number < 0:
                raise ValueError
        except ValueError:
            failed.append(InputResult(f"{noun}:{raw}", str(raw), failed=True, rejections=[Rejection(
                "inputs", f"bad-{noun}-number", f"{raw!r} is not a {noun} number (0, 1, 2, ...)", failure=True)]))
            continue
        if number not in seen:
            seen.add(number)
            items.append(InputItem(len(items), str(number), f"{noun}:{number}", f"{noun}-{number:06d}"))
    return items, failed
