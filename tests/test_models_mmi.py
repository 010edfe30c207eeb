"""The mmi family (MM-Interleaved) on a tiny model: layout, causality through the whole LLM,
gate/zero-conv identity at init, the loss parts (no image loss on first images, dropout keeps the
text loss) and a save/load round trip."""

import pytest
import torch
from PIL import Image

from tapestry.document import Document, ImageSegment, TextSegment
from tapestry.layout import IGNORE
from tapestry.models.common.tokenizer import train_bpe
from tapestry.models.mmi.config import ConfigError, MMFSConfig, MMIConfig, ResamplerConfig
from tapestry.models.mmi.glue import layout_document, prepare_batch, training_loss, encode_images, visibility
from tapestry.models.mmi.model import MMIModel

WORDS = ["a red circle", "a blue square", "then", "the cat sat on the mat", "draw it"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(WORDS * 20, vocab_size=300)


def tiny_config(tokenizer, **kw) -> MMIConfig:
    return MMIConfig(resampler=ResamplerConfig(queries=4, blocks=1, dim=16, heads=2),
                     mmfs=MMFSConfig(every=1, heads=4, points=2, max_images=6),
                     llm=MMIConfig().llm.__class__(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                                   intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
                     **kw).validate()


def tiny_vae():
    from tapestry.models.vae.toy import ToyAEConfig, ToyAutoencoder

    torch.manual_seed(0)
    return ToyAutoencoder(ToyAEConfig(latent_channels=4, channels=(8, 8, 8), encoder_blocks=(1, 1, 1),
                                      decoder_blocks=(1, 1, 1), norm_groups=4, resolution=32)).eval()


def image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy())


def story(seeds=(1, 2, 3)) -> Document:
    segments = []
    for n, s in enumerate(seeds):
        segments.append(TextSegment(WORDS[n % len(WORDS)], role="target" if n else "context"))
        segments.append(ImageSegment(role="target" if n else "context", image=image(s)))
    return Document("story", segments)


def test_layout_places_images_and_supervises_text_boi_eos(tokenizer):
    cfg = tiny_config(tokenizer)
    seq = layout_document(story(), tokenizer, cfg)
    assert [s.index for s in seq.slots] == [0, 1, 2]
    assert [s.image_loss for s in seq.slots] == [False, True, True]  # first image: no NIP
    for slot in seq.slots:
        assert seq.ids[slot.boi] == tokenizer.boi_id and seq.ids[slot.end] == tokenizer.eoi_id
        assert set(seq.ids[slot.start : slot.end]) == {tokenizer.image_id}
        assert all(label == IGNORE for label in seq.labels[slot.boi : slot.end])  # nothing predicts placeholders or <eoi>
        assert seq.labels[slot.boi - 1] == tokenizer.boi_id  # the model learns to emit <boi>
    assert seq.ids[-1] == tokenizer.eos_id and seq.labels[-2] == tokenizer.eos_id
    leading = layout_document(Document("d", [ImageSegment(role="context", image=image(0)), TextSegment("then"),
                                             ImageSegment(role="target", image=image(1))]), tokenizer,
                              tiny_config(tokenizer, skip_first_image="leading_image"))
    assert [s.image_loss for s in leading.slots] == [False, True]
    text_first = layout_document(Document("d", [TextSegment("draw it"), ImageSegment(role="target", image=image(1))]),
                                 tokenizer, tiny_config(tokenizer, skip_first_image="leading_image"))
    assert [s.image_loss for s in text_first.slots] == [True]  # the paper's rule: only an image at the very start


def test_visibility_is_strictly_earlier_images(tokenizer):
    seq = layout_document(story(), tokenizer, tiny_config(tokenizer))
    vis = visibility([seq.slots], len(seq), 3)[0]
    for m, slot in enumerate(seq.slots):
        assert not vis[: slot.end, m].any() and vis[slot.end :, m].all()
        assert not vis[slot.start : slot.end, m:].any()  # an image's own tokens never read it or later ones


def _hidden(model, batch):
    from tapestry.models.mmi.glue import visibility as vis_of

    embeds, memory = encode_images(model, batch)
    vis = vis_of([s.slots for s in batch.sequences], batch.ids.shape[1], memory.count)
    return model.lm(embeds, batch.positions, batch.mask, memory, vis)


def _open_gates(model):
    with torch.no_grad():
        for gated in model.lm.mmfs.values():
            gated.gate.fill_(0.7)
            gated.mmfs.logits.weight.normal_(0, 0.5)
            gated.mmfs.offsets.weight.normal_(0, 0.5)


def test_changing_a_later_image_leaves_earlier_tokens_bitwise_unchanged(tokenizer):
    cfg = tiny_config(tokenizer)
    torch.manual_seed(0)
    model = MMIModel(cfg).eval()
    _open_gates(model)
    vae = tiny_vae()
    a, b = story((1, 2, 3)), story((1, 2, 99))
    seq_a, seq_b = layout_document(a, tokenizer, cfg), layout_document(b, tokenizer, cfg)
    with torch.no_grad():
        ha = _hidden(model, prepare_batch(cfg, [seq_a], [a], vae, tokenizer.pad_id))
        hb = _hidden(model, prepare_batch(cfg, [seq_b], [b], vae, tokenizer.pad_id))
    last = seq_a.slots[2]
    assert torch.equal(ha[0, : last.start], hb[0, : last.start])
    assert not torch.allclose(ha[0, last.end :], hb[0, last.end :])


def test_gates_at_zero_equal_the_model_without_mmfs_bitwise(tokenizer):
    torch.manual_seed(0)
    with_mmfs = MMIModel(tiny_config(tokenizer)).eval()
    torch.manual_seed(0)
    without = MMIModel(tiny_config(tokenizer, use_mmfs=False)).eval()
    # the same LLM and encoder weights (the MMFS parts are extra)
    without.load_state_dict({k: v for k, v in with_mmfs.state_dict().items() if k in without.state_dict()})
    doc = story()
    cfg = with_mmfs.config
    seq = layout_document(doc, tokenizer, cfg)
    batch = prepare_batch(cfg, [seq], [doc], tiny_vae(), tokenizer.pad_id, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(_hidden(with_mmfs, batch), _hidden(without, batch))
        # the decoder: zero-initialized convs add exact zeros to the UNet's skip features
        assert torch.equal(training_loss(with_mmfs, batch)["image"], training_loss(without, batch)["image"])


def test_lm_matches_transformers_llama_forward(tokenizer):
    torch.manual_seed(0)
    model = MMIModel(tiny_config(tokenizer)).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (1, 9))
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None]
    with torch.no_grad():
        ours = model.lm.logits(model.lm(model.lm.embed(ids), torch.arange(9)[None], mask))
        theirs = model.lm.llm(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_kv_cache_steps_equal_one_full_pass(tokenizer):
    from tapestry.models.mmi.model import KVCache

    torch.manual_seed(0)
    model = MMIModel(tiny_config(tokenizer)).eval()
    embeds = torch.randn(1, 7, 32)
    full_mask = torch.ones(7, 7, dtype=torch.bool).tril()[None]
    with torch.no_grad():
        full = model.lm(embeds, torch.arange(7)[None], full_mask)
        cache = KVCache()
        first = model.lm(embeds[:, :4], torch.arange(4)[None], full_mask[:, :4, :4], cache=cache, update_cache=True)
        rest = model.lm(embeds[:, 4:], torch.arange(4, 7)[None], full_mask[:, 4:, :], cache=cache, update_cache=True)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_loss_parts_first_image_and_dropout_keeps_text_loss(tokenizer):
    cfg = tiny_config(tokenizer)
    torch.manual_seed(0)
    model = MMIModel(cfg)
    vae = tiny_vae()
    doc = story()
    seq = layout_document(doc, tokenizer, cfg)
    batch = prepare_batch(cfg, [seq], [doc], vae, tokenizer.pad_id, torch.Generator().manual_seed(0))
    assert [j for _, j in batch.nip] == [1, 2]
    parts = training_loss(model, batch)
    torch.testing.assert_close(parts["loss"], parts["text"] + 10.0 * parts["image"])
    parts["loss"].backward()
    assert model.decoder.unet.conv_in.weight.grad.abs().sum() > 0
    assert model.encoder.clip.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    # one image only: it is the first, so there is no image loss at all
    single = Document("one", [TextSegment("draw it", role="target"), ImageSegment(role="target", image=image(5))])
    one = prepare_batch(cfg, [layout_document(single, tokenizer, cfg)], [single], vae, tokenizer.pad_id)
    assert one.nip == [] and float(training_loss(model, one)["image"].detach()) == 0.0
    # every condition dropped: the image loss changes (negative embedding), the text loss does not
    dropped = prepare_batch(cfg, [seq], [doc], vae, tokenizer.pad_id, torch.Generator().manual_seed(0))
    dropped.dropped[:] = True
    with torch.no_grad():
        kept_parts, dropped_parts = training_loss(model, batch), training_loss(model, dropped)
    assert torch.equal(kept_parts["text"], dropped_parts["text"])
    assert not torch.equal(kept_parts["image"], dropped_parts["image"])


def test_save_load_round_trip_and_bad_config(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = MMIModel(tiny_config(tokenizer))
    model.save_pretrained(tmp_path / "ck")
    again = MMIModel.from_pretrained(tmp_path / "ck")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.config == model.config
    with pytest.raises(ConfigError, match="mmfs.heads"):
        MMIConfig.from_dict({"mmfs": {"heads": 0}})
    with pytest.raises(ConfigError, match="unknown field"):
        MMIConfig.from_dict({"vision": {"sizes": 3}})
