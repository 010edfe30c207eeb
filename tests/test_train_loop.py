"""The training loop end to end on a tiny model: bitwise resume, a real SIGKILL during a
checkpoint write, freeze sets across stages, export to a pipeline folder (learning itself is
tested on ToyWorld in test_train_toyworld.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tapestry.errors import TapestryError
from tapestry.train import checkpoint as ckpt
from tapestry.train.config import config_from_data, dump_toml
from tapestry.train.loop import Trainer, train
from tapestry.train.optim import group_of
from tapestry.train.parallel import Dist
from test_train_data import tiny_config, write_shards

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Shards, a tiny (untrained) ToyWorld autoencoder folder, and a reference run of 6 steps."""
    from tapestry.models.vae.toy import ToyAEConfig, ToyAutoencoder

    root = tmp_path_factory.mktemp("loop")
    shards = write_shards(root / "shards")
    torch.manual_seed(0)
    ae = ToyAutoencoder(ToyAEConfig(channels=(8, 8, 8), encoder_blocks=(0, 0, 0), decoder_blocks=(0, 0, 0),
                                    latent_channels=4, norm_groups=4, resolution=32))
    ae.save_pretrained(root / "ae")
    # Bitwise resume holds at a fixed thread count; the resumed runs below start in other processes,
    # whose torch default need not be the one this process was left with, so the count is pinned.
    raw = tiny_config(shards, **{"model.vae": str(root / "ae"), "parallel.threads": 1})
    reference = root / "reference"
    train(config_from_data(raw), reference, quiet=True)
    return {"root": root, "raw": raw, "reference": reference}


def test_a_run_gives_the_thread_count_back(setup, tmp_path):
    # parallel.threads is process-wide; a caller of train() keeps the count it had
    before = torch.get_num_threads()
    raw = json.loads(json.dumps(setup["raw"]))
    raw["parallel"] = {"threads": before + 1}
    raw["stages"] = [{"name": "main", "steps": 1}]
    train(config_from_data(raw), tmp_path / "run", quiet=True)
    assert torch.get_num_threads() == before


def state_of(checkpoint: Path) -> dict:
    """Every tensor of a training checkpoint (model, optimizer, EMA) as one flat dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = checkpoint.parent / f"{checkpoint.name}.pt"
    with ckpt.quiet_single_process():
        dcp_to_torch_save(checkpoint / "state", target)
    state = torch.load(target, weights_only=False)
    target.unlink()
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = value

    walk("", state)
    return flat


def assert_same_state(a: Path, b: Path) -> None:
    sa, sb = state_of(a), state_of(b)
    assert sa.keys() == sb.keys()
    assert any(k.startswith("ema.") for k in sa) and any(".exp_avg_sq" in k for k in sa)
    for key in sa:
        x, y = sa[key], sb[key]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{key} differs"
        else:
            assert x == y, f"{key}: {x} != {y}"
    assert json.loads((a / "data.json").read_text()) == json.loads((b / "data.json").read_text())


def losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def test_resume_continues_bit_for_bit(setup, tmp_path):
    config = config_from_data(setup["raw"])
    run = tmp_path / "run"
    train(config, run, quiet=True, stop_after=3)
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-00000003"]
    train(config, run, resume=True, quiet=True)
    reference = setup["reference"] / "checkpoints" / "step-00000006"
    assert_same_state(reference, run / "checkpoints" / "step-00000006")
    assert losses(run) == losses(setup["reference"])
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_good_one(setup, tmp_path):
    run = tmp_path / "killed"
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(dump_toml(config_from_data(setup["raw"])))
    flag = tmp_path / "paused"
    # The library has no test hook: this process wraps the checkpoint module's barrier so that the
    # step-6 save holds after the state and RNG files, before trainer.json, long enough to SIGKILL.
    rng_file = run / "checkpoints" / ".step-00000006.partial" / "rng" / "rank-0.pt"
    pausing = f"""
import sys, time
from pathlib import Path
from tapestry.train import checkpoint as ckpt
real_barrier = ckpt.barrier
def barrier(d):
    real_barrier(d)
    if Path({str(rng_file)!r}).exists():
        Path({str(flag)!r}).write_text("paused")
        time.sleep(120)
ckpt.barrier = barrier
from tapestry.train.cli import app
app(["train", {str(config_file)!r}, "--out", {str(run)!r}, "--quiet"])
"""
    process = subprocess.Popen([sys.executable, "-c", pausing], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not flag.exists():
            assert process.poll() is None, process.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the run never reached the step-6 checkpoint"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)  # mid-write: the model state is on disk, trainer.json is not
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    partial = run / "checkpoints" / ".step-00000006.partial"
    assert (partial / "state" / ".metadata").is_file() and not (partial / "trainer.json").exists()
    assert ckpt.latest_checkpoint(run).name == "step-00000003"

    train(config_from_data(setup["raw"]), run, resume=True, quiet=True)
    assert not partial.exists()
    assert_same_state(setup["reference"] / "checkpoints" / "step-00000006", run / "checkpoints" / "step-00000006")
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6], "metrics after the checkpoint are logged once"


def test_frozen_groups_stay_bitwise_unchanged_across_stages(setup, tmp_path):
    raw = json.loads(json.dumps(setup["raw"]))
    # DuetGen's recipe in small: stage 1 trains the language side, stage 2 freezes it and trains
    # the generation side
    raw["stages"] = [{"name": "language", "steps": 2, "freeze": ["gen", "latent_io", "vit", "connector"],
                      "flow_weight": 0.0},
                     {"name": "generation", "steps": 2, "freeze": ["und", "embeddings", "lm_head"],
                      "text_weight": 0.0}]
    raw["checkpoint"] = {"every": 10, "keep": 5}
    config = config_from_data(raw)
    run = tmp_path / "stages"
    train(config, run, quiet=True)
    names = [p.name for p in ckpt.complete_checkpoints(run)]
    assert names == ["step-00000002", "step-00000004"], "every stage ends with a checkpoint"

    trainer = Trainer(config, run, Dist())
    initial = {f"model.{k}": v for k, v in trainer.build(config.stages[0]).model.state_dict().items()}
    after1 = state_of(run / "checkpoints" / "step-00000002")
    after2 = state_of(run / "checkpoints" / "step-00000004")
    for name, value in initial.items():
        group = group_of(name, trainer.family)
        key = f"model.{name}"
        if group in config.stages[0].freeze:
            assert torch.equal(after1[key], value), f"{name} moved while frozen in stage 1"
        elif group != "vit":
            assert not torch.equal(after1[key], value), f"{name} did not train in stage 1"
        if group in config.stages[1].freeze:
            assert torch.equal(after2[key], after1[key]), f"{name} moved while frozen in stage 2"
    # frozen parameters take no optimizer state at all in the stage that freezes them
    assert not any(k.startswith("optim.state.model.layers.0.gen.") for k in after1)


def test_export_writes_a_pipeline_with_the_ema_weights(setup, tmp_path):
    from tapestry.infer.pipeline import Pipeline
    from tapestry.models.mot.model import MoTModel
    from tapestry.train.export import export_checkpoint

    out = tmp_path / "exported"
    info = export_checkpoint(setup["reference"], out)
    assert info["step"] == 6 and info["weights"] == "ema"
    model = MoTModel.from_pretrained(out)
    state = state_of(setup["reference"] / "checkpoints" / "step-00000006")
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[f"ema.model.{name}"]), name
    pipe = Pipeline.from_pretrained(out)
    doc = pipe.generate("Draw a red square top left.", steps=2, max_images=1, max_new_tokens=4)
    assert doc.meta["generation"]["checkpoint_hash"].startswith("sha256:")


def test_cli_train_help_examples_and_export_raw(setup, tmp_path):
    from typer.testing import CliRunner

    from tapestry.train.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "--resume" in result.output and "torchrun" in result.output
    result = runner.invoke(app, ["export", str(setup["reference"]), "--out", str(tmp_path / "raw"), "--raw"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["weights"] == "model"
    result = runner.invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no complete checkpoint" in result.output


def test_export_stores_generation_defaults_chosen_on_val_and_refuses_bad_ones(setup, tmp_path):
    from typer.testing import CliRunner

    from tapestry.infer.pipeline import Pipeline
    from tapestry.train.cli import app

    runner = CliRunner()
    chosen = '{"guidance": "cfg", "guidance_scales": {"scale": 4.5}, "steps": 7}'
    result = runner.invoke(app, ["export", str(setup["reference"]), "--out", str(tmp_path / "chosen"),
                                 "--generation", chosen])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "chosen" / "pipeline.json").read_text())
    shift = config_from_data(setup["raw"]).data.timestep_shift
    assert record["generation"] == {"shift": shift, "guidance": "cfg", "guidance_scales": {"scale": 4.5}, "steps": 7}
    options = Pipeline.from_pretrained(tmp_path / "chosen").options()
    assert (options.guidance, options.guidance_scales, options.steps) == ("cfg", {"scale": 4.5}, 7)
    for bad, reason in (('{"guidence": "cfg"}', "unknown field"), ('{"steps": "many"}', "--generation.steps"),
                        ('{"guidance": "louder"}', "--generation"), ("cfg", "not JSON"), ("[1]", "a JSON object")):
        result = runner.invoke(app, ["export", str(setup["reference"]), "--out", str(tmp_path / "bad"),
                                     "--generation", bad])
        assert result.exit_code == 2 and reason in result.output, (bad, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "bad").exists(), "a refused export writes nothing"


def test_a_run_refuses_to_overwrite_or_to_resume_with_another_recipe(setup, tmp_path):
    config = config_from_data(setup["raw"])
    with pytest.raises(TapestryError, match="already holds checkpoints"):
        train(config, setup["reference"], quiet=True)
    changed = json.loads(json.dumps(setup["raw"]))
    changed["optim"]["lr"] = 1e-2
    with pytest.raises(TapestryError, match=r"optim.lr"):
        train(config_from_data(changed), setup["reference"], resume=True, quiet=True)
