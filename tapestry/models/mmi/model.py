"""MM-Interleaved: image tokenizer (CLIP-ViT + pyramid + perceiver resampler), an LLM with MMFS
every k-th layer, and a UNet image decoder with MMFS residuals on its skip features.

Component layouts are the libraries' own, so published weights load by key:
- `encoder.clip` is a transformers `CLIPVisionModel` (keys `vision_model.*` as in CLIP-ViT-L/14),
- `lm.llm` is a transformers `LlamaForCausalLM` (Vicuna),
- `decoder.unet` is a diffusers `UNet2DConditionModel` in the SD 2.1 block layout.
Everything MM-Interleaved adds (pyramid, resamplers, MMFS, negative embedding) sits beside them.

The LLM forward walks the Llama layers itself (attention from the layer's own projections, with
our boolean mask and KV cache) so MMFS can sit between self-attention and the MLP as in the
paper, and so text, image tokens and packed documents share one masked call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tapestry.masks import DocumentMasks
from tapestry.models.common.attention import document_attention
from tapestry.models.mmi.config import MMIConfig, VisionConfig
from tapestry.models.mmi.mmfs import MMFS, GatedMMFS, pixel_centres

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# ---------------------------------------------------------------------------------------------
# Image tokenizer
# ---------------------------------------------------------------------------------------------


def _conv_block(cin: int, cout: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(groups, cout), nn.GELU())


class Pyramid(nn.Module):
    """ViT-Adapter-style multi-scale maps: a convolutional spatial prior at strides 4, 8, 16, …
    plus the ViT's patch features resized to each level. Level i has side H / 2^(i+1)."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        c, g = vc.feature_dim, vc.norm_groups
        self.levels = tuple(vc.levels)
        self.stem = nn.Sequential(_conv_block(3, c, g), _conv_block(c, c, g))  # stride 4 = level 1
        self.downs = nn.ModuleList(_conv_block(c, c, g) for _ in range(self.levels[-1] - 1))
        self.vit_proj = nn.ModuleList(nn.Conv2d(vc.hidden_size, c, 1) for _ in self.levels)
        self.norms = nn.ModuleList(nn.GroupNorm(g, c) for _ in self.levels)

    def forward(self, pixels: Tensor, patches: Tensor) -> list[Tensor]:
        # pixels: [N, 3, S, S] (CLIP-normalized); patches: [N, g², Dv] -> levels [N, C_f, S/2^(i+1), ·]
        n, count, dv = patches.shape
        side = int(round(count**0.5))
        grid = patches.transpose(1, 2).reshape(n, dv, side, side)
        x = self.stem(pixels)
        out = []
        for level in range(1, self.levels[-1] + 1):
            if level > 1:
                x = self.downs[level - 2](x)
            if level in self.levels:
                j = self.levels.index(level)
                vit = F.interpolate(self.vit_proj[j](grid), size=x.shape[-2:], mode="bilinear", align_corners=False)
                out.append(self.norms[j](x + vit))
        return out


class ResamplerBlock(nn.Module):
    """Flamingo's perceiver block: latents attend to [inputs; latents], then an MLP."""

    def __init__(self, dim: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads = heads
        self.norm_x, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult), nn.GELU(),
                                nn.Linear(dim * ff_mult, dim, bias=False))

    def forward(self, latents: Tensor, x: Tensor, key_mask: Tensor | None) -> Tensor:
        # latents: [B, Q, D]; x: [B, S, D]; key_mask: [B, S] (True = real input) or None
        b, q, d = latents.shape
        h = self.heads
        lat = self.norm_latents(latents)
        k, v = self.kv(torch.cat([self.norm_x(x), lat], 1)).chunk(2, -1)
        split = lambda t: t.view(b, -1, h, d // h).transpose(1, 2)  # noqa: E731
        mask = None
        if key_mask is not None:
            mask = torch.cat([key_mask, key_mask.new_ones(b, q)], 1)[:, None, None, :]
        out = F.scaled_dot_product_attention(split(self.q(lat)), split(k), split(v), attn_mask=mask)
        latents = latents + self.o(out.transpose(1, 2).reshape(b, q, d))
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """A fixed number of learned queries read a variable number of inputs."""

    def __init__(self, in_dim: int, dim: int, out_dim: int, queries: int, blocks: int, heads: int, ff_mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, dim)
        self.latents = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.blocks = nn.ModuleList(ResamplerBlock(dim, heads, ff_mult) for _ in range(blocks))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        # x: [B, S, in_dim] -> [B, queries, out_dim]
        x = self.proj_in(x)
        latents = self.latents.expand(x.shape[0], -1, -1).to(x.dtype)
        for block in self.blocks:
            latents = block(latents, x, key_mask)
        return self.proj_out(self.norm_out(latents))


def clip_vision_config(vc: VisionConfig):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                            num_hidden_layers=vc.num_layers, num_attention_heads=vc.num_heads,
                            image_size=vc.image_size, patch_size=vc.patch_size, hidden_act=vc.hidden_act,
                            layer_norm_eps=vc.layer_norm_eps, attn_implementation="sdpa")


class ImageEncoder(nn.Module):
    """pixels -> (resampled tokens for the LLM, multi-scale maps for MMFS)."""

    def __init__(self, cfg: MMIConfig):
        super().__init__()
        from transformers import CLIPVisionModel

        vc, r = cfg.vision, cfg.resampler
        self.image_size = vc.image_size
        self.clip = CLIPVisionModel(clip_vision_config(vc))
        self.pyramid = Pyramid(vc) if cfg.use_mmfs else None
        self.resampler = PerceiverResampler(vc.hidden_size, r.dim, cfg.llm.hidden_size, r.queries, r.blocks,
                                            r.heads, r.ff_mult)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: Tensor) -> tuple[Tensor, list[Tensor]]:
        # pixels: [N, 3, H, W] in [-1, 1] -> tokens [N, Q, D_llm], maps [N, C_f, h_l, w_l] per level
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False, antialias=True)
        x = ((pixels + 1) / 2 - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)
        hidden = self.clip(pixel_values=x).last_hidden_state  # [N, 1 + g², Dv]
        tokens = self.resampler(hidden)
        maps = self.pyramid(x, hidden[:, 1:]) if self.pyramid is not None else []
        return tokens, maps


# ---------------------------------------------------------------------------------------------
# Images the LLM and decoder can read through MMFS
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageMemory:
    """Multi-scale maps of the images a batch can read; each MMFS projects them once."""

    features: list[Tensor]  # per level [N, M, C_f, h_l, w_l]
    index: Tensor  # [N, M] long: the image-index embedding row of each image (its place in its document)
    # [B] long: the memory row each query row reads (the decoder's targets read their training
    # row's images, and guidance branches one image set); None: query row b reads row b
    rows: Tensor | None = None
    _values: dict[int, list[Tensor]] = field(default_factory=dict, repr=False)

    @property
    def count(self) -> int:
        return self.index.shape[1]

    def values_for(self, mmfs: MMFS) -> list[Tensor]:
        key = id(mmfs)
        if key not in self._values:
            b, m = self.index.shape
            values = mmfs.values([f.flatten(0, 1) for f in self.features])
            self._values[key] = [v.view(b, m, *v.shape[1:]) for v in values]
        return self._values[key]

    @staticmethod
    def stack(per_row: list[list[Tensor]], levels: int, channels: int, sides: list[int],
              device, dtype) -> tuple["ImageMemory", Tensor]:
        """Rows of per-image maps (row r: list of [C_f, h, w] per level, per image) padded to one M.
        Returns the memory and `present` [B, M] (False for padding)."""
        b = len(per_row)
        m = max((len(r) for r in per_row), default=0)
        feats = [torch.zeros(b, m, channels, s, s, device=device, dtype=dtype) for s in sides]
        present = torch.zeros(b, m, dtype=torch.bool, device=device)
        for i, images in enumerate(per_row):
            for j, maps in enumerate(images):
                for level in range(levels):
                    feats[level][i, j] = maps[level]
                present[i, j] = True
        index = torch.arange(m, device=device).expand(b, m)
        return ImageMemory(feats, index), present


# ---------------------------------------------------------------------------------------------
# Language model with MMFS
# ---------------------------------------------------------------------------------------------


def llama_config(cfg: MMIConfig):
    from transformers import LlamaConfig

    c = cfg.llm
    return LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                       num_key_value_heads=c.num_kv_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                       max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
                       attn_implementation="sdpa")


@dataclass
class KVCache:
    keys: list[Tensor | None] = field(default_factory=list)  # per layer [B, Hkv, S, Dh]
    values: list[Tensor | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]


class MMILanguageModel(nn.Module):
    def __init__(self, cfg: MMIConfig):
        super().__init__()
        from transformers import LlamaForCausalLM

        self.llm = LlamaForCausalLM(llama_config(cfg))
        self.mmfs = nn.ModuleDict({
            str(i): GatedMMFS(cfg.llm.hidden_size, cfg.vision.feature_dim, cfg.mmfs.heads, len(cfg.vision.levels),
                              cfg.mmfs.points, cfg.mmfs.max_images, cfg.llm.rms_norm_eps)
            for i in cfg.mmfs_layers()})

    def embed(self, ids: Tensor) -> Tensor:
        return self.llm.model.embed_tokens(ids)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.llm.lm_head(hidden)

    def _attention(self, layer, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: KVCache | None,
                   index: int, update_cache: bool) -> Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = layer.self_attn
        b, t, _ = x.shape
        hd = attn.head_dim
        q = attn.q_proj(x).view(b, t, -1, hd).transpose(1, 2)  # [B, H, T, Dh]
        k = attn.k_proj(x).view(b, t, -1, hd).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = attn.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            if len(cache.keys) <= index:
                cache.keys.append(None)
                cache.values.append(None)
            if cache.keys[index] is not None:
                past_k, past_v = cache.keys[index], cache.values[index]
                if update_cache:
                    cache.keys[index], cache.values[index] = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
                k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
            elif update_cache:
                cache.keys[index], cache.values[index] = k, v
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if isinstance(mask, DocumentMasks):  # a packed training batch: one document at a time
            out = document_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward(self, embeds: Tensor, positions: Tensor, mask: Tensor, memory: ImageMemory | None = None,
                visible: Tensor | None = None, cache: KVCache | None = None, update_cache: bool = False) -> Tensor:
        """embeds: [B, T, D]; positions: [B, T]; mask: [B, T, S] bool (S = cached + T), or
        DocumentMasks of a packed training batch (no cache);
        visible: [B, T, M] which memory images each token may read. Returns final-normed hidden [B, T, D]."""
        model = self.llm.model
        cos, sin = model.rotary_emb(embeds, positions)
        x = embeds
        for i, layer in enumerate(model.layers):
            x = x + self._attention(layer, layer.input_layernorm(x), cos, sin, mask, cache, i, update_cache)
            gated = self.mmfs[str(i)] if str(i) in self.mmfs else None
            if gated is not None and memory is not None and memory.count > 0:
                x = gated(x, memory.values_for(gated.mmfs), visible, memory.index)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.norm(x)


# ---------------------------------------------------------------------------------------------
# Image decoder
# ---------------------------------------------------------------------------------------------


def residual_specs(block_out_channels, layers_per_block: int) -> list[tuple[int, int]]:
    """(channels, resolution level) of each of the UNet's down-block skip features, in order:
    conv_in, then per block its resnets and (all but the last block) its downsampler."""
    specs = [(block_out_channels[0], 0)]
    for i, ch in enumerate(block_out_channels):
        specs += [(ch, i)] * layers_per_block
        if i < len(block_out_channels) - 1:
            specs.append((ch, i + 1))
    return specs


def _zero_conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ImageDecoder(nn.Module):
    """SD-2.1-layout UNet conditioned on 77 resampled LLM states; MMFS over the preceding images
    at each UNet resolution, through zero-initialized 1×1 convs into the skip features.

    The MMFS queries come from the noisy latent at that resolution (+ timestep, + condition,
    + a learned per-resolution embedding) with each pixel's own reference point: diffusers'
    residual hooks take tensors computed beside the UNet, not inside it."""

    def __init__(self, cfg: MMIConfig):
        super().__init__()
        from diffusers import UNet2DConditionModel

        d = cfg.decoder
        self.config = d
        self.resampler = PerceiverResampler(cfg.llm.hidden_size, d.cross_attention_dim, d.cross_attention_dim,
                                            d.tokens, d.resampler_blocks, d.resampler_heads)
        self.negative = nn.Parameter(torch.randn(d.tokens, d.cross_attention_dim) * 0.02)  # CFG's learned ∅
        self.unet = UNet2DConditionModel(**d.unet_kwargs())
        self.specs = residual_specs(d.block_out_channels, d.layers_per_block)
        self.resolutions = len(d.block_out_channels)
        self.mmfs = None
        if cfg.use_mmfs:
            levels = len(cfg.vision.levels)
            self.query_in = nn.Conv2d(d.latent_channels, d.mmfs_dim, 1)
            self.query_time = nn.Linear(d.block_out_channels[0], d.mmfs_dim)
            self.query_cond = nn.Linear(d.cross_attention_dim, d.mmfs_dim)
            self.query_level = nn.Parameter(torch.zeros(self.resolutions, d.mmfs_dim))
            self.mmfs = nn.ModuleList(MMFS(d.mmfs_dim, cfg.vision.feature_dim, d.mmfs_heads, levels, d.mmfs_points,
                                           cfg.mmfs.max_images) for _ in range(self.resolutions))
            self.zero_convs = nn.ModuleList(_zero_conv(d.mmfs_dim, ch) for ch, _ in self.specs)
            self.mid_zero = _zero_conv(d.mmfs_dim, d.block_out_channels[-1])

    def condition(self, context: Tensor, key_mask: Tensor | None = None) -> Tensor:
        # context: [B, S, D_llm] LLM states up to the <BoI> -> [B, 77, cross_dim]
        return self.resampler(context, key_mask)

    def negative_condition(self, batch: int) -> Tensor:
        return self.negative[None].expand(batch, -1, -1)

    def residuals(self, x_t: Tensor, timesteps: Tensor, cond: Tensor, memory: ImageMemory,
                  visible: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
        b, _, h, w = x_t.shape
        t_emb = self.query_time(self.unet.time_proj(timesteps).to(x_t.dtype))  # [B, D_m]
        base = t_emb + self.query_cond(cond.mean(1))
        reads = []
        for r, mmfs in enumerate(self.mmfs):
            hr, wr = h // 2**r, w // 2**r
            q = self.query_in(x_t if r == 0 else F.adaptive_avg_pool2d(x_t, (hr, wr)))
            q = q.flatten(2).transpose(1, 2) + (base + self.query_level[r])[:, None]  # [B, hr·wr, D_m]
            ref = pixel_centres(hr, wr).to(x_t)[None].expand(b, -1, -1)
            vis = visible[:, None, :].expand(b, hr * wr, visible.shape[1])
            out = mmfs(q, memory.values_for(mmfs), vis, ref, memory.index, memory.rows)
            reads.append(out.transpose(1, 2).reshape(b, -1, hr, wr))
        down = tuple(conv(reads[r]) for conv, (_, r) in zip(self.zero_convs, self.specs))
        return down, self.mid_zero(reads[-1])

    def forward(self, x_t: Tensor, timesteps: Tensor, cond: Tensor, memory: ImageMemory | None = None,
                visible: Tensor | None = None) -> Tensor:
        """x_t: [B, C, h, w] noisy latents; timesteps: [B] DDPM steps; cond: [B, 77, X];
        visible: [B, M] which memory images each sample may read. Returns the UNet's prediction."""
        down = mid = None
        if self.mmfs is not None and memory is not None and memory.count > 0:
            down, mid = self.residuals(x_t, timesteps, cond, memory, visible)
        return self.unet(x_t, timesteps, encoder_hidden_states=cond, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample


# ---------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------


class MMIModel(nn.Module):
    def __init__(self, config: MMIConfig):
        super().__init__()
        self.config = config.validate()
        self.encoder = ImageEncoder(config)
        self.lm = MMILanguageModel(config)
        self.decoder = ImageDecoder(config)

    @property
    def device(self) -> torch.device:
        return self.lm.llm.lm_head.weight.device

    def save_pretrained(self, folder: str | Path) -> Path:
        from tapestry.models.common.checkpoint import save_state, write_config

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_state(folder / WEIGHTS_NAME, self, metadata={"format": "tapestry.mmi"})
        write_config(folder, self.config.to_json())
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "MMIModel":
        from tapestry.models.common.checkpoint import checkpoint_files, load_safetensors

        config_path, weights_path = checkpoint_files(folder)
        config = MMIConfig.load(config_path)
        state = load_safetensors(weights_path, device=str(device))
        return cls.from_state_dict(config, state, str(weights_path)).to(device).eval()

    @classmethod
    def from_state_dict(cls, config: MMIConfig, state: dict[str, Tensor], source: str = "<state dict>") -> "MMIModel":
        """A model holding exactly `state` (strict keys). Built for real, not on the meta device:
        the non-persistent buffers (CLIP normalization, rotary frequencies) need their values."""
        from tapestry.models.common.checkpoint import load_state_strict

        model = cls(config)
        load_state_strict(model, state, source)
        return model
