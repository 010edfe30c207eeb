"""`video-story` (ILLUME-X §4.1): videos -> multi-interval windows -> filtered frames ->
three-level captions -> interleaved story Documents.

Per video: decode once into shots; cut each shot into windows of k frames every `interval`
seconds at several scales; drop frames that are blurred, badly exposed or ugly; walk each window
keeping a frame only when it moved enough (optical flow) and differs enough (embeddings) from the
last kept one; windows left with fewer than `min_frames` are rejected with the reason of their
last drop. Survivors are captioned by a VLM at three levels and written as

    [global description]                          text, context
    [frame 1 description] [frame 1]               text + image, context
    [change 1->2] [frame 2 description] [frame 2]  text + text + image, target
    ...

so each image follows the words that describe it, and a model learns to continue a visual story
from its start; all captions are also kept in `meta.captions` for other layouts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tapestry.data.operators.base import (
    Rejected,
    Rejection,
    StageStats,
    operator_versions,
)
from tapestry.data.operators.motion import Motion
from tapestry.data.operators.quality import Aesthetic, Exposure, Sharpness
from tapestry.data.operators.redundancy import Redundancy
from tapestry.data.operators.shots import Shots
from tapestry.data.operators.video import Decode, Frame, Shot
from tapestry.data.operators.vlm import KeepDiscard, StoryCaptions
from tapestry.data.operators.windows import Window, Windows
from tapestry.data.pipelines import config as config_io
from tapestry.data.pipelines.video_common import (
    VIDEO_SUFFIXES,
    frame_quality,
    map_concurrently,
    prime_quality,
    process_video,
    shot_provenance,
    source_provenance,
)
from tapestry.data.providers import BudgetExhausted, ProviderError, ask_json
from tapestry.data.providers.local import provenance as local_provenance
from tapestry.data.records import ImageEncoding, InputItem, InputResult
from tapestry.document import Document, TextSegment


@dataclass(frozen=True)
class StoryOutput:
    min_frames: int = 2  # a window needs at least this many frames left after filtering
    max_windows_per_shot: int | None = None  # sample this many (seeded) before captioning
    image: ImageEncoding = field(default_factory=ImageEncoding)


@dataclass(frozen=True)
class VideoStoryConfig:
    decode: Decode = field(default_factory=Decode)
    shots: Shots = field(default_factory=Shots)
    windows: Windows = field(default_factory=Windows)
    sharpness: Sharpness = field(default_factory=Sharpness)
    exposure: Exposure = field(default_factory=Exposure)
    aesthetic: Aesthetic = field(default_factory=Aesthetic)
    motion: Motion = field(default_factory=Motion)
    redundancy: Redundancy = field(default_factory=Redundancy)
    keep_discard: KeepDiscard = field(default_factory=KeepDiscard)
    captions: StoryCaptions = field(default_factory=StoryCaptions)
    output: StoryOutput = field(default_factory=StoryOutput)
    seed: int = 0

    def __post_init__(self) -> None:
        self.windows.check_grid(self.decode.grid_step_s)
        if self.output.min_frames < 2:
            raise ValueError("output.min_frames must be at least 2 (a story needs two frames)")


@dataclass
class Candidate:
    """A window that passed the filters: its kept frames and their scores against the previous."""

    record: str
    window: Window
    frames: list[Frame]
    pair_scores: list[dict[str, float]]


class VideoStory:
    name: ClassVar[str] = "video-story"
    version: ClassVar[str] = "1"
    config_class: ClassVar[type] = VideoStoryConfig
    input_suffixes: ClassVar[tuple[str, ...]] = VIDEO_SUFFIXES
    stages: ClassVar[tuple[str, ...]] = ("probe", "decode", "shots", "windows", "sharpness", "exposure",
                                         "aesthetic", "motion", "redundancy", "filters", "keep-discard",
                                         "captions")

    def __init__(self, config: VideoStoryConfig):
        self.config = config
        self.fingerprint = config_io.fingerprint(config)
        self._scorer = config.aesthetic.scorer_fn()
        self._embedder = config.redundancy.embedder_fn()

    # ------------------------------------------------------------ filtering
    def filter_window(self, window: Window, stats: StageStats) -> tuple[list[Frame], list[dict[str, float]]]:
        """The frames of `window` that survive, and the motion/redundancy scores of each kept
        frame against the one kept before it. Rejected when fewer than `min_frames` remain."""
        c = self.config
        good: list[Frame] = []
        last_drop: Rejection | None = None
        for frame in window.frames:
            problem = frame_quality(frame, c.sharpness, c.exposure, c.aesthetic, self._scorer, stats)
            if problem is None:
                good.append(frame)
            else:
                last_drop = problem
        kept = good[:1]
        pair_scores: list[dict[str, float]] = []
        for frame in good[1:]:
            where = f"{kept[-1].time:.2f}->{frame.time:.2f} s: "
            try:
                with stats.timed(c.motion.name):
                    scores = c.motion.measure(kept[-1], frame)
                    stats.count(c.motion.name, seen=1)
                    c.motion.check(scores, where)
                    stats.count(c.motion.name, kept=1)
                with stats.timed(c.redundancy.name):
                    scores.update(c.redundancy.measure(kept[-1], frame, self._embedder))
                    stats.count(c.redundancy.name, seen=1)
                    c.redundancy.check(scores, where)
                    stats.count(c.redundancy.name, kept=1)
            except Rejected as r:
                last_drop = r.rejection
                continue
            kept.append(frame)
            pair_scores.append(scores)
        if len(kept) < c.output.min_frames:
            assert last_drop is not None
            raise Rejected(last_drop.stage, last_drop.code,
                           f"{len(kept)} of {len(window.frames)} frames left; last drop: {last_drop.detail}")
        return kept, pair_scores

    # --------------------------------------------------------------- process
    def process(self, item: InputItem, provider: Any) -> InputResult:
        def per_shot(shot, stem, info, stats, rejections):
            candidates = self.shot_candidates(shot, stem, stats, rejections)
            return self.caption(candidates, item, info, provider, stats, rejections)

        return process_video(item, self.config.decode, self.config.shots, per_shot)

    def prime(self, windows: list[Window], stats: StageStats) -> None:
        """Local models score and embed the shot's frames in batches up front (see
        `prime_quality`); the filters then read the cached values."""
        c = self.config
        frames = [f for w in windows for f in w.frames]
        if hasattr(self._scorer, "score"):
            frames = prime_quality(frames, c.sharpness, c.exposure, c.aesthetic, self._scorer, stats)
        if frames and hasattr(self._embedder, "model"):
            with stats.timed(c.redundancy.name):
                c.redundancy.prime(list({id(f): f for f in frames}.values()), self._embedder)

    def shot_candidates(self, shot: Shot, stem: str, stats: StageStats,
                        rejections: list[Rejection]) -> list[Candidate]:
        """The windows of one shot that pass the filters (at most `max_windows_per_shot`)."""
        c = self.config
        with stats.timed("windows"):
            windows = c.windows.windows(shot, c.decode.grid_step_s)
        stats.count("windows", seen=1, kept=len(windows))  # one shot in, its windows out
        self.prime(windows, stats)
        candidates: list[Candidate] = []
        for window in windows:
            record = window.record_id(stem)
            try:
                frames, pair_scores = self.filter_window(window, stats)
            except Rejected as r:
                rejections.append(_with_record(r.rejection, record))
                continue
            candidates.append(Candidate(record, window, frames, pair_scores))
        stats.count("filters", seen=len(windows), kept=len(candidates))
        cap = c.output.max_windows_per_shot
        if cap is not None and len(candidates) > cap:
            rng = random.Random(f"{c.seed}:{stem}:{shot.index}")
            chosen = set(rng.sample(range(len(candidates)), cap))
            for i, candidate in enumerate(candidates):
                if i not in chosen:
                    rejections.append(Rejection("sample", "over-cap", f"more than {cap} windows in this shot",
                                                record=candidate.record))
            candidates = [cand for i, cand in enumerate(candidates) if i in chosen]
        return candidates

    def caption(self, candidates: list[Candidate], item: InputItem, info: Any, provider: Any,
                stats: StageStats, rejections: list[Rejection]) -> list[Document]:
        """Three-level captions for each candidate window (model calls run concurrently)."""
        c = self.config

        def one(cand: Candidate) -> Document | Rejection:
            verdict = None
            if c.keep_discard.enabled:
                with stats.timed(c.keep_discard.name):
                    stats.count(c.keep_discard.name, seen=1)
                    request = c.keep_discard.request([f.rgb for f in cand.frames], [f.time for f in cand.frames],
                                                     c.seed)
                    try:
                        verdict, _ = ask_json(provider, request, KeepDiscard.check, provider.repairs)
                    except BudgetExhausted:
                        raise
                    except ProviderError as e:
                        return Rejection(c.keep_discard.name, f"provider-{e.code}", e.message, cand.record,
                                         failure=True)
                    if not verdict["keep"]:
                        return Rejection(c.keep_discard.name, "discarded", verdict["reason"], cand.record)
                    stats.count(c.keep_discard.name, kept=1)
            request = c.captions.request([f.rgb for f in cand.frames], [f.time for f in cand.frames], c.seed)
            try:
                with stats.timed(c.captions.name):  # busy time of this call (calls run in threads)
                    captions, _ = ask_json(provider, request, StoryCaptions.check(len(cand.frames)),
                                           provider.repairs)
            except BudgetExhausted:
                raise
            except ProviderError as e:
                return Rejection(c.captions.name, f"provider-{e.code}", e.message, cand.record, failure=True)
            return self.document(cand, item.shown, info, captions, provider, verdict)

        outcomes = map_concurrently(one, candidates, provider.max_concurrency)
        docs = [o for o in outcomes if isinstance(o, Document)]
        rejections += [o for o in outcomes if isinstance(o, Rejection)]
        asked = sum(1 for o in outcomes if not (isinstance(o, Rejection) and o.stage == c.keep_discard.name))
        stats.count(c.captions.name, seen=asked, kept=len(docs))
        return docs

    def document(self, cand: Candidate, path: str, info: Any, captions: dict[str, Any], provider: Any,
                 verdict: dict[str, Any] | None = None) -> Document:
        c = self.config
        window, frames, pair_scores = cand.window, cand.frames, cand.pair_scores
        segments: list[Any] = [TextSegment(captions["global"])]
        for i, frame in enumerate(frames):
            role = "context" if i == 0 else "target"
            scores = dict(frame.scores)
            if i > 0:
                segments.append(TextSegment(captions["transitions"][i - 1], role))
                scores.update(pair_scores[i - 1])
            segments.append(TextSegment(captions["frames"][i], role))
            segments.append(c.output.image.segment(frame.rgb, role, f"frame{i + 1}",
                                                   {"time": frame.time, "scores": scores}))
        meta = {
            "source": source_provenance(path, info),
            "shot": shot_provenance(window.shot),
            "window": {"scale": window.scale.label, "frames": window.scale.frames,
                       "interval": window.scale.interval, "times": [f.time for f in window.frames],
                       "kept_times": [f.time for f in frames]},
            "pipeline": {"name": self.name, "version": self.version, "config": self.fingerprint,
                         "seed": c.seed},
            "operators": operator_versions(c.decode, c.shots, c.windows, c.sharpness, c.exposure,
                                           c.aesthetic, c.motion, c.redundancy, c.keep_discard, c.captions),
            "provider": {"name": provider.name, "model": provider.model,
                         "prompts": {c.captions.task: c.captions.version,
                                     **({c.keep_discard.task: c.keep_discard.version} if verdict else {})}},
            "captions": captions,
        }
        if verdict is not None:
            meta["keep_discard"] = {"decision": "keep" if verdict["keep"] else "discard", "reason": verdict["reason"]}
        local = local_provenance(c)
        if local:
            meta["local_models"] = local
        return Document(cand.record, segments, meta)


def _with_record(rejection: Rejection, record: str) -> Rejection:
    return Rejection(rejection.stage, rejection.code, rejection.detail, record, rejection.failure)
