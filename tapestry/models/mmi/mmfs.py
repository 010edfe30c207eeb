"""MMFS — multi-image, multi-scale feature synchronizer (MM-Interleaved, Eq. 4).

A query token looks at a few points of every *earlier* image instead of at every pixel:

    q(m)  = Wq·f_q + PosEmbed(m)                      one query per earlier image m
    p(m)  = p̂_q + Wp·q(m)                              H heads × L levels × K points, (x, y)
    A(m)  = WA·q(m)
    A     = softmax over [A(1) … A(M), null]           per head, across images × levels × points
    f_o   = Wo · Σ_m Σ_l Σ_k A·bilinear(V_l(m), p)

Offsets are in pixels of their level (Deformable DETR), so a unit offset is one pixel at every
scale. The null slot is a per-head logit with a zero value: a token that sees no image gets
exactly zero, and a token may decline to read anything. Visibility is a boolean table
[B, T, M] (token t may read image m) built by the layout; a masked image gets weight exactly
0, which is what makes "a later image never changes an earlier token" hold bitwise.

`deform_sample` is the sampling kernel, in plain PyTorch over `F.grid_sample` (CPU and GPU, with
backward); a fused kernel can replace it behind the same signature.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def deform_sample(values: list[Tensor], locations: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of bilinear samples from several feature levels.

    values[l]:  [N, H, Dh, h_l, w_l]     per-head value maps of level l
    locations:  [N, Q, H, L, K, 2]       (x, y) in [0, 1] image coordinates (pixel centres at (i + .5)/w)
    weights:    [N, Q, H, L, K]
    returns     [N, Q, H, Dh]

    Outside the map samples read zeros (grid_sample padding "zeros", align_corners=False), the
    Deformable DETR convention.
    """
    n, q, h, levels, k, _ = locations.shape
    grids = 2.0 * locations - 1.0  # grid_sample's [-1, 1]
    out = None
    for level, value in enumerate(values):
        dh = value.shape[2]
        # value: [N·H, Dh, h_l, w_l]; grid: [N·H, Q, K, 2] -> sampled: [N·H, Dh, Q, K]
        grid = grids[:, :, :, level].permute(0, 2, 1, 3, 4).reshape(n * h, q, k, 2)
        sampled = F.grid_sample(value.reshape(n * h, dh, *value.shape[-2:]), grid, mode="bilinear",
                                padding_mode="zeros", align_corners=False)
        w = weights[:, :, :, level].permute(0, 2, 1, 3).reshape(n * h, 1, q, k)
        term = (sampled * w).sum(-1)  # [N·H, Dh, Q]
        out = term if out is None else out + term
    return out.view(n, h, -1, q).permute(0, 3, 1, 2)


def dense_reference(values: list[Tensor], weights: list[Tensor]) -> Tensor:
    """What `deform_sample` equals when the points sit on every pixel centre: a weighted sum
    over all pixels. values[l]: [N, H, Dh, h_l, w_l]; weights[l]: [N, Q, H, h_l·w_l] (row-major)."""
    out = None
    for value, w in zip(values, weights):
        flat = value.flatten(3)  # [N, H, Dh, P]
        term = torch.einsum("nqhp,nhdp->nqhd", w, flat)
        out = term if out is None else out + term
    return out


def pixel_centres(height: int, width: int) -> Tensor:
    """[height·width, 2] (x, y) of every pixel centre in [0, 1], row-major."""
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)


class MMFS(nn.Module):
    """Eq. 4 for a batch of query tokens against the multi-scale maps of up to `max_images` images.

    `values(features)` projects an image's maps once (cacheable per image); `forward` reads them.
    """

    def __init__(self, dim: int, feature_dim: int, heads: int = 16, levels: int = 3, points: int = 8,
                 max_images: int = 32):
        super().__init__()
        if dim % heads:
            raise ValueError(f"MMFS dim {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.levels, self.points, self.max_images = dim, heads, levels, points, max_images
        self.query = nn.Linear(dim, dim)
        self.image_embed = nn.Embedding(max_images, dim)  # PosEmbed(m): which earlier image
        self.offsets = nn.Linear(dim, heads * levels * points * 2)
        self.logits = nn.Linear(dim, heads * levels * points)
        self.null_logit = nn.Linear(dim, heads)
        self.value = nn.Linear(feature_dim, dim)
        self.out = nn.Linear(dim, dim, bias=False)  # no bias: nothing visible reads exactly zero
        self.reset_offsets()

    def reset_offsets(self) -> None:
        """Deformable DETR's start: zero weights, the points of head h on a ray in direction
        2πh/H at 1, 2, … K pixels, so heads begin by looking in different directions."""
        nn.init.zeros_(self.offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        ray = torch.stack([angles.cos(), angles.sin()], -1)
        ray = ray / ray.abs().max(-1, keepdim=True).values  # [H, 2]
        bias = ray[:, None, None, :] * torch.arange(1, self.points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.offsets.bias.copy_(bias.expand(self.heads, self.levels, self.points, 2).reshape(-1))
        nn.init.zeros_(self.logits.weight)
        nn.init.zeros_(self.logits.bias)

    def values(self, features: list[Tensor]) -> list[Tensor]:
        """features[l]: [N, C_f, h_l, w_l] -> per-head values [N, H, Dh, h_l, w_l]."""
        if len(features) != self.levels:
            raise ValueError(f"MMFS expects {self.levels} feature levels, got {len(features)}")
        out = []
        for f in features:
            v = self.value(f.permute(0, 2, 3, 1))  # [N, h, w, D]
            n, hh, ww, _ = v.shape
            out.append(v.view(n, hh, ww, self.heads, -1).permute(0, 3, 4, 1, 2))
        return out

    def forward(self, x: Tensor, values: list[Tensor], visible: Tensor, reference: Tensor | None = None,
                image_index: Tensor | None = None) -> Tensor:
        """x: [B, T, D] queries; values[l]: [B, M, H, Dh, h_l, w_l] (from `values`, per image);
        visible: [B, T, M] bool; reference: [B, T, 2] (x, y) in [0, 1], default the centre;
        image_index: [B, M] long, the embedding row of each image (default 0..M-1).
        Returns f_o: [B, T, D] (zero for a token that sees no image)."""
        b, t, _ = x.shape
        m = values[0].shape[1]
        h, lv, k = self.heads, self.levels, self.points
        if m == 0:
            return torch.zeros_like(x)  # what every masked slot gives too (no output bias)
        if image_index is None:
            image_index = torch.arange(m, device=x.device).expand(b, m)
        if int(image_index.max()) >= self.max_images:
            raise ValueError(f"MMFS was built for at most {self.max_images} images per document")
        if reference is None:
            reference = x.new_full((b, t, 2), 0.5)
        # q(m) = Wq·f + PosEmbed(m) is linear, so W·q(m) = W·Wq·f + W·PosEmbed(m): the
        # projections run once per token and once per image instead of per (token, image) pair.
        qx = self.query(x)  # [B, T, D]
        embed = self.image_embed(image_index)  # [B, M, D]
        offsets = (self.offsets(qx)[:, None] + F.linear(embed, self.offsets.weight)[:, :, None])
        offsets = offsets.view(b, m, t, h, lv, k, 2)
        sizes = torch.tensor([[v.shape[-1], v.shape[-2]] for v in values], dtype=x.dtype, device=x.device)
        locations = reference[:, None, :, None, None, None, :] + offsets / sizes[:, None, :]  # [B, M, T, H, L, K, 2]
        logits = (self.logits(qx)[:, None] + F.linear(embed, self.logits.weight)[:, :, None]).view(b, m, t, h, lv * k)
        hidden = ~visible.transpose(1, 2)[:, :, :, None, None]  # [B, M, T, 1, 1]
        logits = logits.masked_fill(hidden, float("-inf"))
        null = self.null_logit(x).view(b, t, h, 1)
        # softmax across images × levels × points (+ null), per head: [B, T, H, M·L·K + 1]
        flat = torch.cat([logits.permute(0, 2, 3, 1, 4).reshape(b, t, h, m * lv * k), null], dim=-1)
        weights = flat.softmax(-1)[..., :-1].view(b, t, h, m, lv, k).permute(0, 3, 1, 2, 4, 5)
        per_image = deform_sample(
            [v.flatten(0, 1) for v in values],
            locations.flatten(0, 1),
            weights.reshape(b * m, t, h, lv, k),
        ).view(b, m, t, h, -1)
        return self.out(per_image.sum(1).reshape(b, t, -1))


class GatedMMFS(nn.Module):
    """The LLM's MMFS layer: x + tanh(α)·MMFS(norm(x)), α = 0 at init (the LLM unchanged)."""

    def __init__(self, dim: int, feature_dim: int, heads: int, levels: int, points: int, max_images: int,
                 eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.mmfs = MMFS(dim, feature_dim, heads, levels, points, max_images)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, values: list[Tensor], visible: Tensor,
                image_index: Tensor | None = None) -> Tensor:
        update = self.mmfs(self.norm(x), values, visible, image_index=image_index)
        return x + torch.tanh(self.gate).to(x.dtype) * update
