"""ToyWorld tasks as Documents, splits, document-level judging and the `toyworld` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tapestry.atomic import OUTPUT_MARKER
from tapestry.document import ImageSegment, TextSegment, to_inline
from tapestry.markup import ordinal_phrase
from tapestry.storage import iter_documents
from tapestry.toyworld import tasks
from tapestry.toyworld.cli import app
from tapestry.toyworld.evaluate import judge_document, summarize
from tapestry.toyworld.judge import judge_image
from tapestry.toyworld.phrases import normalize_answer
from tapestry.toyworld.spec import Scene, SpecError
from tapestry.toyworld.bench import write_bench
from tapestry.toyworld.splits import SEED_BASE, content_split, sample_seed

ALL = [(task, layout) for task in tasks.ALL_TASKS for layout in tasks.task_layouts(task)]


@pytest.mark.parametrize("task, layout", ALL)
def test_every_task_makes_valid_documents_with_their_spec(task, layout):
    for index in range(4):
        doc = tasks.sample(task, "val", index, layout=layout, side=32)
        assert doc.validate() == [], doc.validate()
        spec = doc.meta["toyworld"]
        assert (spec["task"], spec["layout"], spec["split"], spec["index"]) == (task, layout, "val", index)
        json.dumps(doc.to_dict())  # the spec is plain JSON
        targets = [s for s in doc.segments if isinstance(s, ImageSegment) and s.role == "target"]
        for segment in targets:
            assert segment.image.size == (32, 32)
            Scene.from_dict(segment.meta["toyworld"]["scene"])
        if task == "understand":
            assert targets == [] and doc.segments[-1].role == "target" and doc.segments[-1].text
        else:
            assert len(targets) == len(spec["scenes"]) >= 1


def test_sampling_is_deterministic():
    for task, layout in ALL:
        a, b = (tasks.sample(task, "train", 7, layout=layout, seed=3) for _ in range(2))
        assert a.to_dict() == b.to_dict()
        for x, y in zip(a.images(), b.images()):
            assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
    assert tasks.sample("compose", "train", 7, seed=3).to_dict() != tasks.sample("compose", "train", 7, seed=4).to_dict()


def test_compose_layouts_share_the_scene_and_image_first_names_each_image_once():
    for index in range(6):
        inline = tasks.sample("compose", "test", index, layout="inline")
        first = tasks.sample("compose", "test", index, layout="image-first")
        assert inline.meta["toyworld"]["scenes"] == first.meta["toyworld"]["scenes"]
        assert inline.meta["toyworld"]["references"] == first.meta["toyworld"]["references"]
        assert inline.layout() == "inline" and first.layout() == "image-first"
        n_refs = len(first.meta["toyworld"]["references"])
        text = next(s.text for s in first.segments if isinstance(s, TextSegment))
        for k in range(1, n_refs + 1):
            assert text.count(ordinal_phrase(k)) == 1, text
        to_inline(first)  # the image-first text binds back to its images


def test_copying_a_reference_is_wrong():
    scores = []
    for index in range(8):
        doc = tasks.sample("compose", "test", index)
        scene = Scene.from_dict(doc.meta["toyworld"]["scenes"][0])
        reference = next(s for s in doc.segments if isinstance(s, ImageSegment) and s.role == "reference")
        scores.append(judge_image(scene, reference.image)["total"])
    assert np.mean(scores) < 0.75, scores


def test_phrasing_varies():
    texts = {next(s.text for s in tasks.sample("compose", "train", i).segments if isinstance(s, TextSegment))
             .split("<img")[0] for i in range(30)}
    assert len(texts) >= 5


def test_splits_are_disjoint_by_seed_and_by_content():
    assert sample_seed("test", (1 << 20) - 1) < SEED_BASE["val"] <= sample_seed("val", 0)
    assert sample_seed("val", (1 << 20) - 1) < SEED_BASE["train"] <= sample_seed("train", 0, seed=0)
    with pytest.raises(SpecError, match="fixed set"):
        sample_seed("test", 0, seed=1)
    with pytest.raises(SpecError, match="index"):
        sample_seed("val", 1 << 20)
    seen: dict[str, set] = {}
    for split in ("train", "val", "test"):
        seen[split] = set()
        for index in range(60):
            doc = tasks.sample("compose", split, index)
            scene = Scene.from_dict(doc.meta["toyworld"]["scenes"][0])
            assert content_split({"scene": scene.fingerprint()}) == split
            seen[split].add(scene.fingerprint())
    assert not (seen["train"] & seen["test"]) and not (seen["train"] & seen["val"]) and not (seen["val"] & seen["test"])


def test_answers_are_compared_after_normalization():
    assert normalize_answer("The upper-left corner.") == normalize_answer("top-left") == "top left"
    assert normalize_answer("Three") == normalize_answer("3")
    assert normalize_answer("Stripes!") == normalize_answer("striped")
    assert normalize_answer("centre") == normalize_answer("In the middle.")
    assert normalize_answer("red") != normalize_answer("orange")


def test_judge_document_scores_ground_truth_and_catches_mistakes():
    for task, layout in ALL:
        doc = tasks.sample(task, "test", 1, layout=layout)
        assert judge_document(doc)["total"] >= 0.97, (task, layout, judge_document(doc))
    understand = tasks.sample("understand", "test", 2)
    wrong = understand.copy()
    wrong.segments[-1] = TextSegment("definitely not this", role="target")
    assert judge_document(understand, wrong)["total"] == 0.0
    howto = tasks.sample("howto", "test", 0)
    short = howto.copy()
    short.segments = short.segments[:-2]  # the model stopped one image early
    result = judge_document(howto, short)
    assert result["count"] == 0.0 and result["total"] <= 0.3 + 0.7 * (1 - 1 / len(howto.images())) + 1e-6
    story = next(d for d in (tasks.sample("story", "test", i) for i in range(20)) if len(d.images()) >= 4)
    shuffled = story.copy()
    frames = [s for s in shuffled.segments if isinstance(s, ImageSegment)]
    pixels = [s.image for s in frames]
    for segment, image in zip(frames, pixels[::-1]):
        segment.image = image
    assert judge_document(story, shuffled)["total"] < judge_document(story)["total"] - 0.1


def test_summary_reports_tasks_layouts_and_intervals():
    results = [judge_document(tasks.sample(t, "test", 0, layout=l)) for t, l in ALL]
    report = summarize(results)
    assert report["overall"]["n"] == len(ALL) and report["overall"]["ci95"] is not None
    assert set(report["tasks"]) == set(tasks.ALL_TASKS)
    assert "compose/inline" in report["layouts"] and "compose/image-first" in report["layouts"]


def test_bench_is_written_whole_with_a_manifest(tmp_path):
    sizes = {"compose": 2, "story": 1, "edit": 1, "understand": 2, "howto": 1}
    manifest = write_bench(tmp_path / "bench", sizes, side=32)
    counts = {task: entry["documents"] for task, entry in manifest["files"].items()}
    assert counts == {"compose": 4, "story": 1, "edit": 2, "understand": 4, "howto": 1}
    docs = list(iter_documents(tmp_path / "bench" / "compose.tar"))
    assert len(docs) == 4 and all(d.meta["toyworld"]["split"] == "test" for d in docs)
    again = write_bench(tmp_path / "again", sizes, side=32)
    assert again["files"] == manifest["files"]  # the benchmark is the same everywhere


def test_cli_sample_bench_and_judge(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["sample", "--task", "edit", "--n", "2", "--out", str(tmp_path / "s"), "--side", "32", "-q"])
    assert result.exit_code == 0, result.output
    assert len([p for p in (tmp_path / "s").iterdir() if not p.name.startswith(".")]) == 4  # two scenes, both layouts
    assert (tmp_path / "s" / OUTPUT_MARKER).is_file()  # the folder says who wrote it
    result = runner.invoke(app, ["bench", "--out", str(tmp_path / "b"), "--compose", "1", "--story", "1", "--edit", "0",
                                 "--understand", "1", "--howto", "1", "--side", "32", "-q"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["judge", str(tmp_path / "b"), "--expected", str(tmp_path / "b"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["judged"] == 6 and report["overall"]["mean"] >= 0.97 and report["invalid"] == []
    result = runner.invoke(app, ["judge", "--self-test", "--n", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) >= {"clean_mean", "clean_min", "corruptions", "degraded"}
    bad = runner.invoke(app, ["sample", "--task", "dance", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and not (tmp_path / "x").exists()
    for command in ("sample", "bench", "judge"):
        help_text = runner.invoke(app, [command, "--help"]).output
        assert "Example" in help_text and "tapestry toyworld" in help_text
