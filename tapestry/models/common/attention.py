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
    # `split`, not slicing: the backward of a slice writes its gradient into a zero-filled tensor of
    # the whole input, one per document and per q/k/v (a third of the default's training step went
    # to those fills, profiled); the backward of a split concatenates the pieces' gradients once.
    # The blocks tile [0, L) in order (DocumentMasks), so the pieces are exactly the documents.
    rows = []
    for qb, kb, vb, blocks in zip(q.split(1), k.split(1), v.split(1), mask.rows, strict=True):
        sizes = [e - s for s, e, _ in blocks]
        pieces = [
            F.scaled_dot_product_attention(qd, kd, vd, attn_mask=m[None, None], enable_gqa=gqa)
            for qd, kd, vd, (_, _, m) in zip(qb.split(sizes, 2), kb.split(sizes, 2), vb.split(sizes, 2), blocks)
        ]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0)
