"""Fixed 2-D sin-cos position tables (MAE convention, as BAGEL's `latent_pos_embed` and
`vit_pos_embed` hold them).

Row r·side + c of the table is [sincos(dim/2, c), sincos(dim/2, r)] — column first — where
sincos(d, p) = [sin(p·ω), cos(p·ω)] with ω_i = 10000^(−i/(d/2)), i < d/2. The tables are checked
against the bagel-tiny fixture's stored values.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    # positions: [N] -> [N, dim]
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, side: int) -> Tensor:
    """Table [side², dim] (float32) indexed by row·side + col."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    return table.float()


def grid_position_ids(height: int, width: int, side: int) -> Tensor:
    """Flat table indices [height·width] for an h×w grid placed at the table's top-left corner."""
    if height > side or width > side:
        raise ValueError(f"a {height}×{width} grid does not fit a position table of side {side}")
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return (rows * side + cols).flatten()
