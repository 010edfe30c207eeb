"""Motion filter from dense optical flow between two kept frames (ILLUME-X uses RAFT; we use
OpenCV's DIS, which runs in milliseconds on a CPU at work size).

The flow magnitude's mean says how much moved and its standard deviation whether the motion is
local (objects acting) or uniform (a camera pan, jitter). Flow counts only where the two frames
differ by more than `noise_level` grey levels (after a light blur): DIS invents small motions in
flat and repetitive regions, which would make a still shot look alive. A target frame is dropped as `static`
when little moved, `uniform` when everything moved alike, and `chaotic` when the mean is so large
that the two frames barely correspond. Magnitudes are in pixels at work size (long side
`decode.work_size`, 256 by default) per `interval` seconds, whatever the source resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tapestry.data.operators.base import Rejected
from tapestry.data.operators.video import Frame


@dataclass(frozen=True)
class Motion:
    name: ClassVar[str] = "motion"
    version: ClassVar[str] = "1"

    method: str = "dis"  # "dis" (fast) or "farneback"
    noise_level: float = 4.0  # grey levels: smaller differences are not evidence of motion
    min_mean: float = 0.1  # px: below is static
    max_mean: float = 40.0  # px: above is chaotic (frames no longer correspond)
    min_std: float = 0.25  # px: below (with a moving mean) is uniform global motion

    def __post_init__(self) -> None:
        if self.method not in ("dis", "farneback"):
            raise ValueError(f"motion.method must be 'dis' or 'farneback', got {self.method!r}")

    def flow(self, source: Frame, target: Frame) -> np.ndarray:
        """Flow from source to target: [h, w, 2] float32 pixels at work size."""
        import cv2

        a, b = source.work_gray, target.work_gray
        if a.shape != b.shape:
            b = cv2.resize(b, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_AREA)
        if self.method == "dis":
            dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)
            return dis.calc(a, b, None)
        return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)

    def measure(self, source: Frame, target: Frame) -> dict[str, float]:
        import cv2

        flow = self.flow(source, target)
        magnitude = np.hypot(flow[..., 0], flow[..., 1])
        a = cv2.GaussianBlur(source.work_gray, (5, 5), 0)
        b = cv2.GaussianBlur(target.work_gray, (5, 5), 0)
        if a.shape != b.shape:
            b = cv2.resize(b, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_AREA)
        magnitude[cv2.absdiff(a, b) <= self.noise_level] = 0.0
        return {"flow_mean": round(float(magnitude.mean()), 4), "flow_std": round(float(magnitude.std()), 4)}

    def check(self, scores: dict[str, float], where: str = "") -> None:
        mean, std = scores["flow_mean"], scores["flow_std"]
        if mean < self.min_mean:
            raise Rejected(self.name, "static", f"{where}flow mean {mean:.2f} px < {self.min_mean:g}")
        if mean > self.max_mean:
            raise Rejected(self.name, "chaotic", f"{where}flow mean {mean:.2f} px > {self.max_mean:g}")
        if std < self.min_std:
            raise Rejected(self.name, "uniform", f"{where}flow std {std:.2f} px < {self.min_std:g}")
