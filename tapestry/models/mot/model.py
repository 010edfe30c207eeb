"""The unified mixture-of-transformers (Inset / ILLUME-X / BAGEL layout), plain PyTorch.

Every decoder layer holds two experts of identical shape — `und` (text, special tokens, ViT
tokens) and `gen` (VAE latent tokens). Each token is routed by its expert index through its
expert's norms, q/k/v/o projections, QK-norm and SwiGLU MLP; attention itself is one softmax over
the whole sequence, so understanding and generation tokens see each other as the mask allows.

Inputs are embeddings, not ids: `embed_text`, `embed_latents` and `embed_images` turn each
modality into [.., D] rows that a layout interleaves. A KV cache lets a context be prefilled once;
new tokens (a text step, or a noisy image block at every denoising step) then run against it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tapestry.masks import DocumentMasks
from tapestry.models.common.attention import document_attention
from tapestry.models.common.checkpoint import (
    WEIGHTS_NAME,
    checkpoint_files,
    load_state_strict,
    save_state,
    write_config,
)
from tapestry.models.common.norm import RMSNorm
from tapestry.models.common.patches import patchify, unpatchify
from tapestry.models.common.rope import RotaryEmbedding, apply_rope
from tapestry.models.common.sincos import grid_position_ids, sincos_2d
from tapestry.models.common.timestep import TimestepEmbedder
from tapestry.models.mot.config import FORMAT, X0_MIN_T, LLMConfig, MoTConfig, ViTConfig

UND, GEN = 0, 1  # expert index of a token


# ---------------------------------------------------------------------------------------------
# Routing and cache
# ---------------------------------------------------------------------------------------------


@dataclass
class Routing:
    """Which flat token rows go to which expert; built once per forward, used by every layer."""

    und: Tensor  # [T_und] indices into the flattened [B·L] tokens
    gen: Tensor  # [T_gen]
    total: int

    @classmethod
    def from_expert_ids(cls, expert_ids: Tensor) -> Routing:
        # expert_ids: [B, L] of UND / GEN
        flat = expert_ids.reshape(-1)
        if flat.numel() and not bool(((flat == UND) | (flat == GEN)).all()):
            raise ValueError(f"expert ids must be {UND} (und) or {GEN} (gen)")
        return cls(
            und=(flat == UND).nonzero().squeeze(1),
            gen=(flat == GEN).nonzero().squeeze(1),
            total=flat.numel(),
        )

    def apply(self, x: Tensor, und_fn: Callable[[Tensor], Tensor], gen_fn: Callable[[Tensor], Tensor]) -> Tensor:
        """out[i] = fn_expert(i)(x[i]) for x: [T, D_in] -> [T, D_out].

        An expert with no tokens is never called, so its weights get no gradient (not a zero one).
        """
        if len(self.gen) == 0:
            return und_fn(x)
        if len(self.und) == 0:
            return gen_fn(x)
        y_und = und_fn(x.index_select(0, self.und))
        y_gen = gen_fn(x.index_select(0, self.gen))
        out = y_und.new_empty(self.total, y_und.shape[-1])
        out = out.index_copy(0, self.und, y_und)
        return out.index_copy(0, self.gen, y_gen)


@dataclass
class KVCache:
    """Per-layer keys and values of everything prefilled so far: [B, H_kv, C, head_dim] each.

    Keys are stored after QK-norm and RoPE, so cached tokens are never recomputed.
    """

    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def layer(self, i: int) -> tuple[Tensor, Tensor] | None:
        return (self.keys[i], self.values[i]) if i < len(self.keys) else None

    def store(self, i: int, k: Tensor, v: Tensor) -> None:
        if i < len(self.keys):
            self.keys[i], self.values[i] = k, v
        elif i == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            raise IndexError(f"cache layer {i} stored before layer {len(self.keys)}")

    def clone(self) -> KVCache:
        """An independent copy (the cache of one guidance branch, say)."""
        return KVCache([k.clone() for k in self.keys], [v.clone() for v in self.values])

    @staticmethod
    def batch(caches: list[KVCache]) -> tuple[KVCache, list[int]]:
        """Stack single-row caches of different lengths into one batch, right-padded with zeros,
        so guidance branches (each with its own context) run in one forward. Returns the cache and
        each row's true length; `batched_step_mask` hides the padding."""
        if not caches or any(c.keys and c.keys[0].shape[0] != 1 for c in caches):
            raise ValueError("KVCache.batch takes a non-empty list of single-row caches")
        lengths = [c.length for c in caches]
        longest = max(lengths)

        def pad(t: Tensor) -> Tensor:  # [1, H_kv, C, hd] -> [1, H_kv, longest, hd]
            return F.pad(t, (0, 0, 0, longest - t.shape[2]))

        layers = len(caches[0].keys)
        if any(len(c.keys) != layers for c in caches):
            raise ValueError("caches to batch must come from the same model")
        return KVCache(
            [torch.cat([pad(c.keys[i]) for c in caches]) for i in range(layers)],
            [torch.cat([pad(c.values[i]) for c in caches]) for i in range(layers)],
        ), lengths


def batched_step_mask(row_masks: list[Tensor], lengths: list[int]) -> Tensor:
    """Per-branch step masks [N, C_b + N] -> one [B, N, C_max + N] for a `KVCache.batch` cache:
    each row's context columns, then padding (never attended), then the N new tokens."""
    longest = max(lengths)
    out = []
    for mask, c in zip(row_masks, lengths, strict=True):
        n = mask.shape[0]
        if mask.shape[1] != c + n:
            raise ValueError(f"a step mask for a context of {c} and {n} new tokens is [{n}, {c + n}], got {list(mask.shape)}")
        padding = mask.new_zeros(n, longest - c)
        out.append(torch.cat([mask[:, :c], padding, mask[:, c:]], dim=1))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """One expert's weights in one layer (Qwen2 shapes: q/k/v with bias, o without)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.mlp_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = SwiGLU(d, cfg.intermediate_size)

    def qkv(self, x: Tensor) -> Tensor:
        # x: [T, D] -> [T, (H + 2·H_kv)·hd], q and k already QK-normed (per expert, before RoPE)
        h = self.attn_norm(x)
        q = self.q_norm(self.q_proj(h).unflatten(-1, (self.num_heads, self.head_dim)))
        k = self.k_norm(self.k_proj(h).unflatten(-1, (self.num_kv_heads, self.head_dim)))
        v = self.v_proj(h)
        return torch.cat([q.flatten(1), k.flatten(1), v], dim=-1)

    def feed_forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.mlp_norm(x))


_compiled_flex = None


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    # flex_attention runs on CPU only compiled (DESIGN §15); compile once per process.
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)


def attention(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """q: [B, H, N, hd]; k, v: [B, H_kv, K, hd]; mask: bool [N, K] / [B, N, K] (True = attend),
    DocumentMasks (a packed training batch, no cache) or a flex_attention BlockMask.
    Returns [B, H, N, hd]."""
    if mask is None:
        raise ValueError("attention needs a mask: build one from the layout's spans")
    if isinstance(mask, Tensor):
        if mask.dtype != torch.bool:
            raise ValueError(f"dense masks are boolean (True = may attend), got {mask.dtype}")
        if mask.shape[-2:] != (q.shape[2], k.shape[2]):
            raise ValueError(
                f"mask covers {list(mask.shape[-2:])} (queries, keys) but there are "
                f"{q.shape[2]} queries and {k.shape[2]} keys (cache + new)"
            )
        mask = mask[None, None] if mask.dim() == 2 else mask[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if isinstance(mask, DocumentMasks):
        return document_attention(q, k, v, mask)
    return _flex_attention(q, k, v, mask)


class MoTLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.und = Expert(cfg)
        self.gen = Expert(cfg)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def forward(
        self,
        x: Tensor,
        shape: tuple[int, int],
        routing: Routing,
        rope: tuple[Tensor, Tensor],
        mask,
        past: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # x: [T = B·N, D] flat tokens; returns (x, k, v) with k, v: [B, H_kv, C + N, hd]
        b, n = shape
        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = routing.apply(x, self.und.qkv, self.gen.qkv).view(b, n, -1)
        q, k, v = qkv.split([h * hd, hkv * hd, hkv * hd], dim=-1)
        cos, sin = rope
        q = apply_rope(q.unflatten(-1, (h, hd)), cos, sin).transpose(1, 2)  # [B, H, N, hd]
        k = apply_rope(k.unflatten(-1, (hkv, hd)), cos, sin).transpose(1, 2)  # [B, H_kv, N, hd]
        v = v.unflatten(-1, (hkv, hd)).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        out = attention(q, k, v, mask).transpose(1, 2).reshape(b * n, h * hd)
        x = x + routing.apply(out, self.und.o_proj, self.gen.o_proj)
        x = x + routing.apply(x, self.und.feed_forward, self.gen.feed_forward)
        return x, k, v


# ---------------------------------------------------------------------------------------------
# Encoders around the decoder
# ---------------------------------------------------------------------------------------------


class ViTLayer(nn.Module):
    """SigLIP encoder layer: pre-LayerNorm attention and GELU(tanh) MLP, all with biases."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d) for _ in range(3))
        self.out_proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, d)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        # x: [..., T, Dv] patches (several images packed on T with a [T, T] mask where an image
        # sees only itself, or one image per leading index with no mask)
        h = self.norm1(x)
        q, k, v = (p(h).unflatten(-1, (self.num_heads, -1)).transpose(-3, -2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(-3, -2).flatten(-2)
        x = x + self.out_proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class NaViT(nn.Module):
    """Variable-size images as packed patch sequences (no resizing to a square)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(3 * cfg.patch_size**2, cfg.hidden_size)  # a Conv2d stored flat
        self.pos_embed = nn.Embedding(cfg.max_patches_per_side**2, cfg.hidden_size)
        self.layers = nn.ModuleList(ViTLayer(cfg) for _ in range(cfg.num_layers))
        self.post_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, patches: Tensor, position_ids: Tensor, lengths: list[int]) -> Tensor:
        # patches: [T, 3·p·p]; position_ids: [T] into the side² table; lengths: patches per image
        x = self.patch_embed(patches) + self.pos_embed(position_ids)
        # Images of one length run as a batch [G, n, Dv] with no mask. One packed [T, T] mask
        # over all of a row's images costs T² attention (T ~ 2 000 for a training row) where
        # the images need only Σ n²: 16x the work for 16-patch images (issue 20, profiled).
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0).tolist()
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            by_length.setdefault(n, []).append(i)
        out = torch.empty_like(x)
        for n, members in by_length.items():
            index = torch.cat([torch.arange(starts[i], starts[i] + n) for i in members]).to(x.device)
            group = x[index].view(len(members), n, -1)  # [G, n, Dv]
            for layer in self.layers:
                group = layer(group)
            out[index] = group.reshape(len(members) * n, -1)
        return self.post_norm(out)


class Connector(nn.Module):
    """ViT features -> decoder width (two linears with GELU(tanh))."""

    def __init__(self, vit_hidden: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(vit_hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class MoTModel(nn.Module):
    def __init__(self, config: MoTConfig):
        super().__init__()
        self.config = config.validate()
        llm = config.llm
        d = llm.hidden_size
        self.embed_tokens = nn.Embedding(llm.vocab_size, d)
        self.layers = nn.ModuleList(MoTLayer(llm) for _ in range(llm.num_layers))
        self.norm_und = RMSNorm(d, llm.rms_norm_eps)
        self.norm_gen = RMSNorm(d, llm.rms_norm_eps)
        self.lm_head = nn.Linear(d, llm.vocab_size, bias=False)
        if llm.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

        if config.vit is not None:
            self.vit = NaViT(config.vit)
            self.connector = Connector(config.vit.hidden_size, d)
        if config.latent is not None:
            lat = config.latent
            self.latent_in = nn.Linear(lat.patch_dim, d)
            self.latent_out = nn.Linear(d, lat.patch_dim)
            self.time_embed = TimestepEmbedder(d, lat.timestep_freq_dim)
        self.build_fixed_tables()
        self.reset_parameters()

    def build_fixed_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the tables derived from the config: RoPE frequencies and the 2-D sin-cos
        position tables. They are not saved; a model built on the meta device calls this after
        its weights are assigned."""
        cfg, d = self.config, self.config.llm.hidden_size
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.rope = RotaryEmbedding(cfg.llm.head_dim, cfg.llm.rope_theta)
            if cfg.vit is not None:  # [side², D]
                self.register_buffer("vit_pos_embed", sincos_2d(d, cfg.vit.max_patches_per_side), persistent=False)
            if cfg.latent is not None:
                self.register_buffer("latent_pos_embed", sincos_2d(d, cfg.latent.max_side), persistent=False)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if self.config.latent is not None:
            # zero output projection: a fresh generation head predicts v = 0 (or x̂0 = 0, the
            # latents' mean) and starts from a stable point instead of random outputs
            nn.init.zeros_(self.latent_out.weight)
            nn.init.zeros_(self.latent_out.bias)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    # -- inputs --------------------------------------------------------------------------------

    def embed_text(self, ids: Tensor) -> Tensor:
        # ids: [B, L] -> [B, L, D]
        return self.embed_tokens(ids)

    def embed_latents(self, latents: Tensor, t: Tensor) -> Tensor:
        """latents: [B, C, H, W] (VAE space, already scaled) and t: [B] -> tokens [B, h·w, D]
        with h = H/p, w = W/p: patch features + timestep embedding + 2-D sin-cos position."""
        lat = self._need("latent")
        h, w = latents.shape[-2] // lat.patch_size, latents.shape[-1] // lat.patch_size
        tokens = self.latent_in(patchify(latents.to(self.dtype), lat.patch_size))
        pos = self.latent_pos_embed[grid_position_ids(h, w, lat.max_side).to(latents.device)]
        return tokens + self.time_embed(t)[:, None, :] + pos[None].to(tokens.dtype)

    def latent_velocity(self, hidden: Tensor, height: int, width: int, x_t: Tensor | None = None,
                        t: Tensor | None = None) -> Tensor:
        """hidden: [B, h·w, D] (final states of an image's latent tokens) -> v: [B, C, H, W].
        An x0-predicting head (config.latent.prediction) also needs x_t: [B, C, H, W] and t: [B]."""
        lat = self._need("latent")
        tokens = x_t if x_t is None else patchify(x_t.to(hidden.dtype), lat.patch_size)
        return unpatchify(self.velocity_tokens(hidden, tokens, t), lat.patch_size, height, width)

    def velocity_tokens(self, hidden: Tensor, x_t: Tensor | None = None, t: Tensor | None = None) -> Tensor:
        """The head in token space: hidden [B, n, D] -> v [B, n, p·p·C]; x_t: [B, n, p·p·C]
        (patchified noisy latents) and t: [B], read only by an x0-predicting head."""
        out = self.latent_out(hidden)
        if self._need("latent").prediction == "velocity":
            return out
        if x_t is None or t is None:
            raise ValueError("an x0-predicting head turns x̂0 into a velocity with x_t and t: pass both")
        # v = (x_t − x̂0) / t: the straight line through x_t and x̂0 reaches noise at t = 1
        t = t.to(out.dtype).clamp(min=X0_MIN_T).view(-1, 1, 1)
        return (x_t.to(out.dtype) - out) / t

    def embed_images(self, images: list[Tensor]) -> list[Tensor]:
        """images: list of [3, H, W] (normalized, sides multiples of the patch) -> [n_i, D] each,
        n_i = (H/p)·(W/p), in raster order of the patch grid."""
        vit = self._need("vit")
        patches, positions, lengths, grids = [], [], [], []
        for img in images:
            h, w = img.shape[-2] // vit.patch_size, img.shape[-1] // vit.patch_size
            patches.append(patchify(img[None].to(self.dtype), vit.patch_size)[0])
            positions.append(grid_position_ids(h, w, vit.max_patches_per_side))
            lengths.append(h * w)
        pos = torch.cat(positions).to(self.device)
        features = self.vit(torch.cat(patches), pos, lengths)
        tokens = self.connector(features) + vit.pos_scale * self.vit_pos_embed[pos].to(features.dtype)
        return list(tokens.split(lengths))

    def _need(self, part: str):
        cfg = getattr(self.config, part)
        if cfg is None:
            raise ValueError(f"this model was built without a {part} path (config.{part} is null)")
        return cfg

    # -- decoder -------------------------------------------------------------------------------

    def forward(
        self,
        embeds: Tensor,
        expert_ids: Tensor,
        position_ids: Tensor,
        mask,
        cache: KVCache | None = None,
        update_cache: bool = False,
    ) -> Tensor:
        """Run the decoder over new tokens, optionally against (and into) a KV cache.

        embeds: [B, N, D]; expert_ids, position_ids: [B, N]; mask: bool [N, C + N] or
        [B, N, C + N] (rows of the new tokens against cache + new keys), or a BlockMask when there
        is no cache. With update_cache the new tokens' keys/values are appended to `cache` (a
        prefill, or clean tokens joining the context); without it the cache is left as it was (a
        denoising step). Returns final hidden states [B, N, D], normed by each token's expert.
        """
        b, n, _ = embeds.shape
        if expert_ids.shape != (b, n) or position_ids.shape != (b, n):
            raise ValueError(
                f"expert_ids {list(expert_ids.shape)} and position_ids {list(position_ids.shape)} "
                f"must both be [B, N] = [{b}, {n}]"
            )
        if cache is None and update_cache:
            raise ValueError("update_cache needs a cache to fill: pass KVCache()")
        if cache is not None and cache.length and not isinstance(mask, Tensor):
            raise ValueError("steps against a cache take a dense mask [N, C + N]")
        routing = Routing.from_expert_ids(expert_ids)
        rope = self.rope(position_ids, dtype=embeds.dtype)
        x = embeds.reshape(b * n, -1)
        for i, layer in enumerate(self.layers):
            past = cache.layer(i) if cache is not None else None
            x, k, v = layer(x, (b, n), routing, rope, mask, past)
            if update_cache:
                cache.store(i, k, v)
        x = routing.apply(x, self.norm_und, self.norm_gen)
        return x.view(b, n, -1)

    def logits(self, hidden: Tensor) -> Tensor:
        # hidden: [..., D] -> [..., vocab]
        return self.lm_head(hidden)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- checkpoints ---------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` (each file atomically) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_state(folder / WEIGHTS_NAME, self, metadata={"format": FORMAT})
        write_config(folder, self.config.to_json())
        return folder

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> MoTModel:
        """Rebuild from a folder written by `save_pretrained`; tensors keep their stored dtype
        unless `dtype` is given. Missing, unexpected or misshapen keys are refused with a list."""
        from tapestry.models.common.checkpoint import load_safetensors

        config_path, weights_path = checkpoint_files(folder)
        config = MoTConfig.load(config_path)
        state = load_safetensors(weights_path, device=str(device))
        return cls.from_state_dict(config, state, source=str(weights_path), dtype=dtype, device=device)

    @classmethod
    def from_state_dict(
        cls,
        config: MoTConfig,
        state: dict[str, Tensor],
        source: str = "<state dict>",
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> MoTModel:
        """Build the model on the meta device (no random init, no copy) and assign `state`."""
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        with torch.device("meta"):
            model = cls(config)
        load_state_strict(model, state, source)
        if config.llm.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.build_fixed_tables(device)
        return model.eval()
