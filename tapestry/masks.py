"""Attention masks from spans (DESIGN §4): the one visibility rule, as a dense mask or a BlockMask.

A span is a contiguous run of tokens with a mode:

    causal  seen by later tokens; within the span each token sees earlier ones   (text, specials)
    full    seen by later tokens; bidirectional within                            (clean images)
    noise   seen by nobody outside; bidirectional within; sees every earlier non-noise token of
            its own document                                                      (noisy latents)

Documents packed into one row never see each other. Spans are the single source of truth for
masks: a dense boolean mask (CPU, short sequences, caches) and a flex_attention BlockMask built
from per-block summaries in O(#blocks), never materializing L×L. The sequence that spans
describe is built in tapestry.layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

SpanMode = Literal["causal", "full", "noise"]
SPAN_MODES: tuple[str, ...] = ("causal", "full", "noise")


@dataclass(frozen=True)
class Span:
    """Tokens [start, end) of document `doc`, attending by `mode`."""

    start: int
    end: int
    mode: SpanMode
    doc: int = 0

    def __post_init__(self) -> None:
        if self.mode not in SPAN_MODES:
            raise ValueError(f"span mode must be one of {SPAN_MODES}, got {self.mode!r}")
        if not (0 <= self.start < self.end):
            raise ValueError(f"span needs 0 <= start < end, got [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start


def check_spans(spans: Sequence[Span]) -> int:
    """Spans must tile [0, L) in order and each document's spans must be contiguous.

    Returns L. (Padding at the end of a packed row is a document of its own, so every row of the
    mask keeps at least one visible key — itself — and softmax never sees an empty row.)
    """
    if not spans:
        raise ValueError("a layout needs at least one span")
    expected, seen_docs, current_doc = 0, set(), None
    for i, span in enumerate(spans):
        if span.start != expected:
            raise ValueError(
                f"spans must tile the sequence in order: spans[{i}] starts at {span.start}, "
                f"expected {expected}"
            )
        if span.doc != current_doc:
            if span.doc in seen_docs:
                raise ValueError(
                    f"document {span.doc} is split: spans[{i}] returns to it after another "
                    "document; pack each document's spans together"
                )
            seen_docs.add(span.doc)
            current_doc = span.doc
        expected = span.end
    return expected


@dataclass(frozen=True)
class TokenTables:
    """Per-token facts that decide visibility, all [L] int64 / bool.

    Token q sees key k  iff  doc_start[q] <= k < visible_end[q]  and  (k is not noise or k is in
    q's own span, i.e. k >= span_start[q]).  visible_end is q + 1 inside a causal span and the
    span's end inside full / noise spans; it never passes the end of q's document.
    """

    doc_start: Tensor
    span_start: Tensor
    visible_end: Tensor
    is_noise: Tensor
    span_id: Tensor

    @property
    def length(self) -> int:
        return self.doc_start.shape[0]


def token_tables(spans: Sequence[Span], device: torch.device | str | None = None) -> TokenTables:
    length = check_spans(spans)
    starts = torch.tensor([s.start for s in spans], dtype=torch.int64)
    lengths = torch.tensor([len(s) for s in spans], dtype=torch.int64)
    ends = starts + lengths
    modes = [SPAN_MODES.index(s.mode) for s in spans]
    mode = torch.tensor(modes, dtype=torch.int64)
    # a document's start is the start of its first span
    doc_first = []
    for i, s in enumerate(spans):
        doc_first.append(i if i == 0 or spans[i - 1].doc != s.doc else doc_first[-1])
    doc_start_of_span = starts[torch.tensor(doc_first, dtype=torch.int64)]

    span_id = torch.repeat_interleave(torch.arange(len(spans)), lengths)
    pos = torch.arange(length, dtype=torch.int64)
    causal = mode[span_id] == SPAN_MODES.index("causal")
    visible_end = torch.where(causal, pos + 1, ends[span_id])
    tables = TokenTables(
        doc_start=doc_start_of_span[span_id],
        span_start=starts[span_id],
        visible_end=visible_end,
        is_noise=mode[span_id] == SPAN_MODES.index("noise"),
        span_id=span_id,
    )
    if device is not None:
        tables = TokenTables(**{k: getattr(tables, k).to(device) for k in tables.__dataclass_fields__})
    return tables


def _visible(tables: TokenTables, q: Tensor, k: Tensor) -> Tensor:
    """The one visibility rule, on broadcastable index tensors (dense masks and mask_mod)."""
    return (
        (k >= tables.doc_start[q])
        & (k < tables.visible_end[q])
        & (~tables.is_noise[k] | (k >= tables.span_start[q]))
    )


def dense_mask(
    spans: Sequence[Span], rows: tuple[int, int] | None = None, device=None
) -> Tensor:
    """Boolean mask (True = may attend) [Lq, L]; rows=(q0, q1) keeps only query rows q0..q1-1.

    `rows` is how a KV-cache step gets its mask: the new tokens' rows against cache + new keys.
    """
    tables = token_tables(spans, device)
    q0, q1 = rows if rows is not None else (0, tables.length)
    if not (0 <= q0 < q1 <= tables.length):
        raise ValueError(f"rows must satisfy 0 <= q0 < q1 <= {tables.length}, got ({q0}, {q1})")
    q = torch.arange(q0, q1, device=tables.doc_start.device)[:, None]
    k = torch.arange(tables.length, device=tables.doc_start.device)[None, :]
    return _visible(tables, q, k)  # [Lq, L]


def _pad_tables(tables: TokenTables, padded: int) -> TokenTables:
    """Pad to a multiple of the block size; padded queries see nothing, padded keys are unseen."""
    extra = padded - tables.length

    def pad(x: Tensor, value) -> Tensor:
        return torch.cat([x, x.new_full((extra,), value)])

    return TokenTables(
        doc_start=pad(tables.doc_start, tables.length),
        span_start=pad(tables.span_start, tables.length),
        visible_end=pad(tables.visible_end, 0),
        is_noise=pad(tables.is_noise, True),
        span_id=pad(tables.span_id, -1),
    )


def _block_kinds(tables: TokenTables, block: int) -> tuple[Tensor, Tensor]:
    """Classify every (query block, key block) pair as partial or full: two bool [n, n].

    Along the sequence doc_start, span_start and visible_end never decrease, so for a query block
    only its first and last token matter:
    - full:  every query sees every key  <=>  doc_start[last] <= ks, visible_end[first] >= ke and
             no noise key in [ks, min(ke, span_start[last]))  (earlier noise is hidden);
    - any:   some non-noise key in [max(ks, doc_start[first]), min(ke, visible_end[last])) — the
             union of the queries' visible ranges is that one interval — or the two blocks share
             a noise span (whose tokens see each other).
    """
    length = tables.length
    n = -(-length // block)
    starts = torch.arange(n, dtype=torch.int64) * block
    ends = torch.clamp(starts + block, max=length)
    q_first, q_last = starts, ends - 1

    non_noise_cum = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(~tables.is_noise, 0)])
    noise_cum = torch.arange(length + 1, dtype=torch.int64) - non_noise_cum

    def count(cum: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return torch.where(b > a, cum[b.clamp(0, length)] - cum[a.clamp(0, length)], 0)

    ks, ke = starts[None, :], ends[None, :]  # key blocks along columns
    ds_last = tables.doc_start[q_last][:, None]
    ss_last = tables.span_start[q_last][:, None]
    ve_first = tables.visible_end[q_first][:, None]
    complete = (ends - starts == block)
    full = (
        (ds_last <= ks)
        & (ve_first >= ke)
        & (count(noise_cum, ks.expand(n, n), torch.minimum(ke, ss_last)) == 0)
        # a block cut by the sequence end is left partial, so the kernel's mask_mod sees the edge
        & complete[:, None]
        & complete[None, :]
    )

    ds_first = tables.doc_start[q_first][:, None]
    ve_last = tables.visible_end[q_last][:, None]
    any_clean = count(non_noise_cum, torch.maximum(ks, ds_first), torch.minimum(ke, ve_last)) > 0
    # span ids covered by each block are a contiguous range; look for a shared noise span
    span_noise = torch.zeros(int(tables.span_id[-1]) + 1, dtype=torch.int64)
    span_noise.scatter_(0, tables.span_id, tables.is_noise.to(torch.int64))  # 0/1 per span
    span_noise_cum = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(span_noise, 0)])
    lo = torch.maximum(tables.span_id[q_first][:, None], tables.span_id[starts][None, :])
    hi = torch.minimum(tables.span_id[q_last][:, None], tables.span_id[ends - 1][None, :])
    any_noise = count(span_noise_cum, lo, hi + 1) > 0
    partial = (any_clean | any_noise) & ~full
    return partial, full


def _indices_first(flags: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: how many blocks are set, and their column indices first (the BlockMask format)."""
    num = flags.sum(-1).to(torch.int32)
    order = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, order


def block_mask(
    spans: Sequence[Span] | Sequence[Sequence[Span]],
    block_size: int = 128,
    device: torch.device | str | None = None,
):
    """A flex_attention BlockMask equal to `dense_mask`, built in O(#blocks) memory and time.

    `spans` is one row's spans, or a list of rows (all of one length) for a batch [B, 1, L, L].
    Full blocks skip the mask_mod; partial blocks evaluate the same rule as `dense_mask`.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    rows = [spans] if spans and isinstance(spans[0], Span) else list(spans)
    all_tables = [token_tables(row) for row in rows]
    length = all_tables[0].length
    if any(t.length != length for t in all_tables):
        raise ValueError(f"rows of a batch must have one length; got {[t.length for t in all_tables]}")
    n = -(-length // block_size)

    kinds = [_block_kinds(t, block_size) for t in all_tables]
    kv_num, kv_idx = _indices_first(torch.stack([p for p, _ in kinds])[:, None])  # [B, 1, n]/[B, 1, n, n]
    full_num, full_idx = _indices_first(torch.stack([f for _, f in kinds])[:, None])

    padded = [_pad_tables(t, n * block_size) for t in all_tables]
    stacked = TokenTables(
        **{k: torch.stack([getattr(t, k) for t in padded]).to(device) for k in TokenTables.__dataclass_fields__}
    )

    def mask_mod(b, h, q_idx, kv_idx):
        # the dense rule, looked up in the batch row b
        return (
            (kv_idx >= stacked.doc_start[b, q_idx])
            & (kv_idx < stacked.visible_end[b, q_idx])
            & (~stacked.is_noise[b, kv_idx] | (kv_idx >= stacked.span_start[b, q_idx]))
        )

    def dev(x: Tensor) -> Tensor:
        return x.to(device) if device is not None else x

    return BlockMask.from_kv_blocks(
        dev(kv_num), dev(kv_idx), dev(full_num), dev(full_idx),
        BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(length, length),
    )


def block_mask_to_dense(mask) -> Tensor:
    """Token-level view [B, H, L, L] of a BlockMask: full blocks, plus mask_mod inside partial
    blocks. For tests and debugging only — this one *does* build L×L."""
    q_len, kv_len = mask.seq_lengths
    bq, bk = mask.BLOCK_SIZE

    def expand(num: Tensor, idx: Tensor) -> Tensor:
        b, h, nq = num.shape
        nk = idx.shape[-1]
        dense = torch.zeros(b, h, nq, nk, dtype=torch.bool, device=num.device)
        valid = torch.arange(nk, device=num.device) < num[..., None]
        dense.scatter_(-1, idx.long(), valid)
        dense = dense.repeat_interleave(bq, dim=2).repeat_interleave(bk, dim=3)
        return dense[:, :, :q_len, :kv_len]

    partial = expand(mask.kv_num_blocks, mask.kv_indices)
    full = (
        expand(mask.full_kv_num_blocks, mask.full_kv_indices)
        if mask.full_kv_num_blocks is not None
        else torch.zeros_like(partial)
    )
    b, h = partial.shape[:2]
    bi = torch.arange(b)[:, None, None, None]
    hi = torch.arange(h)[None, :, None, None]
    qi = torch.arange(q_len)[None, None, :, None]
    ki = torch.arange(kv_len)[None, None, None, :]
    inside = mask.mask_mod(bi, hi, qi, ki)
    return full | (partial & inside)


@dataclass(frozen=True)
class DocumentMasks:
    """A packed batch's dense mask cut into its documents' diagonal blocks.

    Documents packed into one row never see each other, so the [L, L] mask is block diagonal and
    attention can run on each document alone: Σ n_d² scores instead of L². A training row of
    1 024 tokens holds several documents, and the dense CPU kernel computes every masked-out
    score, so this is how CPU training stops paying for them (profiled in issue 20: attention
    was a third of the default's step). `rows[b]` lists row b's documents as
    (start, end, mask [n, n]) in order, tiling [0, length).
    """

    rows: tuple[tuple[tuple[int, int, Tensor], ...], ...]
    length: int


def document_masks(rows: Sequence[Sequence[Span]], device: torch.device | str | None = None) -> DocumentMasks:
    """DocumentMasks of a batch of rows (all of one length) from their spans."""
    out, length = [], None
    for spans in rows:
        n = check_spans(spans)
        if length is not None and n != length:
            raise ValueError(f"rows of one batch must have one length, got {length} and {n}")
        length = n
        blocks, first = [], 0
        for i, span in enumerate(spans):
            if i + 1 == len(spans) or spans[i + 1].doc != span.doc:  # the document's last span
                start = spans[first].start
                own = [Span(s.start - start, s.end - start, s.mode, s.doc) for s in spans[first : i + 1]]
                blocks.append((start, span.end, dense_mask(own, device=device)))
                first = i + 1
        out.append(tuple(blocks))
    if length is None:
        raise ValueError("document_masks needs at least one row")
    return DocumentMasks(tuple(out), length)
