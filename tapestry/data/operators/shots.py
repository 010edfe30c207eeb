"""Shot boundaries with PySceneDetect's content detector, fed frames we decoded ourselves.

We use scenedetect's detector classes rather than its video backends: the frames already come
from our single PyAV pass (small BGR images), so the cut detection costs no second decode and
scenedetect's own OpenCV video reader is never loaded. A cut is the time of the first frame of
the new shot.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class Shots:
    name: ClassVar[str] = "shots"
    version: ClassVar[str] = "1"

    detector: str = "content"  # "content" (HSV difference) or "adaptive" (rolling average)
    threshold: float | None = None  # None: scenedetect's default (content 27.0, adaptive 3.0)
    min_shot_s: float = 0.5  # no two cuts closer than this (scenedetect's min_scene_len)

    def __post_init__(self) -> None:
        if self.detector not in ("content", "adaptive"):
            raise ValueError(f"shots.detector must be 'content' or 'adaptive', got {self.detector!r}")

    def detector_for_video(self) -> "ShotDetector":
        return ShotDetector(self)


class ShotDetector:
    """Stateful cut finder for one video: `start(rate)`, `push(t, bgr)` per frame, `finish(t)`."""

    def __init__(self, config: Shots):
        self.config = config
        self._times: list[float] = []
        self._detector = None
        self._rate: Fraction | None = None

    def start(self, rate: Fraction) -> None:
        from scenedetect.detectors import AdaptiveDetector, ContentDetector

        self._rate = rate
        min_frames = max(1, int(round(self.config.min_shot_s * float(rate))))
        if self.config.detector == "content":
            threshold = 27.0 if self.config.threshold is None else self.config.threshold
            self._detector = ContentDetector(threshold=threshold, min_scene_len=min_frames)
        else:
            threshold = 3.0 if self.config.threshold is None else self.config.threshold
            self._detector = AdaptiveDetector(adaptive_threshold=threshold, min_scene_len=min_frames)
        self._times = []

    def push(self, t: float, bgr: np.ndarray) -> list[float]:
        """Feed the next analysis frame (time in seconds, [h, w, 3] BGR uint8); returns cut times
        found so far (the detector may report a cut a few frames after it happened)."""
        assert self._detector is not None, "call start() first"
        number = len(self._times)
        self._times.append(t)
        return self._cut_times(self._detector.process_frame(self._frame_position(number), bgr))

    def finish(self, t: float) -> list[float]:
        assert self._detector is not None
        if not self._times:
            return []
        return self._cut_times(self._detector.post_process(self._frame_position(len(self._times) - 1)))

    # PySceneDetect 0.6 passes frame numbers as ints; 0.7 passes FrameTimecodes. We pin 0.6 (0.7
    # hard-requires the GUI build of OpenCV, which needs libGL on a headless machine) but accept both.
    def _frame_position(self, number: int):
        import scenedetect

        if scenedetect.__version__.startswith("0.6"):
            return number
        return scenedetect.FrameTimecode(number, fps=float(self._rate))

    def _cut_times(self, cuts) -> list[float]:
        numbers = [c if isinstance(c, int) else c.frame_num for c in cuts]
        return [self._times[n] for n in numbers if 0 < n < len(self._times)]
