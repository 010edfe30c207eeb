"""Fine-tuning a BAGEL-layout checkpoint through the training recipe: `init_from` a release
folder, LoRA adapters chosen by [model.lora] (experts, modules, layers), checkpoints that hold the
adapters alone, resume, `tapestry export` of the adapters alone and `--merge-lora`, and the
Inset / ILLUME-X recipes in configs/.

Everything runs on the tiny release-layout checkpoint the suite generates (tests/bagel_fixture.py)
with a few ToyWorld documents at 32 px: bf16 base weights as released, float32 adapters.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bagel_fixture import write_bagel_checkpoint
from tapestry.cli import app
from tapestry.train.config import config_from_data, load_config

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
runner = CliRunner()
# what [model.lora] below adapts: the generation expert's q, v and up projections of layer 1
ADAPTED = re.compile(r"^layers\.1\.gen\.(q_proj|v_proj|mlp\.up_proj)\.lora_[AB]\.default\.weight$")

pytestmark = pytest.mark.slow


def recipe(bagel: Path, **lora) -> dict:
    return {
        "seed": 0,
        "model": {"init_from": str(bagel), "vae": str(bagel),
                  "lora": {"rank": 4, "alpha": 8.0, "experts": ["gen"], "modules": ["q_proj", "v_proj", "up_proj"],
                           "layers": [1], **lora}},
        "layout": {"target_size": [32, 32], "text_turns": True},
        "data": {"budget": 256, "rows": 2, "lookahead": 128, "timestep_shift": 3.0,
                 "sources": [{"name": "compose", "task": "compose", "side": 32}]},
        "optim": {"lr": 1e-2},  # large, so three steps move the adapters far from zero
        "ema": {"decay": 0.0},
        "stages": [{"name": "lora", "steps": STEPS}],
        "checkpoint": {"every": STEPS},
        "log": {"every": 1},
    }


def probe(model) -> torch.Tensor:
    """Final hidden states of 6 text tokens then 16 latent tokens (both experts, every layer)."""
    from tapestry.layout import GEN, UND, Span, dense_mask

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        text = model.embed_text(torch.randint(0, 500, (1, 6), generator=g))
        latents = model.embed_latents(torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.7]))
        embeds = torch.cat([text, latents], 1)
        experts = torch.tensor([[UND] * 6 + [GEN] * 16])
        positions = torch.tensor([list(range(6)) + [6] * 16])
        mask = dense_mask([Span(0, 6, "causal"), Span(6, 22, "full")])
        return model(embeds, experts, positions, mask).float()


@pytest.fixture(scope="module")
def bagel(tmp_path_factory) -> Path:
    return write_bagel_checkpoint(tmp_path_factory.mktemp("bagel") / "BAGEL-tiny")


@pytest.fixture(scope="module")
def lora_run(bagel, tmp_path_factory):
    """STEPS LoRA steps through the Trainer (the model stays in memory) and the checkpoint it writes."""
    from tapestry.train.loop import Trainer
    from tapestry.train.parallel import Dist

    config = config_from_data(recipe(bagel))
    run = tmp_path_factory.mktemp("lora") / "run"
    trainer = Trainer(config, run, Dist(), quiet=True)
    stage = config.stages[0]
    built = trainer.build(stage)
    trainable = sorted(n for n, p in built.model.named_parameters() if p.requires_grad)
    for step in range(STEPS):
        record = trainer.step(built, step, stage)
    checkpoint = trainer.save(built, STEPS, 0, 0, record["lr"])
    return {"config": config, "run": run, "built": built, "trainable": trainable, "checkpoint": checkpoint}


def base_weights(model) -> dict[str, torch.Tensor]:
    """The model's non-adapter tensors under their plain names (peft inserts `.base_layer`)."""
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


def test_init_from_a_bagel_folder_trains_only_the_chosen_adapters(bagel, lora_run):
    from tapestry.models import family as families

    model = lora_run["built"].model
    assert lora_run["trainable"] and all(ADAPTED.match(n) for n in lora_run["trainable"])
    assert {n.split(".lora_")[0] for n in lora_run["trainable"]} == {
        "layers.1.gen.q_proj", "layers.1.gen.v_proj", "layers.1.gen.mlp.up_proj"}
    released = families.get("mot").from_pretrained(bagel).state_dict()  # the weights init_from named
    after = base_weights(model)
    assert after.keys() == released.keys()
    changed = [k for k in released if not torch.equal(after[k], released[k])]
    assert changed == []  # every base weight bitwise the release's after STEPS steps
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.dtype == torch.float32 for p in lora_b) and all(p.abs().sum() > 0 for p in lora_b)  # B starts at 0


def test_a_lora_checkpoint_holds_the_adapters_alone(lora_run):
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(lora_run["checkpoint"] / "state")).read_metadata().state_dict_metadata
    model_keys = sorted(k.removeprefix("model.model.") for k in saved if k.startswith("model."))
    assert model_keys == lora_run["trainable"]
    size = sum(p.stat().st_size for p in (lora_run["checkpoint"] / "state").glob("*.distcp"))
    assert size < 2_000_000  # adapters + their AdamW moments; the base alone is 2.3 MB in bf16


def test_resumed_lora_run_ends_on_the_same_adapters(bagel, lora_run, tmp_path):
    from tapestry.models.mot.lora import adapter_state_dict
    from tapestry.train.loop import train

    config = config_from_data(recipe(bagel))
    run = tmp_path / "resumed"
    train(config, run, quiet=True, stop_after=1)
    train(config, run, resume=True, quiet=True)  # base re-read from init_from, adapters from the checkpoint
    from tapestry.train.export import export_checkpoint

    export_checkpoint(run, tmp_path / "adapters")
    from safetensors.torch import load_file

    resumed = load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))
    straight = adapter_state_dict(lora_run["built"].model)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)  # bit for bit, as an uninterrupted run


def test_merged_export_equals_the_adapter_model(bagel, lora_run, tmp_path):
    from tapestry.models import family as families
    from tapestry.models.pipeline_folder import load_pipeline

    run = str(lora_run["run"])
    alone, merged = tmp_path / "adapters", tmp_path / "merged"
    result = runner.invoke(app, ["export", run, "--out", str(alone)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["adapters"] == "alone"
    from tapestry.atomic import OUTPUT_MARKER

    assert sorted(p.name for p in alone.iterdir() if p.name != OUTPUT_MARKER) == [
        "adapter.json", "adapter_config.json", "adapter_model.safetensors", "export.json", "train_config.toml"]
    result = runner.invoke(app, ["export", run, "--out", str(merged), "--merge-lora"])
    assert result.exit_code == 0, result.output

    trained = probe(lora_run["built"].model.eval())
    base = probe(families.get("mot").from_pretrained(bagel))
    from_adapters = load_pipeline(alone)  # the release folder + the adapters, unmerged
    assert torch.equal(probe(from_adapters.model), trained)
    assert from_adapters.layout.text_turns and from_adapters.layout.target_size == (32, 32)
    folded = load_pipeline(merged).model
    assert not any("lora_" in k or "base_layer" in k for k in folded.state_dict())
    assert folded.dtype == torch.bfloat16  # merged into the release's dtype
    effect = (trained - base).norm() / trained.norm()
    error = (probe(folded) - trained).norm() / trained.norm()
    # The folded weight W + (α/r)·B·A is rounded once to bf16 (the released dtype) while the
    # unmerged path adds the float32 adapter output to a bf16 product: the two differ by bf16
    # rounding (2^-8 relative per value), far less than what the adapters changed
    assert effect > 0.01 and error < 0.004 and error < 0.2 * effect, (float(effect), float(error))
    assert torch.equal(probe(folded)[:, :6], base[:, :6])  # gen-only adapters: text before the image untouched


def test_generate_runs_on_an_adapter_folder(lora_run, tmp_path):
    from tapestry.document import Document, ImageSegment, TextSegment
    from tapestry.infer.pipeline import Pipeline
    from tapestry.train.export import export_checkpoint

    export_checkpoint(lora_run["run"], tmp_path / "adapters")
    pipe = Pipeline.from_pretrained(tmp_path / "adapters")
    assert pipe.defaults.shift == 3.0
    doc = Document("p", [TextSegment("a red cube", "context"), ImageSegment("target", width=32, height=32)])
    first, again = (pipe.generate(doc, steps=2, seed=4) for _ in range(2))
    assert first.segments[-1].image.size == (32, 32)
    assert first.segments[-1].image.tobytes() == again.segments[-1].image.tobytes()
    assert first.meta["generation"]["checkpoint_hash"].startswith("sha256:")


def test_full_fine_tune_from_a_bagel_folder_and_merge_lora_refusal(bagel, tmp_path):
    from tapestry.models import family as families
    from tapestry.train.loop import Trainer
    from tapestry.train.parallel import Dist

    raw = recipe(bagel)
    raw["model"]["lora"] = {"rank": 0}
    config = config_from_data(raw)
    trainer = Trainer(config, tmp_path / "run", Dist(), quiet=True)
    built = trainer.build(config.stages[0])
    released = families.get("mot").from_pretrained(bagel).state_dict()
    state = built.model.state_dict()
    assert state.keys() == released.keys() and all(torch.equal(state[k], released[k]) for k in released)
    assert all(p.requires_grad for p in built.model.parameters())  # no adapters: everything trains
    record = trainer.step(built, 0, config.stages[0])
    trainer.save(built, 1, 0, 0, record["lr"])
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--merge-lora"])
    assert result.exit_code == 2 and "trained no adapters" in result.output
    assert not (tmp_path / "m").exists()


def test_lora_settings_are_checked_where_the_config_is_read(bagel, tmp_path):
    from tapestry.train.config import TrainConfigError

    with pytest.raises(TrainConfigError, match=r"model\.lora\.experts"):
        config_from_data(recipe(bagel, experts=["vision"]))
    raw = recipe(bagel)
    raw["model"].update(init_from="", tokenizer=str(bagel))  # a fresh model: nothing to adapt
    path = tmp_path / "bad.toml"
    from tapestry.train.config import dump_toml

    path.write_text(dump_toml(config_from_data(raw)))
    result = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2 and "set model.init_from" in result.output


def test_the_paper_recipes_load_with_their_numbers():
    inset = load_config(ROOT / "configs" / "bagel-lora-inset.toml")
    assert (inset.optim.lr, inset.optim.betas, inset.stages[0].steps, inset.data.timestep_shift) == (2.5e-5, [0.9, 0.95], 50000, 3.0)
    assert {s.name: s.weight for s in inset.data.sources} == {
        "image-interleaved": 0.2, "video-interleaved": 0.2, "editing": 0.1, "text-to-image": 0.5}
    assert inset.layout.target_size == [1024, 1024] and not inset.layout.references_as_vae
    assert inset.data.budget == 30000 and inset.model.arch.lora.experts == ["und", "gen"]
    illumex = load_config(ROOT / "configs" / "bagel-lora-illumex.toml")
    assert (illumex.optim.lr, illumex.stages[0].steps, illumex.schedule.warmup) == (2e-5, 6005, 100)
    assert illumex.layout.target_size == [512, 512] and illumex.dropout.policy == "illume"
    assert illumex.model.arch.lora.rank == 32 and inset.model.arch.lora.rank == 64
    for config in (inset, illumex):
        assert config.layout.text_turns and config.parallel.activation_checkpointing
