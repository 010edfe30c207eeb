"""The peak-memory estimator (tapestry/models/mot/memory.py) against measured peaks on the CPU,
and `tapestry memory` on BAGEL-7B-MoT's shapes.

`measure` runs the step for real and counts every storage from its creation to its release
(torch's own CPU allocator is invisible to tracemalloc; RSS would count the allocator's cache and
the interpreter). The estimate never runs the model (meta device and arithmetic), so agreement
within 15 % on every tiny config — training full / checkpointed / LoRA, inference fp32 with one
and three guidance branches, int8 and int4 weights — is the claim benchmarks/memory.py tracks.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tapestry.cli import app
from tapestry.models.mot.config import LatentConfig, LLMConfig, MoTConfig, ViTConfig
from tapestry.models.mot.memory import Plan, estimate, fits, measure

runner = CliRunner()


def tiny() -> MoTConfig:
    return MoTConfig(
        llm=LLMConfig(vocab_size=512, hidden_size=96, intermediate_size=192, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=24),
        vit=ViTConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, patch_size=8,
                      max_patches_per_side=4),
        latent=LatentConfig(channels=4, patch_size=2, max_side=16, timestep_freq_dim=32),
    )


PLANS = {
    "train": Plan(mode="train", dtype="fp32", device="cpu", tokens=192),
    "train-checkpointing": Plan(mode="train", dtype="fp32", device="cpu", tokens=192, activation_checkpointing=True),
    "train-lora": Plan(mode="train", dtype="fp32", device="cpu", tokens=192, lora_rank=8, ema=False),
    "infer": Plan(mode="inference", dtype="fp32", device="cpu", tokens=192, image_tokens=64),
    "infer-3-branches": Plan(mode="inference", dtype="fp32", device="cpu", tokens=192, image_tokens=64, branches=3),
    "infer-int8": Plan(mode="inference", dtype="fp32", device="cpu", tokens=192, image_tokens=64, quant="int8"),
    "infer-int4": Plan(mode="inference", dtype="bf16", device="cpu", tokens=192, image_tokens=64, quant="int4"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PLANS))
def test_estimate_is_within_15_percent_of_the_measured_peak(name):
    plan = PLANS[name]
    predicted, measured = estimate(tiny(), plan).peak, measure(tiny(), plan)
    assert abs(predicted / measured - 1) <= 0.15, (name, predicted, measured)


def test_options_move_the_estimate_the_way_they_should():
    config = tiny()
    train = PLANS["train"]
    full = estimate(config, train)
    checkpointed = estimate(config, PLANS["train-checkpointing"])
    assert checkpointed.parts["activations"] < full.parts["activations"]
    lora = estimate(config, PLANS["train-lora"])
    assert lora.parts["gradients"] < full.parts["gradients"] / 5 and lora.parts["ema"] == 0
    offload = estimate(config, Plan(mode="train", dtype="fp32", device="cpu", tokens=192, offload=True))
    assert offload.parts["optimizer"] == 0 and offload.parts["weights"] < full.parts["weights"]
    bf16, int8, int4 = (estimate(config, Plan(mode="inference", quant=q, tokens=192, image_tokens=64)).parts["weights"]
                        for q in ("none", "int8", "int4"))
    assert int4 < int8 < bf16
    three = estimate(config, PLANS["infer-3-branches"])
    assert three.parts["kv_cache"] == 3 * estimate(config, PLANS["infer"]).parts["kv_cache"]


def test_memory_command_on_bagel_7b_lists_what_fits():
    result = runner.invoke(app, ["memory", "bagel-7b", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    by_option = {row["option"]: row for row in out["options"]}
    # 14.1 B parameters (two experts of a 7B decoder + SigLIP) in bf16: 26-27 GiB of weights alone
    assert 26 < out["parts_bytes"]["weights"] / 1024**3 < 28
    assert not by_option["bf16"]["fits_24"] and by_option["bf16"]["fits_48"]
    assert by_option["int4"]["fits_24"]
    assert by_option["int4"]["peak_gib"] < by_option["int8"]["peak_gib"] < by_option["bf16"]["peak_gib"]


def test_memory_command_reads_the_lora_recipe(tmp_path):
    from pathlib import Path

    config = Path(__file__).resolve().parent.parent / "configs" / "bagel-lora-inset.toml"
    result = runner.invoke(app, ["memory", str(config), "--model", "bagel-7b", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["plan"]["lora_rank"] == 64 and out["plan"]["tokens"] == 30000 and out["plan"]["activation_checkpointing"]
    options = [row["option"] for row in out["options"]]
    assert "LoRA r64 + checkpointing + FSDP2 CPU offload" in options
    rows = {row["option"]: row["peak_gib"] for row in out["options"]}
    assert rows["LoRA r64 + activation checkpointing"] < rows["LoRA r64"]  # each row sets its own options
    missing = runner.invoke(app, ["memory", str(config)])  # init_from is not a folder here
    assert missing.exit_code == 2 and "--model bagel-7b" in missing.output


def test_fits_rows_set_every_option_they_name():
    rows = {r["option"]: r for r in fits(tiny(), Plan(mode="train", tokens=192, lora_rank=4, activation_checkpointing=True))}
    assert rows["full fine-tune"]["peak_gib"] >= rows["full + activation checkpointing"]["peak_gib"]
    assert "LoRA r4" in rows
