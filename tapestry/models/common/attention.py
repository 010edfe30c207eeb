"""Attention over packed training rows, one document at a time (shared by the families)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tapestry.masks import DocumentMasks


def document_attention(q: Tensor, k: Tensor, v: Tensor, mask: DocumentMasks) -> Tensor:
    """q: [B, H, L, hd]; k, v: [B, H_kv, L, hd] -> [B, H, L, hd], one SDPA per packed document.

    Equal to SDPA with the row's dense mask (documents never see each other) without computing
    the masked-out scores between documents. No cache: every document starts at its block's key 0.
    """
    if q.shape[2] != mask.length or k.shape[2] != mask.length or len(mask.rows) != q.shape[0]:
        raise ValueError(
            f"document masks cover {len(mask.rows)} rows of {mask.length} tokens but there are "
            f"{q.shape[0]} rows of {q.shape[2]} queries and {k.shape[2]} keys"
        )
    gqa = q.shape[1] != k.shape[1]
    rows = []
    for b, blocks in enumerate(mask.rows):
        pieces = [
            F.scaled_dot_product_attention(q[b : b + 1, :, s:e], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e],
                                           attn_mask=m[None, None], enable_gqa=gqa)
            for s, e, m in blocks
        ]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0)
