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


# ------------------------------------------------------------------ every family through the protocol
@pytest.fixture(scope="module")
def duet_folders(tmp_path_factory):
    """A duet checkpoint, and its parts written in the published layouts (Qwen2.5-VL in two shards,
    a diffusers Wan folder with model_index.json and a sharded transformer)."""
    from tapestry.models.duet import convert
    from tapestry.models.duet.config import DuetConfig
    from tapestry.models.duet.model import DuetModel

    root = tmp_path_factory.mktemp("duet")
    torch.manual_seed(0)
    model = DuetModel(DuetConfig())
    model.save_pretrained(root / "duet")
    convert.write_qwen(model.mllm, root / "Qwen2.5-VL", shards=2)
    convert.write_diffusers(model.dit.net, root / "Wan" / "transformer", max_shard_size="50KB")
    convert.write_diffusers(model.vae.net, root / "Wan" / "vae")
    convert.write_model_index(root / "Wan", "WanPipeline", "WanTransformer3DModel", "AutoencoderKLWan")
    return root, model


def test_duet_checkpoint_and_published_layouts_from_headers(duet_folders, no_tensor_reads):
    root, model = duet_folders
    report = inspect_checkpoint(root / "duet")
    assert (report["family"], report["layout"], report["ok"]) == ("duet", "tapestry", True), report["errors"]
    groups = report["parameters"]["by_component"]
    assert set(groups) == {"mllm", "connector", "dit", "vae"}
    assert groups["dit"] == sum(p.numel() for p in model.dit.parameters())
    assert any(line.startswith("connector: mlp, reads all layers") for line in report["summary"])

    qwen = inspect_checkpoint(root / "Qwen2.5-VL")
    assert (qwen["family"], qwen["layout"], qwen["ok"]) == ("duet", "qwen2.5-vl", True), qwen["errors"]
    assert qwen["weights"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert qwen["parameters"]["total"] == sum(p.numel() for p in model.mllm.parameters())

    wan = inspect_checkpoint(root / "Wan")
    assert (wan["family"], wan["layout"], wan["ok"]) == ("duet", "diffusers", True), wan["errors"]
    assert set(wan["parameters"]["by_component"]) == {"transformer", "vae"}
    assert sum(w.startswith("transformer/diffusion_pytorch_model-") for w in wan["weights"]) > 1  # shards
    alone = inspect_checkpoint(root / "Wan" / "transformer")
    assert alone["layout"] == "diffusers-transformer" and alone["ok"]
    assert alone["parameters"]["total"] == wan["parameters"]["by_component"]["transformer"]


def test_duet_published_key_problems_use_the_published_names(duet_folders, tmp_path):
    root, _ = duet_folders
    qwen = tmp_path / "qwen"
    shutil.copytree(root / "Qwen2.5-VL", qwen)
    index = json.loads((qwen / "model.safetensors.index.json").read_text())
    shard = qwen / index["weight_map"]["model.norm.weight"]
    state = load_file(str(shard))
    state.pop("model.norm.weight")
    save_file(state, str(shard))
    report = inspect_checkpoint(qwen)
    assert not report["ok"] and report["missing"] == ["model.norm.weight"]
    wan = tmp_path / "wan"
    shutil.copytree(root / "Wan", wan)
    vae = wan / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(vae))
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(vae))
    report = inspect_checkpoint(wan)
    assert report["unexpected"] == ["vae/extra.weight"] and not report["ok"]
    result = CliRunner().invoke(app, [str(wan)])
    assert result.exit_code == 1
    assert "family: duet" in result.output and "vae/extra.weight" in result.output


@pytest.fixture(scope="module")
def tied_duet_folders(tmp_path_factory):
    """A tied-head duet model (Qwen2.5-VL-3B style: tie_word_embeddings, no lm_head.weight stored)
    as a duet checkpoint and as a two-shard published Qwen folder."""
    from tapestry.models.duet import convert
    from tapestry.models.duet.config import DuetConfig, MLLMConfig
    from tapestry.models.duet.model import DuetModel

    root = tmp_path_factory.mktemp("tied")
    torch.manual_seed(1)
    model = DuetModel(DuetConfig(mllm=MLLMConfig(tie_word_embeddings=True)))
    model.save_pretrained(root / "duet")
    convert.write_qwen(model.mllm, root / "Qwen2.5-VL", shards=2)
    return root, model


def test_tied_qwen_and_duet_folders_are_complete_from_headers(tied_duet_folders, no_tensor_reads):
    root, model = tied_duet_folders
    qwen = inspect_checkpoint(root / "Qwen2.5-VL")
    assert (qwen["layout"], qwen["ok"], qwen["missing"], qwen["unexpected"]) == ("qwen2.5-vl", True, [], []), qwen
    assert "lm_head" not in qwen["parameters"]["by_component"]
    assert qwen["parameters"]["total"] == sum(p.numel() for p in model.mllm.parameters())  # the table counted once
    assert any(n.startswith("lm_head is tied to model.embed_tokens.weight") and "not stored" in n for n in qwen["notes"])
    duet = inspect_checkpoint(root / "duet")
    assert (duet["ok"], duet["missing"], duet["unexpected"]) == (True, [], []), duet
    assert duet["parameters"]["by_component"]["mllm"] == sum(p.numel() for p in model.mllm.parameters())


def test_untied_qwen_folder_without_lm_head_says_why_in_one_line(duet_folders, tmp_path):
    root, _ = duet_folders
    qwen = tmp_path / "qwen"
    shutil.copytree(root / "Qwen2.5-VL", qwen)
    index_path = qwen / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = qwen / index["weight_map"].pop("lm_head.weight")
    state = load_file(str(shard))
    del state["lm_head.weight"]
    save_file(state, str(shard))
    index_path.write_text(json.dumps(index))
    report = inspect_checkpoint(qwen)
    assert not report["ok"] and report["missing"] == ["lm_head.weight"] and not report["unexpected"]
    hint = [n for n in report["notes"] if "tie_word_embeddings" in n]
    assert len(hint) == 1 and "\n" not in hint[0] and '"tie_word_embeddings": true' in hint[0]
    result = CliRunner().invoke(app, [str(qwen)])
    assert result.exit_code == 1 and hint[0] in result.output


@pytest.fixture
def mmi_folders(tmp_path):
    """Written before `no_tensor_reads` patches safetensors: the writers import transformers,
    which binds `safe_open` at import and would keep the refusing stand-in for later tests."""
    from test_models_mmi_convert import base_config, write_clip, write_llama, write_sd21

    from tapestry.models.mmi.model import MMIModel

    clip, llama, unet = (write_clip(tmp_path / "clip"), write_llama(tmp_path / "vicuna"), write_sd21(tmp_path / "sd"))
    torch.manual_seed(0)
    MMIModel(base_config()).save_pretrained(tmp_path / "mmi")
    return clip, llama, unet


def test_mmi_checkpoint_and_published_components_from_headers(tmp_path, mmi_folders, no_tensor_reads):
    clip, llama, unet = mmi_folders
    report = inspect_checkpoint(tmp_path / "clip")
    assert (report["family"], report["layout"], report["ok"]) == ("mmi", "clip", True), report["errors"]
    assert report["parameters"]["by_component"]["vision_model"] == sum(v.numel() for v in clip.values())
    assert "5 text-tower / projection tensors, 1 stale position_ids" in report["notes"][0]
    report = inspect_checkpoint(tmp_path / "vicuna")
    assert (report["layout"], report["ok"]) == ("llama", True), report["errors"]
    assert report["parameters"]["total"] == sum(v.numel() for v in llama.values())
    report = inspect_checkpoint(tmp_path / "sd")
    assert (report["layout"], report["ok"]) == ("stable-diffusion", True), report["errors"]
    assert report["parameters"]["by_component"]["unet"] == sum(v.numel() for v in unet.values())
    assert "v_prediction" in report["summary"][0]  # the scheduler's setting reaches the decoder config
    report = inspect_checkpoint(tmp_path / "mmi")
    assert (report["family"], report["layout"], report["ok"]) == ("mmi", "tapestry", True), report["errors"]
    assert {"llm", "mmfs", "unet", "vision"} <= set(report["parameters"]["by_component"])


def test_mmi_component_problems_are_listed(tmp_path):
    from test_models_mmi_convert import write_clip

    write_clip(tmp_path / "clip")
    weights = tmp_path / "clip" / "model.safetensors"
    state = load_file(str(weights))
    state["vision_model.post_layernorm.weight"] = torch.zeros(3)
    save_file(state, str(weights))
    report = inspect_checkpoint(tmp_path / "clip")
    assert not report["ok"]
    assert report["shape_mismatch"] == [{"key": "vision_model.post_layernorm.weight", "expected": [16], "found": [3]}]


def test_a_config_json_that_names_no_known_layout_is_unknown(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    report = inspect_checkpoint(tmp_path)
    assert report["layout"] == "unknown" and report["family"] is None and "no known layout" in report["errors"][0]
