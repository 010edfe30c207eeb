"""The duet family through the unchanged train/ and infer/: configs/duet-tiny.toml trains both
DuetGen stages, resumes bitwise after a stop, exports, and generates through Pipeline; the
model's <BOV> emissions decide how many images a free-running generation draws."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tapestry.train.config import load_config
from tapestry.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ["data.budget=256", "data.rows=1", "data.lookahead=64", "stages.0.steps=2", "stages.1.steps=2",
             "checkpoint.every=1", "checkpoint.keep=4", "model.tokenizer_docs=40"]

pytestmark = pytest.mark.slow


def _losses(run: Path) -> list[tuple[int, str, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["stage"], r["text_loss"], r["flow_loss"]) for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("duet") / "reference"
    train(load_config(ROOT / "configs" / "duet-tiny.toml", OVERRIDES), run, quiet=True)
    return run


def test_tiny_run_trains_both_stages_and_resumes_bitwise(reference, tmp_path):
    from tapestry.train.export import export_checkpoint

    losses = _losses(reference)
    assert [s for _, s, _, _ in losses] == ["stage1-mllm"] * 2 + ["stage2-dit"] * 2
    assert all(flow == 0 for _, s, _, flow in losses if s == "stage1-mllm")  # stage 1: text only
    assert all(flow > 0 for _, s, _, flow in losses if s == "stage2-dit")

    run = tmp_path / "run"
    config = load_config(ROOT / "configs" / "duet-tiny.toml", OVERRIDES)
    train(config, run, quiet=True, stop_after=3)  # stopped inside stage 2, as a kill would
    train(config, run, resume=True, quiet=True)
    assert _losses(run) == losses
    a = export_checkpoint(reference, tmp_path / "a", weights="model")
    b = export_checkpoint(run, tmp_path / "b", weights="model")
    from safetensors.torch import load_file

    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "a" / "pipeline.json").read_text())["family"] == "duet"
    del a, b


def test_stage2_left_the_llm_of_stage1_untouched(reference, tmp_path):
    from safetensors.torch import load_file

    from tapestry.train.export import export_checkpoint

    export_checkpoint(reference, tmp_path / "s1", step=2, weights="model")
    export_checkpoint(reference, tmp_path / "s2", step=4, weights="model")
    s1, s2 = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("s1", "s2"))
    assert all(torch.equal(s1[k], s2[k]) for k in s1 if k.startswith("mllm."))
    assert any(not torch.equal(s1[k], s2[k]) for k in s1 if k.startswith("dit."))


def test_generate_through_pipeline_and_bov_drives_the_image_count(reference, tmp_path, monkeypatch):
    from tapestry.document import ImageSegment
    from tapestry.infer.pipeline import Pipeline
    from tapestry.models.duet.family import DuetRuntime
    from tapestry.train.export import export_checkpoint

    export_checkpoint(reference, tmp_path / "export")
    pipe = Pipeline.from_pretrained(tmp_path / "export")
    doc = pipe.generate("How do I draw a red circle?", steps=2, max_new_tokens=4, guidance="duetgen")
    assert doc.meta["generation"]["guidance"] == "duetgen"

    # the engine draws exactly when the model emits <BOV>: bias its logit up or down
    bov = pipe.engine.tokenizer.boi_id
    plain = DuetRuntime.next_text
    counts = {}
    for name, bias in (("emits", 1e4), ("never", -1e4)):
        def biased(self, context, bias=bias):
            logits = plain(self, context).clone()
            logits[bov] += bias
            return logits

        monkeypatch.setattr(DuetRuntime, "next_text", biased)
        out = pipe.generate("How do I draw a red circle?", steps=2, max_new_tokens=6, max_images=2)
        counts[name] = sum(isinstance(s, ImageSegment) for s in out.segments)
    assert counts == {"emits": 2, "never": 0}


def test_tied_head_run_exports_one_table_and_loads_tied(tmp_path):
    """A Qwen2.5-VL-3B-style tied head through train -> export -> Pipeline: the export writes
    the embedding table once (no lm_head.weight) and the loaded model's head is that table."""
    from safetensors.torch import load_file

    from tapestry.infer.pipeline import Pipeline
    from tapestry.train.export import export_checkpoint

    overrides = OVERRIDES + ["stages.0.steps=1", "stages.1.steps=1", "model.mllm.tie_word_embeddings=true"]
    run = tmp_path / "run"
    train(load_config(ROOT / "configs" / "duet-tiny.toml", overrides), run, quiet=True)
    export_checkpoint(run, tmp_path / "export", weights="model")
    stored = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert "mllm.hf.lm_head.weight" not in stored and "mllm.hf.model.language_model.embed_tokens.weight" in stored
    hf = Pipeline.from_pretrained(tmp_path / "export").engine.runtime.model.mllm.hf
    assert hf.config.tie_word_embeddings and hf.lm_head.weight is hf.model.language_model.embed_tokens.weight
    assert torch.equal(hf.lm_head.weight, stored["mllm.hf.model.language_model.embed_tokens.weight"])
