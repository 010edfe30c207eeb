import pytest
import torch
from PIL import Image

from tapestry.document import Document, ImageSegment, TextSegment, from_markup
from tapestry.layout import (
    GEN,
    IGNORE,
    UND,
    LayoutConfig,
    concat_layouts,
    dense_mask,
    layout_document,
    pack_layouts,
    packing_efficiency,
)
from tapestry.models.common.tokenizer import TextTokenizer, train_bpe

CONFIG = LayoutConfig(vit_patch=8, vae_downsample=4, latent_patch=2, target_size=(32, 32))
# 32 px images: ViT 4x4 = 16 tokens, VAE 4x4 = 16 tokens


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["A red circle sits left of a blue star.", "Then the star moves to the centre.",
             "What colour is the shape? red"] * 20
    return train_bpe(texts, vocab_size=300)


def img(colour=(200, 0, 0), size=32):
    return Image.new("RGB", (size, size), colour)


def compose_doc():
    doc = from_markup("A [img1] sits left of a [img2].", [img(), img((0, 0, 200))], id="compose")
    doc.segments.append(ImageSegment("target", width=32, height=32))
    return doc


def test_compose_sequence_structure(tokenizer):
    seq = layout_document(compose_doc(), tokenizer, CONFIG)
    ids = seq.token_ids.tolist()
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    kinds = [(p.kind, p.role, p.end - p.start) for p in seq.images]
    # The target: noise span, then its clean copy (ViT + VAE) for whatever the model does next.
    assert kinds == [("vit", "reference", 16), ("vit", "reference", 16), ("noise", "target", 16),
                     ("vit", "target", 16), ("vae", "target", 16)]
    # References through the ViT only (Inset): no VAE tokens of inputs, so nothing to copy.
    assert not any(p.kind == "vae" and p.role == "reference" for p in seq.images)
    for p in seq.images[:2]:
        assert ids[p.start - 1] == tokenizer.boi_id and ids[p.end] == tokenizer.eoi_id
        assert set(seq.expert[p.start : p.end].tolist()) == {UND if p.kind == "vit" else GEN}
        assert set(seq.position_ids[p.start : p.end].tolist()) == {p.position}
    noise, clean_vit, clean_vae = seq.images[2:]
    assert ids[noise.start - 1] == tokenizer.boi_id and ids[clean_vae.end] == tokenizer.eoi_id
    assert clean_vit.start == noise.end and clean_vae.start == clean_vit.end
    modes = [s.mode for s in seq.spans]
    assert modes == ["causal", "full", "causal", "full", "causal", "noise", "full", "causal"]
    # Text between the references is read in sentence order.
    first_eoi = seq.images[0].end
    second_boi = seq.images[1].start - 1
    assert tokenizer.decode(ids[first_eoi + 1 : second_boi]) == " sits left of a "
    # Positions increase by one per text token and per image.
    positions = seq.position_ids.tolist()
    assert positions[: seq.images[0].start] == list(range(seq.images[0].start))
    assert positions[seq.images[0].end] == seq.images[0].position + 1


def test_loss_targets_when_to_draw_and_when_to_stop(tokenizer):
    seq = layout_document(compose_doc(), tokenizer, CONFIG)
    labels = seq.labels.tolist()
    ids = seq.token_ids.tolist()
    supervised = [(i, labels[i]) for i in range(len(labels)) if labels[i] != IGNORE]
    target = seq.images[2]
    # Only: the BOI before the target (predicted from the token before it) and the final EOS.
    assert supervised == [(target.start - 2, tokenizer.boi_id), (len(ids) - 2, tokenizer.eos_id)]


def test_references_as_vae_switch(tokenizer):
    seq = layout_document(compose_doc(), tokenizer, LayoutConfig(**{**CONFIG.__dict__, "references_as_vae": True}))
    assert [p.kind for p in seq.images] == ["vit", "vae", "vit", "vae", "noise", "vit", "vae"]
    vit, vae = seq.images[0], seq.images[1]
    assert vae.start == vit.end and vit.position == vae.position  # one image, one position


def story_doc():
    return Document("story", [
        TextSegment("A red circle sits left."),
        ImageSegment("context", image=img()),
        TextSegment("Then it moves to the centre.", role="target"),
        ImageSegment("target", width=32, height=32),
        TextSegment("What colour is the shape?"),
        TextSegment("red", role="target"),
    ])


def test_generated_image_is_noise_then_clean_and_later_text_sees_only_clean(tokenizer):
    seq = layout_document(story_doc(), tokenizer, CONFIG)
    kinds = [(p.kind, p.role) for p in seq.images]
    assert kinds == [("vit", "context"), ("vae", "context"), ("noise", "target"), ("vit", "target"), ("vae", "target")]
    noise, clean_vit, clean_vae = seq.images[2:]
    assert noise.position == clean_vit.position == clean_vae.position
    mask = dense_mask(seq.spans)
    last = seq.length - 1
    assert not mask[last, noise.start : noise.end].any()  # later text never sees noisy latents
    assert mask[last, clean_vit.start : clean_vae.end].all()
    # The noisy latents see every earlier clean token, including the BOI, but not their copy.
    assert mask[noise.start, : noise.start].all()
    assert not mask[noise.start, clean_vit.start : clean_vae.end].any()
    assert not mask[clean_vit.start, noise.start : noise.end].any()
    # Loss on target text, on the target image's BOI, on EOS; not on the question.
    labels = seq.labels.tolist()
    supervised_tokens = [labels[i] for i in range(len(labels)) if labels[i] != IGNORE]
    text = tokenizer.decode([t for t in supervised_tokens if t not in (tokenizer.boi_id, tokenizer.eos_id)])
    assert text == "Then it moves to the centre.red"
    assert supervised_tokens.count(tokenizer.boi_id) == 1


def test_text_loss_all(tokenizer):
    cfg = LayoutConfig(**{**CONFIG.__dict__, "text_loss": "all"})
    seq = layout_document(story_doc(), tokenizer, cfg)
    labels = seq.labels.tolist()
    text_tokens = [t for t in labels if t not in (IGNORE, tokenizer.boi_id, tokenizer.eos_id, tokenizer.eoi_id)]
    assert tokenizer.decode(text_tokens) == ("A red circle sits left.Then it moves to the centre."
                                             "What colour is the shape?red")


def test_packing_keeps_documents_apart_and_fills_rows(tokenizer):
    singles = [layout_document(d, tokenizer, CONFIG, ) for d in [compose_doc(), story_doc()] * 5]
    budget = 256
    rows = pack_layouts(singles, budget, tokenizer.pad_id)
    assert all(r.length == budget for r in rows)
    assert sum(len(r.documents) for r in rows) == 10
    assert sum(r.real_tokens for r in rows) == sum(s.length for s in singles)
    # Lengths are 99 (compose) and 123 (story): a row holds at most two documents (the three
    # shortest need 297), so ten documents need 5 rows at best; best-fit decreasing finds that.
    assert sorted(s.length for s in singles[:2]) == [99, 123]
    assert len(rows) == 5
    assert packing_efficiency(rows) == sum(s.length for s in singles) / (len(rows) * budget)
    for row in rows:
        mask = dense_mask(row.spans)
        for a in row.documents:
            for b in row.documents:
                if a is not b:
                    assert not mask[a.start : a.end, b.start : b.end].any()
        # Each packed document's labels and spans equal its single layout, shifted.
        for doc in row.documents:
            single = next(s for s in singles if s.documents[0].id == doc.id and s.length == doc.end - doc.start)
            assert torch.equal(row.labels[doc.start : doc.end], single.labels)
            assert torch.equal(row.position_ids[doc.start : doc.end], single.position_ids)
    # Padding is invisible to every document.
    row = rows[-1]
    pad_start = row.documents[-1].end
    if pad_start < budget:
        assert not dense_mask(row.spans)[:pad_start, pad_start:].any()
        assert (row.labels[pad_start:] == IGNORE).all()


def test_packing_refuses_documents_over_budget(tokenizer):
    single = layout_document(story_doc(), tokenizer, CONFIG)
    with pytest.raises(ValueError, match=r"document 'story' needs \d+ tokens, more than the packing budget of 16"):
        pack_layouts([single], 16, tokenizer.pad_id)


def test_concat_then_dense_mask_equals_per_document_masks(tokenizer):
    a = layout_document(compose_doc(), tokenizer, CONFIG)
    b = layout_document(story_doc(), tokenizer, CONFIG)
    row = concat_layouts([a, b], tokenizer.pad_id)
    mask = dense_mask(row.spans)
    assert torch.equal(mask[: a.length, : a.length], dense_mask(a.spans))
    assert torch.equal(mask[a.length :, a.length :], dense_mask(b.spans))


def test_grids_fit_budget_and_keep_aspect():
    cfg = LayoutConfig(vit_patch=14, max_vit_side=70, vae_downsample=8, latent_patch=2, max_latent_side=64)
    assert cfg.vit_grid(980, 980) == (70, 70)
    assert cfg.vit_grid(1960, 980) == (70, 35)
    assert cfg.vae_grid(512, 256) == (32, 16)
    assert cfg.vae_grid(3, 3) == (1, 1)


def test_tokenizer_round_trip_and_save(tokenizer, tmp_path):
    text = "A naïve café — 🎨 [img] <b>"
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte-level: anything encodes
    tokenizer.save(tmp_path)
    again = TextTokenizer.load(tmp_path)
    assert again.encode(text) == tokenizer.encode(text)
    assert (again.bos_id, again.boi_id, again.image_id) == (tokenizer.bos_id, tokenizer.boi_id, tokenizer.image_id)


def branch_texts(doc):
    return [s.text if isinstance(s, TextSegment) else s.role for s in doc.segments]


def test_guidance_branches_drop_the_right_conditions(tokenizer):
    from tapestry.layout import branch_document
    from tapestry.models.common.guidance import RULES, required_branches

    doc = from_markup("A [img1] naps beside a [img2] on the table.", [img(), img()], id="b")
    doc.segments += [TextSegment("Then it jumps."), ImageSegment("target", width=32, height=32)]
    expect = {
        "cond": ["A <img:img1/> naps beside a <img:img2/> on the table.", "reference", "reference",
                 "Then it jumps.", "target"],
        "no_text": ["<img:img1/><img:img2/>", "reference", "reference", "target"],
        # the text since the previous image in reading order: the tail after [img2] and the next segment
        "no_last_text": ["A <img:img1/> naps beside a <img:img2/>", "reference", "reference", "target"],
        "no_image": ["A naps beside a on the table.", "Then it jumps.", "target"],
        "uncond": ["target"],
    }
    for branch, texts in expect.items():
        got = branch_document(doc, branch)
        assert branch_texts(got) == texts, branch
        assert got.validate() == []
        # Every branch still lays out, ending with the target's noise span.
        seq = layout_document(got, tokenizer, CONFIG)
        assert [p.kind for p in seq.images if p.role == "target"] == ["noise", "vit", "vae"]
    # Every branch a guidance rule asks for is one we can build.
    for rule in RULES:
        for branch in required_branches(rule):
            branch_document(doc, branch)
    with pytest.raises(ValueError, match="unknown guidance branch 'no_audio'"):
        branch_document(doc, "no_audio")


def test_the_last_text_chunk_is_the_text_since_the_previous_image_whoever_wrote_it(tokenizer):
    from tapestry.layout import branch_document

    # given text with slots, a drawn image, text the model wrote (role target), the next target
    doc = from_markup("A [img1] naps beside a [img2] and purrs.", [img(), img()], id="m")
    doc.segments += [ImageSegment("target", image=img()), TextSegment("Then it", "target"),
                     TextSegment(" jumps.", "target"), ImageSegment("target", width=32, height=32),
                     TextSegment("The end.", "target")]
    second = 6
    last = branch_document(doc, "no_last_text", target=second)
    # both pieces the model wrote since the first drawn image go; the prompt's text stays, the
    # drawn image is now a condition, and what follows the target is cut
    assert branch_texts(last) == ["A <img:img1/> naps beside a <img:img2/> and purrs.", "reference",
                                  "reference", "context", "target"]
    assert branch_texts(branch_document(doc, "no_text", target=second)) == [
        "<img:img1/><img:img2/>", "reference", "reference", "context", "target"]
    assert branch_texts(branch_document(doc, "no_image", target=second)) == [
        "A naps beside a and purrs.", "Then it", " jumps.", "target"]
    assert branch_texts(branch_document(doc, "uncond", target=second)) == ["target"]
    # for the first target the last chunk is the prompt's tail after its last slot
    assert branch_texts(branch_document(doc, "no_last_text")) == [
        "A <img:img1/> naps beside a <img:img2/>", "reference", "reference", "target"]
    for branch in ("cond", "no_text", "no_last_text", "no_image", "uncond"):
        got = branch_document(doc, branch, target=second)
        assert got.validate() == [] and got.segments[-1].role == "target"
        layout_document(got, tokenizer, CONFIG)
    with pytest.raises(ValueError, match="not a target image"):
        branch_document(doc, "no_text", target=4)


def test_supervise_text_off_removes_every_label(tokenizer):
    seq = layout_document(story_doc(), tokenizer, CONFIG, supervise_text=False)
    assert (seq.labels == IGNORE).all()
    assert [p.kind for p in seq.images] == [p.kind for p in layout_document(story_doc(), tokenizer, CONFIG).images]


def test_noise_copies_give_a_target_several_noise_spans_that_see_the_context_and_not_each_other():
    from tapestry.masks import dense_mask

    tok = train_bpe(["draw a thing"] * 10, vocab_size=280)
    doc = Document("k", [TextSegment("draw"), ImageSegment("target", image=Image.new("RGB", (64, 64)))])
    one = layout_document(doc, tok, LayoutConfig(noise_copies=1))
    three = layout_document(doc, tok, LayoutConfig(noise_copies=3))
    noise = [p for p in three.images if p.kind == "noise"]
    assert len(noise) == 3 and len([p for p in one.images if p.kind == "noise"]) == 1
    per_image = noise[0].end - noise[0].start
    assert three.length == one.length + 2 * per_image
    assert len({p.position for p in noise}) == 1  # one image, one position id
    mask = dense_mask(three.spans)
    first, second = noise[0], noise[1]
    assert mask[second.start, : first.start].all()  # the context
    assert not mask[second.start, first.start : first.end].any()  # never the other copies
    assert mask[second.start, second.start : second.end].all()
    clean = next(p for p in three.images if p.kind != "noise")
    assert not mask[clean.start, first.start : second.end].any()  # the clean copy sees no noise

