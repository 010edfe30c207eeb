"""Condition-dropout policies: configured rates (statistical, fixed seed) and what each drop does
to the laid-out sample."""

from __future__ import annotations

import math

import pytest

from tapestry.layout import IGNORE, branch_document, check_spans, layout_document
from tapestry.train.config import DropoutConfig
from tapestry.train.dropout import KEEP, Decision, apply_decision, decide, decision_rng, without_vit_tokens
from test_train_data import LAYOUT, make_doc, tokenizer  # noqa: F401 - fixture

N = 4000


def rates(policy: DropoutConfig, doc) -> dict:
    counts: dict = {}
    for i in range(N):
        d = decide(policy, decision_rng(7, i), doc)
        key = (d.branch, d.drop_vit, d.drop_vae)
        counts[key] = counts.get(key, 0) + 1
    return {k: v / N for k, v in counts.items()}


def close(observed: float, expected: float) -> bool:
    # 4 standard deviations of a binomial rate over N draws
    return abs(observed - expected) <= 4 * math.sqrt(expected * (1 - expected) / N) + 1e-12


def test_bagel_rates_are_text_01_vit_03_vae_03_independent():
    doc = make_doc(0)  # references -> target
    r = rates(DropoutConfig(policy="bagel"), doc)
    text = sum(v for (b, _, _), v in r.items() if b in ("no_text", "uncond"))
    vit = sum(v for (b, vt, _), v in r.items() if vt or b in ("no_image", "uncond"))
    vae = sum(v for (b, _, va), v in r.items() if va or b in ("no_image", "uncond"))
    both = sum(v for (b, _, _), v in r.items() if b in ("no_image", "uncond"))
    assert close(text, 0.1) and close(vit, 0.3) and close(vae, 0.3)
    assert close(both, 0.09), "ViT and VAE are dropped independently (0.3 × 0.3)"
    assert close(r.get(("uncond", False, False), 0), 0.009)


def test_illume_keep_text_both_and_mmi_text_rates():
    doc = make_doc(1)  # prompt -> target
    r = rates(DropoutConfig(policy="illume", keep=0.6, drop_text=0.3, drop_both=0.1), doc)
    assert set(r) == {("cond", False, False), ("no_text", False, False), ("uncond", False, False)}
    assert close(r[("cond", False, False)], 0.6) and close(r[("no_text", False, False)], 0.3)
    assert close(r[("uncond", False, False)], 0.1)
    m = rates(DropoutConfig(policy="mmi"), doc)
    assert set(m) == {("cond", False, False), ("no_text", False, False)} and close(m[("no_text", False, False)], 0.1)
    assert rates(DropoutConfig(policy="none"), doc) == {("cond", False, False): 1.0}


def test_documents_without_a_target_image_are_never_dropped():
    answer = make_doc(2)  # image -> text answer
    assert rates(DropoutConfig(policy="illume", keep=0.0, drop_text=0.5, drop_both=0.5), answer) == {
        ("cond", False, False): 1.0}


def test_decisions_are_a_function_of_seed_and_document_index():
    policy, doc = DropoutConfig(policy="bagel"), make_doc(0)
    first = [decide(policy, decision_rng(3, i), doc) for i in range(200)]
    assert first == [decide(policy, decision_rng(3, i), doc) for i in range(200)]
    assert first != [decide(policy, decision_rng(4, i), doc) for i in range(200)]


def test_a_dropped_text_condition_is_the_no_text_branch_and_carries_no_text_loss(tokenizer):
    doc = make_doc(1)
    kept_doc, kept = apply_decision(KEEP, doc, tokenizer, LAYOUT)
    dropped_doc, dropped = apply_decision(Decision("no_text"), doc, tokenizer, LAYOUT)
    expected = layout_document(branch_document(doc, "no_text"), tokenizer, LAYOUT, supervise_text=False)
    assert dropped.token_ids.tolist() == expected.token_ids.tolist()
    assert dropped.length < kept.length and not dropped_doc.texts()
    assert bool((kept.labels != IGNORE).any()) and bool((dropped.labels == IGNORE).all())


def test_dropping_images_and_single_token_kinds(tokenizer):
    doc = make_doc(0)  # two references -> target; references are ViT-only (Inset)
    _, kept = apply_decision(KEEP, doc, tokenizer, LAYOUT)
    _, no_image = apply_decision(Decision("no_image"), doc, tokenizer, LAYOUT)
    # the target's noise span is followed by its clean copy (ViT + VAE), as inference appends it
    assert [p.kind for p in kept.images] == ["vit", "vit", "noise", "vit", "vae"]
    assert [p.kind for p in no_image.images] == ["noise", "vit", "vae"]
    # a ViT-only reference keeps its ViT tokens when only ViT is dropped (an image keeps one kind)
    _, vit_dropped = apply_decision(Decision(drop_vit=True), doc, tokenizer, LAYOUT)
    assert [p.kind for p in vit_dropped.images] == ["vit", "vit", "noise", "vae"]
    assert bool((vit_dropped.labels == IGNORE).all()), "any drop switches text loss off"

    from dataclasses import replace

    both_kinds = replace(LAYOUT, references_as_vae=True)
    _, full = apply_decision(KEEP, doc, tokenizer, both_kinds)
    _, no_vae = apply_decision(Decision(drop_vae=True), doc, tokenizer, both_kinds)
    _, no_vit = apply_decision(Decision(drop_vit=True), doc, tokenizer, both_kinds)
    assert [p.kind for p in full.images] == ["vit", "vae", "vit", "vae", "noise", "vit", "vae"]
    assert [p.kind for p in no_vae.images] == ["vit", "vit", "noise", "vit"]
    assert [p.kind for p in no_vit.images] == ["vae", "vae", "noise", "vae"]
    assert check_spans(no_vit.spans) == no_vit.length
    vit_tokens = sum(p.end - p.start for p in full.images if p.kind == "vit")
    assert no_vit.length == full.length - vit_tokens


def test_without_vit_tokens_keeps_every_other_token_in_place(tokenizer):
    from dataclasses import replace

    from tapestry.document import Document, ImageSegment, TextSegment
    from test_train_data import picture

    story = Document("s", [TextSegment("A red square."), ImageSegment("context", image=picture("red")),
                           TextSegment("It moves.", "target"), ImageSegment("target", image=picture("red", cell=1)),
                           TextSegment("Done.", "target")])
    full = layout_document(story, tokenizer, replace(LAYOUT, context_as_vae=True))
    cut = without_vit_tokens(full)
    keep = [i for i in range(full.length)
            if not any(p.kind == "vit" and p.start <= i < p.end for p in full.images)]
    assert cut.token_ids.tolist() == full.token_ids[keep].tolist()
    assert cut.labels.tolist() == full.labels[keep].tolist()
    assert cut.position_ids.tolist() == full.position_ids[keep].tolist()
    assert [p.kind for p in cut.images] == ["vae", "noise", "vae"]
    for p in cut.images:  # placements still point at image tokens of the right expert
        assert set(cut.token_ids[p.start : p.end].tolist()) == {tokenizer.image_id}
    assert cut.documents[0].end == cut.length


def test_a_dropped_document_with_several_targets_trains_the_branch_of_one_of_them(tokenizer):
    from tapestry.document import Document, ImageSegment, TextSegment
    from test_train_data import picture

    story = Document("s", [TextSegment("A red square."), ImageSegment("context", image=picture("red")),
                           TextSegment("It moves.", "target"), ImageSegment("target", image=picture("red", cell=1)),
                           TextSegment("It stops.", "target"), ImageSegment("target", image=picture("red", cell=2))])
    policy = DropoutConfig(policy="illume", keep=0.0, drop_text=1.0, drop_both=0.0, text_scope="last")
    decisions = [decide(policy, decision_rng(0, i), story) for i in range(40)]
    assert {d.branch for d in decisions} == {"no_last_text"} and {d.target for d in decisions} == {3, 5}
    doc, seq = apply_decision(Decision("no_last_text", target=5), story, tokenizer, LAYOUT)
    # the second target under the branch inference builds for it: text written since the first
    # target image dropped, that image now a clean condition, one noise span
    assert [s.text if isinstance(s, TextSegment) else s.role for s in doc.segments] == [
        "A red square.", "context", "It moves.", "context", "target"]
    assert [p.kind for p in seq.images].count("noise") == 1 and bool((seq.labels == IGNORE).all())
    single = make_doc(0)  # one target: decided exactly as before the choice of target existed
    assert all(decide(policy, decision_rng(0, i), single).target is None for i in range(10))
