"""Condition dropout: named policies that teach the model the unconditional branches guidance needs.

A policy decides, per document, which conditions this sample loses; the Document is then cut
by `tapestry.layout.branch_document`, the very function inference uses to build its guidance
branches, so a dropped sample looks exactly like the branch it trains.

    none    keep everything
    bagel   BAGEL: text 0.1, ViT 0.3, VAE 0.3, drawn independently. ViT and VAE dropped together
            drop the given images (the `no_image` branch); one alone strips that kind of token
            from given images that also have the other kind (an image keeps at least one).
    illume  ILLUME-X: keep both / drop text / drop text and images, with configured
            probabilities (the paper gives no numbers; ours default to 0.8 / 0.1 / 0.1).
    mmi     MM-Interleaved: text 10 %.

Only documents with a target image are dropped: guidance steers image generation, and a sample
without a target image has nothing to guide. A dropped document with several target images
trains the branch of one of them, drawn uniformly: the sample is what precedes that image (text
the document's targets wrote and earlier target images included, as at inference when the model
has written them) with the branch's conditions dropped, then the image — so the second and later
images of a document are trained under exactly the branches inference builds for them. A dropped sample carries no text loss (ILLUME-X: the
text and special tokens of a sample with a missing condition are not predictable from it).

Decisions are a pure function of (seed, document index), not of a running generator, so a
resumed run, a run on more processes and a re-read pending document all decide identically.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from tapestry.layout import (
    IGNORE,
    LayoutConfig,
    SequenceLayout,
    Span,
    branch_document,
    layout_document,
    target_images,
)
from tapestry.train.config import DropoutConfig

_DROPOUT_STREAM = 0xD0  # keeps dropout draws apart from other per-document random streams


@dataclass(frozen=True)
class Decision:
    branch: str = "cond"  # the guidance branch this sample trains (models.common.guidance.BRANCHES)
    drop_vit: bool = False  # ViT tokens of given images removed (they keep their VAE tokens)
    drop_vae: bool = False  # VAE tokens of given images removed (they keep their ViT tokens)
    target: int | None = None  # the target image segment a branch is built for (None: the first)

    @property
    def dropped(self) -> bool:
        return self.branch != "cond" or self.drop_vit or self.drop_vae


KEEP = Decision()


def has_target_image(doc) -> bool:
    return any(getattr(s, "role", None) == "target" and getattr(s, "type", None) == "image" for s in doc.segments)


def decision_rng(seed: int, doc_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _DROPOUT_STREAM, doc_index])


def decide(policy: DropoutConfig, rng: np.random.Generator, doc) -> Decision:
    """What this document loses under `policy`, drawn from `rng`; a branch of a document with
    several target images is built for one of them, drawn after the policy's own draws (so a
    document with one target decides exactly as before that choice existed)."""
    decision = _decide(policy, rng, doc)
    if policy.text_scope == "last" and decision.branch == "no_text":
        decision = replace(decision, branch="no_last_text")
    targets = target_images(doc)
    if decision.branch != "cond" and len(targets) > 1:
        decision = replace(decision, target=targets[int(rng.integers(len(targets)))])
    return decision


def _decide(policy: DropoutConfig, rng: np.random.Generator, doc) -> Decision:
    if policy.policy == "none" or not has_target_image(doc):
        return KEEP
    if policy.policy == "bagel":
        # three draws always, so every rate is independent of the others
        text, vit, vae = (bool(u < p) for u, p in zip(rng.random(3), (policy.text, policy.vit, policy.vae)))
        if vit and vae:
            return Decision("uncond" if text else "no_image")
        return Decision("no_text" if text else "cond", drop_vit=vit, drop_vae=vae)
    if policy.policy == "illume":
        u = rng.random()
        if u < policy.keep:
            return KEEP
        return Decision("no_text" if u < policy.keep + policy.drop_text else "uncond")
    if policy.policy == "mmi":
        return Decision("no_text") if rng.random() < policy.text else KEEP
    raise ValueError(f"unknown dropout policy {policy.policy!r}")


def apply_decision(decision: Decision, doc, tokenizer, layout: LayoutConfig, layout_fn=layout_document):
    """(the Document as trained, its single-document SequenceLayout by `layout_fn`, the
    family's `layout`)."""
    if decision.branch != "cond":
        doc = branch_document(doc, decision.branch, decision.target)
    if decision.drop_vae:
        layout = replace(layout, references_as_vae=False, context_as_vae=False)
    sequence = layout_fn(doc, tokenizer, layout, supervise_text=not decision.dropped)
    if decision.drop_vit:
        sequence = without_vit_tokens(sequence)
    return doc, sequence


def without_vit_tokens(sequence: SequenceLayout) -> SequenceLayout:
    """The layout with the ViT tokens of every image that also has VAE tokens removed.

    Spans, placements and documents are re-indexed; an image's tokens share one RoPE position,
    so positions need no change. No label is lost: image tokens never carry a next-token loss.
    """
    # an image is identified by (document, segment, its shared position): a target's noise span
    # and its clean copy share it, the clean copy's ViT part is what goes
    has_vae = {(p.doc, p.segment, p.position) for p in sequence.images if p.kind == "vae"}
    dropped = [i for i, p in enumerate(sequence.images) if p.kind == "vit" and (p.doc, p.segment, p.position) in has_vae]
    if not dropped:
        return sequence
    keep = torch.ones(sequence.length, dtype=torch.bool)  # [L]
    for i in dropped:
        keep[sequence.images[i].start : sequence.images[i].end] = False
    assert bool((sequence.labels[~keep] == IGNORE).all()), "image tokens never carry a loss"
    kept_before = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(keep, 0)]).tolist()  # [L + 1]
    spans = [Span(kept_before[s.start], kept_before[s.end], s.mode, s.doc) for s in sequence.spans
             if kept_before[s.end] > kept_before[s.start]]
    images = [replace(p, start=kept_before[p.start], end=kept_before[p.end])
              for i, p in enumerate(sequence.images) if i not in set(dropped)]
    documents = [replace(d, start=kept_before[d.start], end=kept_before[d.end]) for d in sequence.documents]
    return SequenceLayout(
        token_ids=sequence.token_ids[keep], expert=sequence.expert[keep],
        position_ids=sequence.position_ids[keep], labels=sequence.labels[keep],
        spans=spans, images=images, documents=documents,
    )
