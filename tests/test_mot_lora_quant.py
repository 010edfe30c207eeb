"""LoRA through peft (experts chosen separately, adapters saved alone, merge), torchao weight-only
quantization on CPU, and layer-wise offload, on a tiny MoT model."""

from __future__ import annotations

import copy

import pytest
import torch

from tapestry.layout import GEN, UND, Span, dense_mask
from tapestry.models.mot.config import LatentConfig, LLMConfig, MoTConfig, ViTConfig
from tapestry.models.mot.model import MoTModel


def tiny_model(seed: int = 0, hidden: int = 64) -> MoTModel:
    torch.manual_seed(seed)
    config = MoTConfig(
        llm=LLMConfig(vocab_size=128, hidden_size=hidden, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16),
        vit=ViTConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, patch_size=8,
                      max_patches_per_side=4),
        latent=LatentConfig(channels=4, patch_size=2, max_side=4, timestep_freq_dim=32),
    )
    model = MoTModel(config)
    with torch.no_grad():  # a trained-looking output head, so velocities are not all zero
        model.latent_out.weight.normal_(std=0.02)
    return model.eval()


def inputs(model: MoTModel, seed: int = 1):
    # 4 text tokens (causal, und), then 4 latent tokens (full, gen), then 2 text tokens
    g = torch.Generator().manual_seed(seed)
    text = model.embed_text(torch.randint(0, 128, (1, 6), generator=g))
    latents = model.embed_latents(torch.randn(1, 4, 4, 4, generator=g), torch.tensor([0.5]))
    embeds = torch.cat([text[:, :4], latents, text[:, 4:]], dim=1)
    experts = torch.tensor([[UND] * 4 + [GEN] * 4 + [UND] * 2])
    positions = torch.tensor([[0, 1, 2, 3, 4, 4, 4, 4, 5, 6]])
    mask = dense_mask([Span(0, 4, "causal"), Span(4, 8, "full"), Span(8, 10, "causal")])
    return embeds.detach(), experts, positions, mask


def train_steps(model, steps: int = 3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = inputs(model)
    for _ in range(steps):
        opt.zero_grad()
        out = model(*x)
        loss = out.pow(2).mean() + model.logits(out).logsumexp(-1).mean()
        loss.backward()
        opt.step()
    return model


def base_state(model) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def test_lora_training_changes_only_adapters_and_merges_to_equal_outputs(tmp_path):
    from tapestry.models.mot.lora import LoraSpec, add_lora, adapter_state_dict, load_adapter, merge_lora, save_adapter

    model = tiny_model()
    before = base_state(model)
    spec = LoraSpec(rank=4, alpha=8, modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    add_lora(model, spec)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    train_steps(model)
    after = base_state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # base weights bitwise untouched
    adapters = adapter_state_dict(model)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # B left zero-init: it trained

    save_adapter(model, spec, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # adapters alone, no base weight
    with torch.no_grad():
        adapted = model(*inputs(model))
    fresh = tiny_model()
    load_adapter(fresh, tmp_path / "adapter")
    merged = merge_lora(fresh)
    assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())
    assert set(merged.state_dict()) == set(tiny_model().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(*inputs(merged)), adapted, atol=1e-5, rtol=1e-4)


def test_gen_only_lora_leaves_understanding_tokens_bitwise_unchanged():
    from tapestry.models.mot.lora import LoraSpec, add_lora

    model = tiny_model()
    with torch.no_grad():
        ref = model(*inputs(model))
    add_lora(model, LoraSpec(rank=4, experts=["gen"]))
    assert all(".gen." in n for n, p in model.named_parameters() if p.requires_grad)
    train_steps(model)
    with torch.no_grad():
        out = model(*inputs(tiny_model()))
    assert torch.equal(out[:, :4], ref[:, :4])  # text before the image never meets a gen expert
    assert not torch.allclose(out[:, 4:8], ref[:, 4:8])  # the latent tokens do


def test_lora_spec_errors_name_the_field():
    from tapestry.models.mot.lora import LoraError, LoraSpec, add_lora

    with pytest.raises(LoraError, match="lora.experts"):
        LoraSpec(experts=["vision"]).validate()
    with pytest.raises(LoraError, match="lora.modules"):
        LoraSpec(modules=["qkv"]).validate()
    with pytest.raises(LoraError, match="layers 0..1"):
        add_lora(tiny_model(), LoraSpec(layers=[5]))


@pytest.mark.parametrize("mode, tolerance", [("int8", 0.02), ("int4", 0.15)])
def test_weight_only_quantization_stays_close_to_fp32(mode, tolerance):
    from tapestry.models.mot.quant import quantize_weights, weight_bytes

    model = tiny_model()
    x = inputs(model)
    with torch.no_grad():
        ref = model(*x)
        ref_v = model.latent_out(ref)
    full = weight_bytes(model)
    quantize_weights(model, mode)
    with torch.no_grad():
        out = model(*x)
        v = model.latent_out(out)
    error = ((out - ref).norm() / ref.norm()).item()
    assert 0 < error < tolerance  # quantized (not a no-op) and close: stated bound per mode
    assert ((v - ref_v).norm() / ref_v.norm()).item() < 2 * tolerance
    assert weight_bytes(model) < 0.6 * full  # fp32 -> 1 byte per decoder weight (+ scales)


def test_quantization_refuses_groups_that_do_not_divide():
    from tapestry.models.mot.quant import QuantError, quantize_weights

    with pytest.raises(QuantError, match="int4 groups of 48"):
        quantize_weights(tiny_model(), "int4", group_size=48)
    with pytest.raises(QuantError, match="not one of"):
        quantize_weights(tiny_model(), "fp4")


def test_layer_offload_gives_equal_outputs_and_keeps_layers_on_the_cpu():
    from tapestry.models.mot.quant import offload_layers

    model = tiny_model()
    x = inputs(model)
    with torch.no_grad():
        ref = model(*x)
    offloaded = offload_layers(copy.deepcopy(model), "cpu")
    calls = []
    offloaded.layers[1].register_forward_pre_hook(lambda m, a: calls.append(m.und.q_proj.weight.device.type))
    with torch.no_grad():
        assert torch.equal(offloaded(*x), ref)
    assert calls == ["cpu"]  # the layer held its weights on the compute device while it ran
    assert all(p.device.type == "cpu" for p in offloaded.layers.parameters())
