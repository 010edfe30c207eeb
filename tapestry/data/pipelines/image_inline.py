"""`image-inline` (Inset §3.2, synthesizing from images): one picture -> an inline interleaved
caption whose salient objects are reference images standing at the phrases that name them.

Per image: a VLM writes a global caption; a detector finds objects (label + box); boxes are
filtered (area, aspect, overlap, count); a segmenter outlines each (GrabCut on the box when it
fails); each object is cut out with its background removed and captioned by the VLM; an LLM weaves
one caption with a slot per object and a phrase map, validated with repair requests:

    "A bright, wide view in mostly grey tones. It shows a <img:red-object/> red object at the left."
    [red-object cut-out, reference] ...  [the original image, target]

A sidecar `NAME.json` beside `NAME.png` with {"objects": [{"label": ..., "box": [x0, y0, x1, y1]}]}
(0-1000 grid) is handed to the detector as ground truth (the offline detector returns it as is);
`toyworld_sidecar` writes one for a ToyWorld scene.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
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
from tapestry.data.operators.objects import (
    Detect,
    GlobalCaption,
    InlineWeave,
    Masks,
    ObjectCaptions,
    cutout,
    grabcut_mask,
    polygon_mask,
)
from tapestry.data.operators.video import resize_long_side
from tapestry.data.pipelines import config as config_io
from tapestry.data.pipelines.video_common import map_concurrently
from tapestry.data.pipelines.video_state_change import slug
from tapestry.data.providers import BudgetExhausted, ProviderError, ask_json
from tapestry.data.providers.local import provenance as local_provenance
from tapestry.data.records import ImageEncoding, InputItem, InputResult
from tapestry.document import Document, TextSegment
from tapestry.errors import TapestryError
from tapestry.storage import load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class ImageInput:
    max_side: int = 1024  # larger pictures are shrunk first (model calls and masks see this size)
    min_side: int = 64  # smaller ones are rejected


@dataclass(frozen=True)
class InlineOutput:
    min_objects: int = 1  # fewer usable objects left: the image is rejected
    crop_pad: float = 0.05
    crop_max_side: int = 256
    crop_background: tuple[int, int, int] = (255, 255, 255)  # what replaces the removed background
    image: ImageEncoding = field(default_factory=lambda: ImageEncoding("png"))


@dataclass(frozen=True)
class ImageInlineConfig:
    input: ImageInput = field(default_factory=ImageInput)
    global_caption: GlobalCaption = field(default_factory=GlobalCaption)
    detect: Detect = field(default_factory=Detect)
    boxes: BoxFilter = field(default_factory=lambda: BoxFilter(min_area=0.01, max_area=0.8, max_objects=4,
                                                               box_key="box"))
    masks: Masks = field(default_factory=Masks)
    object_captions: ObjectCaptions = field(default_factory=ObjectCaptions)
    weave: InlineWeave = field(default_factory=InlineWeave)
    output: InlineOutput = field(default_factory=InlineOutput)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.boxes.box_key != "box":
            raise ValueError("boxes.box_key must be 'box' for image-inline")
        if self.output.min_objects < 1:
            raise ValueError("output.min_objects must be at least 1")


def image_stem(path: str, data: bytes) -> str:
    stem = re.sub(r"[^\w.-]+", "-", Path(path).stem).strip("-.") or "image"
    return f"{stem[:80]}-{hashlib.sha256(data).hexdigest()[:8]}"


def read_sidecar(path: str) -> list[dict[str, Any]] | None:
    """Ground-truth objects from `NAME.json` beside the image, or None when there is none."""
    sidecar = Path(path).with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        obj = json.loads(sidecar.read_text(encoding="utf-8"))
        objects = obj["objects"]
        if not isinstance(objects, list) or not all(isinstance(o, dict) and "label" in o and "box" in o
                                                    for o in objects):
            raise ValueError("'objects' must be a list of {label, box}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Rejected("load", "bad-sidecar", f"{sidecar.name}: {e}", failure=True) from None
    return objects


def toyworld_sidecar(scene: Any, side: int) -> dict[str, Any]:
    """{"objects": [...]} with the exact box (0-1000 grid) and a label of each entity of a ToyWorld
    scene rendered at `side` pixels."""
    from tapestry.toyworld.render import cell_centre, entity_box, entity_radius

    objects = []
    for placed in scene.entities:
        left, top, width, height = entity_box(cell_centre(placed.cell, side), entity_radius(placed.size, side), side)
        objects.append({"label": placed.entity.describe(),
                        "box": [round(v / side * 1000, 1) for v in (left, top, left + width, top + height)]})
    return {"objects": objects}


class ImageInline:
    name: ClassVar[str] = "image-inline"
    version: ClassVar[str] = "1"
    config_class: ClassVar[type] = ImageInlineConfig
    input_suffixes: ClassVar[tuple[str, ...]] = IMAGE_SUFFIXES
    input_noun: ClassVar[str] = "images"
    stages: ClassVar[tuple[str, ...]] = ("load", "global-caption", "detect", "boxes", "masks", "crops",
                                         "object-captions", "weave")

    def __init__(self, config: ImageInlineConfig):
        self.config = config
        self.fingerprint = config_io.fingerprint(config)
        self._local: dict[str, Any] = {}  # local models, loaded on first use once per process

    def local_model(self, stage: str) -> Any:
        if stage not in self._local:
            from tapestry.data.providers.local import LocalDetector, LocalSegmenter

            c = self.config
            self._local[stage] = (LocalDetector(c.detect.model, stage) if stage == c.detect.name
                                  else LocalSegmenter(c.masks.source, stage))
        return self._local[stage]

    def load(self, item: InputItem, stats: StageStats) -> tuple[np.ndarray, bytes, list | None]:
        c = self.config.input
        with stats.timed("load"):
            stats.count("load", seen=1)
            try:
                image, data = load_image(item.path)
            except TapestryError as e:
                raise Rejected("load", "unreadable", str(e).replace(item.path + ": ", ""), failure=True) from None
            if min(image.size) < c.min_side:
                raise Rejected("load", "too-small", f"{image.width}x{image.height} is under {c.min_side} px a side")
            rgb = np.asarray(image)
            if max(rgb.shape[:2]) > c.max_side:
                rgb = resize_long_side(rgb, c.max_side)
            truth = read_sidecar(item.path)
            stats.count("load", kept=1)
        return rgb, data, truth

    def process(self, item: InputItem, provider: Any) -> InputResult:
        stats = StageStats()
        result = InputResult(item.key, item.shown)
        try:
            rgb, data, truth = self.load(item, stats)
        except Rejected as r:
            result.failed = r.rejection.failure
            result.rejections.append(r.rejection)
            result.stats = stats.to_json()
            return result
        record = image_stem(item.path, data)
        try:
            result.docs.append(self.document(record, item, rgb, data, truth, provider, stats))
        except Rejected as r:
            x = r.rejection
            result.rejections.append(Rejection(x.stage, x.code, x.detail, record, x.failure))
        except BudgetExhausted as e:  # not done: the engine leaves this input for the next run
            result.stopped = str(e)
            return result
        result.stats = stats.to_json()
        return result

    def mask(self, rgb: np.ndarray, obj: dict[str, Any], provider: Any, stats: StageStats) -> tuple[np.ndarray, str]:
        """The object's mask and where it came from ("segmenter" or "grabcut")."""
        c = self.config
        h, w = rgb.shape[:2]
        if c.masks.source == "provider":
            try:
                value, _ = ask_json(provider, c.masks.request(rgb, obj, c.seed), Masks.check, provider.repairs)
                mask = polygon_mask(value, w, h) & polygon_mask(_box_polygon(obj["box"]), w, h)
                if c.masks.plausible(mask, obj["box"]):
                    return mask, "segmenter"
            except BudgetExhausted:
                raise
            except ProviderError:
                pass  # GrabCut below
        mask = grabcut_mask(rgb, obj["box"], c.masks.grabcut_iterations, c.masks.grabcut_max_side)
        return mask, "grabcut"

    def detect(self, rgb: np.ndarray, caption: str, truth: list | None, provider: Any,
               stats: StageStats) -> list[dict[str, Any]]:
        c = self.config
        if c.detect.model == "provider":
            return ask_stage(c.detect.name, provider, c.detect.request(rgb, c.seed, truth), c.detect.check, stats)
        detector = self.local_model(c.detect.name)  # loaded once per process, outside the stage's time
        with stats.timed(c.detect.name):
            stats.count(c.detect.name, seen=1)
            found = detector.detect(
                [rgb], [c.detect.local_queries(caption)], c.detect.min_score, c.detect.max_objects,
                batch_size=c.detect.batch_size, template=c.detect.query_template)[0]
            stats.count(c.detect.name, kept=1)
        return found

    def local_masks(self, rgb: np.ndarray, kept: list[dict[str, Any]],
                    stats: StageStats) -> list[tuple[dict[str, Any], np.ndarray, str, float]]:
        """Masks of every kept box from the local segmenter in one batched call; GrabCut for
        the ones it makes implausible."""
        c = self.config
        masks = self.local_model(c.masks.name).segment([rgb], [[o["box"] for o in kept]], c.masks.batch_size)[0]
        out = []
        for obj, (mask, _iou) in zip(kept, masks):
            source = "segmenter"
            if not c.masks.plausible(mask, obj["box"]):
                mask, source = grabcut_mask(rgb, obj["box"], c.masks.grabcut_iterations, c.masks.grabcut_max_side), "grabcut"
            out.append((obj, mask, source, c.masks.fill(mask, obj["box"])))
        return out

    def document(self, record: str, item: InputItem, rgb: np.ndarray, data: bytes, truth: list | None,
                 provider: Any, stats: StageStats) -> Document:
        c = self.config
        caption = ask_stage(c.global_caption.name, provider, c.global_caption.request(rgb, c.seed),
                            GlobalCaption.check, stats)
        found = self.detect(rgb, caption, truth, provider, stats)
        if not found:
            raise Rejected(c.detect.name, "no-objects", "the detector found no object")
        with stats.timed(c.boxes.name):
            kept, dropped = c.boxes.keep(found)
            stats.count(c.boxes.name, seen=len(found), kept=len(kept))
        if len(kept) < c.output.min_objects:
            raise Rejected(c.boxes.name, "too-few-objects", f"{len(kept)} left of {len(found)}: "
                           + (", ".join(f"{n} {why}" for why, n in dropped.items()) or "none dropped"))

        def masked(obj: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray, str, float]:
            mask, source = self.mask(rgb, obj, provider, stats)
            return obj, mask, source, c.masks.fill(mask, obj["box"])

        if c.masks.source.startswith("local:"):
            self.local_model(c.masks.name)  # loaded once per process, outside the stage's time
        with stats.timed(c.masks.name):
            if c.masks.source.startswith("local:"):
                outcomes = self.local_masks(rgb, kept, stats)
            else:
                outcomes = map_concurrently(masked, kept, provider.max_concurrency)
        usable = [o for o in outcomes if c.masks.plausible(o[1], o[0]["box"])]
        stats.count(c.masks.name, seen=len(kept), kept=len(usable))
        if len(usable) < c.output.min_objects:
            raise Rejected(c.masks.name, "no-mask", f"{len(usable)} of {len(kept)} object(s) got a usable mask "
                           f"(fill of the box between {c.masks.min_fill} and {c.masks.max_fill})")
        taken: set[str] = set()
        objects: dict[str, dict[str, Any]] = {}
        crops: dict[str, np.ndarray] = {}
        with stats.timed("crops"):
            for obj, mask, source, fill in usable:
                key = slug(obj["label"], taken)
                crop = cutout(rgb, mask, obj["box"], c.output.crop_pad, tuple(c.output.crop_background))
                if max(crop.shape[:2]) > c.output.crop_max_side:
                    crop = resize_long_side(crop, c.output.crop_max_side)
                crops[key] = crop
                objects[key] = {"label": obj["label"], "box": obj["box"], "mask": source, "fill": round(fill, 3)}
            stats.count("crops", seen=len(usable), kept=len(crops))

        def described(key: str) -> str:
            return ask_stage(c.object_captions.name, provider,
                             c.object_captions.request(crops[key], objects[key], c.seed), ObjectCaptions.check, stats)

        for key, text in zip(objects, map_concurrently(described, list(objects), provider.max_concurrency)):
            objects[key]["caption"] = text
        woven = ask_stage(c.weave.name, provider, c.weave.request(caption, objects, c.seed),
                          c.weave.check(objects, caption), stats)
        encode = c.output.image
        segments: list[Any] = [TextSegment(woven["caption"])]
        for key, obj in objects.items():
            segments.append(encode.segment(crops[key], "reference", key, {**obj, "phrase": woven["phrases"][key]}))
        segments.append(encode.segment(rgb, "target", "image"))
        meta = {
            "source": {"path": item.shown, "name": Path(item.path).name,
                       "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                       "width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "ground_truth": truth is not None},
            "pipeline": {"name": self.name, "version": self.version, "config": self.fingerprint, "seed": c.seed},
            "operators": operator_versions(c.global_caption, c.detect, c.boxes, c.masks, c.object_captions, c.weave),
            "provider": {"name": provider.name, "model": provider.model,
                         "prompts": {op.task: op.version for op in (c.global_caption, c.detect, c.masks,
                                                                    c.object_captions, c.weave)}},
            "captions": {"global": caption, "plain": woven["plain"]},
            "objects": {"detected": len(found), "dropped_by_boxes": dropped,
                        "dropped_by_masks": len(kept) - len(usable)},
        }
        if local_provenance(c):
            meta["local_models"] = local_provenance(c)
        return Document(record, segments, meta)


def _box_polygon(box: list[float]) -> list[list[float]]:
    x0, y0, x1, y1 = box
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
