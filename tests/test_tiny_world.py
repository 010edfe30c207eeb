"""Restricted ToyWorlds (issue 20's overfit diagnostic), the `copy` task (its upper bound), the
source fields that make them, and benchmarks/overfit_tiny_world.py on a tiny run."""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from tapestry.document import ImageSegment
from tapestry.toyworld import tasks
from tapestry.toyworld.evaluate import judge_document, judge_prompt
from tapestry.toyworld.sampling import World
from tapestry.toyworld.spec import BACKGROUND_KINDS, Scene, SpecError
from tapestry.train.config import TrainConfigError, config_from_data, dump_toml, load_config
from tapestry.train.data import ToyWorldSource
from tapestry.train.evaluate import val_documents

ROOT = Path(__file__).resolve().parent.parent
TINY = {"shapes": ["circle", "triangle"], "colours": ["red", "blue"], "patterns": ["solid"], "entities": [1, 1]}


def scenes_of(doc) -> list[Scene]:
    """Every scene a document shows: targets, references and context images."""
    return [Scene.from_dict(s.meta["toyworld"]["scene"]) for s in doc.segments if isinstance(s, ImageSegment)]


def test_default_streams_are_the_documents_they_were_before_worlds():
    # sha256 over the JSON and pixels of documents 0-2 of every task, layout and split, recorded
    # with the code before restricted worlds existed: a default stream must not move by a byte
    # (the shipped default was trained on these streams; its tests pin hashes of its outputs).
    digest = hashlib.sha256()
    for task in tasks.TASKS:
        for layout in tasks.task_layouts(task):
            for split, seed in (("train", 0), ("train", 5), ("val", 0), ("test", 0)):
                for index in (0, 1, 2):
                    doc = tasks.sample(task, split, index, layout=layout, seed=seed, side=32)
                    digest.update(json.dumps(doc.to_dict(), sort_keys=True).encode())
                    for segment in doc.images():
                        digest.update(np.asarray(segment.image).tobytes())
    assert digest.hexdigest()[:32] == "3d6e53b67883bb782436f532c4ab892d"
    assert tasks.world_for("compose") == World() and not World().restricted


@pytest.mark.parametrize("task", ["compose", "copy", "understand"])
def test_a_restricted_source_draws_only_its_identities_and_counts(task):
    fields = {"shapes": ["star", "heart"], "colours": ["green"], "patterns": ["dotted", "ringed"],
              "backgrounds": ["plain"], "entities": [2, 3]}
    world = tasks.world_for(task, **fields)
    seen_shapes, seen_counts = set(), set()
    for split, seed in (("train", 0), ("val", 0)):
        for layout in tasks.task_layouts(task):
            for index in range(6):
                doc = tasks.sample(task, split, index, layout=layout, seed=seed, side=32, world=world)
                assert doc.validate() == []
                assert doc.meta["toyworld"]["world"] == world.to_dict()
                assert f"-w{world.tag()}-" in doc.id
                target_scene = Scene.from_dict(doc.meta["toyworld"]["scenes"][0])
                seen_counts.add(len(target_scene.entities))
                for scene in scenes_of(doc) + [target_scene]:
                    assert scene.background.kind == "plain"
                    for placed in scene.entities:
                        e = placed.entity
                        assert (e.shape in fields["shapes"] and e.colour in fields["colours"]
                                and e.pattern in fields["patterns"]), (doc.id, e)
                        seen_shapes.add(e.shape)
    assert seen_counts <= {2, 3} and seen_counts, seen_counts
    assert seen_shapes == {"star", "heart"}
    if task == "compose":  # a reference per entity, each from the world too (checked above)
        doc = tasks.sample(task, "train", 0, side=32, world=world)
        assert len(doc.meta["toyworld"]["references"]) == len(doc.meta["toyworld"]["scenes"][0]["entities"])


def test_the_training_source_and_its_val_documents_carry_the_world():
    base = {"data": {"sources": [{"name": "tiny", "task": "compose", "side": 32, **TINY},
                                 {"name": "full", "task": "compose", "side": 32}]}}
    config = config_from_data(base)
    tiny, full = config.data.sources
    assert tiny.entities == [1, 1] and full.shapes is None
    assert "shapes" not in dump_toml(config_from_data({"data": {"sources": [base["data"]["sources"][1]]}})), \
        "an unrestricted source's config.toml is what it was"
    assert config_from_data(tomllib.loads(dump_toml(config))) == config
    source = ToyWorldSource(tiny, seed=0)
    for position in range(8):
        doc = source.fetch(position)[0]
        (scene,) = [Scene.from_dict(s) for s in doc.meta["toyworld"]["scenes"]]
        assert len(scene.entities) == 1 and scene.entities[0].entity.shape in TINY["shapes"]
    assert ToyWorldSource(full, seed=0).fetch(0)[0].to_dict() == tasks.sample("compose", "train", 0, side=32).to_dict()
    val = val_documents(config, 4)
    assert [d.meta["toyworld"].get("world") is not None for d in val] == [True, False, True, False]
    assert len({d.id for d in val}) == 4


@pytest.mark.parametrize("fields, key, bad", [
    ({"shapes": ["circle", "blob"]}, "data.sources.0.shapes", "'blob'"),
    ({"colours": []}, "data.sources.0.colours", "[]"),
    ({"entities": [3, 1]}, "data.sources.0.entities", "[3, 1]"),
    ({"entities": [0, 1]}, "data.sources.0.entities", "[0, 1]"),
    ({"entities": [1]}, "data.sources.0.entities", "[1]"),
    ({"shapes": ["circle"], "colours": ["red"], "patterns": ["solid"], "entities": [1, 2]},
     "data.sources.0.entities", "give 1"),
    ({"shapes": ["circle"], "colours": ["red"], "patterns": ["solid"]}, "data.sources.0.entities", "up to 4"),
    ({"patterns": ["solid", "solid"]}, "data.sources.0.patterns", "'solid', 'solid'"),
    ({"backgrounds": ["stripes"]}, "data.sources.0.backgrounds", "'stripes'"),
    ({"task": "story", "shapes": ["circle"], "entities": [1, 1]}, "data.sources.0.shapes", "story"),
    ({"kind": "shards", "path": "x", "colours": ["red"]}, "data.sources.0.colours", "shards"),
    ({"shapes": "circle"}, "data.sources.0.shapes", "expected a list"),
])
def test_bad_world_fields_fail_at_load_with_one_line_naming_field_and_value(fields, key, bad):
    source = {"name": "s", "task": "compose", "side": 32, **fields}
    with pytest.raises(TrainConfigError) as err:
        config_from_data({"data": {"sources": [source]}}, where="diag.toml")
    message = str(err.value)
    assert message.startswith(f"diag.toml: {key}") and bad in message and "\n" not in message, message


def test_copy_gives_the_target_itself_as_a_clean_context_image():
    for layout in tasks.task_layouts("copy"):
        doc = tasks.sample("copy", "val", 3, layout=layout, side=32)
        (source,) = [s for s in doc.images() if s.role == "context"]
        (target,) = [s for s in doc.images() if s.role == "target"]
        assert source.meta == target.meta and np.array_equal(np.asarray(source.image), np.asarray(target.image))
        assert judge_document(doc)["exact"] == 1.0
        prompt = judge_prompt(doc)
        assert [s.image is None for s in prompt.images()] == [False, True], "only the target is generated"
        assert next(s for s in prompt.images() if s.role == "context").image is not None
    assert "copy" not in tasks.TASKS, "copy is a diagnostic: never part of toyworld-bench-v1"


def test_the_diagnostic_config_is_the_default_model_on_a_tiny_compose_world():
    diag = load_config(ROOT / "configs" / "diag-tiny-world.toml")
    default = load_config(ROOT / "configs" / "toyworld-default.toml")
    assert diag.model == default.model and diag.layout == default.layout and diag.dropout == default.dropout
    assert {(s.task, s.layout) for s in diag.data.sources} == {("compose", "inline"), ("compose", "image-first")}
    for s in diag.data.sources:
        world = tasks.world_for(s.task, **s.world_fields())
        assert world.identities == 4 and world.entities == (1, 1) and world.backgrounds == BACKGROUND_KINDS


def test_copy_source_override_is_accepted():
    config = load_config(ROOT / "configs" / "diag-tiny-world.toml",
                         ["data.sources.0.task=copy", "data.sources.1.task=copy"])
    assert {s.task for s in config.data.sources} == {"copy"}
    with pytest.raises(SpecError):
        tasks.sample("copy", "val", 0, world=World(shapes=("circle",), colours=("red",), patterns=("solid",)))


def test_overfit_benchmark_quick_path_on_a_run_trained_a_few_steps(tmp_path, capsys):
    from tapestry.train.loop import train

    world = ", ".join(f"{key} = {json.dumps(value)}" for key, value in TINY.items())
    sources = "[" + ", ".join(f'{{name = "{name}", task = "{task}", layout = "{layout}", side = 32, {world}}}'
                              for name, task, layout in (("tiny", "compose", "inline"),
                                                         ("tiny-copy", "copy", "image-first"))) + "]"
    config = load_config(ROOT / "configs" / "test-tiny.toml",
                         [f"data.sources={sources}", "stages.0.steps=2", "model.vocab_size=300",
                          "model.tokenizer_docs=40", "checkpoint.every=2", "eval.every=0", "eval.judge_every=0"])
    run = tmp_path / "run"
    train(config, run, quiet=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import overfit_tiny_world
    finally:
        sys.path.pop(0)
    capsys.readouterr()
    overfit_tiny_world.main(["--checkpoint", str(run), "--quick", "--n", "2", "--steps", "2"])
    figures = {r["metric"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    for source in ("tiny", "tiny-copy"):
        for name in ("exact", "graded", "present", "cell", "colour", "shape", "pattern", "size", "background",
                     "no_extra", "ae_exact"):
            record = figures[f"{source}_{name}"]
            assert 0.0 <= record["value"] <= 1.0 and record["config"]["n"] >= 2, record
        assert figures[f"{source}_exact"]["target"] == 0.95
        assert figures[f"{source}_exact"]["config"]["world"]["shapes"] == TINY["shapes"]
    assert figures["all_exact"]["config"]["n"] == 4
    assert figures["tiny_shape"]["config"]["n"] == 2, "one entity per document"
