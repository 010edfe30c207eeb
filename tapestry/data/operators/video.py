"""Decode videos with PyAV: probe a file, walk it once for shots and grid frames, seek to frames.

One pass over the file does everything cheap: every frame (up to `analysis_fps`) goes to the
shot detector as a small BGR image, and on a time grid (every `grid_step_s`) a frame is kept at
`frame_size` for the filters and the output. Windows and pairs are then built from kept frames
only, so decoding is the one cost proportional to the video's length. Shots are yielded as they
close, which bounds memory by the longest shot rather than the whole video.

Bad files end in `Rejected` with a stable code (`empty`, `unreadable`, `not-a-video`,
`audio-only`, `still-image`, `corrupt`, `truncated`, `too-large`, `no-frames`), never anything else.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np

from tapestry.data.operators.base import Rejected

STAGE = "decode"
# Demuxers that read single pictures: a PNG or JPEG "video" is a still image, not footage.
STILL_IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe",
                       "gif_pipe", "pam_pipe", "ppm_pipe", "pgm_pipe", "svg_pipe", "jpegls_pipe"}


@dataclass(frozen=True)
class VideoInfo:
    path: str
    size_bytes: int
    sha256: str
    format: str
    codec: str
    width: int
    height: int
    fps: float
    duration: float  # seconds the container declares (0.0 when it does not say)
    has_audio: bool

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "codec": self.codec, "width": self.width,
                "height": self.height, "fps": round(self.fps, 4), "duration": round(self.duration, 3),
                "has_audio": self.has_audio}


@dataclass
class Frame:
    """A kept frame: `rgb` at output size; smaller views for the filters are made on demand."""

    time: float  # seconds from the first frame of the video
    index: int  # decoded frame number
    rgb: np.ndarray  # [H, W, 3] uint8
    work_size: int = 256
    scores: dict[str, float] = field(default_factory=dict)
    derived: dict[str, Any] = field(default_factory=dict, repr=False)  # e.g. embeddings, per model
    _work_rgb: np.ndarray | None = field(default=None, repr=False)
    _work_gray: np.ndarray | None = field(default=None, repr=False)

    @property
    def work_rgb(self) -> np.ndarray:
        """[h, w, 3] uint8 with long side exactly `work_size` (small sources are enlarged): what
        sharpness, flow and ORB look at, so their thresholds do not depend on the resolution."""
        if self._work_rgb is None:
            self._work_rgb = resize_long_side(self.rgb, self.work_size)
        return self._work_rgb

    @property
    def detail_gray(self) -> np.ndarray:
        """Grey at work size, but never enlarged: sharpness must not see interpolation blur."""
        if max(self.rgb.shape[:2]) <= self.work_size:
            import cv2

            return cv2.cvtColor(self.rgb, cv2.COLOR_RGB2GRAY)
        return self.work_gray

    @property
    def work_gray(self) -> np.ndarray:
        if self._work_gray is None:
            import cv2

            self._work_gray = cv2.cvtColor(self.work_rgb, cv2.COLOR_RGB2GRAY)
        return self._work_gray


@dataclass
class Shot:
    index: int
    start: float
    end: float
    frames: list[Frame]
    starts_at_cut: bool = False  # False at the start of the video (or of the decoded range)
    ends_at_cut: bool = False  # False at its end

    @property
    def duration(self) -> float:
        return self.end - self.start


def resize_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """`image` scaled so its long side is `long_side` (up or down)."""
    import cv2

    h, w = image.shape[:2]
    if max(h, w) == long_side:
        return image
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interpolation)


def scaled_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(w, h) with the long side at most `long_side`, both even (what video scalers prefer)."""
    scale = min(1.0, long_side / max(width, height))
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sniff_container(path: Path) -> str | None:
    """The video container family its first bytes announce (None: not a known video container)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "MP4/MOV"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    if head[:3] == b"FLV":
        return "FLV"
    if head[:4] == b"OggS":
        return "Ogg"
    if head[:1] == b"\x47" or head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"):
        return "MPEG"
    return None


def _open(path: Path):
    import av

    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.error.FileNotFoundError:
        raise Rejected(STAGE, "unreadable", "file not found", failure=True) from None
    except av.error.PermissionError:
        raise Rejected(STAGE, "unreadable", "permission denied", failure=True) from None
    except (av.error.InvalidDataError, av.error.EOFError) as e:
        family = sniff_container(path)
        if family is not None:
            raise Rejected(STAGE, "corrupt", f"a damaged or truncated {family} file: its index cannot be "
                           f"read ({_short(e)})", failure=True) from None
        raise Rejected(STAGE, "not-a-video",
                       f"no container format PyAV can read ({_short(e)})", failure=True) from None
    except av.error.FFmpegError as e:
        raise Rejected(STAGE, "corrupt", f"cannot open: {_short(e)}", failure=True) from None


def _short(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    path_marker = ": '"
    if path_marker in text:  # PyAV appends the path; the log names the file already
        text = text.split(path_marker)[0]
    return text[:200]


@dataclass(frozen=True)
class Decode:
    """Probe + one decoding pass (see the module docstring)."""

    name: ClassVar[str] = "decode"
    version: ClassVar[str] = "1"

    frame_size: int = 512  # long side of kept frames (the output images)
    work_size: int = 256  # long side of the frames filters look at
    analysis_size: int = 160  # long side of the frames the shot detector looks at
    analysis_fps: float = 15.0  # shot detection sees every frame up to this rate
    grid_step_s: float = 1.0  # keep one frame every this many seconds
    start_s: float = 0.0  # seek here before decoding
    max_seconds: float | None = None  # stop after this much video
    max_side: int = 8192  # refuse larger videos (memory guard)
    allow_truncated: bool = False
    truncation_tolerance_s: float = 0.5

    def __post_init__(self) -> None:
        if self.grid_step_s <= 0 or self.analysis_fps <= 0:
            raise ValueError("decode.grid_step_s and decode.analysis_fps must be positive")
        if min(self.frame_size, self.work_size, self.analysis_size) < 16:
            raise ValueError("decode sizes must be at least 16 pixels")

    def probe(self, path: str | os.PathLike) -> VideoInfo:
        """What the container says about `path`; Rejected when it is not a usable video file."""
        path = Path(path)
        try:
            if not path.exists():
                raise Rejected(STAGE, "unreadable", "file not found", failure=True)
            if not path.is_file():
                raise Rejected(STAGE, "unreadable", "not a regular file", failure=True)
            size = path.stat().st_size
            if size == 0:
                raise Rejected(STAGE, "empty", "file has 0 bytes", failure=True)
            with open(path, "rb") as f:
                f.read(1)
            sha = file_sha256(path)
        except OSError as e:
            raise Rejected(STAGE, "unreadable", e.strerror or str(e), failure=True) from None
        container = _open(path)
        with container:
            fmt = container.format.name if container.format else "unknown"
            videos = list(container.streams.video)
            has_audio = bool(container.streams.audio)
            if not videos:
                if has_audio:
                    raise Rejected(STAGE, "audio-only", "the file has audio but no video stream", failure=True)
                raise Rejected(STAGE, "not-a-video", f"no video stream (container {fmt})", failure=True)
            if fmt.split(",")[0] in STILL_IMAGE_FORMATS:
                raise Rejected(STAGE, "still-image", f"a still image ({fmt}), not a video", failure=True)
            stream = videos[0]
            width = stream.codec_context.width or stream.width or 0
            height = stream.codec_context.height or stream.height or 0
            if width <= 0 or height <= 0:
                raise Rejected(STAGE, "corrupt", "the video stream has no frame size", failure=True)
            if max(width, height) > self.max_side:
                raise Rejected(STAGE, "too-large",
                               f"{width}x{height} exceeds the limit of {self.max_side} pixels per side",
                               failure=True)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            if not math.isfinite(fps) or fps <= 0 or fps > 1000:
                fps = 25.0  # unknown: frames carry their own timestamps anyway
            duration = 0.0
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            codec = stream.codec_context.name if stream.codec_context else "unknown"
        return VideoInfo(str(path), size, sha, fmt, codec, width, height, fps, max(0.0, duration), has_audio)

    def shots(self, info: VideoInfo, detector: "Any", stats: dict[str, float] | None = None) -> Iterator[Shot]:
        """Decode `info.path` once; yield shots (with their grid frames) as they close.

        `detector` is a fresh `shots.ShotDetector`. `stats`, when given, receives `seconds`
        (video decoded) and `frames` (frames decoded)."""
        import av
        from av.video.reformatter import VideoReformatter

        path = Path(info.path)
        # One reformatter per output size keeps its scaling context between frames; a fresh
        # one per frame (what frame.to_ndarray(width=...) does) costs more than the decoding.
        to_analysis, to_output = VideoReformatter(), VideoReformatter()
        frame_w, frame_h = scaled_size(info.width, info.height, self.frame_size)
        an_w, an_h = scaled_size(info.width, info.height, self.analysis_size)
        stride = max(1, int(round(info.fps / self.analysis_fps)))
        detector.start(Fraction(info.fps).limit_denominator(1001) / stride)
        container = _open(path)
        pending: list[Frame] = []
        shot_start = 0.0
        shot_index = 0
        last_time = -1.0
        decoded = 0
        next_grid = self.start_s  # the grid starts where decoding starts
        origin: float | None = None  # stream time of t = 0
        end_limit = None if self.max_seconds is None else self.start_s + self.max_seconds
        frame_period = 1.0 / info.fps
        try:
            stream = container.streams.video[0]
            # One decoding thread: executors run one worker process per core, and FFmpeg's own
            # threads would only fight them for the same cores.
            stream.thread_type = "NONE"
            stream.codec_context.thread_count = 1
            if self.start_s > 0 and stream.time_base is not None:
                container.seek(int(self.start_s / stream.time_base) + (stream.start_time or 0),
                               stream=stream, backward=True)
            try:
                for frame in container.decode(stream):
                    stamp = frame.time
                    if origin is None:
                        origin = (float(stream.start_time * stream.time_base)
                                  if stream.start_time is not None and stream.time_base is not None
                                  else (stamp or 0.0))
                    t = (stamp - origin) if stamp is not None else decoded * frame_period
                    if t < self.start_s - 1e-6 or t <= last_time:
                        continue  # before the seek target, or a duplicate timestamp
                    if end_limit is not None and t >= end_limit:
                        break
                    last_time = t
                    if decoded % stride == 0:
                        small = to_analysis.reformat(frame, width=an_w, height=an_h, format="bgr24",
                                                     interpolation="FAST_BILINEAR").to_ndarray()
                        for cut in detector.push(t, small):
                            yield from self._close(pending, shot_index, shot_start, cut)
                            shot_index += 1
                            shot_start = cut
                            pending = [f for f in pending if f.time >= cut]
                    if t >= next_grid - frame_period / 2:
                        rgb = to_output.reformat(frame, width=frame_w, height=frame_h, format="rgb24",
                                                 interpolation="AREA").to_ndarray()
                        pending.append(Frame(round(t, 4), decoded, rgb, self.work_size))
                        while next_grid <= t + frame_period / 2:
                            next_grid += self.grid_step_s
                    decoded += 1
            except av.error.FFmpegError as e:
                if decoded == 0:
                    raise Rejected(STAGE, "corrupt", f"no frame could be decoded: {_short(e)}",
                                   failure=True) from None
                if not self.allow_truncated:
                    of = f" of {info.duration:.2f} s" if info.duration else ""
                    raise Rejected(STAGE, "corrupt", f"decoding failed at {last_time:.2f} s{of} (damaged or "
                                   f"truncated): {_short(e)}", failure=True) from None
        finally:
            container.close()
        if decoded == 0:
            raise Rejected(STAGE, "no-frames", "the video stream holds no decodable frame", failure=True)
        end = last_time + frame_period
        declared_end = (info.duration if self.max_seconds is None
                        else min(info.duration, self.start_s + self.max_seconds))
        if (not self.allow_truncated and info.duration > 0
                and end < declared_end - max(self.truncation_tolerance_s, 2 * frame_period)):
            raise Rejected(STAGE, "truncated",
                           f"frames stop at {end:.2f} s but the container declares {info.duration:.2f} s",
                           failure=True)
        for cut in detector.finish(last_time):
            yield from self._close(pending, shot_index, shot_start, cut)
            shot_index += 1
            shot_start = cut
            pending = [f for f in pending if f.time >= cut]
        if stats is not None:
            stats["seconds"] = end - self.start_s
            stats["frames"] = decoded
        yield Shot(shot_index, shot_start, end, [f for f in pending if f.time >= shot_start],
                   starts_at_cut=shot_index > 0)

    @staticmethod
    def _close(pending: list[Frame], index: int, start: float, cut: float) -> Iterator[Shot]:
        yield Shot(index, start, cut, [f for f in pending if start <= f.time < cut],
                   starts_at_cut=index > 0, ends_at_cut=True)

    def frames_at(self, path: str | os.PathLike, times: list[float], long_side: int | None = None,
                  seek_gap_s: float = 2.0) -> list[np.ndarray]:
        """RGB frames nearest to `times` (seconds from the first frame), at `long_side` (None:
        native size). Seeks by timestamp when the next wanted time is more than `seek_gap_s`
        ahead, and decodes forward otherwise (a seek lands on a keyframe before the target)."""
        import av

        wanted = sorted(set(times))
        found: dict[float, np.ndarray] = {}
        container = _open(Path(path))
        try:
            stream = container.streams.video[0]
            base = stream.time_base
            start_pts = stream.start_time or 0
            origin = float(start_pts * base) if base is not None else 0.0
            rate = stream.average_rate or stream.guessed_rate
            half_period = 0.5 / float(rate) if rate else 0.02
            decoder = None
            previous = current = None  # (seconds, frame)
            for target in wanted:
                if decoder is None or (current is not None and target - current[0] > seek_gap_s):
                    if base is not None:
                        container.seek(int(target / base) + start_pts, stream=stream, backward=True)
                    decoder = container.decode(stream)
                    previous = current = None
                while current is None or current[0] + half_period < target:
                    frame = next(decoder, None)
                    if frame is None:
                        break  # the stream ended: the last frame is the nearest
                    t = frame.time - origin if frame.time is not None else 0.0
                    previous, current = current, (t, frame)
                if current is None:
                    raise Rejected(STAGE, "seek-failed", f"no frame decodes at {target:.2f} s", failure=True)
                chosen = current
                if previous is not None and abs(previous[0] - target) < abs(current[0] - target):
                    chosen = previous
                found[target] = self._to_rgb(chosen[1], long_side)
        except av.error.FFmpegError as e:
            raise Rejected(STAGE, "corrupt", f"decoding failed while seeking: {_short(e)}", failure=True) from None
        finally:
            container.close()
        return [found[t] for t in times]

    @staticmethod
    def _to_rgb(frame: Any, long_side: int | None) -> np.ndarray:
        if long_side is None:
            return frame.to_ndarray(format="rgb24")
        w, h = scaled_size(frame.width, frame.height, long_side)
        return frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA")
