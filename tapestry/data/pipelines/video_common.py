"""Steps both video pipelines share: probe + decode into shots, per-frame quality, ids, provenance."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from tapestry.data.operators.base import Rejected, Rejection, StageStats
from tapestry.data.operators.quality import Aesthetic, Exposure, ImageScorer, Sharpness
from tapestry.data.operators.video import Frame, Shot, VideoInfo
from tapestry.data.providers import BudgetExhausted
from tapestry.data.records import InputItem, InputResult

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts",
                  ".m2ts", ".flv", ".wmv", ".3gp", ".ogv", ".gif")
T = TypeVar("T")
R = TypeVar("R")


def source_stem(path: str, info: VideoInfo) -> str:
    """A readable, unique id prefix: the file name (letters, digits, '_', '.', '-') + 8 hex of its hash."""
    stem = re.sub(r"[^\w.-]+", "-", Path(path).stem).strip("-.") or "video"  # \w: letters of any script
    return f"{stem[:80]}-{info.sha256[:8]}"


def timed_iter(items: Iterable[T], stats: StageStats, stage: str) -> Iterator[T]:
    """Yield from `items`, adding the time spent producing each item to `stage`."""
    iterator = iter(items)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        finally:
            stats.add_seconds(stage, time.perf_counter() - start)
        yield item


def frame_quality(frame: Frame, sharpness: Sharpness, exposure: Exposure, aesthetic: Aesthetic,
                  scorer: ImageScorer, stats: StageStats) -> Rejection | None:
    """None when the frame passes all three quality filters, else the first rejection."""
    for op, run in ((sharpness, lambda: sharpness.check(frame)), (exposure, lambda: exposure.check(frame)),
                    (aesthetic, lambda: aesthetic.check(frame, scorer))):
        with stats.timed(op.name):
            try:
                run()
            except Rejected as r:
                stats.count(op.name, seen=1, kept=0)
                return r.rejection
        stats.count(op.name, seen=1, kept=1)
    return None


def prime_quality(frames: list[Frame], sharpness: Sharpness, exposure: Exposure, aesthetic: Aesthetic,
                  scorer: ImageScorer, stats: StageStats) -> list[Frame]:
    """With a batched (local) scorer, score every frame that passes the cheap sharpness and
    exposure checks in batches up front, so the per-frame filters then read cached values: one
    forward pass per `aesthetic.batch_size` frames, not one per frame. Returns the frames that
    pass all three (empty, and nothing done, for a per-frame scorer)."""
    if not hasattr(scorer, "score"):
        return []
    passing = []
    for frame in {id(f): f for f in frames}.values():
        try:
            sharpness.check(frame)
            exposure.check(frame)
        except Rejected:
            continue
        passing.append(frame)
    with stats.timed(aesthetic.name):
        aesthetic.prime(passing, scorer)
    return [f for f in passing if aesthetic.score(f, scorer) >= aesthetic.min_score]


def map_concurrently(fn: Callable[[T], R], items: list[T], limit: int) -> list[R]:
    """fn over items with at most `limit` at once, results in order (model calls wait on I/O)."""
    if limit <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(limit, len(items))) as pool:
        return list(pool.map(fn, items))


def shot_provenance(shot: Shot) -> dict[str, Any]:
    return {"index": shot.index, "start": round(shot.start, 3), "end": round(shot.end, 3)}


def source_provenance(path: str, info: VideoInfo) -> dict[str, Any]:
    return {"path": path, "name": Path(path).name, "sha256": info.sha256, "bytes": info.size_bytes,
            **info.to_json()}


# The per-shot step of a video pipeline: (shot, stem, video info, stats, rejections) -> Documents.
ShotStep = Callable[[Shot, str, VideoInfo, StageStats, list[Rejection]], list]


def process_video(item: InputItem, decode: Any, shots_config: Any, per_shot: ShotStep) -> InputResult:
    """The frame of every video pipeline: probe, decode shot by shot, `per_shot` on each shot.

    A file that breaks mid-way yields nothing (none of it is trusted); a spent provider budget
    leaves the input unfinished for the next run; rejections of single candidates are kept."""
    stats = StageStats()
    result = InputResult(item.key, item.shown)
    try:
        with stats.timed("probe"):
            info = decode.probe(item.path)
        stats.count("probe", seen=1, kept=1)
    except Rejected as r:
        stats.count("probe", seen=1)
        result.failed = True
        result.rejections.append(r.rejection)
        result.stats = stats.to_json()
        return result
    stem = source_stem(item.path, info)
    decoded: dict[str, float] = {}
    rejections: list[Rejection] = []
    try:
        shots = decode.shots(info, shots_config.detector_for_video(), decoded)
        # Shot by shot, so memory holds one shot's frames whatever the video's length.
        for shot in timed_iter(shots, stats, "decode"):
            stats.count("shots", kept=1)
            result.docs += per_shot(shot, stem, info, stats, rejections)
    except Rejected as r:  # the file broke mid-way: nothing from it is trusted
        result.failed = True
        result.rejections.append(r.rejection)
        result.stats = stats.to_json()
        return result
    except BudgetExhausted as e:  # not done: the engine leaves this input for the next run
        result.stopped = str(e)
        return result
    stats.count("decode", seen=1, kept=1)
    stats.count("shots", seen=1)  # one video in, its shots out
    result.video_seconds = decoded.get("seconds", 0.0)
    result.rejections.extend(rejections)
    result.stats = stats.to_json()
    return result
