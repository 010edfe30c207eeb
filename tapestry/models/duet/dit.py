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
        return self.forward_batch([frames], times[None], [context], time_index)[0]

    def forward_batch(self, frames: Sequence[Sequence[Tensor]], times: Tensor, contexts: Sequence[Tensor],
                      time_index: Sequence[int] | None = None) -> list[list[Tensor]]:
        """B packed sequences in one forward (guidance branches): `frames[b]` are sequence b's F
        frames — the same F and sizes in every sequence, their values may differ; times: [B, F];
        contexts: B conditions [S_b, D_ctx] of any lengths. Shorter contexts are padded and
        masked out of the cross-attention, so each sequence's velocities are what `forward`
        gives it alone (up to float rounding). Returns B lists of F velocities."""
        shapes = {tuple(tuple(f.shape) for f in seq) for seq in frames}
        if len(shapes) != 1:
            raise ValueError(f"forward_batch needs the same frame sizes in every sequence, got {sorted(shapes)}")
        count = len(frames[0])
        index = list(range(count)) if time_index is None else list(time_index)
        lengths = [int(c.shape[0]) for c in contexts]
        longest = max(lengths)
        context = contexts[0].new_zeros(len(contexts), longest, contexts[0].shape[-1])  # [B, S, D_ctx]
        for b, c in enumerate(contexts):
            context[b, : lengths[b]] = c
        # [B, S] keys each sequence may read; None when nothing is padded (the library's own path)
        mask = None
        if min(lengths) < longest:
            mask = torch.arange(longest, device=context.device)[None] < torch.tensor(lengths, device=context.device)[:, None]
        stacked = [torch.stack([seq[i] for seq in frames]) for i in range(count)]  # F × [B, C, h_i, w_i]
        if self.config.kind == "wan":
            out = self._wan(stacked, times, context, index, mask)
        else:
            out = self._cosmos(stacked, times, context, index, mask)
        return [[v[b] for v in out] for b in range(len(contexts))]

    # ------------------------------------------------------------------ wan
    def _wan(self, frames, times, context, index, mask) -> list[Tensor]:
        # frames: F × [B, C, h, w]; times: [B, F]; context: [B, S, D_ctx]; mask: [B, S] or None
        net = self.net
        _, ph, pw = net.config.patch_size
        tokens, shapes, ts, tt, yy, xx = [], [], [], [], [], []
        for i, x in enumerate(frames):
            emb = net.patch_embedding(x[:, :, None].to(net.patch_embedding.weight.dtype))  # [B, D, 1, h', w']
            rows, cols = emb.shape[-2:]
            tokens.append(emb.flatten(2).transpose(1, 2))  # [B, n, D]
            shapes.append((rows, cols))
            ts.append(times[:, i : i + 1].expand(-1, rows * cols))  # [B, n]
            t_, y_, x_ = _grid(index[i], rows, cols)
            tt.append(t_), yy.append(y_), xx.append(x_)
        hidden = torch.cat(tokens, 1).contiguous()  # [B, L, D]
        batch, length = hidden.shape[:2]
        rope = net.rope
        parts = [rope.t_dim, rope.h_dim, rope.w_dim]
        cos_t, cos_h, cos_w = rope.freqs_cos.split(parts, dim=1)
        sin_t, sin_h, sin_w = rope.freqs_sin.split(parts, dim=1)
        t_i, y_i, x_i = (torch.cat(v).to(rope.freqs_cos.device) for v in (tt, yy, xx))
        cos = torch.cat([cos_t[t_i], cos_h[y_i], cos_w[x_i]], dim=-1)[None, :, None]  # [1, L, 1, head_dim]
        sin = torch.cat([sin_t[t_i], sin_h[y_i], sin_w[x_i]], dim=-1)[None, :, None]
        timestep = torch.cat(ts, 1).reshape(-1).to(hidden.device) * self.config.time_scale  # [B·L]
        temb, proj, encoder, _ = net.condition_embedder(timestep, context.to(hidden.dtype), None,
                                                        timestep_seq_len=length)
        proj = proj.unflatten(2, (6, -1))  # [B, L, 6, D]
        cross_mask = None if mask is None else mask[:, None, None, :].to(hidden.device)  # [B, 1, 1, S]
        for block in net.blocks:
            if cross_mask is None:
                hidden = block(hidden, encoder, proj, (cos, sin))
            else:
                hidden = _wan_block(block, hidden, encoder, proj, (cos, sin), cross_mask)
        shift, scale = (net.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
        hidden = (net.norm_out(hidden.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)).type_as(hidden)
        out = net.proj_out(hidden)  # [B, L, ph·pw·C] in (p_t, p_h, p_w, C) order
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

    def _cosmos(self, frames, times, context, index, mask) -> list[Tensor]:
        # frames: F × [B, C, h, w]; times: [B, F]; context: [B, S, D_ctx]; mask: [B, S] or None
        net, cfg = self.net, self.config
        ph, pw = net.config.patch_size[1:]
        tokens, shapes, ts, tt, yy, xx = [], [], [], [], [], []
        dtype = net.patch_embed.proj.weight.dtype
        for i, x in enumerate(frames):
            channels = [x]
            if cfg.condition_mask:
                clean = (times[:, i] == 0).to(x.dtype)[:, None, None, None]  # [B, 1, 1, 1]
                channels.append(clean.expand(-1, 1, *x.shape[-2:]))
            if net.config.concat_padding_mask:
                channels.append(torch.zeros_like(x[:, :1]))  # images are never padded
            emb = net.patch_embed(torch.cat(channels, 1)[:, :, None].to(dtype))  # [B, 1, h', w', D]
            rows, cols = emb.shape[2:4]
            tokens.append(emb.flatten(1, 3))  # [B, n, D]
            shapes.append((rows, cols))
            ts.append(times[:, i : i + 1].expand(-1, rows * cols))
            t_, y_, x_ = _grid(index[i], rows, cols)
            tt.append(t_), yy.append(y_), xx.append(x_)
        hidden = torch.cat(tokens, 1)  # [B, L, D]
        batch, length = hidden.shape[:2]
        t_i, y_i, x_i = (torch.cat(v).to(hidden.device) for v in (tt, yy, xx))
        rotary = self._cosmos_rope(t_i, y_i, x_i)
        extra = self._cosmos_learnable(t_i, y_i, x_i) if net.config.extra_pos_embed_type else None
        timestep = torch.cat(ts, 1).reshape(-1).to(hidden.device) * cfg.time_scale  # [B·L]
        temb, embedded = net.time_embed(hidden.reshape(batch * length, -1), timestep)  # [B·L, 3D], [B·L, D]
        temb, embedded = temb.view(batch, length, -1), embedded.view(batch, length, -1)
        text = context.to(hidden.dtype)
        if net.config.use_crossattn_projection:
            text = net.crossattn_proj(text)
        cross_mask = None if mask is None else mask[:, None, None, :].to(hidden.device)  # [B, 1, 1, S]
        for block in net.transformer_blocks:
            hidden = block(hidden, text, embedded, temb, rotary, extra, cross_mask, None)
        hidden = net.norm_out(hidden, embedded, temb)
        out = net.proj_out(hidden)  # [B, L, ph·pw·C] in (p_h, p_w, p_t, C) order
        return self._unpatchify(out, shapes, ph, pw, order="hwtc")

    @staticmethod
    def _unpatchify(out: Tensor, shapes, ph: int, pw: int, order: str) -> list[Tensor]:
        # out: [B, L, ph·pw·C] -> one [B, C, rows·ph, cols·pw] per frame
        result, start = [], 0
        batch = out.shape[0]
        for rows, cols in shapes:
            tok = out[:, start:start + rows * cols]
            start += rows * cols
            # wan orders a token's outputs (p_t, p_h, p_w, C), cosmos (p_h, p_w, p_t, C): with p_t = 1
            # both are (p_h, p_w, C)
            tok = tok.reshape(batch, rows, cols, ph, pw, -1)
            # [B, rows, cols, ph, pw, C] -> [B, C, rows·ph, cols·pw]
            result.append(tok.permute(0, 5, 1, 3, 2, 4).reshape(batch, tok.shape[-1], rows * ph, cols * pw))
        return result


def _wan_block(block: nn.Module, hidden: Tensor, encoder: Tensor, temb: Tensor, rotary, cross_mask: Tensor) -> Tensor:
    """diffusers' WanTransformerBlock forward (per-token timesteps, Wan 2.2 TI2V) with a key mask
    in its cross-attention, which the library's block does not pass on; equal to `block(...)`
    when every key is kept (tested). hidden: [B, L, D]; encoder: [B, S, D]; temb: [B, L, 6, D];
    cross_mask: [B, 1, 1, S] bool."""
    modulation = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
    shift, scale, gate, c_shift, c_scale, c_gate = (m.squeeze(2) for m in modulation)
    normed = (block.norm1(hidden.float()) * (1 + scale) + shift).type_as(hidden)
    hidden = (hidden.float() + block.attn1(normed, None, None, rotary) * gate).type_as(hidden)
    normed = block.norm2(hidden.float()).type_as(hidden)
    hidden = hidden + block.attn2(normed, encoder, cross_mask, None)
    normed = (block.norm3(hidden.float()) * (1 + c_scale) + c_shift).type_as(hidden)
    return (hidden.float() + block.ffn(normed).float() * c_gate).type_as(hidden)
