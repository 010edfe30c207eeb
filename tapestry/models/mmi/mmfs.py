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

`deform_sample` is the sampling kernel, in plain PyTorch (CPU and GPU, with backward): the four
bilinear taps of every point are computed at once and read, weighted and summed over images,
levels and points by `F.embedding_bag` — one fused gather per level instead of `F.grid_sample`
followed by a weighting and a reduction over materialized samples (what the first version did;
the test suite keeps it as the reference the kernel must equal). A fused kernel can replace it
behind the same signature.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bilinear_taps(pixels: Tensor, height: int, width: int, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The four pixels a bilinear read at each point touches, and their weights.

    pixels: [..., 2] (x, y) in pixels of a height × width map (pixel (i, j)'s centre at x = j,
    y = i; a location in [0, 1] is location·size − ½); scale: [...] multiplies every weight (a
    point's attention weight). Returns (row-major pixel index [..., 4] int64, weight [..., 4]). A
    tap off the map gets weight 0 and a clamped index: F.grid_sample's padding "zeros" with
    align_corners=False. Separable: two taps per axis (both axes in each op), the four corners
    their outer product.
    """
    size = pixels.new_tensor([width, height])  # [2]
    low = pixels.floor()
    frac = pixels - low  # the weights are differentiable in the points through this
    # [..., 2 axes, 2 taps]: taps low and low + 1, each kept only while on the map
    on_low = ((low >= 0) & (low <= size - 1)).to(pixels.dtype)
    on_high = ((low >= -1) & (low <= size - 2)).to(pixels.dtype)
    weight = torch.stack([(1 - frac) * on_low, frac * on_high], -1)
    index = torch.stack([low, low + 1], -1).clamp(min=0).minimum((size - 1)[:, None])
    wx, wy = weight[..., 0, :], weight[..., 1, :]
    if scale is not None:
        wy = wy * scale[..., None]
    corners = (wy[..., :, None] * wx[..., None, :]).flatten(-2)
    rows = (index[..., 1, :, None] * width + index[..., 0, None, :]).flatten(-2)  # exact: < height·width
    return rows.to(torch.int64), corners


def _gather(value: Tensor, pixels: Tensor, weights: Tensor) -> Tensor:
    """One level: value [N, M, H, h, w, Dh]; pixels: [N, Q, H, M, K, 2] (pixel coordinates);
    weights: [N, Q, H, M, K] -> [N·Q·H, Dh], summed over images and points."""
    n, m, h, height, width, dh = value.shape
    q = pixels.shape[1]
    index, tap = bilinear_taps(pixels, height, width, weights)  # [N, Q, H, M, K, 4]
    # the row of pixel p of (image n·M + m, head h) in the flattened [N·M·H·h·w, Dh] table
    block = ((torch.arange(n, device=value.device)[:, None, None] * m
              + torch.arange(m, device=value.device)[None, None, :]) * h
             + torch.arange(h, device=value.device)[None, :, None]) * (height * width)  # [N, H, M]
    rows = index + block[:, None, :, :, None, None]
    table = value.reshape(n * m * h * height * width, dh)
    bags = n * q * h
    return F.embedding_bag(rows.reshape(bags, -1), table, per_sample_weights=tap.reshape(bags, -1).to(table.dtype),
                           mode="sum")


def deform_sample(values: list[Tensor], locations: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of bilinear samples from several images and feature levels.

    values[l]:  [N, M, H, h_l, w_l, Dh]   per-head value maps of level l of M images (channels last)
    locations:  [N, Q, H, M, L, K, 2]     (x, y) in [0, 1] image coordinates (pixel centres at (i + .5)/w)
    weights:    [N, Q, H, M, L, K]
    returns     [N, Q, H, Dh]             summed over images, levels and points

    Taps off a map read zeros (`bilinear_taps`). Each level is one `F.embedding_bag` call: the
    taps' rows in that level's maps (flattened to rows of Dh values) and their weights (point
    weight × bilinear weight) make one bag per (query, head), read, weighted and summed in one
    vectorized pass with backward for the values and the weights; no [.., Dh, Q, K] tensor of
    samples is ever materialized.
    """
    n, q, h, m, levels, k, _ = locations.shape
    out = None
    for level, value in enumerate(values):
        height, width = value.shape[-3:-1]
        pixels = locations[:, :, :, :, level] * locations.new_tensor([width, height]) - 0.5
        term = _gather(value, pixels, weights[:, :, :, :, level])
        out = term if out is None else out + term
    return out.view(n, q, h, -1)


def dense_reference(values: list[Tensor], weights: list[Tensor]) -> Tensor:
    """What `deform_sample` equals when the points sit on every pixel centre: a weighted sum
    over all pixels of all images. values[l]: [N, M, H, h_l, w_l, Dh]; weights[l]:
    [N, Q, H, M, h_l·w_l] (row-major)."""
    out = None
    for value, w in zip(values, weights):
        flat = value.flatten(3, 4)  # [N, M, H, P, Dh]
        term = torch.einsum("nqhmp,nmhpd->nqhd", w, flat)
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
        """features[l]: [N, C_f, h_l, w_l] -> per-head values [N, H, h_l, w_l, Dh] (channels
        last: the rows `deform_sample` gathers)."""
        if len(features) != self.levels:
            raise ValueError(f"MMFS expects {self.levels} feature levels, got {len(features)}")
        out = []
        for f in features:
            v = self.value(f.permute(0, 2, 3, 1))  # [N, h, w, D]
            n, hh, ww, _ = v.shape
            out.append(v.view(n, hh, ww, self.heads, -1).permute(0, 3, 1, 2, 4).contiguous())
        return out

    def forward(self, x: Tensor, values: list[Tensor], visible: Tensor, reference: Tensor | None = None,
                image_index: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
        """x: [B, T, D] queries; values[l]: [N, M, H, h_l, w_l, Dh] (from `values`, per image);
        visible: [B, T, M] bool; reference: [B, T, 2] (x, y) in [0, 1], default the centre;
        image_index: [N, M] long, the embedding row of each image (default 0..M-1); rows: [B]
        long, the image set each query row reads (default: row b reads set b, N = B).
        Returns f_o: [B, T, D] (zero for a token that sees no image)."""
        b, t, _ = x.shape
        n, m = values[0].shape[:2]
        h, lv, k = self.heads, self.levels, self.points
        if m == 0:
            return torch.zeros_like(x)  # what every masked slot gives too (no output bias)
        if image_index is None:
            image_index = torch.arange(m, device=x.device).expand(n, m)
        if int(image_index.max()) >= self.max_images:
            raise ValueError(f"MMFS was built for at most {self.max_images} images per document")
        if reference is None:
            reference = x.new_full((b, t, 2), 0.5)
        # q(m) = Wq·f + PosEmbed(m) is linear, so W·q(m) = W·Wq·f + W·PosEmbed(m): the
        # projections run once per token and once per image instead of per (token, image) pair.
        qx = self.query(x)  # [B, T, D]
        embed = self.image_embed(image_index)  # [N, M, D]
        # Only the (token, image) pairs the token may read are computed. A packed training row
        # holds many documents (35 images in a 1024-token row of the ToyWorld mixture) while a
        # token sees the few earlier images of its own document: computing every image and
        # masking made 96 % of the samples zero-weight reads, and MMFS ~97 % of a training step.
        pair_b, pair_t, pair_m = visible.nonzero(as_tuple=True)  # [P] each, in (b, t, m) order
        if pair_b.numel() == 0:
            return torch.zeros_like(x)  # no token sees an image: what the null slot gives each
        token = pair_b * t + pair_t  # [P]: the query row each pair reads for
        pair_n = pair_b if rows is None else rows[pair_b]  # [P]: the image set it reads from
        offsets = (self.offsets(qx).view(b * t, h, lv, k, 2)[token]
                   + F.linear(embed, self.offsets.weight).view(n, m, h, lv, k, 2)[pair_n, pair_m])  # [P, H, L, K, 2]
        logits = (self.logits(qx).view(b * t, h, lv * k)[token]
                  + F.linear(embed, self.logits.weight).view(n, m, h, lv * k)[pair_n, pair_m])  # [P, H, L·K]
        null = self.null_logit(x).view(b * t, h)
        weights = _pair_softmax(logits, null, token).view(-1, h, lv, k)  # [P, H, L, K]
        # the sampling points in pixels of each level directly: the reference point's pixel
        # coordinate plus the offset (location·size − ½ of the [0, 1] convention)
        reference = reference.reshape(b * t, 2)[token]  # [P, 2]
        image = pair_n * m + pair_m  # [P]: the image's row in the flattened [N·M, ...] maps
        read = None
        for level, value in enumerate(values):
            height, width = value.shape[-3:-1]
            ref = reference * reference.new_tensor([width, height]) - 0.5
            pixels = ref[:, None, None, :] + offsets[:, :, level]  # [P, H, K, 2]
            term = _gather_pairs(value, pixels, weights[:, :, level], image)  # [P, H·Dh]
            read = term if read is None else read + term
        summed = read.new_zeros(b * t, read.shape[1]).index_add_(0, token, read)  # over each token's images
        return self.out(summed.view(b, t, -1))  # [B, T, D]


def _pair_softmax(logits: Tensor, null: Tensor, token: Tensor) -> Tensor:
    """Eq. 4's softmax across images × levels × points (+ the null slot), per token and head,
    over the pairs of each token. logits: [P, H, S] (S = levels·points); null: [N, H] (one per
    query row); token: [P] each pair's row. Returns the weights [P, H, S]; the null slot's share
    is left out (its value is zero)."""
    # the shift keeps exp finite and cancels in the ratio: no gradient needs to flow through it
    peak = logits.detach().amax(-1)  # [P, H]
    top = null.detach().scatter_reduce(0, token[:, None].expand_as(peak), peak, "amax")  # [N, H]
    e = (logits - top[token][..., None]).exp()  # [P, H, S]
    total = (null - top).exp().index_add(0, token, e.sum(-1))  # [N, H]
    return e / total[token][..., None]


def _gather_pairs(value: Tensor, pixels: Tensor, weights: Tensor, image: Tensor) -> Tensor:
    """One level for (token, image) pairs: value [N, M, H, h, w, Dh]; pixels: [P, H, K, 2]
    (pixel coordinates); weights: [P, H, K]; image: [P] the pair's image as a row of the
    flattened N·M images. Returns [P, H·Dh], summed over the points."""
    n, m, h, height, width, dh = value.shape
    p = pixels.shape[0]
    index, tap = bilinear_taps(pixels, height, width, weights)  # [P, H, K, 4]
    block = (image[:, None] * h + torch.arange(h, device=value.device)[None, :]) * (height * width)  # [P, H]
    rows = index + block[:, :, None, None]
    table = value.reshape(n * m * h * height * width, dh)
    out = F.embedding_bag(rows.reshape(p * h, -1), table, per_sample_weights=tap.reshape(p * h, -1).to(table.dtype),
                          mode="sum")
    return out.view(p, h * dh)


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
