"""Shared setup of the engine benchmarks: a model of a given size with random weights, and
contexts of random clean tokens (timing does not depend on what the weights have learned)."""

from __future__ import annotations

import torch
from _common import model_config

from tapestry.models import family as families


def random_model(hidden: int = 256, layers: int = 4, heads: int = 4, kv_heads: int = 2, latent_side: int = 16):
    torch.manual_seed(0)
    llm = {"hidden_size": hidden, "intermediate_size": hidden * 11 // 4, "num_layers": layers, "num_heads": heads,
           "num_kv_heads": kv_heads, "head_dim": hidden // heads}
    vit = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "patch_size": 8,
           "max_patches_per_side": 16}
    config = model_config("mot", {"llm": llm, "vit": vit, "latent": {"patch_size": 2, "max_side": latent_side}},
                          vocab_size=1024, latent_channels=8)
    model = families.get("mot").build(config).eval()
    torch.nn.init.normal_(model.latent_out.weight, std=0.02)
    return model


def filled_context(model, length: int, recompute: bool = False, chunk: int = 512):
    """A Context holding `length` clean tokens: text (causal, und) and image (full, gen) blocks."""
    parts = families.get("mot").benchmark_parts()
    Block, Context = parts.Block, parts.Context
    ctx = Context(model, recompute=recompute)
    d = model.config.llm.hidden_size
    generator = torch.Generator().manual_seed(length)
    blocks = []
    start = 0
    while start < length:
        n = min(chunk, length - start)
        text = len(blocks) % 2 == 0
        positions = ctx.take_positions(n) if text else torch.full((n,), ctx.take_image_position())
        blocks.append(Block(torch.randn(n, d, generator=generator) * 0.02, torch.full((n,), 0 if text else 1),
                            positions, "causal" if text else "full"))
        start += n
    ctx.prefill(blocks) if not recompute else ctx.blocks.extend(blocks)
    return ctx
