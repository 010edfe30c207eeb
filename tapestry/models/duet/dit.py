"""The drawing half of DuetGen: a diffusers video transformer run over packed frames.

Every earlier image of the document is one clean *condition frame*, the image to draw is the
last, noisy frame; the frames stand on the time axis in reading order (time index +1 per image),
as Cosmos-Predict conditions a video on its first frames. Images of different sizes cannot be
one [B, C, T, H, W] tensor, so, as the paper modifies Cosmos, frames are patchified one by one,
their tokens concatenated, and each token gets the rotary position (time index, row, column) of
its own image. Clean frames are marked by a per-token timestep of 0 (Wan 2.2 TI2V's mechanism)
and, for Cosmos, also by its condition-mask input channel.

The modules are the diffusers models' own (`WanTransformer3DModel`, `CosmosTransformer3DModel`)
with their published key names, so real checkpoints load unchanged; only the forward is ours,
and on a batch of equal-size frames it equals the diffusers forward (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tapestry.models.duet.config import DiTConfig


def build_diffusers_dit(config: DiTConfig) -> nn.Module:
    if config.kind == "wan":
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel(**config.diffusers_config())
    from diffusers import CosmosTransformer3DModel

    return CosmosTransformer3DModel(**config.diffusers_config())


def _grid(index: int, rows: int, cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """(t, y, x) of every token of one frame, row-major: three [rows·cols] long tensors."""
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.full((rows * cols,), index), y.flatten(), x.flatten()


class PackedDiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.net = build_diffusers_dit(config)

    @property
    def device(self) -> torch.device:
        return self.net.proj_out.weight.device

    def forward(self, frames: Sequence[Tensor], times: Tensor, context: Tensor,
                time_index: Sequence[int] | None = None) -> list[Tensor]:
        """Velocity of every frame.

        frames: F latents [C, h_i, w_i] (sizes may differ); times: [F] flow times in [0, 1]
        (0 for clean condition frames); context: [S, D_ctx] text condition (connector output);
        time_index: each frame's index on the time axis (default 0..F−1).
        Returns F velocities [C, h_i, w_i].
        """
        index = list(range(len(frames))) if time_index is None else list(time_index)
        if self.config.kind == "wan":
            return self._wan(frames, times, context, index)
        return self._cosmos(frames, times, context, index)

    # ------------------------------------------------------------------ wan
    def _wan(self, frames, times, context, index) -> list[Tensor]:
        net = self.net
        _, ph, pw = net.config.patch_size
        tokens, shapes, ts, tt, yy, xx = [], [], [], [], [], []
        for i, x in enumerate(frames):
            emb = net.patch_embedding(x[None, :, None].to(net.patch_embedding.weight.dtype))  # [1, D, 1, h', w']
            rows, cols = emb.shape[-2:]
            tokens.append(emb.flatten(2).transpose(1, 2)[0])  # [n, D]
            shapes.append((rows, cols))
            ts.append(times[i].reshape(1).expand(rows * cols))
            t_, y_, x_ = _grid(index[i], rows, cols)
            tt.append(t_), yy.append(y_), xx.append(x_)
        hidden = torch.cat(tokens)[None].contiguous()  # [1, L, D]
        length = hidden.shape[1]
        rope = net.rope
        parts = [rope.t_dim, rope.h_dim, rope.w_dim]
        cos_t, cos_h, cos_w = rope.freqs_cos.split(parts, dim=1)
        sin_t, sin_h, sin_w = rope.freqs_sin.split(parts, dim=1)
        t_i, y_i, x_i = (torch.cat(v).to(rope.freqs_cos.device) for v in (tt, yy, xx))
        cos = torch.cat([cos_t[t_i], cos_h[y_i], cos_w[x_i]], dim=-1)[None, :, None]  # [1, L, 1, head_dim]
        sin = torch.cat([sin_t[t_i], sin_h[y_i], sin_w[x_i]], dim=-1)[None, :, None]
        timestep = torch.cat(ts).to(hidden.device) * self.config.time_scale  # [L]
        temb, proj, encoder, _ = net.condition_embedder(timestep, context[None].to(hidden.dtype), None,
                                                        timestep_seq_len=length)
        proj = proj.unflatten(2, (6, -1))  # [1, L, 6, D]
        for block in net.blocks:
            hidden = block(hidden, encoder, proj, (cos, sin))
        shift, scale = (net.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
        hidden = (net.norm_out(hidden.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)).type_as(hidden)
        out = net.proj_out(hidden)[0]  # [L, ph·pw·C] in (p_t, p_h, p_w, C) order
        return self._unpatchify(out, shapes, ph, pw, order="thwc")

    # --------------------------------------------------------------- cosmos
    def _cosmos_rope(self, t_i: Tensor, y_i: Tensor, x_i: Tensor) -> tuple[Tensor, Tensor]:
        rope = self.net.rope

        def freqs(dim: int, ntk: float) -> Tensor:
            theta = 10000.0 * ntk
            steps = torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim
            return 1.0 / (theta**steps)

        emb_t = t_i.float()[:, None] * freqs(rope.dim_t, rope.t_ntk_factor)[None]
        emb_h = y_i.float()[:, None] * freqs(rope.dim_h, rope.h_ntk_factor)[None]
        emb_w = x_i.float()[:, None] * freqs(rope.dim_w, rope.w_ntk_factor)[None]
        angles = torch.cat([emb_t, emb_h, emb_w] * 2, dim=-1)  # [L, head_dim]
        return torch.cos(angles), torch.sin(angles)

    def _cosmos_learnable(self, t_i: Tensor, y_i: Tensor, x_i: Tensor) -> Tensor:
        pe = self.net.learnable_pos_embed
        emb = pe.pos_emb_t[t_i] + pe.pos_emb_h[y_i] + pe.pos_emb_w[x_i]  # [L, D]
        norm = torch.linalg.vector_norm(emb, dim=-1, keepdim=True, dtype=torch.float32)
        norm = torch.add(pe.eps, norm, alpha=float(np.sqrt(1.0 / emb.shape[-1])))
        return (emb / norm)[None]

    def _cosmos(self, frames, times, context, index) -> list[Tensor]:
        net, cfg = self.net, self.config
        ph, pw = net.config.patch_size[1:]
        tokens, shapes, ts, tt, yy, xx = [], [], [], [], [], []
        dtype = net.patch_embed.proj.weight.dtype
        for i, x in enumerate(frames):
            channels = [x]
            clean = bool(times[i] == 0)
            if cfg.condition_mask:
                channels.append(torch.full_like(x[:1], 1.0 if clean else 0.0))
            if net.config.concat_padding_mask:
                channels.append(torch.zeros_like(x[:1]))  # images are never padded
            emb = net.patch_embed(torch.cat(channels)[None, :, None].to(dtype))  # [1, 1, h', w', D]
            rows, cols = emb.shape[2:4]
            tokens.append(emb.flatten(1, 3)[0])
            shapes.append((rows, cols))
            ts.append(times[i].reshape(1).expand(rows * cols))
            t_, y_, x_ = _grid(index[i], rows, cols)
            tt.append(t_), yy.append(y_), xx.append(x_)
        hidden = torch.cat(tokens)[None]  # [1, L, D]
        t_i, y_i, x_i = (torch.cat(v).to(hidden.device) for v in (tt, yy, xx))
        rotary = self._cosmos_rope(t_i, y_i, x_i)
        extra = self._cosmos_learnable(t_i, y_i, x_i) if net.config.extra_pos_embed_type else None
        timestep = torch.cat(ts).to(hidden.device) * cfg.time_scale
        temb, embedded = net.time_embed(hidden, timestep)  # [L, 3D], [L, D]
        temb, embedded = temb[None], embedded[None]
        text = context[None].to(hidden.dtype)
        if net.config.use_crossattn_projection:
            text = net.crossattn_proj(text)
        for block in net.transformer_blocks:
            hidden = block(hidden, text, embedded, temb, rotary, extra, None, None)
        hidden = net.norm_out(hidden, embedded, temb)
        out = net.proj_out(hidden)[0]  # [L, ph·pw·C] in (p_h, p_w, p_t, C) order
        return self._unpatchify(out, shapes, ph, pw, order="hwtc")

    @staticmethod
    def _unpatchify(out: Tensor, shapes, ph: int, pw: int, order: str) -> list[Tensor]:
        result, start = [], 0
        for rows, cols in shapes:
            tok = out[start:start + rows * cols]
            start += rows * cols
            # wan orders a token's outputs (p_t, p_h, p_w, C), cosmos (p_h, p_w, p_t, C): with p_t = 1
            # both are (p_h, p_w, C)
            tok = tok.reshape(rows, cols, ph, pw, -1)
            # [rows, cols, ph, pw, C] -> [C, rows·ph, cols·pw]
            result.append(tok.permute(4, 0, 2, 1, 3).reshape(tok.shape[-1], rows * ph, cols * pw))
        return result
