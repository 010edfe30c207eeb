import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tapestry.layout import Span, dense_mask
from tapestry.models.common.checkpoint import CheckpointError, read_header
from tapestry.models.common.patches import patchify
from tapestry.models.common.sincos import sincos_2d
from tapestry.models.mot.convert import (
    bagel_config,
    bagel_expected_keys,
    bagel_to_tapestry_key,
    conv_patch_weight_to_linear,
    load_bagel,
    tapestry_to_bagel_key,
    to_bagel_state_dict,
)
from tapestry.models.mot.model import GEN, UND, MoTModel



def test_conv_patch_weight_maps_to_linear_order():
    conv = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4)
    image = torch.randn(1, 3, 8, 12)
    expected = conv(image).flatten(2).transpose(1, 2)  # [1, patches, 5] in raster order
    linear_w = conv_patch_weight_to_linear(conv.weight)
    got = patchify(image, 4) @ linear_w.T + conv.bias
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_config_is_read_from_the_folder(bagel_tiny):
    cfg, notes = bagel_config(bagel_tiny)
    llm = cfg.llm
    assert (llm.vocab_size, llm.hidden_size, llm.intermediate_size, llm.num_layers) == (512, 96, 128, 2)
    assert (llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.rope_theta) == (4, 2, 24, 1e6)
    assert llm.qk_norm and not llm.tie_word_embeddings
    assert (cfg.vit.num_layers, cfg.vit.max_patches_per_side, cfg.vit.patch_size) == (2, 10, 14)
    assert (cfg.latent.channels, cfg.latent.patch_size, cfg.latent.max_side) == (16, 2, 8)
    assert cfg.latent.timestep_freq_dim == 256
    assert any("the last is dropped" in n for n in notes)


def test_key_rules_cover_every_fixture_key_both_ways(bagel_tiny):
    header = read_header(bagel_tiny / "ema.safetensors")
    cfg, _ = bagel_config(bagel_tiny)
    expected = bagel_expected_keys(cfg)
    assert expected == {k: v.shape for k, v in header.items()}  # names and shapes, every key
    for key in header:
        ours = bagel_to_tapestry_key(key)
        if key.endswith("pos_embed.pos_embed"):
            assert ours is None  # fixed tables are recomputed, not loaded
            continue
        assert ours is not None, key
        assert tapestry_to_bagel_key(ours) == key
    assert bagel_to_tapestry_key("language_model.model.layers.0.mlp_moe_gen.up_proj.weight") == \
        "layers.0.gen.mlp.up_proj.weight"
    assert bagel_to_tapestry_key("language_model.model.layers.1.self_attn.k_norm_moe_gen.weight") == \
        "layers.1.gen.k_norm.weight"


def test_fixture_position_tables_are_our_sincos(bagel_tiny):
    state = load_file(str(bagel_tiny / "ema.safetensors"))
    torch.testing.assert_close(state["latent_pos_embed.pos_embed"].float(), sincos_2d(96, 8), atol=1e-2, rtol=0)
    torch.testing.assert_close(state["vit_pos_embed.pos_embed"].float(), sincos_2d(96, 10), atol=1e-2, rtol=0)


@pytest.fixture(scope="module")
def bagel_model(bagel_tiny):
    return load_bagel(bagel_tiny, dtype=torch.float32)


def _mixed_inputs(model):
    torch.manual_seed(0)
    text = model.embed_text(torch.tensor([5, 9, 100, 7]))
    image = model.embed_images([torch.randn(3, 28, 42)])[0]  # 2×3 patches of 14
    latents = model.embed_latents(torch.randn(1, 16, 4, 6), torch.tensor([0.6]))[0]  # 2×3 tokens
    embeds = torch.cat([text, image, latents, text[:2]])[None]
    experts = torch.tensor([[UND] * 4 + [UND] * 6 + [GEN] * 6 + [UND] * 2])
    positions = torch.tensor([[0, 1, 2, 3] + [4] * 6 + [5] * 6 + [6, 7]])
    spans = [Span(0, 4, "causal"), Span(4, 10, "full"), Span(10, 16, "noise"), Span(16, 18, "causal")]
    return embeds, experts, positions, dense_mask(spans)


def test_loaded_weights_equal_the_file(bagel_tiny, bagel_model):
    state = load_file(str(bagel_tiny / "ema.safetensors"))
    ours = bagel_model.state_dict()
    for key, tensor in state.items():
        name = bagel_to_tapestry_key(key)
        if name is not None:
            assert torch.equal(ours[name], tensor.float()), key
    native = load_bagel(bagel_tiny)  # dtype kept: bitwise bf16
    assert native.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(native.layers[1].gen.q_proj.weight,
                       state["language_model.model.layers.1.self_attn.q_proj_moe_gen.weight"])
    exported = to_bagel_state_dict(native)
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in state if "pos_embed.pos_embed" not in k)


@torch.no_grad()
def test_bagel_save_load_round_trip_gives_equal_outputs(bagel_tiny, bagel_model, tmp_path):
    embeds, experts, positions, mask = _mixed_inputs(bagel_model)
    out = bagel_model(embeds, experts, positions, mask)
    assert torch.isfinite(out).all()
    again = MoTModel.from_pretrained(bagel_model.save_pretrained(tmp_path / "tapestry-ckpt"))
    assert torch.equal(again(embeds, experts, positions, mask), out)
    logits = again.logits(out)
    assert logits.shape == (1, 18, 512)


def _copy_fixture(tmp_path: Path, source: Path) -> Path:
    # a scratch copy inside the test's temp folder, to break on purpose
    dst = tmp_path / "bagel"
    shutil.copytree(source, dst)
    return dst


def test_vit_layer_count_trap_is_explained(bagel_tiny, tmp_path):
    folder = _copy_fixture(tmp_path, bagel_tiny)
    cfg = json.loads((folder / "vit_config.json").read_text())
    cfg["num_hidden_layers"] = 2  # as if the file counted the layers actually stored
    (folder / "vit_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="should hold 1 .*BAGEL drops the last.*holds 2"):
        load_bagel(folder)


def test_missing_and_unexpected_keys_are_listed(bagel_tiny, tmp_path):
    folder = _copy_fixture(tmp_path, bagel_tiny)
    state = load_file(str(folder / "ema.safetensors"))
    del state["language_model.model.layers.1.mlp_moe_gen.down_proj.weight"]
    state["language_model.model.layers.1.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(folder / "ema.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_bagel(folder)
    assert "layers.1.mlp_moe_gen.down_proj.weight" in str(err.value)
    assert "1 unexpected" in str(err.value) and "mlp.extra_proj.weight" in str(err.value)


@torch.no_grad()
def test_conv_patch_embedding_and_wrong_tables(bagel_tiny, tmp_path, bagel_model):
    folder = _copy_fixture(tmp_path, bagel_tiny)
    state = load_file(str(folder / "ema.safetensors"))
    key = "vit_model.vision_model.embeddings.patch_embedding.weight"
    linear = state[key]
    state[key] = linear.reshape(32, 14, 14, 3).permute(0, 3, 1, 2).contiguous()  # as a Conv2d
    save_file(state, str(folder / "ema.safetensors"))
    conv_loaded = load_bagel(folder, dtype=torch.float32)
    assert torch.equal(conv_loaded.vit.patch_embed.weight, bagel_model.vit.patch_embed.weight)

    state["latent_pos_embed.pos_embed"] = state["latent_pos_embed.pos_embed"].flip(1)
    save_file(state, str(folder / "ema.safetensors"))
    with pytest.raises(CheckpointError, match="does not hold the 2-D sin-cos table"):
        load_bagel(folder)
