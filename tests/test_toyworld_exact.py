"""The strict ToyWorld metric (issue 20): an image is exact only when every entity is right in
every attribute, the background is right and nothing extra is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from tapestry.document import ImageSegment
from tapestry.toyworld import tasks
from tapestry.toyworld.evaluate import judge_document, summarize
from tapestry.toyworld.judge import EXACT_THRESHOLDS, analyse_image, score_scene
from tapestry.toyworld.render import render_layers, render_scene
from tapestry.toyworld.selftest import corrupt_image
from tapestry.toyworld.spec import Background, Entity, PlacedEntity, Scene

SCENE = Scene(Background("gradient", ("sand", "dusk"), "vertical"), (
    PlacedEntity(Entity("star", "red", "striped"), 0, "large", 0.0, "e1"),
    PlacedEntity(Entity("hexagon", "blue", "solid"), 4, "large", 0.0, "e2"),
    PlacedEntity(Entity("heart", "yellow", "dotted"), 8, "small", 0.0, "e3"),
))


def judge(scene: Scene, background: Background | None = None, entities=None) -> dict:
    image = render_layers(background or scene.background, list(scene.entities if entities is None else entities), 64)
    return score_scene(scene, analyse_image(image))


def test_a_clean_render_is_exact():
    result = judge(SCENE)
    assert result["exact"] is True and all(p["exact"] for p in result["per_entity"])


@pytest.mark.parametrize("change", [dict(colour="green"), dict(shape="square"), dict(pattern="ringed"),
                                    dict(cell=2), dict(size="small")])
def test_one_wrong_attribute_makes_its_entity_and_the_image_not_exact(change):
    entities = list(SCENE.entities)
    entities[0] = entities[0].with_(**change)
    result = judge(SCENE, entities=entities)
    assert [p["exact"] for p in result["per_entity"]] == [False, True, True], (change, result["per_entity"][0])
    assert result["exact"] is False
    assert result["total"] > 0.85  # the graded score barely moves: why a strict figure is needed


def test_an_extra_entity_or_a_missing_one_is_not_exact():
    extra = list(SCENE.entities) + [PlacedEntity(Entity("circle", "green", "solid"), 6, "small", 0.0, "e4")]
    result = judge(SCENE, entities=extra)
    assert all(p["exact"] for p in result["per_entity"]) and result["n_extra"] == 1 and result["exact"] is False
    result = judge(SCENE, entities=SCENE.entities[:2])
    assert result["per_entity"][2]["exact"] is False and result["exact"] is False


def test_a_wrong_background_is_not_exact():
    for background in (Background("plain", ("sand",)), Background("gradient", ("fog", "charcoal"), "vertical")):
        result = judge(SCENE, background=background)
        assert all(p["exact"] for p in result["per_entity"]) and result["exact"] is False, background


def test_rolled_and_permuted_images_score_high_graded_but_zero_exact():
    image = render_layers(SCENE.background, list(SCENE.entities), 64)
    for kind in ("rolled", "permuted"):
        result = score_scene(SCENE, analyse_image(corrupt_image(image, kind, SCENE)))
        assert result["exact"] is False and not any(p["exact"] for p in result["per_entity"]), kind
    white = Scene(SCENE.background, (PlacedEntity(Entity("star", "white", "solid"), 0, "large", 0.0, "e1"),))
    assert corrupt_image(render_layers(white.background, list(white.entities), 64), "permuted", white) is None


def test_thresholds_are_the_ramps_decision_points():
    assert set(EXACT_THRESHOLDS) == {"cell", "colour", "shape", "pattern", "size", "background_colour"}
    assert all(0.0 < t < 1.0 for t in EXACT_THRESHOLDS.values())


def _frames(doc):
    return [s for s in doc.segments if isinstance(s, ImageSegment) and s.role == "target"]


def test_documents_carry_exact_figures_per_task():
    compose = tasks.sample("compose", "test", 0, layout="inline")
    assert judge_document(compose)["exact"] == 1.0
    wrong = compose.copy()
    scene = Scene.from_dict(compose.meta["toyworld"]["scenes"][0])
    moved = scene.entities[0].with_(cell=next(iter(scene.free_cells())))
    _frames(wrong)[0].image = render_scene(Scene(scene.background, (moved, *scene.entities[1:])), 64)
    assert judge_document(compose, wrong)["exact"] == 0.0
    story = next(d for d in (tasks.sample("story", "test", i) for i in range(20)) if len(d.images()) >= 3)
    truth = judge_document(story)
    assert truth["exact"] == 1.0 and truth["persistence_exact"] == 1.0
    broken = story.copy()
    frames = _frames(broken)
    frames[1].image = frames[0].image  # the second frame repeats the first: its changes are lost
    result = judge_document(story, broken)
    assert result["exact"] < 1.0 and result["persistence_exact"] < 1.0
    howto = tasks.sample("howto", "test", 0)
    short = howto.copy()
    short.segments = short.segments[:-2]
    result = judge_document(howto, short)
    assert result["count_exact"] == 0.0 and result["exact"] == pytest.approx(1 - 1 / len(_frames(howto)), abs=1e-3)
    assert judge_document(howto)["count_exact"] == 1.0
    understand = tasks.sample("understand", "test", 0)
    assert judge_document(understand)["exact"] == 1.0


def test_summary_puts_exact_rates_with_intervals_next_to_the_graded_means():
    docs = [tasks.sample("compose", "test", i, layout="inline") for i in range(3)]
    results = [judge_document(d) for d in docs]
    wrong = docs[0].copy()
    _frames(wrong)[0].image = render_scene(Scene(Background("plain", ("fog",)), (
        PlacedEntity(Entity("circle", "green", "solid"), 4, "large", 0.0, "x"),)), 64)
    results.append(judge_document(docs[0], wrong))
    report = summarize(results)
    block = report["layouts"]["compose/inline"]
    assert block["exact"]["n"] == 4 and block["exact"]["mean"] == 0.75 and block["exact"]["ci95"] is not None
    assert block["mean"] > block["exact"]["mean"] - 0.5 and report["overall"]["exact"]["mean"] == 0.75
    story = [judge_document(tasks.sample("story", "test", i)) for i in range(2)]
    assert summarize(story)["tasks"]["story"]["persistence_exact"]["mean"] == 1.0
    assert np.isclose(summarize(story)["tasks"]["story"]["exact"]["mean"], 1.0)
