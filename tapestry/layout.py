"""Layout: Documents -> one packed token sequence + attention spans; masks from spans (DESIGN §4).

A span is a contiguous run of tokens with a mode:

    causal  seen by later tokens; within the span each token sees earlier ones   (text, specials)
    full    seen by later tokens; bidirectional within                            (clean images)
    noise   seen by nobody outside; bidirectional within; sees every earlier non-noise token of
            its own document                                                      (noisy latents)

Documents packed into one row never see each other. Spans are the single source of truth for
masks: a dense boolean mask (CPU, short sequences, caches) and a flex_attention BlockMask built
from per-block summaries in O(#blocks), never materializing L×L.

This file has two halves: the mask half (spans -> masks, below) and the Document -> sequence half
(tokens, expert ids, positions, loss targets, packing), which builds on `Span`.
"""

from __future__ import annotations

import re
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


# ---------------------------------------------------------------------------------------------
# Mask half: spans -> dense mask / BlockMask
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Document half: Documents -> one packed sequence (token ids, experts, positions, labels, spans)
# ---------------------------------------------------------------------------------------------

IGNORE = -100  # label of positions without a next-token loss (torch cross_entropy's default)
UND, GEN = 0, 1  # expert index: understanding (text, specials, ViT) / generation (VAE latents)
ImageTokenKind = Literal["vit", "vae", "noise"]


@dataclass(frozen=True)
class LayoutConfig:
    """How images become tokens. Saved with a model's config: layout and model must agree."""

    vit_patch: int = 8  # pixels per ViT patch side (SigLIP so400m: 14)
    vae_downsample: int = 8  # pixels per latent cell (FLUX VAE: 8)
    latent_patch: int = 2  # latent cells per VAE token side (BAGEL: 2x2 patchify)
    max_vit_side: int = 16  # ViT patches per side at most (images are resized down to fit)
    max_latent_side: int = 16  # VAE tokens per side at most
    references_as_vae: bool = False  # Inset: references enter through the ViT only (no copy-paste)
    context_as_vae: bool = True  # given story frames and generated images also as clean VAE tokens
    clean_copy: bool = True  # a generated image appears again as clean tokens after its noise span
    text_loss: Literal["targets", "all"] = "targets"  # which text carries next-token loss
    target_size: tuple[int, int] = (64, 64)  # (height, width) of targets that declare no size

    def vit_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of ViT tokens for an image; the encoder resizes to exactly this."""
        return _grid(height, width, self.vit_patch, self.max_vit_side)

    def vae_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of VAE tokens; the image is resized to rows·cell × cols·cell pixels."""
        return _grid(height, width, self.vae_downsample * self.latent_patch, self.max_latent_side)


def _grid(height: int, width: int, cell: int, max_side: int) -> tuple[int, int]:
    rows, cols = max(1, round(height / cell)), max(1, round(width / cell))
    scale = max(rows, cols) / max_side
    if scale > 1:  # keep the aspect ratio while fitting the budget
        rows, cols = max(1, int(rows / scale)), max(1, int(cols / scale))
    return rows, cols


@dataclass(frozen=True)
class ImagePlacement:
    """Tokens [start, end) of a row hold one image as `kind` tokens on a (rows, cols) grid."""

    doc: int  # index of the document in the packed row
    segment: int  # index of the ImageSegment in that document
    kind: ImageTokenKind
    start: int
    end: int
    grid: tuple[int, int]
    role: str
    position: int  # the shared RoPE position id of all tokens of this image


@dataclass(frozen=True)
class DocumentPlacement:
    id: str
    start: int
    end: int


@dataclass
class SequenceLayout:
    """One row of tokens: ids, experts, positions, next-token labels, spans, image placements.

    Image token positions hold the tokenizer's image placeholder id; the model fills their
    embeddings from `images`. Everything about masks comes from `spans`.
    """

    token_ids: Tensor  # [L] int64
    expert: Tensor  # [L] int64, UND or GEN
    position_ids: Tensor  # [L] int64, 1-D RoPE; an image's tokens share one id
    labels: Tensor  # [L] int64, the token to predict at each position, or IGNORE
    spans: list[Span]
    images: list[ImagePlacement]
    documents: list[DocumentPlacement]

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def real_tokens(self) -> int:
        return sum(d.end - d.start for d in self.documents)


class _Builder:
    """Accumulates one document's tokens; spans are merged when neighbours share a mode."""

    def __init__(self, doc_index: int):
        self.doc = doc_index
        self.ids: list[int] = []
        self.expert: list[int] = []
        self.positions: list[int] = []
        self.loss: list[bool] = []  # does token i carry a loss (predicted from position i-1)?
        self.spans: list[Span] = []
        self.images: list[ImagePlacement] = []
        self.next_position = 0

    def _span(self, start: int, end: int, mode: SpanMode) -> None:
        last = self.spans[-1] if self.spans else None
        if last is not None and last.mode == mode == "causal" and last.end == start:
            self.spans[-1] = Span(last.start, end, mode, self.doc)
        else:
            self.spans.append(Span(start, end, mode, self.doc))

    def text(self, ids: Sequence[int], loss: bool) -> None:
        if not ids:
            return
        start = len(self.ids)
        self.ids.extend(ids)
        self.expert.extend([UND] * len(ids))
        self.positions.extend(range(self.next_position, self.next_position + len(ids)))
        self.next_position += len(ids)
        self.loss.extend([loss] * len(ids))
        self._span(start, len(self.ids), "causal")

    def image(self, parts: Sequence[tuple[ImageTokenKind, tuple[int, int]]], mode: SpanMode,
              segment: int, role: str, image_token: int, position: int) -> None:
        start = len(self.ids)
        for kind, grid in parts:
            count = grid[0] * grid[1]
            begin = len(self.ids)
            self.ids.extend([image_token] * count)
            self.expert.extend([UND if kind == "vit" else GEN] * count)
            self.positions.extend([position] * count)
            self.loss.extend([False] * count)
            self.images.append(ImagePlacement(self.doc, segment, kind, begin, len(self.ids), grid, role, position))
        self._span(start, len(self.ids), mode)


def clean_token_kinds(role: str, config: LayoutConfig) -> list[ImageTokenKind]:
    """Which clean tokens stand for a finished image of `role`: ViT always, VAE as configured
    (references: `references_as_vae`; context and generated images: `context_as_vae`)."""
    as_vae = config.references_as_vae if role == "reference" else config.context_as_vae
    return ["vit", "vae"] if as_vae else ["vit"]


def layout_document(doc, tokenizer, config: LayoutConfig = LayoutConfig(), doc_index: int = 0,
                    supervise_text: bool = True) -> SequenceLayout:
    """One Document -> its token sequence (see `SequenceLayout`).

    Sequence: BOS, then the reading order: text pieces as causal tokens; each image as
    BOI, image tokens, EOI. Given images (reference / context) are one `full` span of ViT tokens
    (plus clean VAE tokens where configured). A target image is a `noise` span of VAE tokens,
    followed by the same clean tokens a context image has (`clean_copy`), so a generated image
    is seen exactly as a given one at inference. Ends with EOS.

    Loss: the next-token label of position i is token i+1 when that token is target text (or any
    text with text_loss="all"), the BOI of a target image (the model learns *when* to draw), or
    EOS of a document that has targets. `supervise_text=False` removes every next-token label
    (ILLUME-X: no text or special-token loss on a sample whose conditions were dropped).
    """
    from tapestry.document import ImageSegment, TextSegment

    items = doc.reading_order_with_segments()
    has_targets = any(getattr(s, "role", None) == "target" for s in doc.segments)
    build = _Builder(doc_index)
    build.text([tokenizer.bos_id], loss=False)
    for item, segment_index in items:
        segment = doc.segments[segment_index]
        if isinstance(item, str):
            assert isinstance(segment, TextSegment)
            loss = config.text_loss == "all" or segment.role == "target"
            build.text(tokenizer.encode(item), loss=loss)
            continue
        assert isinstance(item, ImageSegment)
        height, width = _image_size(item, config)
        grids = {"vit": config.vit_grid(height, width), "vae": config.vae_grid(height, width)}
        clean = [(kind, grids[kind]) for kind in clean_token_kinds(item.role, config)]
        build.text([tokenizer.boi_id], loss=item.role == "target")
        position = build.next_position
        build.next_position += 1
        if item.role == "target":
            build.image([("noise", grids["vae"])], "noise", segment_index, item.role, tokenizer.image_id, position)
            # The clean copy is kept even for a final image: at inference a generated image is
            # always appended before the model decides what follows (more text, another image
            # or EOS), so training must show that decision with the same context.
            if config.clean_copy:
                build.image(clean, "full", segment_index, item.role, tokenizer.image_id, position)
        else:
            build.image(clean, "full", segment_index, item.role, tokenizer.image_id, position)
        build.text([tokenizer.eoi_id], loss=False)
    build.text([tokenizer.eos_id], loss=has_targets or config.text_loss == "all")
    if not supervise_text:
        build.loss = [False] * len(build.loss)
    return _finish([build], [doc.id], tokenizer.pad_id, None)


def _image_size(segment, config: LayoutConfig) -> tuple[int, int]:
    if segment.image is not None:
        return segment.image.height, segment.image.width
    if segment.height and segment.width:
        return segment.height, segment.width
    return config.target_size


def _finish(builders: list[_Builder], ids: list[str], pad_id: int, budget: int | None) -> SequenceLayout:
    token_ids: list[int] = []
    expert: list[int] = []
    positions: list[int] = []
    labels: list[int] = []
    spans: list[Span] = []
    images: list[ImagePlacement] = []
    documents: list[DocumentPlacement] = []
    for index, (build, doc_id) in enumerate(zip(builders, ids)):
        offset = len(token_ids)
        token_ids.extend(build.ids)
        expert.extend(build.expert)
        positions.extend(build.positions)
        # position i predicts token i+1 of the same document; the last token predicts nothing
        labels.extend(build.ids[i + 1] if build.loss[i + 1] else IGNORE for i in range(len(build.ids) - 1))
        labels.append(IGNORE)
        spans.extend(Span(s.start + offset, s.end + offset, s.mode, index) for s in build.spans)
        images.extend(ImagePlacement(index, p.segment, p.kind, p.start + offset, p.end + offset,
                                     p.grid, p.role, p.position) for p in build.images)
        documents.append(DocumentPlacement(doc_id, offset, len(token_ids)))
    if budget is not None and len(token_ids) < budget:
        # Padding is a document of its own: it sees only itself and nobody sees it.
        pad = budget - len(token_ids)
        spans.append(Span(len(token_ids), budget, "causal", len(builders)))
        token_ids.extend([pad_id] * pad)
        expert.extend([UND] * pad)
        positions.extend(range(pad))
        labels.extend([IGNORE] * pad)
    return SequenceLayout(
        token_ids=torch.tensor(token_ids, dtype=torch.int64),
        expert=torch.tensor(expert, dtype=torch.int64),
        position_ids=torch.tensor(positions, dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.int64),
        spans=spans, images=images, documents=documents,
    )


def pack_layouts(layouts: Sequence[SequenceLayout], budget: int, pad_id: int) -> list[SequenceLayout]:
    """Pack single-document layouts into rows of exactly `budget` tokens (padding at the end).

    Best-fit decreasing: longest documents first, each into the row it fills most tightly.
    Deterministic for the same input order. A document longer than the budget is an error
    naming it, never silently truncated.
    """
    for layout in layouts:
        if len(layout.documents) != 1:
            raise ValueError("pack_layouts takes single-document layouts (from layout_document)")
        if layout.length > budget:
            raise ValueError(
                f"document {layout.documents[0].id!r} needs {layout.length} tokens, more than the "
                f"packing budget of {budget}; raise the budget or shorten the document")
    order = sorted(range(len(layouts)), key=lambda i: (-layouts[i].length, i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        need = layouts[i].length
        best = min((r for r in range(len(rows)) if free[r] >= need), key=lambda r: (free[r], r), default=None)
        if best is None:
            rows.append([i])
            free.append(budget - need)
        else:
            rows[best].append(i)
            free[best] -= need
    return [concat_layouts([layouts[i] for i in sorted(row)], pad_id, budget) for row in rows]


def concat_layouts(layouts: Sequence[SequenceLayout], pad_id: int, budget: int | None = None) -> SequenceLayout:
    """Several single-document layouts side by side in one row (documents never see each other)."""
    builders = []
    for index, layout in enumerate(layouts):
        build = _Builder(index)
        build.ids = layout.token_ids.tolist()
        build.expert = layout.expert.tolist()
        build.positions = layout.position_ids.tolist()
        labels = layout.labels.tolist()
        build.loss = [False] + [labels[i] != IGNORE for i in range(len(labels) - 1)]
        build.spans = list(layout.spans)
        build.images = list(layout.images)
        builders.append(build)
    return _finish(builders, [layout.documents[0].id for layout in layouts], pad_id, budget)


def packing_efficiency(rows: Sequence[SequenceLayout]) -> float:
    """Real tokens / all tokens of the rows."""
    total = sum(r.length for r in rows)
    return sum(r.real_tokens for r in rows) / total if total else 0.0


# ---------------------------------------------------------------------------------------------
# Guidance branches: which conditions each branch drops (DESIGN §6)
# ---------------------------------------------------------------------------------------------

TextScope = Literal["all", "last"]
BRANCH_DROPS: dict[str, tuple[bool, bool]] = {  # branch -> (drop text, drop images)
    "cond": (False, False),
    "no_text": (True, False),
    "no_image": (False, True),
    "uncond": (True, True),
}


def branch_document(doc, branch: str, text_scope: TextScope = "all"):
    """The Document a guidance branch conditions on: `doc` with its text and/or given images
    dropped. Dropping happens on the Document, not on tokens, so a branch is laid out exactly as
    training lays out a sample whose conditions were dropped (the same function serves both).

    - text dropped: the words go, image slots stay in reading order; `text_scope="last"` drops
      only the last text segment before the first target (BAGEL's and DuetGen's negative).
    - images dropped: reference and context images go, with their slots; targets stay.
    """
    from tapestry.document import Document, ImageSegment, TextSegment
    from tapestry.markup import replace_slots

    if branch not in BRANCH_DROPS:
        raise ValueError(f"unknown guidance branch {branch!r}; expected one of {', '.join(BRANCH_DROPS)}")
    if text_scope not in ("all", "last"):
        raise ValueError(f"text_scope must be 'all' or 'last', got {text_scope!r}")
    drop_text, drop_images = BRANCH_DROPS[branch]
    bindings = doc.bindings()
    first_target = next((i for i, s in enumerate(doc.segments) if getattr(s, "role", None) == "target"),
                        len(doc.segments))
    text_indices = [i for i, s in enumerate(doc.segments[:first_target]) if isinstance(s, TextSegment)]
    dropped_text = set(text_indices if text_scope == "all" else text_indices[-1:]) if drop_text else set()
    dropped_images = {i for i, s in enumerate(doc.segments)
                      if drop_images and isinstance(s, ImageSegment) and s.role != "target"}
    by_segment: dict[int, list] = {}
    for b in bindings:
        by_segment.setdefault(b.segment, []).append(b)
    segments = []
    for i, segment in enumerate(doc.copy().segments):
        if i in dropped_images:
            continue
        if isinstance(segment, TextSegment):
            slots = [b.slot for b in by_segment.get(i, [])]
            kept = [b.slot.markup if b.image_segment not in dropped_images else "" for b in by_segment.get(i, [])]
            if i in dropped_text:
                text = "".join(kept)
            else:
                text = replace_slots(segment.text, slots, kept)
                if "" in kept:  # a removed slot leaves its two neighbouring spaces behind
                    text = re.sub(r" {2,}", " ", text).strip()
            if not text:
                continue
            segment.text = text
        segments.append(segment)
    return Document(doc.id, segments, dict(doc.meta))
