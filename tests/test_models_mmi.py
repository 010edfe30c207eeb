"""The mmi family (MM-Interleaved) on a tiny model: layout, causality through the whole LLM,
gate/zero-conv identity at init, the loss parts (no image loss on first images, a dropped
sample trains against the learned negative), save/load, and the runtime (cached = recomputed,
generation through the family registry and the unchanged engine)."""

import pytest
import torch
from PIL import Image

from tapestry.document import Document, ImageSegment, TextSegment
from tapestry.layout import IGNORE, branch_document
from tapestry.models.common.tokenizer import train_bpe
from tapestry.models.mmi.config import ConfigError, LLMConfig, MMFSConfig, MMIConfig, ResamplerConfig
from tapestry.models.mmi.family import (
    MMIRuntime,
    layout_config_for,
    layout_document,
    lm_forward,
    loss_counts,
    loss_sums,
    prepare_row,
    visibility,
)
from tapestry.models.mmi.model import KVCache, MMIModel

WORDS = ["a red circle", "a blue square", "then", "the cat sat on the mat", "draw it"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(WORDS * 20, vocab_size=300)


def tiny_config(tokenizer, **kw) -> MMIConfig:
    return MMIConfig(resampler=ResamplerConfig(queries=4, blocks=1, dim=16, heads=2),
                     mmfs=MMFSConfig(every=1, heads=4, points=2, max_images=6),
                     llm=LLMConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_layers=2, num_heads=4, num_kv_heads=2),
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


def layout_of(cfg):
    return layout_config_for(cfg, 4, text_loss="all", target_size=(32, 32))


def rows_of(cfg, tokenizer, docs, vae, seed=0, supervise=True):
    layout = layout_of(cfg)
    out = []
    for i, doc in enumerate(docs):
        row = layout_document(doc, tokenizer, layout, supervise)
        out.append(prepare_row(row, [doc], layout, vae, torch.Generator().manual_seed(seed + i)))
    return out


def test_layout_places_images_and_supervises_text_boi_eos(tokenizer):
    cfg = tiny_config(tokenizer)
    row = layout_document(story(), tokenizer, layout_of(cfg))
    ids, labels = row.token_ids.tolist(), row.labels.tolist()
    assert len(row.images) == 3 and all(p.end - p.start == 4 for p in row.images)
    for p in row.images:
        assert ids[p.start - 1] == tokenizer.boi_id and ids[p.end] == tokenizer.eoi_id
        assert set(ids[p.start : p.end]) == {tokenizer.image_id}
        assert all(label == IGNORE for label in labels[p.start - 1 : p.end])  # nothing predicts placeholders or <eoi>
        assert labels[p.start - 2] == tokenizer.boi_id  # the model learns to emit <boi>
        assert row.position_ids[p.start : p.end].tolist() == list(range(p.start, p.end))  # sequential (LLaMA)
    assert ids[-1] == tokenizer.eos_id and labels[-2] == tokenizer.eos_id
    assert loss_counts([row], cfg)["image"] == 2 * 4 * 8 * 8  # images 2 and 3 only: 2 × C × s²


def test_first_image_rules(tokenizer):
    leading = Document("d", [ImageSegment(role="context", image=image(0)), TextSegment("then"),
                             ImageSegment(role="target", image=image(1))])
    text_first = Document("t", [TextSegment("draw it"), ImageSegment(role="target", image=image(1))])
    for rule, expected in (("first_image", (1, 0)), ("leading_image", (1, 1))):
        cfg = tiny_config(tokenizer, skip_first_image=rule)
        counts = tuple(loss_counts([layout_document(d, tokenizer, layout_of(cfg))], cfg)["image"] // 256
                       for d in (leading, text_first))
        assert counts == expected, rule


def test_visibility_is_strictly_earlier_images(tokenizer):
    row = layout_document(story(), tokenizer, layout_of(tiny_config(tokenizer)))
    vis = visibility(row, 3)
    for m, p in enumerate(row.images):
        assert not vis[: p.end, m].any() and vis[p.end :, m].all()
        assert not vis[p.start - 1 : p.end, m:].any()  # an image's <boi> and tokens never read it or later ones


def _open_gates(model):
    with torch.no_grad():
        for gated in model.lm.mmfs.values():
            gated.gate.fill_(0.7)
            gated.mmfs.logits.weight.normal_(0, 0.5)
            gated.mmfs.offsets.weight.normal_(0, 0.5)


@pytest.fixture(scope="module")
def model_and_vae(tokenizer):
    torch.manual_seed(0)
    return MMIModel(tiny_config(tokenizer)).eval(), tiny_vae()


def test_changing_a_later_image_leaves_earlier_tokens_bitwise_unchanged(tokenizer):
    cfg = tiny_config(tokenizer)
    torch.manual_seed(0)
    model = MMIModel(cfg).eval()
    _open_gates(model)
    vae = tiny_vae()
    (a,), (b,) = rows_of(cfg, tokenizer, [story((1, 2, 3))], vae), rows_of(cfg, tokenizer, [story((1, 2, 99))], vae)
    with torch.no_grad():
        ha, hb = lm_forward(model, [a])[0], lm_forward(model, [b])[0]
    last = a.row.images[2]
    assert torch.equal(ha[0, : last.start], hb[0, : last.start])
    assert not torch.allclose(ha[0, last.end :], hb[0, last.end :])


def test_gates_at_zero_equal_the_model_without_mmfs_bitwise(tokenizer, model_and_vae):
    with_mmfs, vae = model_and_vae
    without = MMIModel(tiny_config(tokenizer, use_mmfs=False)).eval()
    # the same LLM, encoder and UNet weights (the MMFS parts are extra)
    without.load_state_dict({k: v for k, v in with_mmfs.state_dict().items() if k in without.state_dict()})
    batch = rows_of(with_mmfs.config, tokenizer, [story()], vae)
    with torch.no_grad():
        assert torch.equal(lm_forward(with_mmfs, batch)[0], lm_forward(without, batch)[0])
        # the decoder: zero-initialized convs add exact zeros to the UNet's skip features
        assert torch.equal(loss_sums(with_mmfs, batch)["image"], loss_sums(without, batch)["image"])


def test_training_attention_per_document_equals_the_dense_mask(tokenizer, monkeypatch):
    import tapestry.models.mmi.family as mmi_family
    from tapestry.layout import dense_mask

    torch.manual_seed(0)
    model, vae = MMIModel(tiny_config(tokenizer)), tiny_vae()
    _open_gates(model)
    batch = rows_of(model.config, tokenizer, [story()], vae)
    assert len(mmi_family.document_masks([b.row.spans for b in batch]).rows[0]) == 1  # one document, no padding
    results = []
    for dense in (False, True):
        if dense:
            monkeypatch.setattr(mmi_family, "document_masks",
                                lambda rows, device=None: torch.stack([dense_mask(r) for r in rows]).to(device))
        model.zero_grad()
        parts = loss_sums(model, batch)
        (parts["text"] + parts["image"]).backward()
        grad = model.lm.llm.model.layers[0].self_attn.q_proj.weight.grad.clone()
        results.append((parts["text"].detach(), parts["image"].detach(), grad))
    model.zero_grad()
    for got, want in zip(results[0], results[1]):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max().clamp_min(1e-6)


def test_lm_matches_transformers_llama_forward_and_kv_cache(tokenizer, model_and_vae):
    model, _ = model_and_vae
    ids = torch.randint(0, tokenizer.vocab_size, (1, 9))
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None]
    with torch.no_grad():
        ours = model.lm.logits(model.lm(model.lm.embed(ids), torch.arange(9)[None], mask))
        theirs = model.lm.llm(input_ids=ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        embeds = model.lm.embed(ids)
        full = model.lm(embeds, torch.arange(9)[None], mask)
        cache = KVCache()
        first = model.lm(embeds[:, :5], torch.arange(5)[None], mask[:, :5, :5], cache=cache, update_cache=True)
        rest = model.lm(embeds[:, 5:], torch.arange(5, 9)[None], mask[:, 5:], cache=cache, update_cache=True)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_loss_parts_first_image_and_dropped_samples(tokenizer):
    cfg = tiny_config(tokenizer)
    torch.manual_seed(0)
    model = MMIModel(cfg)
    vae = tiny_vae()
    batch = rows_of(cfg, tokenizer, [story()], vae)
    parts = loss_sums(model, batch)
    counts = loss_counts([b.row for b in batch], cfg)
    assert set(parts) == set(counts) == {"text", "image"} and parts["image"] > 0
    (parts["text"] / counts["text"] + 10.0 * parts["image"] / counts["image"]).backward()
    assert model.decoder.unet.conv_in.weight.grad.abs().sum() > 0
    assert model.encoder.clip.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert model.decoder.negative.grad is None or model.decoder.negative.grad.abs().sum() == 0  # nothing dropped
    # one image only: it is the first, so there is no image loss at all
    single = Document("one", [TextSegment("draw it", role="target"), ImageSegment(role="target", image=image(5))])
    one = rows_of(cfg, tokenizer, [single], vae)
    assert loss_counts([one[0].row], cfg)["image"] == 0 and float(loss_sums(model, one)["image"].detach()) == 0.0
    # the shared `mmi` dropout: text removed (branch_document), no text loss -> images learn the negative
    doc = story()
    dropped_doc = branch_document(doc, "no_text", target=5)
    dropped = rows_of(cfg, tokenizer, [dropped_doc], vae, supervise=False)
    assert all(info.dropped for info in dropped[0].images)
    model.zero_grad()
    out = loss_sums(model, dropped)
    assert float(out["text"].detach()) == 0.0
    out["image"].backward()
    assert model.decoder.negative.grad.abs().sum() > 0
    assert model.decoder.resampler.latents.grad is None or model.decoder.resampler.latents.grad.abs().sum() == 0


def test_save_load_round_trip_and_bad_config(tokenizer, tmp_path, model_and_vae):
    model, _ = model_and_vae
    model.save_pretrained(tmp_path / "ck")
    again = MMIModel.from_pretrained(tmp_path / "ck")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.config == model.config
    from tapestry.models import family as families

    assert families.family_of_folder(tmp_path / "ck").name == "mmi"
    with pytest.raises(ConfigError, match="mmfs.heads"):
        MMIConfig.from_dict({"mmfs": {"heads": 0}})
    with pytest.raises(ConfigError, match="unknown field"):
        MMIConfig.from_dict({"vision": {"sizes": 3}})


def test_runtime_cached_equals_recomputed_and_engine_generates(tokenizer, model_and_vae):
    from tapestry.infer.engine import Engine, GenerationOptions

    model, vae = model_and_vae
    _open_gates(model)
    runtime = MMIRuntime(model, tokenizer, vae, layout_of(model.config))
    prompt = Document("p", [TextSegment("a red circle"), ImageSegment(role="context", image=image(1)),
                            TextSegment("then")])
    with torch.inference_mode():
        cached, fresh = runtime.prefill(prompt), runtime.prefill(prompt, recompute=True)
        for ctx in (cached, fresh):
            runtime.append_text(ctx, [tokenizer.boi_id])
            runtime.begin_image(ctx)
        torch.testing.assert_close(runtime.next_text(cached), runtime.next_text(fresh), rtol=1e-4, atol=1e-5)
        x = runtime.noise((32, 32), torch.Generator().manual_seed(0))
        assert x.shape == (1, 8, 8, 4)
        v = runtime.denoise({"cond": cached, "uncond": cached}, x, torch.tensor(0.5))
        v_one = runtime.denoise({"cond": cached, "uncond": cached}, x, torch.tensor(0.5), batched=False)
        assert not torch.equal(v["cond"], v["uncond"])  # the negative is another condition
        torch.testing.assert_close(v["cond"], v_one["cond"], rtol=1e-4, atol=1e-5)
    engine = Engine.for_model(model, tokenizer, vae, layout_of(model.config))
    doc = Document("g", [TextSegment("a red circle"), ImageSegment(role="context", image=image(1)),
                         TextSegment("then"), ImageSegment(role="target")])
    out = engine.generate(doc, GenerationOptions(steps=2, guidance="cfg", seed=0))
    made = out.segments[3].image
    assert made is not None and made.size == (32, 32)
    again = engine.generate(doc, GenerationOptions(steps=2, guidance="cfg", seed=0)).segments[3].image
    assert again.tobytes() == made.tobytes()  # seeded
