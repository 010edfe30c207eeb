"""Multi-interval sliding windows (ILLUME-X §4.1): k frames spaced `interval` seconds apart,
taken from inside one shot, at several (k, interval) scales at once.

Windows lie on the decoder's time grid (frames kept every `grid_step_s`), so every interval must
be a multiple of the grid step. A window never crosses a cut and keeps `cut_margin_s` away from
the cuts around its shot (frames right at a cut are often blends or flashes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from tapestry.data.operators.video import Frame, Shot


@dataclass(frozen=True)
class Scale:
    frames: int  # k
    interval: float  # seconds between consecutive frames

    @property
    def label(self) -> str:
        return f"{self.frames}x{self.interval:g}s"

    @classmethod
    def parse(cls, text: str) -> "Scale":
        """'5x3' or '5x3s' -> 5 frames every 3 seconds."""
        k, _, interval = text.strip().lower().rstrip("s").partition("x")
        try:
            return cls(int(k), float(interval))
        except ValueError:
            raise ValueError(f"window scale {text!r} must look like KxSECONDS, e.g. 5x3") from None


DEFAULT_SCALES = (Scale(2, 1.0), Scale(5, 3.0), Scale(8, 10.0))


@dataclass
class Window:
    shot: Shot
    scale: Scale
    frames: list[Frame]

    @property
    def start(self) -> float:
        return self.frames[0].time

    def record_id(self, stem: str) -> str:
        scale = f"{self.scale.frames}x{self.scale.interval:g}"
        return f"{stem}-s{self.shot.index:03d}-{scale}-t{round(self.start * 1000):08d}"


@dataclass(frozen=True)
class Windows:
    name: ClassVar[str] = "windows"
    version: ClassVar[str] = "1"

    scales: tuple[Scale, ...] = field(default=DEFAULT_SCALES)
    stride: float | None = None  # seconds between window starts; None: k * interval (adjacent)
    cut_margin_s: float = 0.25

    def __post_init__(self) -> None:
        raw = self.scales.split(",") if isinstance(self.scales, str) else self.scales  # "2x1,5x3"
        scales = tuple(Scale.parse(s) if isinstance(s, str) else
                       Scale(**s) if isinstance(s, dict) else
                       Scale(*s) if isinstance(s, (list, tuple)) else s for s in raw)
        object.__setattr__(self, "scales", scales)
        for s in scales:
            if s.frames < 2 or s.interval <= 0:
                raise ValueError(f"window scale {s.label}: need at least 2 frames and a positive interval")

    def check_grid(self, grid_step_s: float) -> None:
        for s in self.scales:
            ratio = s.interval / grid_step_s
            if abs(ratio - round(ratio)) > 1e-6 or round(ratio) < 1:
                raise ValueError(f"window interval {s.interval:g} s is not a multiple of the decode grid "
                                 f"step {grid_step_s:g} s (set decode.grid_step_s to a common divisor)")

    def windows(self, shot: Shot, grid_step_s: float) -> list[Window]:
        """Every window of every scale inside `shot`, in time order per scale."""
        low = shot.start + (self.cut_margin_s if shot.starts_at_cut else 0.0)
        high = shot.end - (self.cut_margin_s if shot.ends_at_cut else 0.0)
        usable = [f for f in shot.frames if low <= f.time <= high]
        if not usable:
            return []
        out: list[Window] = []
        base = usable[0].time
        by_step = {round((f.time - base) / grid_step_s): f for f in usable}
        last_step = max(by_step)
        for scale in self.scales:
            step = round(scale.interval / grid_step_s)
            stride = round((self.stride if self.stride is not None else scale.frames * scale.interval) / grid_step_s)
            stride = max(1, stride)
            first = 0
            while first + step * (scale.frames - 1) <= last_step:
                steps = [first + step * m for m in range(scale.frames)]
                if all(s in by_step for s in steps):
                    out.append(Window(shot, scale, [by_step[s] for s in steps]))
                first += stride
        return out
