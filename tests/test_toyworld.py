"""ToyWorld spec, renderer and judge: the yardstick every later number depends on."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tapestry.errors import TapestryError
from tapestry.toyworld.judge import analyse_image, judge_image, score_scene
from tapestry.toyworld.render import render_layers, render_scene, render_scene_array
from tapestry.toyworld.sampling import random_scene
from tapestry.toyworld.selftest import CORRUPTIONS, SPEC_CORRUPTIONS, corrupt, run_self_test
from tapestry.toyworld.spec import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    GRADIENT_PAIRS,
    PATTERNS,
    Background,
    Entity,
    PlacedEntity,
    Scene,
    SpecError,
)


def scenes(n: int, seed: int = 0, rotate: bool = False, count=(1, 4)) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng, count, rotate=rotate) for _ in range(n)]


# ------------------------------------------------------------------ spec
def test_spec_round_trips_through_json():
    for scene in scenes(30, seed=1, rotate=True):
        text = json.dumps(scene.to_dict())
        assert Scene.from_dict(json.loads(text)) == scene


@pytest.mark.parametrize("change, words", [
    (lambda d: d["entities"][0].update(colour="pink"), ["entities[0].colour", "'pink'", "red"]),
    (lambda d: d["entities"][0].update(cell=9), ["entities[0].cell", "0..8"]),
    (lambda d: d["entities"].append(dict(d["entities"][0])), ["already taken"]),
    (lambda d: d.update(entities=[]), ["1 to 4 entities"]),
    (lambda d: d["entities"][0].update(size="huge"), ["size", "small, large"]),
    (lambda d: d["entities"][0].update(rotation=float("nan")), ["rotation", "finite"]),
    (lambda d: d["entities"][0].update(glow=True), ["unknown field", "'glow'"]),
    (lambda d: d.update(background={"kind": "gradient", "colours": ["slate", "dusk"], "direction": "vertical"}),
     ["too alike", "slate"]),
    (lambda d: d.update(background={"kind": "plain", "colours": ["stone", "fog"]}), ["takes 1 colour"]),
])
def test_spec_errors_name_the_field_and_the_fix(change, words):
    raw = scenes(1, seed=2, count=(2, 2))[0].to_dict()
    change(raw)
    with pytest.raises(SpecError) as info:
        Scene.from_dict(raw)
    assert isinstance(info.value, TapestryError)
    for word in words:
        assert word in str(info.value)


def test_every_gradient_pair_is_far_enough_apart_to_be_judged():
    assert len(GRADIENT_PAIRS) >= 15
    for first, second in GRADIENT_PAIRS:
        Background("gradient", (first, second), "diagonal")  # does not raise


# --------------------------------------------------------------- renderer
def test_renderer_is_deterministic_within_and_across_processes():
    scene = scenes(1, seed=3, rotate=True)[0]
    a = render_scene_array(scene, 64)
    assert np.array_equal(a, render_scene_array(scene, 64))
    code = ("import json,sys,hashlib; from tapestry.toyworld.spec import Scene; "
            "from tapestry.toyworld.render import render_scene_array; "
            "s=Scene.from_dict(json.loads(sys.argv[1])); print(hashlib.sha256(render_scene_array(s,64).tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(scene.to_dict())], capture_output=True, text=True,
                         check=True).stdout.strip()
    import hashlib

    assert out == hashlib.sha256(a.tobytes()).hexdigest()


@pytest.mark.parametrize("side", [32, 64, 128, 256])
def test_renderer_draws_any_resolution_with_antialiasing(side):
    scene = Scene(Background("plain", ("stone",)), (PlacedEntity(Entity("circle", "red"), 4, "large"),))
    image = render_scene(scene, side)
    assert image.size == (side, side) and image.mode == "RGB"
    colours = {tuple(c) for c in np.asarray(image).reshape(-1, 3)}
    assert len(colours) > 2  # edge pixels blend entity and background


def test_renderer_refuses_a_silly_resolution():
    scene = scenes(1)[0]
    with pytest.raises(SpecError, match="resolution"):
        render_scene(scene, 4)


def test_patterns_are_visible_at_64_px():
    ink_share = {}
    for pattern in PATTERNS:
        scene = Scene(Background("plain", ("sand",)), (PlacedEntity(Entity("circle", "yellow", pattern), 4, "small"),))
        pixels = render_scene_array(scene, 64)[21:43, 21:43]
        ink_share[pattern] = float((pixels.max(axis=-1) < 90).mean())
    assert ink_share["solid"] == 0.0
    for pattern in ("striped", "dotted", "ringed"):
        assert ink_share[pattern] > 0.05, ink_share


# ------------------------------------------------------------------ judge
def test_backgrounds_alone_never_read_as_entities():
    rng = np.random.default_rng(4)
    for kind in BACKGROUND_KINDS:
        for colour in BACKGROUND_COLOURS:
            if kind == "gradient":
                pair = next(p for p in GRADIENT_PAIRS if colour in p)
                background = Background(kind, pair, "diagonal")
            else:
                background = Background(kind, (colour,), seed=int(rng.integers(1000)))
            for side in (32, 64):
                analysis = analyse_image(render_layers(background, [], side))
                assert analysis.blobs == [], (background, side)
                assert analysis.background.kind == kind, (background, side, analysis.background.summary())


@pytest.mark.parametrize("background", ["fog", "sand"])
def test_white_entities_on_the_lightest_backgrounds_are_found(background):
    for kind in ("plain", "noise", "grid"):
        scene = Scene(Background(kind, (background,), seed=7),
                      (PlacedEntity(Entity("star", "white", "dotted"), 0, "small"),
                       PlacedEntity(Entity("square", "white"), 8, "large")))
        result = judge_image(scene, render_scene(scene, 64))
        assert result["total"] >= 0.97, (kind, result["per_entity"])


def test_clean_renders_score_near_one():
    totals = [judge_image(s, render_scene(s, 64))["total"] for s in scenes(12, seed=5)]
    assert np.mean(totals) >= 0.99 and min(totals) >= 0.97, totals


def test_judge_is_invariant_to_resolution():
    for scene in scenes(6, seed=6):
        by_side = {side: judge_image(scene, render_scene(scene, side))["total"] for side in (32, 64, 128)}
        assert min(by_side.values()) >= 0.93, by_side
        assert abs(by_side[64] - by_side[128]) <= 0.03, by_side


def test_judge_reads_a_large_image_of_the_scene_like_the_small_one():
    scene = scenes(1, seed=7, count=(3, 3))[0]
    big = render_scene(scene, 64).resize((512, 512), Image.BICUBIC)
    assert judge_image(scene, big)["total"] >= 0.9


def test_garbage_images_do_not_crash_and_score_low():
    scene = scenes(1, seed=8, count=(3, 3))[0]
    good = render_scene(scene, 64)
    rng = np.random.default_rng(0)
    garbage = {
        "wrong size": Image.new("RGB", (300, 17), (40, 200, 90)),
        "all black": Image.new("RGB", (64, 64)),
        "all white": Image.new("RGB", (64, 64), (255, 255, 255)),
        "transparent RGBA": Image.new("RGBA", (64, 64), (0, 0, 0, 0)),
        "noise": Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
        "one pixel": Image.new("RGB", (1, 1), (230, 30, 50)),
        "16-bit grey": Image.fromarray(rng.integers(0, 65535, (40, 40)).astype(np.uint16)),
        "float array": rng.random((48, 48, 3)) * 255,
    }
    for name, image in garbage.items():
        result = judge_image(scene, image)
        assert 0.0 <= result["total"] <= 0.25, (name, result["total"])
    # A greyscale copy of the right picture has lost every colour: far below the original.
    grey = judge_image(scene, good.convert("L"))["total"]
    assert grey <= 0.6 and judge_image(scene, good.convert("RGBA"))["total"] >= 0.97


@pytest.mark.parametrize("kind", SPEC_CORRUPTIONS)
def test_each_corruption_breaks_its_attribute_and_lowers_the_total(kind):
    rng = np.random.default_rng(9)
    for scene in scenes(3, seed=10, rotate=True, count=(2, 4)):
        clean = score_scene(scene, analyse_image(render_scene_array(scene, 64)))
        background, entities, touched = corrupt(scene, kind, rng)
        result = score_scene(scene, analyse_image(render_layers(background, entities, 64)))
        assert result["total"] < clean["total"] - 0.01, (kind, result["total"], clean["total"])
        if kind == "extra":
            assert result["no_extra"] <= 0.4
        elif kind == "wrong_background":
            assert result["background"] <= 0.5
        else:
            attribute = {"wrong_colour": "colour", "wrong_shape": "shape", "wrong_pattern": "pattern",
                         "wrong_cell": "cell", "wrong_size": "size", "missing": "present"}.get(kind)
            for i in touched:
                scores = result["per_entity"][i]["scores"]
                value = scores[attribute] if attribute else min(scores[k] for k in ("cell", "colour", "shape", "pattern"))
                assert value <= 0.5, (kind, result["per_entity"][i])


def test_self_test_meets_the_thresholds():
    report = run_self_test(n=8, seed=11, side=64)
    assert report["ok"], report["failures"]
    assert set(report) >= {"clean_mean", "clean_min", "corruptions", "degraded"}
    assert set(report["corruptions"]) == set(CORRUPTIONS)
    assert report["clean_exact"] >= 0.99 and report["degraded"]["exact_full_chroma"] >= 0.9
    for name, row in report["corruptions"].items():
        assert set(row) == {"total", "attribute", "exact", "n"} and row["attribute"] <= 0.5
        assert row["n"] >= 1 and row["exact"] == 0.0, name
