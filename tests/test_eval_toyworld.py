"""`tapestry eval toyworld` and the ablations: baselines score as they must, a tiny real pipeline
runs end to end, a killed run resumes without generating or scoring anything twice and gives the
same scores, the --json shape, bootstrap intervals, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_mot_config
from tapestry.cli import app
from tapestry.eval.report import mean_ci
from tapestry.eval.toyworld import Generator, ToyWorldEvalConfig, oracle_predictor, run_toyworld

runner = CliRunner()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny random pipeline (as in test_infer_cli): real generation, meaningless pictures."""
    from tapestry.infer.engine import GenerationOptions
    from tapestry.infer.pipeline import save_pipeline
    from tapestry.models.common.tokenizer import train_bpe
    from tapestry.models.mot.family import layout_config_for
    from tapestry.models.mot.model import MoTModel
    from tapestry.models.vae.toy import ToyAEConfig, ToyAutoencoder

    folder = tmp_path_factory.mktemp("pipe")
    tokenizer = train_bpe(["A red circle sits left of a blue star.", "Then it moves."] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = tiny_mot_config(tokenizer.vocab_size, latent_channels=4)
    model = MoTModel(config)
    vae = ToyAutoencoder(ToyAEConfig(latent_channels=4, channels=(8, 8, 8), encoder_blocks=(0, 0, 0),
                                     decoder_blocks=(0, 0, 0), norm_groups=4, resolution=32))
    layout = layout_config_for(config, vae.downsample, target_size=(32, 32))
    save_pipeline(folder, model, tokenizer, vae, layout, GenerationOptions(steps=2, max_new_tokens=4, max_images=2))
    return folder


def _json(result) -> dict:
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_oracle_scores_one_and_json_has_the_issue_shape(tmp_path):
    result = runner.invoke(app, ["eval", "toyworld", "--checkpoint", "oracle", "--n", "2", "--out",
                                 str(tmp_path / "o"), "--json", "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    summary = _json(result)
    assert set(summary) == {"overall", "tasks", "ci95", "exact"}
    assert summary["overall"] >= 0.99
    exact = summary["exact"]  # the strict figure beside the graded one, in the same shape (issue 20)
    assert exact["overall"] == 1.0 and exact["tasks"]["compose"] == {"inline": 1.0, "image_first": 1.0}
    assert set(exact["tasks"]) == set(summary["tasks"]) and exact["ci95"]["story"]["interleaved"] == [1.0, 1.0]
    assert exact["persistence_exact"] == {"story": {"interleaved": 1.0}}
    assert exact["count_exact"] == {"howto": {"interleaved": 1.0}}
    assert set(summary["tasks"]) == {"compose", "story", "edit", "understand", "howto"}
    assert set(summary["tasks"]["compose"]) == {"inline", "image_first"}
    assert summary["tasks"]["story"] == {"interleaved": summary["tasks"]["story"]["interleaved"]}
    assert all(v >= 0.99 for by in summary["tasks"].values() for v in by.values())
    assert summary["ci95"]["compose"]["inline"][0] <= summary["tasks"]["compose"]["inline"] <= summary["ci95"]["compose"]["inline"][1]
    out = tmp_path / "o"
    for name in ("report.md", "report.html", "scores.jsonl", "summary.json", "scores_by_task.png", "run.json"):
        assert (out / name).is_file(), name
    assert (out / "scores_by_task.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "scores.jsonl").read_text().splitlines()) == 16  # 2 scenes x (2+1+2+2+1) layouts
    report = (out / "report.md").read_text()
    assert "tapestry eval toyworld --checkpoint oracle" in report and "--n 2" in report and "baseline:oracle" in report
    assert "| compose | inline | 2 | 1.000 | [1.000, 1.000] | 1.000 | [1.000, 1.000] | - |" in report
    assert "| howto | interleaved | 2 | 1.000 | [1.000, 1.000] | 1.000 | [1.000, 1.000] | image count exact 1.000 |" in report
    assert "data:image/png;base64" in (out / "report.html").read_text()


def test_copy_first_reference_scores_low(tmp_path):
    summary = _json(runner.invoke(app, ["eval", "toyworld", "--checkpoint", "copy-reference", "--n", "3",
                                        "--tasks", "compose,story", "--out", str(tmp_path / "c"), "--json"]))
    assert summary["overall"] < 0.5
    assert summary["tasks"]["compose"]["inline"] < 0.6


def test_bootstrap_interval_on_a_known_case():
    values = [0.0, 1.0] * 50  # mean 0.5, standard error 0.05
    block = mean_ci(values, n_boot=2000, seed=0)
    lo, hi = block["ci95"]
    assert block["mean"] == 0.5 and lo < 0.5 < hi
    assert 0.08 < 0.5 - lo < 0.12 and 0.08 < hi - 0.5 < 0.12  # ~1.96 standard errors
    assert mean_ci([0.7], 200)["ci95"] is None and mean_ci([], 200)["mean"] is None


class Interrupted(BaseException):
    """Stands in for a kill: not an error the run could catch and record."""


def _counting_oracle(calls: list, die_after: int | None = None) -> Generator:
    def predict(prompt, expected, seed):
        if die_after is not None and len(calls) >= die_after:
            raise Interrupted()
        calls.append(expected.id)
        return oracle_predictor(prompt, expected, seed)

    return Generator(predict, "oracle", "baseline:oracle", {})


def test_resume_after_kill_gives_identical_scores_without_redoing_work(tmp_path, monkeypatch):
    import tapestry.toyworld.evaluate as judge_module

    config = ToyWorldEvalConfig(checkpoint="oracle", n=2, tasks=("compose", "story", "understand"), bootstrap=200)
    whole = run_toyworld(config, tmp_path / "whole", ["test"], _counting_oracle([]))
    calls: list = []
    with pytest.raises(Interrupted):
        run_toyworld(config, tmp_path / "killed", ["test"], _counting_oracle(calls, die_after=3))
    assert len(calls) == 3 and len(list((tmp_path / "killed" / "scores").iterdir())) == 3
    judged = []
    real = judge_module.judge_document
    monkeypatch.setattr(judge_module, "judge_document", lambda e, p=None: judged.append(e.id) or real(e, p))
    resumed_calls: list = []
    resumed = run_toyworld(config, tmp_path / "killed", ["test"], _counting_oracle(resumed_calls))
    assert not set(resumed_calls) & set(calls) and len(resumed_calls) == 10 - 3
    assert sorted(judged) == sorted(resumed_calls)  # the first three were not scored again
    assert resumed["counts"] == {"generated": 7, "reused_predictions": 0, "judged": 7, "reused_scores": 3}
    assert resumed["overall"] == whole["overall"] and resumed["layouts"] == whole["layouts"]
    assert (tmp_path / "killed" / "scores.jsonl").read_text() == (tmp_path / "whole" / "scores.jsonl").read_text()
    # A prediction stored before the kill but not yet scored is judged, not generated again.
    (tmp_path / "killed" / "scores" / "toyworld-story-test-000001.json").unlink()
    again: list = []
    third = run_toyworld(config, tmp_path / "killed", ["test"], _counting_oracle(again))
    assert again == [] and third["counts"]["reused_predictions"] == 1 and third["overall"] == whole["overall"]


def test_tiny_pipeline_end_to_end_records_provenance(pipeline_dir, tmp_path):
    out = tmp_path / "tiny"
    args = ["eval", "toyworld", "--checkpoint", str(pipeline_dir), "--n", "1", "--tasks", "compose,understand",
            "--out", str(out), "--seed", "5", "--steps", "1", "--json", "--bootstrap", "200"]
    summary = _json(runner.invoke(app, args))
    assert 0.0 <= summary["overall"] < 0.9  # random weights: a real, low score
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["checkpoint_hash"].startswith("sha256:") and run["settings"]["seed"] == 5
    assert run["settings"]["generation"]["steps"] == 1 and "eval" in run["command"]
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [s["seed"] for s in scores] == [5, 6, 7, 8]
    # Same command again: everything reused, same numbers; other settings into the same folder: refused.
    assert _json(runner.invoke(app, args)) == summary
    other = runner.invoke(app, args[:-5] + ["--steps", "2", "--json"])
    assert other.exit_code == 2 and "other settings" in other.output and "generation" in other.output


def test_guidance_ablation_with_a_tiny_pipeline(pipeline_dir, tmp_path):
    out = tmp_path / "g"
    result = runner.invoke(app, ["eval", "ablation", "guidance", "--checkpoint", str(pipeline_dir), "--rule", "illume",
                                 "--grid", "gamma_txt=1,2", "--grid", "gamma_img=1", "--n", "1", "--tasks", "compose",
                                 "--steps", "1", "--out", str(out), "--json", "-q", "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output.strip().splitlines()[-1])["rows"]
    assert [r["variant"] for r in rows] == ["none", "illume-gamma_img=1,gamma_txt=1", "illume-gamma_img=1,gamma_txt=2"]
    settings = json.loads((out / "illume-gamma_img=1,gamma_txt=2" / "run.json").read_text())["settings"]
    assert settings["generation"]["guidance"] == "illume" and settings["generation"]["guidance_scales"]["gamma_txt"] == 2
    report = (out / "report.md").read_text()
    assert (out / "guidance.png").is_file() and "![guidance](guidance.png)" in report
    assert all(f"| {label} |" in report for label in ("none", "illume-gamma_img=1,gamma_txt=1",
                                                      "illume-gamma_img=1,gamma_txt=2"))


def test_placement_ablation_pairs_scenes(tmp_path):
    result = runner.invoke(app, ["eval", "ablation", "placement", "--checkpoint", "oracle", "--n", "3",
                                 "--out", str(tmp_path / "p"), "--json", "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["inline"]["n"] == data["image_first"]["n"] == 3
    assert data["inline_minus_image_first"]["mean"] == 0.0 and data["inline_minus_image_first"]["n"] == 3
    assert (tmp_path / "p" / "placement.png").is_file() and (tmp_path / "p" / "placement_exact.png").is_file()
    assert data["mode"] == "one checkpoint" and data["by_references"]["all"]["inline"]["exact"]["mean"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--tasks", "paint"], "--tasks paint"),
    (["--split", "train"], "--split"),
    (["--n", "0"], "--n"),
    (["--checkpoint", "no/such/folder"], "not found"),
    (["--scale", "gamma_txt"], "NAME=NUMBER"),
])
def test_bad_options_exit_2_with_a_clear_message(tmp_path, args, message):
    result = runner.invoke(app, ["eval", "toyworld", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_bootstrap_covers_the_mean_of_real_scores(tmp_path):
    summary = run_toyworld(ToyWorldEvalConfig(checkpoint="copy-reference", n=6, tasks=("compose",), bootstrap=500),
                           tmp_path / "c", ["test"])
    for block in [summary["overall"], *summary["layouts"]["compose"].values()]:
        lo, hi = block["ci95"]
        assert lo <= block["mean"] <= hi and hi - lo > 0
    scores = [json.loads(x)["total"] for x in (tmp_path / "c" / "scores.jsonl").read_text().splitlines()]
    assert summary["overall"]["mean"] == round(float(np.mean(scores)), 4)


def test_compare_ablation_pairs_samples_by_task_and_references(tmp_path):
    out = tmp_path / "c"
    result = runner.invoke(app, ["eval", "ablation", "compare", "--a", "oracle", "--b", "copy-reference",
                                 "--names", "oracle,copy", "--n", "3", "--tasks", "compose,edit", "--out", str(out),
                                 "--json", "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    table = data["by_references"]
    scores = {name: [json.loads(x) for x in (out / name / "scores.jsonl").read_text().splitlines()]
              for name in ("oracle", "copy")}
    n = len(scores["oracle"])
    assert n == 12 and table["all"]["oracle_minus_copy"]["graded"]["n"] == n  # 3 scenes x 2 layouts x 2 tasks
    assert table["all"]["oracle"]["exact"]["mean"] == 1.0 and data["oracle"]["mean"] > data["copy"]["mean"]
    # each sample sits in exactly one "<task> <references>" row, with its own count of references
    rows = {k: v for k, v in table.items() if k != "all"}
    assert sum(v["oracle"]["graded"]["n"] for v in rows.values()) == n
    for r in scores["copy"]:
        label = f"{r['task']} {r['references']}" if r["references"] else r["task"]
        assert label in rows
    want = np.mean([a["total"] - b["total"] for a, b in zip(scores["oracle"], scores["copy"])])
    assert data["oracle_minus_copy"]["mean"] == pytest.approx(want, abs=1e-4)
    report = (out / "report.md").read_text()
    assert "| all | 12 |" in report and (out / "compare.png").is_file() and (out / "compare_exact.png").is_file()


@pytest.mark.parametrize("names", ["mmfs", "same,same", "a b,c"])
def test_compare_ablation_refuses_bad_names(tmp_path, names):
    result = runner.invoke(app, ["eval", "ablation", "compare", "--a", "oracle", "--b", "copy-reference",
                                 "--names", names, "--n", "1", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "--names" in result.output, result.output
    assert not (tmp_path / "c").exists()  # refused before any work
