import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tapestry.models.common.checkpoint import CheckpointError, read_header
from tapestry.models.inspect_cli import app
from tapestry.models.inspection import inspect_checkpoint
from tapestry.models.mot.config import LatentConfig, LLMConfig, MoTConfig, ViTConfig
from tapestry.models.mot.model import MoTModel



@pytest.fixture
def no_tensor_reads(monkeypatch):
    """inspect must read headers only: any tensor load fails the test."""
    import safetensors
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("inspect read tensors")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "safe_open", refuse, raising=False)


@pytest.fixture
def tapestry_ckpt(tmp_path) -> tuple[Path, MoTModel]:
    cfg = MoTConfig(
        llm=LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16),
        vit=ViTConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, patch_size=4,
                      max_patches_per_side=4),
        latent=LatentConfig(channels=4, max_side=4, timestep_freq_dim=16),
    )
    model = MoTModel(cfg)
    return model.save_pretrained(tmp_path / "ckpt"), model


def test_tapestry_checkpoint(tapestry_ckpt, no_tensor_reads):
    folder, model = tapestry_ckpt
    report = inspect_checkpoint(folder)
    assert report["layout"] == "tapestry" and report["ok"]
    assert report["missing"] == report["unexpected"] == report["shape_mismatch"] == []
    assert report["parameters"]["total"] == model.num_parameters()
    comp = report["parameters"]["by_component"]
    assert comp["und_expert"] == comp["gen_expert"] > 0
    assert report["dtype"] == {"F32": len(read_header(folder / "model.safetensors"))}
    assert report["config"]["llm"]["hidden_size"] == 32
    json.dumps(report)  # JSON-ready


def test_key_problems_are_listed(tapestry_ckpt):
    folder, _ = tapestry_ckpt
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    del state["layers.0.gen.o_proj.weight"]
    state["layers.0.und.extra.weight"] = torch.zeros(1)
    state["lm_head.weight"] = torch.zeros(65, 32)
    save_file(state, str(weights))
    report = inspect_checkpoint(folder)
    assert not report["ok"]
    assert report["missing"] == ["layers.0.gen.o_proj.weight"]
    assert report["unexpected"] == ["layers.0.und.extra.weight"]
    assert report["shape_mismatch"] == [{"key": "lm_head.weight", "expected": [64, 32], "found": [65, 32]}]
    result = CliRunner().invoke(app, [str(folder)])
    assert result.exit_code == 1
    assert "layers.0.gen.o_proj.weight" in result.output and "not loadable" in result.output


def test_bagel_fixture(bagel_tiny, no_tensor_reads):
    report = inspect_checkpoint(bagel_tiny)
    assert report["layout"] == "bagel" and report["ok"], report["errors"]
    header = read_header(bagel_tiny / "ema.safetensors")
    assert report["parameters"]["total"] == sum(i.numel for i in header.values())
    comp = report["parameters"]["by_component"]
    assert comp["und_expert"] == comp["gen_expert"] and comp["fixed_tables"] == (64 + 100) * 96
    assert "other" not in comp
    assert report["dtype"] == {"BF16": 111}
    assert report["config"]["vit"]["num_layers"] == 2
    assert report["other_files"]["ae.safetensors"]["tensors"] == 176
    result = CliRunner().invoke(app, [str(bagel_tiny), "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert {"layout", "missing", "unexpected", "shape_mismatch", "parameters"} <= data.keys()


def test_bagel_trap_is_reported_not_raised(bagel_tiny, tmp_path):
    folder = tmp_path / "bagel"
    shutil.copytree(bagel_tiny, folder)
    cfg = json.loads((folder / "vit_config.json").read_text())
    cfg["num_hidden_layers"] = 5
    (folder / "vit_config.json").write_text(json.dumps(cfg))
    report = inspect_checkpoint(folder)
    assert not report["ok"] and "BAGEL drops the last" in report["errors"][0]
    assert report["parameters"]["total"] > 0  # what could be read is still reported


def test_unknown_and_absent_folders(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    report = inspect_checkpoint(tmp_path)
    assert report["layout"] == "unknown" and not report["ok"]
    assert report["other_files"]["weights.safetensors"]["tensors"] == 0
    with pytest.raises(CheckpointError, match="not a directory"):
        inspect_checkpoint(tmp_path / "nope")
    result = CliRunner().invoke(app, [str(tmp_path / "nope")])
    assert result.exit_code == 2
