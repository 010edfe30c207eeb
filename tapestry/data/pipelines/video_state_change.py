"""`video-state-change` (Inset §3.2, synthesizing from videos): frame pairs in which the same
entities change state -> references cropped from the source frame + the later frame as target.

Per video: decode once into shots; take pairs (source, target) `gap` seconds apart inside a shot;
drop pairs with a bad frame (sharpness, exposure, aesthetic) and pairs that barely changed (ORB
static-pair filter); then ask the VLM (1) whether a subject really changed, (2) which entities
appear in both frames with a box in each, keep the sensible boxes, crop each entity from the
*source* frame (at the video's native resolution, fetched by seeking), and (3) for a description
of the target frame naming each entity with a phrase. Slots are woven in at the phrases:

    "A moment later, the <img:red-car/> red car turns into the <img:gate/> gate."
    [red-car crop, reference] [gate crop, reference] [target frame, target]

Training on these teaches a model to keep an entity's identity from its reference while changing
its state as the text says, instead of pasting the reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from tapestry.data.operators.base import (
    Rejected,
    Rejection,
    StageStats,
    ask_stage,
    operator_versions,
)
from tapestry.data.operators.boxes import BoxFilter
from tapestry.data.operators.orb import OrbStatic
from tapestry.data.operators.quality import Aesthetic, Exposure, Sharpness
from tapestry.data.operators.shots import Shots
from tapestry.data.operators.video import Decode, Frame, Shot, resize_long_side
from tapestry.data.operators.vlm import (
    ChangeCheck,
    Correspondence,
    Instruction,
    crop_box,
)
from tapestry.data.operators.windows import Scale, Window, Windows
from tapestry.data.pipelines import config as config_io
from tapestry.data.pipelines.video_common import (
    VIDEO_SUFFIXES,
    frame_quality,
    prime_quality,
    map_concurrently,
    process_video,
    shot_provenance,
    source_provenance,
)
from tapestry.data.records import ImageEncoding, InputItem, InputResult
from tapestry.document import Document, TextSegment

PAIR_SCALES = (Scale(2, 1.0), Scale(2, 3.0))


@dataclass(frozen=True)
class StateChangeOutput:
    # "native": crops come from the source frame fetched again by seeking, at up to
    # `native_max_side` (sharper references than the output-size frame when the video is larger);
    # "kept": from the output-size frame (no second decode)
    crop_from: str = "native"
    native_max_side: int = 1280
    crop_pad: float = 0.1  # extra margin around a box, as a share of its size
    crop_max_side: int = 256
    image: ImageEncoding = field(default_factory=ImageEncoding)

    def __post_init__(self) -> None:
        if self.crop_from not in ("native", "kept"):
            raise ValueError(f"output.crop_from must be 'native' or 'kept', got {self.crop_from!r}")


@dataclass(frozen=True)
class VideoStateChangeConfig:
    decode: Decode = field(default_factory=Decode)
    shots: Shots = field(default_factory=Shots)
    pairs: Windows = field(default_factory=lambda: Windows(scales=PAIR_SCALES))
    sharpness: Sharpness = field(default_factory=Sharpness)
    exposure: Exposure = field(default_factory=Exposure)
    aesthetic: Aesthetic = field(default_factory=Aesthetic)
    orb: OrbStatic = field(default_factory=OrbStatic)
    change: ChangeCheck = field(default_factory=ChangeCheck)
    correspondence: Correspondence = field(default_factory=Correspondence)
    boxes: BoxFilter = field(default_factory=BoxFilter)
    instruction: Instruction = field(default_factory=Instruction)
    output: StateChangeOutput = field(default_factory=StateChangeOutput)
    seed: int = 0

    def __post_init__(self) -> None:
        self.pairs.check_grid(self.decode.grid_step_s)
        if any(s.frames != 2 for s in self.pairs.scales):
            raise ValueError("pairs.scales must all have 2 frames (source and target), e.g. 2x1,2x3")


@dataclass
class Candidate:
    record: str
    window: Window
    scores: dict[str, float]

    @property
    def source(self) -> Frame:
        return self.window.frames[0]

    @property
    def target(self) -> Frame:
        return self.window.frames[1]


def slug(name: str, taken: set[str]) -> str:
    """An image name from an entity's phrase: 'the red car' -> 'red-car' (unique in `taken`)."""
    words = [w for w in re.findall(r"[a-z0-9]+", name.lower()) if w not in ("a", "an", "the")]
    base = "-".join(words)[:40].strip("-") or "entity"
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    taken.add(candidate)
    return candidate


class VideoStateChange:
    name: ClassVar[str] = "video-state-change"
    version: ClassVar[str] = "1"
    config_class: ClassVar[type] = VideoStateChangeConfig
    input_suffixes: ClassVar[tuple[str, ...]] = VIDEO_SUFFIXES
    stages: ClassVar[tuple[str, ...]] = ("probe", "decode", "shots", "pairs", "sharpness", "exposure", "aesthetic",
                                         "orb", "filters", "seek", "change-check", "correspondence", "boxes",
                                         "instruction")

    def __init__(self, config: VideoStateChangeConfig):
        self.config = config
        self.fingerprint = config_io.fingerprint(config)
        self._scorer = config.aesthetic.scorer_fn()

    def filter_pair(self, window: Window, stats: StageStats) -> dict[str, float]:
        c = self.config
        for frame in window.frames:
            problem = frame_quality(frame, c.sharpness, c.exposure, c.aesthetic, self._scorer, stats)
            if problem is not None:
                raise Rejected(problem.stage, problem.code, problem.detail)
        with stats.timed(c.orb.name):
            scores = c.orb.similarity(*window.frames)
            stats.count(c.orb.name, seen=1)
            c.orb.check(scores, f"{window.frames[0].time:.2f}->{window.frames[1].time:.2f} s: ")
            stats.count(c.orb.name, kept=1)
        return scores

    def process(self, item: InputItem, provider: Any) -> InputResult:
        def per_shot(shot, stem, info, stats, rejections):
            candidates = self.shot_candidates(shot, stem, stats, rejections)
            sources = self.native_sources(candidates, item, info, stats)
            return self.documents(candidates, sources, item, info, provider, stats, rejections)

        return process_video(item, self.config.decode, self.config.shots, per_shot)

    def shot_candidates(self, shot: Shot, stem: str, stats: StageStats,
                        rejections: list[Rejection]) -> list[Candidate]:
        c = self.config
        with stats.timed("pairs"):
            pairs = c.pairs.windows(shot, c.decode.grid_step_s)
        stats.count("pairs", seen=1, kept=len(pairs))  # one shot in, its pairs out
        prime_quality([f for w in pairs for f in w.frames], c.sharpness, c.exposure, c.aesthetic, self._scorer, stats)
        candidates: list[Candidate] = []
        for window in pairs:
            record = window.record_id(stem)
            try:
                scores = self.filter_pair(window, stats)
            except Rejected as r:
                rejections.append(Rejection(r.rejection.stage, r.rejection.code, r.rejection.detail, record))
                continue
            candidates.append(Candidate(record, window, scores))
        stats.count("filters", seen=len(pairs), kept=len(candidates))
        return candidates

    def native_sources(self, candidates: list[Candidate], item: InputItem, info: Any,
                       stats: StageStats) -> dict[float, np.ndarray]:
        """Source frames at the video's own resolution (capped), fetched by seeking, when the
        video is larger than the output frames; {} otherwise (kept frames are native then)."""
        c = self.config
        larger = max(info.width, info.height) > c.decode.frame_size
        if c.output.crop_from != "native" or not candidates or not larger:
            return {}
        with stats.timed("seek"):
            times = sorted({cand.source.time for cand in candidates})
            side = min(max(info.width, info.height), c.output.native_max_side)
            sources = dict(zip(times, c.decode.frames_at(item.path, times, long_side=side)))
        stats.count("seek", seen=len(times), kept=len(times))
        return sources

    def documents(self, candidates: list[Candidate], sources: dict[float, np.ndarray], item: InputItem, info: Any,
                  provider: Any, stats: StageStats, rejections: list[Rejection]) -> list[Document]:
        """The VLM steps for each candidate pair (model calls run concurrently)."""

        def one(cand: Candidate) -> Document | Rejection:
            try:
                return self.vlm_steps(cand, item.shown, info, sources.get(cand.source.time), provider, stats)
            except Rejected as r:
                rejection = r.rejection
                return Rejection(rejection.stage, rejection.code, rejection.detail, cand.record, rejection.failure)

        outcomes = map_concurrently(one, candidates, provider.max_concurrency)
        rejections += [o for o in outcomes if isinstance(o, Rejection)]
        return [o for o in outcomes if isinstance(o, Document)]

    def vlm_steps(self, cand: Candidate, path: str, info: Any, native_source: np.ndarray | None,
                  provider: Any, stats: StageStats) -> Document:
        c = self.config
        source, target = cand.source.rgb, cand.target.rgb
        verdict = _ask_uncounted(c.change.name, provider, c.change.request(source, target, c.seed),
                            ChangeCheck.check, stats)
        if not verdict["changed"]:
            raise Rejected(c.change.name, "no-change", verdict["reason"] or "the VLM sees no state change")
        stats.count(c.change.name, kept=1)
        objects = _ask_uncounted(c.correspondence.name, provider, c.correspondence.request(source, target, c.seed),
                            c.correspondence.check, stats)
        with stats.timed(c.boxes.name):
            kept, dropped = c.boxes.keep(objects)
            stats.count(c.boxes.name, seen=len(objects), kept=len(kept))
        if not objects:
            raise Rejected(c.correspondence.name, "no-objects", "the VLM found no entity in both frames")
        if not kept:
            raise Rejected(c.boxes.name, "no-usable-box",
                           ", ".join(f"{n} {why}" for why, n in dropped.items()) or "no box left")
        stats.count(c.correspondence.name, kept=1)
        crop_image = native_source if native_source is not None else source
        taken: set[str] = set()
        named = {slug(obj["name"], taken): obj for obj in kept}
        crops: dict[str, np.ndarray] = {}
        for key, obj in named.items():
            crop = crop_box(crop_image, obj["source_box"], c.output.crop_pad)
            if max(crop.shape[:2]) > c.output.crop_max_side:
                crop = resize_long_side(crop, c.output.crop_max_side)
            crops[key] = crop
        answer = _ask_uncounted(c.instruction.name, provider,
                           c.instruction.request(target, crops, named, c.seed),
                           Instruction.check(list(named)), stats)
        stats.count(c.instruction.name, kept=1)
        encode = c.output.image
        segments: list[Any] = [TextSegment(answer["woven"])]
        for key, obj in named.items():
            segments.append(encode.segment(crops[key], "reference", key,
                                           {"phrase": answer["phrases"][key], "label": obj["name"],
                                            "source_box": obj["source_box"], "target_box": obj["target_box"],
                                            "change": obj["change"], "time": cand.source.time,
                                            "cropped_from": [crop_image.shape[1], crop_image.shape[0]]}))
        segments.append(encode.segment(target, "target", "target",
                                       {"time": cand.target.time, "scores": dict(cand.target.scores)}))
        meta = {
            "source": source_provenance(path, info),
            "shot": shot_provenance(cand.window.shot),
            "pair": {"source_time": cand.source.time, "target_time": cand.target.time,
                     "gap": cand.window.scale.interval, "scores": cand.scores,
                     "source_scores": dict(cand.source.scores)},
            "pipeline": {"name": self.name, "version": self.version, "config": self.fingerprint, "seed": c.seed},
            "operators": operator_versions(c.decode, c.shots, c.pairs, c.sharpness, c.exposure, c.aesthetic,
                                           c.orb, c.change, c.correspondence, c.boxes, c.instruction),
            "provider": {"name": provider.name, "model": provider.model,
                         "prompts": {op.task: op.version for op in (c.change, c.correspondence, c.instruction)}},
            "change": verdict,
            "caption": answer["text"],
        }
        return Document(cand.record, segments, meta)


def _ask_uncounted(stage, provider, request, check, stats):
    """State-change steps count what they keep themselves (a pair may pass one step and fail the next)."""
    return ask_stage(stage, provider, request, check, stats, count_kept=False)
