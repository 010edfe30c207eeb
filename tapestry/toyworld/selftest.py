"""The judge's self-test: does it score perfect renders ~1 and fall on each kind of mistake?

Scenes are drawn at random (2-4 entities with distinct identities, random rotations, every kind
of background). Each is rendered clean, then again after one edit of its spec — the mistakes a
generator makes — and the judge scores every image against the *unedited* spec:

    wrong_colour, wrong_shape, wrong_pattern, wrong_cell, wrong_size: one entity changed;
    missing: one entity removed; extra: one entity added on a free cell;
    swapped: two entities of different identity trade places;
    wrong_background: another kind in far-away colours.

For each mistake the report gives the mean total and the mean sub-score of the attribute that
was broken, read where it was broken (the edited entity, or the scene for extras and background).
`degraded`: clean renders after mild blur, noise and JPEG, which a judge must not mistake for
errors. Thresholds (issue 4): clean mean >= 0.99, clean min >= 0.97, each broken attribute
<= 0.5 with the total below the clean total, degraded mean >= 0.9.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from tapestry.toyworld.judge import analyse_image, score_scene
from tapestry.toyworld.render import render_layers
from tapestry.toyworld.sampling import (
    pick,
    random_background,
    random_entity,
    random_scene,
)
from tapestry.toyworld.spec import (
    BACKGROUND_KINDS,
    BACKGROUND_RGB,
    COLOURS,
    PATTERNS,
    SHAPES,
    Background,
    PlacedEntity,
    Scene,
)

CORRUPTIONS: tuple[str, ...] = ("wrong_colour", "wrong_shape", "wrong_pattern", "wrong_cell", "wrong_size",
                                "missing", "extra", "swapped", "wrong_background")
THRESHOLDS = {"clean_mean": 0.99, "clean_min": 0.97, "attribute_max": 0.5, "degraded_mean": 0.9}


def _other(rng: np.random.Generator, options: tuple[str, ...], current: str) -> str:
    return pick(rng, tuple(o for o in options if o != current))


def corrupt(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[Background, list[PlacedEntity], list[int]]:
    """(background, entities, indices of the expected entities the mistake touches)."""
    entities = list(scene.entities)
    i = int(rng.integers(len(entities)))
    e = entities[i]
    if kind == "wrong_colour":
        entities[i] = e.with_(colour=_other(rng, COLOURS, e.entity.colour))
    elif kind == "wrong_shape":
        entities[i] = e.with_(shape=_other(rng, SHAPES, e.entity.shape))
    elif kind == "wrong_pattern":
        entities[i] = e.with_(pattern=_other(rng, PATTERNS, e.entity.pattern))
    elif kind == "wrong_cell":
        entities[i] = e.with_(cell=pick(rng, tuple(scene.free_cells())))
    elif kind == "wrong_size":
        entities[i] = e.with_(size="small" if e.size == "large" else "large")
    elif kind == "missing":
        del entities[i]
    elif kind == "extra":
        extra = random_entity(rng, {x.entity for x in entities})
        entities.append(PlacedEntity(extra, pick(rng, tuple(scene.free_cells())), pick(rng, ("small", "large")),
                                     round(float(rng.uniform(0, 360)), 1)))
        return scene.background, entities, []
    elif kind == "swapped":
        pairs = [(a, b) for a in range(len(entities)) for b in range(a + 1, len(entities))
                 if entities[a].entity.colour != entities[b].entity.colour]
        pairs = pairs or [(a, b) for a in range(len(entities)) for b in range(a + 1, len(entities))]
        a, b = pairs[int(rng.integers(len(pairs)))]
        entities[a], entities[b] = (entities[a].with_(cell=entities[b].cell), entities[b].with_(cell=entities[a].cell))
        return scene.background, entities, [a, b]
    elif kind == "wrong_background":
        return _far_background(scene.background, rng), entities, []
    else:
        raise ValueError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    return scene.background, entities, [i]


def _far_background(background: Background, rng: np.random.Generator) -> Background:
    kind = _other(rng, BACKGROUND_KINDS, background.kind)
    old = np.mean([BACKGROUND_RGB[c] for c in background.colours], axis=0)
    while True:
        candidate = random_background(rng, kind)
        new = np.mean([BACKGROUND_RGB[c] for c in candidate.colours], axis=0)
        if math.dist(old, new) >= 45.0:
            return candidate


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild blur (0.6 px at 64 px, scaled with size), Gaussian noise (sigma 3 levels), JPEG q=85."""
    side = image.shape[0]
    blurred = Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.6 * side / 64))
    noisy = np.asarray(blurred, dtype=np.float32) + rng.normal(0.0, 3.0, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=85)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _attribute(kind: str, result: dict[str, Any], touched: list[int]) -> float | None:
    """The broken attribute's sub-score, read where it was broken (None if it cannot be read)."""
    if kind == "extra":
        return result["no_extra"]
    if kind == "wrong_background":
        return result["background"]
    name = {"wrong_colour": "colour", "wrong_shape": "shape", "wrong_pattern": "pattern", "wrong_cell": "cell",
            "wrong_size": "size", "missing": "present"}.get(kind)
    values = []
    for i in touched:
        item = result["per_entity"][i]
        if item.get("readable") is False:
            continue
        scores = item["scores"]
        if name is not None:
            values.append(scores[name])
        else:  # swapped: is this identity at this place? (matching may blame place or identity)
            judged = [scores[k] for k in ("cell", "colour", "shape", "pattern") if scores[k] is not None]
            values.append(min(judged))
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def run_self_test(n: int = 100, seed: int = 0, side: int = 64,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Score n clean scenes, each under every corruption and degraded; the JSON report."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    clean: list[float] = []
    degraded: list[float] = []
    totals: dict[str, list[float]] = {k: [] for k in CORRUPTIONS}
    attributes: dict[str, list[float]] = {k: [] for k in CORRUPTIONS}
    drops: dict[str, list[float]] = {k: [] for k in CORRUPTIONS}
    for k in range(n):
        scene = random_scene(rng, (2, 4), rotate=True)
        image = render_layers(scene.background, scene.entities, side)
        base = score_scene(scene, analyse_image(image))["total"]
        clean.append(base)
        degraded.append(score_scene(scene, analyse_image(degrade(image, rng)))["total"])
        for kind in CORRUPTIONS:
            background, entities, touched = corrupt(scene, kind, rng)
            result = score_scene(scene, analyse_image(render_layers(background, entities, side)))
            totals[kind].append(result["total"])
            drops[kind].append(base - result["total"])
            value = _attribute(kind, result, touched)
            if value is not None:
                attributes[kind].append(value)
        if progress is not None:
            progress(k + 1)
    report: dict[str, Any] = {
        "clean_mean": round(float(np.mean(clean)), 4),
        "clean_min": round(float(np.min(clean)), 4),
        "corruptions": {k: {"total": round(float(np.mean(totals[k])), 4),
                            "attribute": round(float(np.mean(attributes[k])), 4) if attributes[k] else None}
                        for k in CORRUPTIONS},
        "degraded": {"mean": round(float(np.mean(degraded)), 4), "min": round(float(np.min(degraded)), 4)},
        "n": n, "seed": seed, "side": side,
    }
    failures = []
    if report["clean_mean"] < THRESHOLDS["clean_mean"]:
        failures.append(f"clean_mean {report['clean_mean']} < {THRESHOLDS['clean_mean']}")
    if report["clean_min"] < THRESHOLDS["clean_min"]:
        failures.append(f"clean_min {report['clean_min']} < {THRESHOLDS['clean_min']}")
    for k in CORRUPTIONS:
        attribute = report["corruptions"][k]["attribute"]
        if attribute is None or attribute > THRESHOLDS["attribute_max"]:
            failures.append(f"{k}: attribute {attribute} > {THRESHOLDS['attribute_max']}")
        if not np.mean(drops[k]) > 0:
            failures.append(f"{k}: the total did not drop")
    if report["degraded"]["mean"] < THRESHOLDS["degraded_mean"]:
        failures.append(f"degraded mean {report['degraded']['mean']} < {THRESHOLDS['degraded_mean']}")
    report["ok"] = not failures
    report["failures"] = failures
    return report


__all__ = ["CORRUPTIONS", "THRESHOLDS", "corrupt", "degrade", "run_self_test"]
