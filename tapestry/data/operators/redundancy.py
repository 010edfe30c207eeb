"""Redundancy filter: cosine similarity of image embeddings between neighbouring kept frames
(ILLUME-X compares DINOv2 features of adjacent frames and drops near-duplicates).

The default embedder is computed locally and needs no weights: a zero-mean 16x16 grey thumbnail
(layout) joined with an 8x4x4 HSV colour histogram (palette). A DINOv2 or CLIP checkpoint
replaces it with `embedder = 'local:/dir'` (batched over a shot's frames, see
`tapestry.data.providers.local`), any other model with `'torch:/dir'` or
`'python:module:function'` (see `tapestry.data.plugins`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from tapestry.data.operators.base import Rejected
from tapestry.data.operators.video import Frame

Embedder = Callable[[np.ndarray], np.ndarray]


def thumbnail_histogram_embedding(rgb: np.ndarray) -> np.ndarray:
    import cv2

    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    thumb = cv2.resize(gray, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32).reshape(-1)
    thumb -= thumb.mean()
    thumb /= np.linalg.norm(thumb) + 1e-6
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, [8, 4, 4], [0, 180, 0, 256, 0, 256]).reshape(-1)
    hist = np.sqrt(hist / (hist.sum() + 1e-6))  # Hellinger: cosine of sqrt-histograms
    return np.concatenate([thumb, hist.astype(np.float32)])


class BatchedEmbedder:
    """A local embedder as a one-image callable, keeping its batched `embed` for `prime`."""

    def __init__(self, model: Any):
        self.model = model

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return self.model.embed([rgb])[0]


@dataclass(frozen=True)
class Redundancy:
    name: ClassVar[str] = "redundancy"
    version: ClassVar[str] = "1"
    local_fields: ClassVar[dict[str, str]] = {"embedder": "embedder"}

    embedder: str = "thumbnail-histogram"
    max_cosine: float = 0.99  # above: the later frame adds nothing
    batch_size: int = 16  # local embedder: frames per forward pass

    def embedder_fn(self) -> Embedder:
        if self.embedder == "thumbnail-histogram":
            return thumbnail_histogram_embedding
        if self.embedder.startswith("local:"):
            from tapestry.data.providers.local import LocalEmbedder

            return BatchedEmbedder(LocalEmbedder(self.embedder, self.name))
        from tapestry.data.plugins import load_image_model

        return load_image_model(self.embedder)

    def embedding(self, frame: Frame, embed: Embedder) -> np.ndarray:
        key = f"embedding:{self.embedder}"
        if key not in frame.derived:
            vector = np.asarray(embed(frame.work_rgb), dtype=np.float32).reshape(-1)
            frame.derived[key] = vector / (np.linalg.norm(vector) + 1e-8)
        return frame.derived[key]

    def prime(self, frames: list[Frame], embed: Embedder) -> None:
        """Embed the frames not embedded yet in batches, when the embedder takes batches."""
        key = f"embedding:{self.embedder}"
        todo = [f for f in frames if key not in f.derived]
        if not todo or not isinstance(embed, BatchedEmbedder):
            return
        for frame, vector in zip(todo, embed.model.embed([f.work_rgb for f in todo], self.batch_size)):
            frame.derived[key] = vector / (np.linalg.norm(vector) + 1e-8)

    def measure(self, source: Frame, target: Frame, embed: Embedder) -> dict[str, float]:
        a, b = self.embedding(source, embed), self.embedding(target, embed)
        if a.shape != b.shape:
            raise ValueError(f"embedder returned vectors of different sizes: {a.shape} and {b.shape}")
        return {"cosine": round(float(a @ b), 5)}

    def check(self, scores: dict[str, float], where: str = "") -> None:
        if scores["cosine"] > self.max_cosine:
            raise Rejected(self.name, "redundant",
                           f"{where}embedding cosine {scores['cosine']:.4f} > {self.max_cosine:g}")
