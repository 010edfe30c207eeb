"""Distributed training on CPU: 2 processes (gloo) with DDP, FSDP2 and FSDP2 with CPU offload follow
the loss curve of 1 process with the same global batch, and a sharded checkpoint resumes in one
process.

Tolerance: every logged loss within 1e-5 (relative, losses are ~6) of the one-process run. The
global batch is identical by construction (every process packs all rows, the loss is normalized
by global token counts); what differs is only the order of floating-point sums in the gradient
all-reduce / reduce-scatter, about 1e-7 relative per step, so 1e-5 leaves room for a few steps of
Adam to amplify it while any real mismatch (a rank seeing other data, a wrong normalization, a
missed gradient) shows up at the 1e-2 level from the first step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tapestry.train import checkpoint as ckpt
from tapestry.train.config import config_from_data, dump_toml
from tapestry.train.loop import train
from test_train_data import tiny_config, write_shards

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5

pytestmark = pytest.mark.slow


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def torchrun(config_file: Path, out: Path, mode: str) -> None:
    """mode: ddp, fsdp, or fsdp-offload (FSDP2 with CPUOffloadPolicy: on CPU processes the same
    code path — shards, gradients and the optimizer step on host memory — with nothing to move)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tapestry.train", "train", str(config_file), "--out", str(out), "--quiet",
               "--set", f"parallel.mode={mode.removesuffix('-offload')}"]
    if mode.endswith("-offload"):
        command += ["--set", "parallel.cpu_offload=true"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    raw = tiny_config(write_shards(root / "shards"))
    config_file = root / "tiny.toml"
    config_file.write_text(dump_toml(config_from_data(raw)))
    train(config_from_data(raw), root / "single", quiet=True)
    for mode in ("ddp", "fsdp", "fsdp-offload"):
        torchrun(config_file, root / mode, mode)
    return {"root": root, "raw": raw}


def assert_same_curve(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in ("loss", "text_loss", "flow_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= TOLERANCE * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])
        assert a["tokens"] == b["tokens"] and a["docs"] == b["docs"], "the same global batch"


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-offload"])
def test_two_processes_follow_the_one_process_loss_curve(runs, mode):
    root = runs["root"]
    assert_same_curve(records(root / mode), records(root / "single"))
    final = root / mode / "checkpoints" / "step-00000006"
    shards = {p.name: p.stat().st_size for p in (final / "state").glob("*.distcp")}
    single = sum(p.stat().st_size for p in (root / "single" / "checkpoints" / "step-00000006" / "state").glob("*.distcp"))
    # FSDP2: each process wrote its own shard, about half of the state each; DDP: the replicated
    # tensors are written once, not once per process (the total is one copy, not two)
    assert sorted(shards) == ["__0_0.distcp", "__1_0.distcp"] or mode == "ddp" and shards
    if mode == "ddp":
        assert 0.9 * single < sum(shards.values()) < 1.1 * single, (shards, single)
    else:  # FSDP2 shards carry their own metadata and padding: more than one copy, far less than two
        assert all(size > 0.25 * single for size in shards.values()) and sum(shards.values()) < 1.5 * single, shards
    assert sorted(p.name for p in (final / "rng").iterdir()) == ["rank-0.pt", "rank-1.pt"]
    single = json.loads((root / "single" / "checkpoints" / "step-00000006" / "data.json").read_text())
    assert json.loads((final / "data.json").read_text()) == single, "the data state does not depend on the world size"


def test_a_sharded_checkpoint_resumes_and_exports_in_one_process(runs, tmp_path):
    from tapestry.models.mot.model import MoTModel
    from tapestry.train.export import export_checkpoint

    root = runs["root"]
    run = tmp_path / "from-fsdp"
    shutil.copytree(root / "fsdp", run)
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    assert ckpt.latest_checkpoint(run).name == "step-00000003"
    train(config_from_data(runs["raw"]), run, resume=True, quiet=True)
    assert_same_curve(records(run), records(root / "single"))

    sharded = MoTModel.from_pretrained(export_checkpoint(root / "fsdp", tmp_path / "fsdp-export")["out"])
    single = MoTModel.from_pretrained(export_checkpoint(root / "single", tmp_path / "single-export")["out"])
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items()):
        # weights are ~0.02; Adam turns 1e-7 gradient differences into ~1e-6 weight differences
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
