"""Per-frame quality: sharpness, exposure/contrast and a pluggable aesthetic scorer (ILLUME-X's
aesthetic filtering uses the Laplacian variance plus a learned quality model; here the learned
model is any scorer you plug in, with a cheap local heuristic as the default).

Scores are computed on the frame's work-size view (long side `decode.work_size`), so the
thresholds mean the same thing for 480p and 4K sources; sharpness looks at a view that is
reduced but never enlarged (enlarging blurs, and would call every small video blurred).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np

from tapestry.data.operators.base import Rejected
from tapestry.data.operators.video import Frame


@dataclass(frozen=True)
class Sharpness:
    """Variance of the Laplacian of the grey frame: low means blurred or featureless."""

    name: ClassVar[str] = "sharpness"
    version: ClassVar[str] = "1"

    min_variance: float = 60.0

    def score(self, frame: Frame) -> float:
        if "sharpness" not in frame.scores:
            import cv2

            frame.scores["sharpness"] = round(float(cv2.Laplacian(frame.detail_gray, cv2.CV_32F).var()), 3)
        return frame.scores["sharpness"]

    def check(self, frame: Frame) -> None:
        value = self.score(frame)
        if value < self.min_variance:
            raise Rejected(self.name, "blurry",
                           f"frame at {frame.time:.2f} s: Laplacian variance {value:.1f} < {self.min_variance:g}")


@dataclass(frozen=True)
class Exposure:
    """Mean grey level (too dark / blown out) and its standard deviation (flat, no contrast)."""

    name: ClassVar[str] = "exposure"
    version: ClassVar[str] = "1"

    min_mean: float = 20.0
    max_mean: float = 235.0
    min_contrast: float = 12.0

    def score(self, frame: Frame) -> tuple[float, float]:
        if "brightness" not in frame.scores:
            gray = frame.work_gray
            frame.scores["brightness"] = round(float(gray.mean()), 3)
            frame.scores["contrast"] = round(float(gray.std()), 3)
        return frame.scores["brightness"], frame.scores["contrast"]

    def check(self, frame: Frame) -> None:
        mean, std = self.score(frame)
        where = f"frame at {frame.time:.2f} s"
        if mean < self.min_mean:
            raise Rejected(self.name, "too-dark", f"{where}: mean grey {mean:.1f} < {self.min_mean:g}")
        if mean > self.max_mean:
            raise Rejected(self.name, "overexposed", f"{where}: mean grey {mean:.1f} > {self.max_mean:g}")
        if std < self.min_contrast:
            raise Rejected(self.name, "low-contrast", f"{where}: grey std {std:.1f} < {self.min_contrast:g}")


def heuristic_aesthetic(rgb: np.ndarray) -> float:
    """A cheap, local stand-in for a learned quality model, in [0, 1]: colourfulness
    (Hasler & Suesstrunk 2003), contrast, and the share of pixels not clipped to black or white.
    It separates washed-out, flat and clipped frames from ordinary footage; it knows nothing of
    composition, which is what a learned scorer is for."""
    x = rgb.astype(np.float32)
    rg = x[..., 0] - x[..., 1]
    yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
    colourfulness = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    gray = x.mean(axis=2)
    contrast = float(gray.std())
    unclipped = float(((gray > 8) & (gray < 247)).mean())
    # the unclipped share only counts when there is contrast: a flat grey frame clips nothing
    score = (0.35 * min(colourfulness / 60.0, 1.0) + 0.4 * min(contrast / 55.0, 1.0)
             + 0.25 * unclipped * min(contrast / 10.0, 1.0))
    return round(score, 4)


ImageScorer = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class Aesthetic:
    """A pluggable aesthetic/quality scorer. `scorer` is 'heuristic' (default, local and cheap),
    'local:/path/quality.safetensors' (the small learned scorer of
    `tapestry.data.providers.quality_net`, batched over a shot's frames), 'torch:/dir' (a local
    model directory, see `tapestry.data.plugins`) or 'python:module:function' (any callable
    taking an [H, W, 3] uint8 RGB array, returning a float)."""

    name: ClassVar[str] = "aesthetic"
    version: ClassVar[str] = "1"
    local_fields: ClassVar[dict[str, str]] = {"scorer": "quality"}

    scorer: str = "heuristic"
    min_score: float = 0.2
    batch_size: int = 16  # local scorer: frames per forward pass

    def scorer_fn(self) -> ImageScorer:
        if self.scorer == "heuristic":
            return heuristic_aesthetic
        if self.scorer.startswith("local:"):
            from tapestry.data.providers.quality_net import LearnedQuality

            return LearnedQuality(self.scorer, self.name)
        from tapestry.data.plugins import load_image_model

        model = load_image_model(self.scorer)
        return lambda rgb: float(np.asarray(model(rgb)).reshape(-1)[0])

    def score(self, frame: Frame, scorer: ImageScorer) -> float:
        if "aesthetic" not in frame.scores:
            frame.scores["aesthetic"] = round(float(scorer(frame.work_rgb)), 4)
        return frame.scores["aesthetic"]

    def prime(self, frames: list[Frame], scorer: ImageScorer) -> None:
        """Score the frames not scored yet in batches, when the scorer takes batches."""
        todo = [f for f in frames if "aesthetic" not in f.scores]
        batched = getattr(scorer, "score", None)
        if not todo or batched is None:
            return
        for frame, value in zip(todo, batched([f.work_rgb for f in todo], self.batch_size)):
            frame.scores["aesthetic"] = round(float(value), 4)

    def check(self, frame: Frame, scorer: ImageScorer) -> None:
        value = self.score(frame, scorer)
        if value < self.min_score:
            raise Rejected(self.name, "low-score",
                           f"frame at {frame.time:.2f} s: {self.scorer} score {value:.3f} < {self.min_score:g}")
