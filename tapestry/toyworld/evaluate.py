"""Judging whole ToyWorld Documents: each task's rule on top of `judge_image`.

    compose, edit   the target image against its scene (and copy, the diagnostic task).
    story           each frame against its scene (0.8) and identity persistence (0.2): for each
                    entity present in two consecutive frames, the colour, shape and pattern the
                    judge reads must change exactly where the story changes them.
    understand      normalized exact match of the answer (phrases.normalize_answer).
    howto           image count exact (0.3) and each expected step against the image at its
                    position (0.7; missing images score 0).

Beside each graded total, a strict figure (`exact`, judge.image_exact: every entity right in every
attribute, right background, nothing extra):

    compose, edit   exact = 1 when the target image is exact, else 0.
    story           exact = share of frames that are exact; persistence_exact = share of
                    (entity, consecutive frame pair) with the entity exact in both frames.
    understand      exact = the answer's exact match (the same as its total).
    howto           exact = share of expected steps whose image is exact (missing images: 0);
                    count_exact = 1 when the number of images is right.

The expected Document (from `tasks.sample` or a benchmark shard) gives the specs; the predicted
Document gives the pixels (its target images, in order) and the answer (its first target text).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image

from tapestry.document import Document, ImageSegment, TextSegment
from tapestry.errors import TapestryError
from tapestry.toyworld.judge import judge_image
from tapestry.toyworld.phrases import normalize_answer
from tapestry.toyworld.spec import Scene, SpecError

STORY_WEIGHTS = {"frames": 0.8, "persistence": 0.2}
HOWTO_WEIGHTS = {"count": 0.3, "steps": 0.7}


class JudgeError(TapestryError):
    """A document cannot be judged (no ToyWorld spec, unknown task, ...); the message says which."""


def toyworld_spec(doc: Document) -> dict[str, Any]:
    spec = doc.meta.get("toyworld") if isinstance(doc.meta, dict) else None
    if not isinstance(spec, dict) or spec.get("task") not in ("compose", "story", "edit", "understand", "howto",
                                                              "copy"):
        raise JudgeError(f"document {doc.id!r}: meta.toyworld is missing or names no ToyWorld task; "
                         "judge Documents made by `tapestry toyworld sample/bench` (or pass --expected)")
    return spec


def _targets(doc: Document) -> list[ImageSegment]:
    return [s for s in doc.segments if isinstance(s, ImageSegment) and s.role == "target"]


def _pixels(segment: ImageSegment) -> Image.Image | None:
    if segment.image is not None:
        return segment.image
    if segment.encoded is not None:
        try:
            return Image.open(io.BytesIO(segment.encoded)).convert("RGB")
        except Exception:  # noqa: BLE001 - undecodable bytes are an image the model failed to make
            return None
    return None


def _scene_of(segment: ImageSegment, doc: Document, k: int, spec: dict[str, Any]) -> Scene:
    meta = segment.meta.get("toyworld") if isinstance(segment.meta, dict) else None
    raw = meta.get("scene") if isinstance(meta, dict) else None
    if raw is None:
        scenes = spec.get("scenes") or []
        if k >= len(scenes):
            raise JudgeError(f"document {doc.id!r}: target {k + 1} has no scene in its meta or in meta.toyworld.scenes")
        raw = scenes[k]
    try:
        return Scene.from_dict(raw, f"{doc.id}: target {k + 1} scene")
    except SpecError as e:
        raise JudgeError(str(e)) from None


def _judge_frame(scene: Scene, segment: ImageSegment | None) -> dict[str, Any]:
    image = _pixels(segment) if segment is not None else None
    if image is None:
        return {"total": 0.0, "exact": False, "missing": True}
    return judge_image(scene, image)


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("total", "exact", "present", "cell", "colour", "shape", "pattern", "size", "background", "no_extra", "missing")
    return {k: result[k] for k in keys if k in result}


def _identity(found: dict[str, Any] | None, scores: dict[str, Any]) -> dict[str, Any] | None:
    if not found:
        return None
    # An attribute the judge cannot read at this size is left out of the comparison.
    return {a: found.get(a) for a in ("colour", "shape", "pattern") if scores.get(a) is not None}


def persistence(frames: list[Scene], results: list[dict[str, Any]]) -> float | None:
    """Share of (entity, consecutive frame pair) whose read identity changes exactly where the
    expected identity changes; None when no entity spans two frames."""
    checks = []
    for k in range(len(frames) - 1):
        a_res, b_res = results[k], results[k + 1]
        if "per_entity" not in a_res or "per_entity" not in b_res:
            keys_a = {e.key for e in frames[k].entities} & {e.key for e in frames[k + 1].entities}
            checks.extend([0.0] * len(keys_a))
            continue
        a_items = {p["expected"].get("key"): p for p in a_res["per_entity"]}
        b_items = {p["expected"].get("key"): p for p in b_res["per_entity"]}
        for key in set(a_items) & set(b_items):
            if key is None:
                continue
            pa, pb = a_items[key], b_items[key]
            if pa.get("readable") is False or pb.get("readable") is False:
                continue
            ia, ib = _identity(pa["found"], pa["scores"]), _identity(pb["found"], pb["scores"])
            if ia is None or ib is None:
                checks.append(0.0)
                continue
            ok = all((ia[attr] == ib[attr]) == (pa["expected"][attr] == pb["expected"][attr])
                     for attr in set(ia) & set(ib))
            checks.append(1.0 if ok else 0.0)
    return float(np.mean(checks)) if checks else None


def persistence_exact(frames: list[Scene], results: list[dict[str, Any]]) -> float | None:
    """Share of (entity, consecutive frame pair) with the entity exact in both frames: its
    identity carried, and drawn right, from one frame to the next. None when no entity spans
    two frames."""
    checks = []
    for k in range(len(frames) - 1):
        keys = {e.key for e in frames[k].entities} & {e.key for e in frames[k + 1].entities} - {None}
        if not keys:
            continue
        items = []
        for res in (results[k], results[k + 1]):
            items.append({p["expected"].get("key"): p for p in res.get("per_entity", [])})
        for key in keys:
            pa, pb = items[0].get(key), items[1].get(key)
            if pa is None or pb is None:
                checks.append(0.0)  # a frame that is missing, or an entity not read at all
                continue
            if pa.get("readable") is False or pb.get("readable") is False:
                continue
            checks.append(1.0 if pa["exact"] and pb["exact"] else 0.0)
    return float(np.mean(checks)) if checks else None


def _answer(doc: Document | None) -> str | None:
    if doc is None:
        return None
    for s in doc.segments:
        if isinstance(s, TextSegment) and s.role == "target":
            return s.text
    return None


def judge_document(expected: Document, predicted: Document | None = None) -> dict[str, Any]:
    """Score `predicted` against `expected` (the same Document with generated targets when
    `predicted` is None: a benchmark's own ground truth scores ~1)."""
    spec = toyworld_spec(expected)
    predicted = expected if predicted is None else predicted
    task = spec["task"]
    out: dict[str, Any] = {"id": expected.id, "task": task, "layout": spec.get("layout")}
    if task == "understand":
        want, got = spec.get("answer"), _answer(predicted)
        if want is None:
            raise JudgeError(f"document {expected.id!r}: meta.toyworld.answer is missing")
        match = got is not None and normalize_answer(got) == normalize_answer(want)
        out.update(total=1.0 if match else 0.0, exact=1.0 if match else 0.0, answer=got, expected_answer=want)
        return out
    expected_targets = _targets(expected)
    predicted_targets = _targets(predicted)
    scenes = [_scene_of(seg, expected, k, spec) for k, seg in enumerate(expected_targets)]
    if not scenes:
        raise JudgeError(f"document {expected.id!r}: no target images to judge")
    results = [_judge_frame(scene, predicted_targets[k] if k < len(predicted_targets) else None)
               for k, scene in enumerate(scenes)]
    out["targets"] = [_brief(r) for r in results]
    frame_mean = float(np.mean([r["total"] for r in results]))
    out["exact"] = round(float(np.mean([1.0 if r["exact"] else 0.0 for r in results])), 4)
    if task in ("compose", "edit", "copy"):
        out["total"] = results[0]["total"]
        out["exact"] = 1.0 if results[0]["exact"] else 0.0
    elif task == "story":
        kept = persistence(scenes, results)
        kept_exact = persistence_exact(scenes, results)
        out["frames"] = round(frame_mean, 4)
        out["persistence"] = None if kept is None else round(kept, 4)
        out["persistence_exact"] = None if kept_exact is None else round(kept_exact, 4)
        out["total"] = frame_mean if kept is None else (
            STORY_WEIGHTS["frames"] * frame_mean + STORY_WEIGHTS["persistence"] * kept)
    else:  # howto
        count_ok = len(predicted_targets) == len(scenes)
        out.update(expected_images=len(scenes), images=len(predicted_targets), count=1.0 if count_ok else 0.0,
                   steps=round(frame_mean, 4), count_exact=1.0 if count_ok else 0.0)
        out["total"] = HOWTO_WEIGHTS["count"] * out["count"] + HOWTO_WEIGHTS["steps"] * frame_mean
    out["total"] = round(float(out["total"]), 4)
    return out


def bootstrap_ci(values: list[float], n: int = 1000, seed: int = 0) -> list[float] | None:
    """95% percentile bootstrap interval of the mean (None for fewer than 2 values)."""
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    data = np.asarray(values, dtype=np.float64)
    means = data[rng.integers(0, data.size, (n, data.size))].mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


STRICT_KEYS = ("exact", "persistence_exact", "count_exact")


def strict_blocks(items: list[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """{"exact": {n, mean, ci95}} over the results that carry an exact figure, plus story's
    persistence_exact and how-to's count_exact when any result has them."""
    out: dict[str, Any] = {}
    for key in STRICT_KEYS:
        values = [float(r[key]) for r in items if r.get(key) is not None]
        if key == "exact" or values:
            out[key] = {"n": len(values), "mean": round(float(np.mean(values)), 4) if values else None,
                        "ci95": bootstrap_ci(values, n=n_boot, seed=seed)}
    return out


def summarize(results: Iterable[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Overall, per task and per task/layout means with bootstrap 95% intervals, the graded
    mean next to the exact rate (and story's persistence_exact, how-to's count_exact)."""
    results = list(results)

    def block(items: list[dict[str, Any]]) -> dict[str, Any]:
        totals = [r["total"] for r in items]
        return {"n": len(items), "mean": round(float(np.mean(totals)), 4) if totals else None,
                "ci95": bootstrap_ci(totals, seed=seed), **strict_blocks(items, seed=seed)}

    by_task: dict[str, list] = {}
    by_layout: dict[str, list] = {}
    for r in results:
        by_task.setdefault(r["task"], []).append(r)
        by_layout.setdefault(f"{r['task']}/{r.get('layout')}", []).append(r)
    return {"overall": block(results), "tasks": {k: block(v) for k, v in sorted(by_task.items())},
            "layouts": {k: block(v) for k, v in sorted(by_layout.items())}}


def judge_prompt(doc: Document) -> Document:
    """What a model is given for a ToyWorld document it is judged on: howto states only its goal
    (the model decides how many images, N-to-M); in the other tasks the text is given and the
    target images (and an understand answer) are generated in place."""
    task = doc.meta.get("toyworld", {}).get("task")
    prompt = doc.copy()
    first_target = next((i for i, s in enumerate(prompt.segments) if getattr(s, "role", None) == "target"),
                        len(prompt.segments))
    if task == "howto":
        prompt.segments = prompt.segments[:first_target]
        return prompt
    if task != "understand":
        for segment in prompt.segments:
            if isinstance(segment, TextSegment) and segment.role == "target":
                segment.role = "context"
    for segment in prompt.segments:
        if getattr(segment, "role", None) == "target" and not isinstance(segment, TextSegment):
            segment.image, segment.encoded, segment.src = None, None, None
    return prompt
