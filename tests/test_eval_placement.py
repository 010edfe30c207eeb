"""Inset's placement ablation from two real checkpoints: each trained (a few steps) on one layout
only, exported, then judged by `tapestry eval ablation placement --inline A --image-first B`."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tapestry.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _train_and_export(tmp: Path, layout: str, seed: int) -> Path:
    from tapestry.train.config import config_from_data
    from tapestry.train.export import export_checkpoint
    from tapestry.train.loop import train

    data = tomllib.loads((ROOT / "configs" / "test-tiny.toml").read_text(encoding="utf-8"))
    data["seed"] = seed
    # the same compose scenes, one layout: what the ablation holds fixed and what it varies
    data["data"]["sources"] = [{"name": f"compose-{layout}", "task": "compose", "layout": layout, "side": 32,
                                "weight": 1.0}]
    data["stages"][0]["steps"] = 2
    data["eval"] = {"every": 0, "judge_every": 0}
    config = config_from_data(data)
    run = tmp / f"run-{layout}"
    train(config, run, quiet=True)
    out = tmp / f"model-{layout}"
    export_checkpoint(run, out)
    return out


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("placement")
    return _train_and_export(tmp, "inline", 0), _train_and_export(tmp, "image-first", 1)


def _scores(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines() if line]


def test_placement_ablation_from_two_checkpoints(two_models, tmp_path):
    inline, first = two_models
    out = tmp_path / "abl"
    args = ["eval", "ablation", "placement", "--inline", str(inline), "--image-first", str(first), "--n", "4",
            "--side", "32", "--steps", "1", "--bootstrap", "200", "--out", str(out), "--json", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["mode"] == "two checkpoints"
    assert data["models"] == {"inline": str(inline), "image_first": str(first)}

    # each model is judged in its own layout only, on the same scenes
    a, b = _scores(out / "inline"), _scores(out / "image_first")
    assert {r["layout"] for r in a} == {"inline"} and {r["layout"] for r in b} == {"image-first"}
    assert sorted(r["index"] for r in a) == sorted(r["index"] for r in b) == [0, 1, 2, 3]
    hashes = [json.loads((out / v / "run.json").read_text())["settings"]["checkpoint_hash"] for v in ("inline", "image_first")]
    assert hashes[0] != hashes[1]

    # rows by number of references, whose counts add up to all scenes, and paired differences
    table = data["by_references"]
    counts = {label: row["inline"]["graded"]["n"] for label, row in table.items() if label != "all"}
    assert sorted(counts) == sorted(str(c) for c in {r["references"] for r in a})
    assert sum(counts.values()) == table["all"]["inline"]["graded"]["n"] == 4
    b_by = {r["index"]: r for r in b}
    for field, metric in (("total", "graded"), ("exact", "exact")):
        diffs = [float(r[field]) - float(b_by[r["index"]][field]) for r in a]
        assert table["all"]["inline_minus_image_first"][metric]["mean"] == pytest.approx(sum(diffs) / len(diffs))
    report = (out / "report.md").read_text()
    assert "inline − image-first exact" in report and str(first) in report
    assert (out / "placement.png").is_file() and (out / "placement_exact.png").is_file()

    # a second run resumes: nothing is generated again, the same result comes back
    before = (out / "inline" / "scores.jsonl").read_bytes()
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["by_references"] == table
    assert (out / "inline" / "scores.jsonl").read_bytes() == before


def test_placement_ablation_needs_both_checkpoints(two_models, tmp_path):
    result = runner.invoke(app, ["eval", "ablation", "placement", "--inline", str(two_models[0]), "--n", "1",
                                 "--out", str(tmp_path / "x"), "-q"])
    assert result.exit_code == 2
    assert "give both --inline and --image-first" in result.output


def test_placement_configs_differ_only_in_layout():
    """The ablation's two recipes: the default's model and budget, compose only, one layout each."""
    from tapestry.train.config import load_config, to_dict

    inline = to_dict(load_config(ROOT / "configs" / "toyworld-placement-inline.toml"))
    first = to_dict(load_config(ROOT / "configs" / "toyworld-placement-image-first.toml"))
    default = to_dict(load_config(ROOT / "configs" / "toyworld-default.toml"))
    sources = inline["data"].pop("sources"), first["data"].pop("sources")
    assert [(s["task"], s["layout"]) for s in sources[0]] == [("compose", "inline")]
    assert [(s["task"], s["layout"]) for s in sources[1]] == [("compose", "image-first")]
    assert inline == first
    default["data"].pop("sources")
    for key in ("model", "layout", "optim", "schedule", "stages", "data", "dropout", "ema"):
        assert inline[key] == default[key], key
