"""Layout: Documents -> one packed token sequence + attention spans (DESIGN §4).

Token ids, expert ids, positions, next-token labels, spans and image placements of one or more
Documents packed into a row; and the Documents guidance branches condition on. The masks those
spans stand for are built in tapestry.masks (re-exported here, so `from tapestry.layout import
dense_mask` keeps working).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tapestry.masks import (  # noqa: F401  (re-exported: the mask half used to live here)
    SPAN_MODES,
    Span,
    SpanMode,
    TokenTables,
    block_mask,
    block_mask_to_dense,
    check_spans,
    dense_mask,
    token_tables,
)

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
    # Training only: each target image is laid out as this many noise spans (each its own noise
    # and time, each seeing the clean context but never another noise span), so one forward of
    # the context supervises the flow head at several times. A target's image tokens are a small
    # share of a row (16 of ~90 for a ToyWorld compose document), so K copies cost far less
    # than K times the documents while giving the flow loss K times the samples.
    noise_copies: int = 1
    text_loss: Literal["targets", "all"] = "targets"  # which text carries next-token loss
    target_size: tuple[int, int] = (64, 64)  # (height, width) of targets that declare no size
    # BAGEL's chat format: every text piece is one turn `bos text eos` (<|im_start|> … <|im_end|>
    # with Qwen2 specials) instead of one BOS for the whole document; the document still ends
    # with EOS, so a prompt cut before it keeps its last turn closed, as BAGEL's are.
    text_turns: bool = False

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
    if not config.text_turns:
        build.text([tokenizer.bos_id], loss=False)
    for item, segment_index in items:
        segment = doc.segments[segment_index]
        if isinstance(item, str):
            assert isinstance(segment, TextSegment)
            loss = config.text_loss == "all" or segment.role == "target"
            if config.text_turns:  # <|im_start|> text <|im_end|>; the turn's end is learnt with its text
                build.text([tokenizer.bos_id], loss=False)
                build.text(tokenizer.encode(item) + [tokenizer.eos_id], loss=loss)
            else:
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
            for _ in range(config.noise_copies):
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


def first_target_image(doc) -> int | None:
    """Index of the first target image segment of `doc`, or None."""
    from tapestry.document import ImageSegment

    return next((i for i, s in enumerate(doc.segments) if isinstance(s, ImageSegment) and s.role == "target"), None)


def target_images(doc) -> list[int]:
    from tapestry.document import ImageSegment

    return [i for i, s in enumerate(doc.segments) if isinstance(s, ImageSegment) and s.role == "target"]


def branch_document(doc, branch: str, target: int | None = None):
    """The Document a guidance branch conditions on when drawing the target image
    `doc.segments[target]` (default: the first target image): what precedes that image, with
    the branch's conditions dropped (tapestry.models.common.guidance.BRANCHES), then the image.
    Dropping happens on the Document, not on tokens, so inference lays out a branch exactly as
    training lays out a sample whose conditions were dropped (the same function serves both).

    - Conditions are everything before the target, whoever wrote it: given text, text the model
      wrote (role `target` in the engine's Document so far), given images, and earlier target
      images (which become `context` images: at inference they have been drawn by then).
      Whatever follows the target is cut.
    - all text dropped (`no_text`, `uncond`): the words go, image slots stay in reading order.
    - the last text chunk dropped (`no_last_text`): the text since the previous image in
      reading order goes — a whole text segment, or the tail of one after its last slot.
    - images dropped (`no_image`, `uncond`): every image before the target goes, with its slot.
    """
    from tapestry.document import Document, ImageSegment, TextSegment
    from tapestry.markup import replace_slots
    from tapestry.models.common.guidance import BRANCHES

    if branch not in BRANCHES:
        raise ValueError(f"unknown guidance branch {branch!r}; expected one of {', '.join(BRANCHES)}")
    text_drop, drop_images = BRANCHES[branch]
    if target is None:
        target = first_target_image(doc)
    elif not (0 <= target < len(doc.segments) and isinstance(doc.segments[target], ImageSegment)
              and doc.segments[target].role == "target"):
        raise ValueError(f"segments[{target}] of document {doc.id!r} is not a target image")
    end = len(doc.segments) if target is None else target
    bindings = doc.bindings()
    by_segment: dict[int, list] = {}
    for b in bindings:
        by_segment.setdefault(b.segment, []).append(b)
    bound = {b.image_segment for b in bindings}
    segments = doc.copy().segments
    kept_text = {i for i in range(end) if isinstance(segments[i], TextSegment)}
    # images bound into kept text stay (wherever their segment is); anything else after the target goes
    keep = set(range(end)) | {b.image_segment for b in bindings if b.segment in kept_text}
    if target is not None:
        keep.add(target)
    dropped_images = {i for i in keep if drop_images and isinstance(segments[i], ImageSegment) and i != target}
    cut_text: dict[int, int] = {}  # text segment -> characters kept (the rest is the last chunk)
    if text_drop == "all":
        cut_text = {i: 0 for i in kept_text}
    elif text_drop == "last":
        for i in range(end - 1, -1, -1):  # back from the target to the previous image in reading order
            segment = segments[i]
            if isinstance(segment, ImageSegment):
                if i in bound:  # appears at its slot, inside some text
                    continue
                break
            slots = by_segment.get(i, [])
            cut_text[i] = max((b.slot.end for b in slots), default=0)
            if slots:
                break
    out = []
    for i, segment in enumerate(segments):
        if i not in keep or i in dropped_images:
            continue
        if isinstance(segment, TextSegment):
            slots = [b.slot for b in by_segment.get(i, [])]
            kept = [b.slot.markup if b.image_segment not in dropped_images else "" for b in by_segment.get(i, [])]
            if cut_text.get(i) == 0:
                text = "".join(kept)
            else:
                text = segment.text[: cut_text[i]] if i in cut_text else segment.text
                text = replace_slots(text, slots, kept)
                if "" in kept:  # a removed slot leaves its two neighbouring spaces behind
                    text = re.sub(r" {2,}", " ", text).strip()
            if not text:
                continue
            segment.text = text
        elif i != target and segment.role == "target":
            segment.role = "context"
        out.append(segment)
    return Document(doc.id, out, dict(doc.meta))
