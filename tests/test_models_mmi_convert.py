"""Loaders for the published mmi components, on tiny random weights written in exactly the
published layouts: CLIPModel (openai/clip-vit-large-patch14), LlamaForCausalLM (Vicuna, sharded),
Stable Diffusion 2.1 (diffusers unet/ + vae/ + scheduler/)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from tapestry.models.mmi.config import DecoderConfig, MMFSConfig, MMIConfig, ResamplerConfig, VisionConfig
from tapestry.models.mmi.convert import ConvertError, build_from_components

VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def write_clip(folder):
    """A CLIPModel folder as the hub ships it: vision_model.* + text_model.* + projections."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    vision = CLIPVisionModel(CLIPVisionConfig(**VISION))
    state = {"vision_model." + k: v.clone() for k, v in vision.state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # old exports carry it
    state["text_model.embeddings.token_embedding.weight"] = torch.randn(20, 16)
    state["text_model.final_layer_norm.weight"] = torch.ones(16)
    state["visual_projection.weight"] = torch.randn(8, 16)
    state["text_projection.weight"] = torch.randn(8, 16)
    state["logit_scale"] = torch.tensor(2.6592)
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 8,
        "vision_config": {**VISION, "model_type": "clip_vision_model"},
        "text_config": {"hidden_size": 16, "vocab_size": 20, "model_type": "clip_text_model"}}))
    return {k: v for k, v in state.items() if k.startswith("vision_model.") and "position_ids" not in k}


def write_llama(folder):
    """A Vicuna-style LlamaForCausalLM folder, weights in two safetensors shards + index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=False)
    state = {k: v.clone() for k, v in LlamaForCausalLM(LlamaConfig(**cfg)).state_dict().items()}
    folder.mkdir()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(folder / name))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    **cfg}))
    return state


def write_sd21(folder):
    """An SD-2.1 diffusers folder: unet/ (SD 2.x block layout, linear projections), vae/, scheduler/."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=24, norm_num_groups=8, use_linear_projection=True)
    unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  scaling_factor=0.18215).save_pretrained(str(folder / "vae"), safe_serialization=True)
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="v_prediction").save_pretrained(str(folder / "scheduler"))
    return {k: v.clone() for k, v in unet.state_dict().items()}


def base_config():
    return MMIConfig(vision=VisionConfig(feature_dim=16, norm_groups=4),
                     resampler=ResamplerConfig(queries=4, blocks=1, dim=16, heads=2),
                     mmfs=MMFSConfig(every=2, heads=4, points=2, max_images=4),
                     decoder=DecoderConfig(resampler_heads=2, mmfs_dim=16, mmfs_heads=2, mmfs_points=2))


def test_components_load_bitwise_with_coverage(tmp_path):
    clip = write_clip(tmp_path / "clip-vit-large-patch14")
    llama = write_llama(tmp_path / "vicuna")
    unet = write_sd21(tmp_path / "sd21")
    model, coverage = build_from_components(tmp_path / "clip-vit-large-patch14", tmp_path / "vicuna",
                                            tmp_path / "sd21", base=base_config())
    state = model.state_dict()
    for k, v in clip.items():
        assert torch.equal(state["encoder.clip." + k.removeprefix("vision_model.")], v), k
    for k, v in llama.items():
        assert torch.equal(state["lm.llm." + k], v), k
    for k, v in unet.items():
        assert torch.equal(state["decoder.unet." + k], v), k
    cfg = model.config
    assert (cfg.llm.hidden_size, cfg.llm.num_layers, cfg.vision.num_layers) == (32, 2, 2)
    assert cfg.decoder.cross_attention_dim == 24 and cfg.decoder.prediction_type == "v_prediction"
    assert cfg.mmfs_layers() == [1]
    assert sum(coverage.sources.values()) == len(clip) + len(llama) + len(unet)
    assert coverage.initialized and all(k.split(".")[1] not in ("clip", "llm", "unet") for k in coverage.initialized)
    assert any(k.startswith("lm.mmfs.") for k in coverage.initialized)
    # the VAE is read by the shared autoencoder loader with SD's scale
    from tapestry.models.vae import load_autoencoder

    vae = load_autoencoder(tmp_path / "sd21" / "vae")
    assert vae.scale_factor == pytest.approx(0.18215) and vae.latent_channels == 4
    # the converted LLM computes what transformers' own from_pretrained model computes
    from transformers import LlamaForCausalLM

    reference = LlamaForCausalLM.from_pretrained(str(tmp_path / "vicuna")).eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        ours = model.lm.logits(model.lm(model.lm.embed(ids), torch.arange(6)[None],
                                        torch.ones(6, 6, dtype=torch.bool).tril()[None]))
        torch.testing.assert_close(ours, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_component_that_does_not_fit_is_refused_with_its_keys(tmp_path):
    write_llama(tmp_path / "vicuna")
    index = json.loads((tmp_path / "vicuna" / "model.safetensors.index.json").read_text())
    # drop one shard's worth of keys from the index: the loader must name what is missing
    shard = "model-00002-of-00002.safetensors"
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    (tmp_path / "vicuna" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConvertError, match="missing"):
        build_from_components(llm_dir=tmp_path / "vicuna", base=base_config())
    with pytest.raises(ConvertError, match="config.json: missing"):
        build_from_components(clip_dir=tmp_path / "nowhere", base=base_config())
