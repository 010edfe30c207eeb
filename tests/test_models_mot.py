import json

import pytest
import torch

from tapestry.layout import Span, block_mask, dense_mask
from tapestry.masks import document_masks
from tapestry.models.common.sincos import sincos_2d
from tapestry.models.mot.config import ConfigError, LatentConfig, LLMConfig, MoTConfig, ViTConfig
from tapestry.models.mot.model import GEN, UND, KVCache, MoTModel

torch.set_num_threads(2)


def tiny_config(**llm) -> MoTConfig:
    return MoTConfig(
        llm=LLMConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, **llm),
        vit=ViTConfig(hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2, patch_size=4,
                      max_patches_per_side=4),
        latent=LatentConfig(channels=4, patch_size=2, max_side=4, timestep_freq_dim=32),
    )


@pytest.fixture(scope="module")
def model() -> MoTModel:
    torch.manual_seed(0)
    m = MoTModel(tiny_config()).eval()
    # the generation head starts at zero; give it weights so velocities are informative
    torch.nn.init.normal_(m.latent_out.weight, std=0.1)
    return m


class Sequence:
    """A test-side layout: pieces appended in order, with spans, experts and RoPE positions."""

    def __init__(self, model: MoTModel, doc: int = 0, start: int = 0):
        self.model, self.doc, self.start = model, doc, start
        self.embeds, self.experts, self.positions, self.spans = [], [], [], []
        self.next_pos = 0

    @property
    def end(self) -> int:
        return self.start + sum(e.shape[0] for e in self.embeds)

    def _add(self, emb: torch.Tensor, expert: int, mode: str, one_position: bool):
        n = emb.shape[0]
        self.spans.append(Span(self.end, self.end + n, mode, self.doc))
        self.embeds.append(emb)
        self.experts.append(torch.full((n,), expert))
        if one_position:  # a whole image shares one RoPE id
            self.positions.append(torch.full((n,), self.next_pos))
            self.next_pos += 1
        else:
            self.positions.append(torch.arange(self.next_pos, self.next_pos + n))
            self.next_pos += n
        return self

    def text(self, ids):
        return self._add(self.model.embed_text(torch.tensor(ids)), UND, "causal", False)

    def latents(self, lat, t, mode):
        emb = self.model.embed_latents(lat, torch.tensor([t]))[0]
        return self._add(emb, GEN, mode, True)

    def vit(self, image):
        return self._add(self.model.embed_images([image])[0], UND, "full", True)

    def tensors(self):
        return (torch.cat(self.embeds)[None], torch.stack([torch.cat(self.experts)]),
                torch.stack([torch.cat(self.positions)]))


def run(model, seq: Sequence, spans=None):
    emb, exp, pos = seq.tensors()
    return model(emb, exp, pos, dense_mask(spans or seq.spans))[0]


def lat(seed, h=4, w=4):
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed))


# -- config ------------------------------------------------------------------------------------


def test_config_json_round_trip(tmp_path):
    cfg = tiny_config(rope_theta=1e6)
    again = MoTConfig.from_json(cfg.to_json())
    assert again == cfg
    no_paths = MoTConfig(llm=LLMConfig(), vit=None, latent=None)
    assert MoTConfig.from_dict(json.loads(no_paths.to_json())) == no_paths
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    assert MoTConfig.load(path) == cfg


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda d: d["llm"].update(num_kv_heads=3), "multiple of num_kv_heads"),
        (lambda d: d["llm"].update(hiddden=3), r"config.llm: unknown field\(s\) \['hiddden'\]"),
        (lambda d: d.update(format="other"), "format is 'other'"),
        (lambda d: d["latent"].update(patch_size=0), "latent.patch_size must be >= 1"),
        (lambda d: d.update(extra=1), r"unknown field\(s\) \['extra'\]"),
    ],
)
def test_bad_configs_are_refused(change, match):
    data = tiny_config().to_dict()
    change(data)
    with pytest.raises(ConfigError, match=match):
        MoTConfig.from_dict(data)


# -- masks in the model ---------------------------------------------------------------------------


@torch.no_grad()
def test_causality_later_text_never_changes_earlier_outputs(model):
    ids = [3, 9, 4, 17, 8, 22, 5, 11, 30, 2]
    base = run(model, Sequence(model).text(ids))
    for j in (3, 7, 9):
        changed = list(ids)
        changed[j] = (changed[j] + 13) % 64
        out = run(model, Sequence(model).text(changed))
        torch.testing.assert_close(out[:j], base[:j], rtol=0, atol=1e-6)
        assert (out[j] - base[j]).abs().max() > 1e-3


@torch.no_grad()
def test_noise_span_is_invisible_outside(model):
    def seq(noise_seed):
        return (Sequence(model).text([1, 2, 3, 4]).latents(lat(noise_seed), 0.7, "noise")
                .latents(lat(99), 0.0, "full").text([5, 6, 7]))

    a, b = seq(1), seq(2)
    out_a, out_b = run(model, a), run(model, b)
    noise = a.spans[1]
    outside = torch.ones(out_a.shape[0], dtype=torch.bool)
    outside[noise.start:noise.end] = False
    torch.testing.assert_close(out_a[outside], out_b[outside], rtol=0, atol=1e-6)
    assert (out_a[~outside] - out_b[~outside]).abs().max() > 1e-3


@torch.no_grad()
def test_packed_documents_are_independent(model):
    image = torch.randn(3, 8, 12)

    def doc_a(start=0, doc=0):
        return Sequence(model, doc, start).text([1, 5, 9]).vit(image).text([4, 2]).latents(lat(3), 0.0, "full")

    def doc_b(start=0, doc=0):
        return Sequence(model, doc, start).text([7, 8, 9, 10]).latents(lat(4), 0.5, "noise")

    alone_a, alone_b = run(model, doc_a()), run(model, doc_b())
    a, b = doc_a(0, 0), None
    b = doc_b(a.end, 1)
    packed = Sequence(model)
    for part in (a, b):
        packed.embeds += part.embeds
        packed.experts += part.experts
        packed.positions += part.positions  # RoPE restarts per document
        packed.spans += part.spans
    out = run(model, packed)
    torch.testing.assert_close(out[: a.end], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[a.end :], alone_b, rtol=1e-5, atol=1e-5)


def packed_rows(model):
    """Two rows of one length, each several documents (the second ends in a padding-like doc)."""
    image = torch.randn(3, 8, 12, generator=torch.Generator().manual_seed(1))
    docs = [
        [lambda s, d: Sequence(model, d, s).text([1, 5, 9]).vit(image).text([4, 2]).latents(lat(3), 0.3, "noise"),
         lambda s, d: Sequence(model, d, s).text([7, 8, 9, 10]).latents(lat(4), 0.0, "full").text([3])],
        [lambda s, d: Sequence(model, d, s).text([2, 3]).latents(lat(5), 0.7, "noise").latents(lat(6), 0.2, "noise"),
         lambda s, d: Sequence(model, d, s).text([11, 12, 13]),
         lambda s, d: Sequence(model, d, s).text([6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6])],
    ]
    rows = []
    for makers in docs:
        packed, end = Sequence(model), 0
        for d, make in enumerate(makers):
            part = make(end, d)
            for name in ("embeds", "experts", "positions", "spans"):
                getattr(packed, name).extend(getattr(part, name))
            end = part.end
        rows.append(packed)
    lengths = {r.end for r in rows}
    assert len(lengths) == 1, lengths  # the fixture itself: both rows must be of one length
    return rows


def test_document_masks_forward_and_backward_match_dense(model):
    rows = packed_rows(model)
    tensors = [r.tensors() for r in rows]
    emb, exp, pos = (torch.cat([t[i] for t in tensors]) for i in range(3))
    emb = emb.detach()
    dense = torch.stack([dense_mask(r.spans) for r in rows])
    blocks = document_masks([r.spans for r in rows])
    assert [len(b) for b in blocks.rows] == [2, 3]
    outs, grads = [], []
    for mask in (dense, blocks):
        x = emb.clone().requires_grad_(True)
        model.zero_grad()
        out = model(x, exp, pos, mask)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outs.append(out.detach())
        grads.append((x.grad, model.layers[0].und.k_proj.weight.grad.clone(), model.layers[1].gen.q_proj.weight.grad.clone()))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(grads[1], grads[0]):  # float32 sums in another order: relative to the scale
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (got - want).abs().max() / want.abs().max()
    model.zero_grad()


def test_document_masks_refuse_what_they_do_not_cover(model):
    rows = packed_rows(model)
    with pytest.raises(ValueError, match="one length"):
        document_masks([rows[0].spans, rows[0].spans[:-1]])
    emb, exp, pos = rows[0].tensors()
    with pytest.raises(ValueError, match="document masks cover 2 rows"):
        model(emb, exp, pos, document_masks([r.spans for r in rows]))


# -- KV cache -------------------------------------------------------------------------------------


@torch.no_grad()
def test_cached_forward_equals_uncached(model):
    image = torch.randn(3, 8, 8)
    context = Sequence(model).text([1, 2, 3, 4, 5]).vit(image).text([6, 7, 8])
    c = context.end
    emb, exp, pos = context.tensors()
    cache = KVCache()
    ctx_out = model(emb, exp, pos, dense_mask(context.spans), cache=cache, update_cache=True)[0]
    assert cache.length == c
    torch.testing.assert_close(ctx_out, run(model, context), rtol=0, atol=0)

    def step(seq_after: Sequence, new_from: int, update: bool):
        """New tokens [new_from, end) against the cache vs. recomputing everything."""
        e, x, p = seq_after.tensors()
        rows = dense_mask(seq_after.spans, rows=(new_from, seq_after.end))
        got = model(e[:, new_from:], x[:, new_from:], p[:, new_from:], rows, cache=cache, update_cache=update)[0]
        torch.testing.assert_close(got, run(model, seq_after)[new_from:], rtol=1e-5, atol=1e-5)
        return got

    # a text step
    context.text([9])
    step(context, c, update=True)
    assert cache.length == c + 1

    # denoising: [BOI, noisy latents, EOI] at several steps, never written into the cache
    for t, seed in ((0.9, 10), (0.5, 11)):
        trial = Sequence(model)
        trial.embeds, trial.experts = list(context.embeds), list(context.experts)
        trial.positions, trial.spans, trial.next_pos = list(context.positions), list(context.spans), context.next_pos
        trial.text([60]).latents(lat(seed), t, "noise").text([61])
        step(trial, c + 1, update=False)
        assert cache.length == c + 1

    # the finished image joins the context as clean tokens, then text continues
    context.text([60]).latents(lat(12), 0.0, "full").text([61])
    step(context, c + 1, update=True)
    assert cache.length == context.end
    context.text([33, 34])
    step(context, context.end - 2, update=True)


def test_cache_steps_refuse_mismatched_masks(model):
    cache = KVCache()
    seq = Sequence(model).text([1, 2, 3])
    e, x, p = seq.tensors()
    with torch.no_grad():
        model(e, x, p, dense_mask(seq.spans), cache=cache, update_cache=True)
        with pytest.raises(ValueError, match="3 queries and 6 keys"):
            model(e, x, p, dense_mask(seq.spans), cache=cache)
    with pytest.raises(ValueError, match="needs a cache"):
        model(e, x, p, dense_mask(seq.spans), update_cache=True)


# -- routing ----------------------------------------------------------------------------------


def _grads(model, part):
    return [p.grad for name, p in model.named_parameters() if f".{part}." in name]


def test_routing_keeps_expert_gradients_apart():
    torch.manual_seed(1)
    m = MoTModel(tiny_config())
    # gen-only tokens (latents) -> no und expert weight is touched
    seq = Sequence(m).latents(lat(1), 0.3, "noise")
    run(m, seq).square().mean().backward()
    assert all(g is None for g in _grads(m, "und"))
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(m, "gen"))
    assert m.embed_tokens.weight.grad is None
    m.zero_grad(set_to_none=True)
    # und-only tokens (text) -> no gen expert weight is touched
    run(m, Sequence(m).text([1, 2, 3, 4])).square().mean().backward()
    assert all(g is None for g in _grads(m, "gen"))
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(m, "und"))
    assert m.latent_in.weight.grad is None


def test_mixed_sequence_routes_each_token_to_its_expert():
    # swapping the two experts' weights must change exactly what the routing says it changes
    torch.manual_seed(2)
    m = MoTModel(tiny_config()).eval()
    seq = Sequence(m).latents(lat(1), 0.3, "full").text([1, 2])
    with torch.no_grad():
        out = run(m, seq)
        for layer in m.layers:
            layer.gen.load_state_dict(layer.und.state_dict())
        m.norm_gen.load_state_dict(m.norm_und.state_dict())
        same = run(m, seq)
    assert (out[:4] - same[:4]).abs().max() > 1e-4  # gen tokens used gen weights
    # a model whose experts are equal acts like a dense model: expert ids no longer matter
    e, x, p = seq.tensors()
    with torch.no_grad():
        flipped = m(e, 1 - x, p, dense_mask(seq.spans))[0]
    torch.testing.assert_close(flipped, same, rtol=1e-6, atol=1e-6)


# -- embeddings --------------------------------------------------------------------------------


def test_latent_and_image_paths_shapes(model):
    latents = torch.randn(2, 4, 6, 8)
    tokens = model.embed_latents(latents, torch.tensor([0.1, 0.9]))
    assert tokens.shape == (2, 12, 64)
    v = model.latent_velocity(torch.randn(2, 12, 64), 3, 4)
    assert v.shape == (2, 4, 6, 8)
    outs = model.embed_images([torch.randn(3, 8, 16), torch.randn(3, 16, 4)])
    assert [o.shape for o in outs] == [(8, 64), (4, 64)]


def test_images_in_one_vit_call_are_independent(model):
    a, b = torch.randn(3, 8, 16), torch.randn(3, 16, 4)
    with torch.no_grad():
        together = model.embed_images([a, b])
        torch.testing.assert_close(together[1], model.embed_images([b])[0], rtol=1e-5, atol=1e-5)


def test_fresh_generation_head_predicts_zero_velocity():
    m = MoTModel(tiny_config())
    assert m.latent_velocity(torch.randn(1, 4, 64), 2, 2).abs().max() == 0


def test_position_tables_are_fixed_sincos(model):
    assert torch.equal(model.latent_pos_embed, sincos_2d(64, 4))
    assert "latent_pos_embed" not in model.state_dict()


@pytest.mark.slow
@torch.no_grad()
def test_block_mask_forward_matches_dense(model):
    pytest.importorskip("torch.nn.attention.flex_attention")
    seq = Sequence(model).text([1, 2, 3, 4, 5]).latents(lat(5), 0.4, "noise").latents(lat(6), 0.0, "full").text([9, 8])
    e, x, p = seq.tensors()
    dense = model(e, x, p, dense_mask(seq.spans))
    try:
        flex = model(e, x, p, block_mask(seq.spans, block_size=8))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"flex_attention does not run compiled on this machine: {type(exc).__name__}: {exc}")
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-4)


# -- checkpoints ----------------------------------------------------------------------------------


def test_save_load_round_trip_is_bitwise(tmp_path, model):
    folder = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    again = MoTModel.from_pretrained(folder)
    assert again.config == model.config
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert torch.equal(again.latent_pos_embed, model.latent_pos_embed)
    seq = Sequence(model).text([1, 2, 3]).latents(lat(1), 0.5, "noise")
    with torch.no_grad():
        assert torch.equal(run(model, seq), run(again, seq))
    half = MoTModel.from_pretrained(folder, dtype=torch.bfloat16)
    assert half.embed_tokens.weight.dtype == torch.bfloat16


def test_tied_embeddings_are_saved_once(tmp_path):
    from tapestry.models.common.checkpoint import read_header

    m = MoTModel(tiny_config(tie_word_embeddings=True))
    m.save_pretrained(tmp_path)
    assert "lm_head.weight" not in read_header(tmp_path / "model.safetensors")
    again = MoTModel.from_pretrained(tmp_path)
    assert again.lm_head.weight is again.embed_tokens.weight
    assert torch.equal(again.lm_head.weight, m.embed_tokens.weight)


def test_loading_refuses_missing_and_unexpected_keys(tmp_path, model):
    from safetensors.torch import load_file, save_file

    from tapestry.models.common.checkpoint import CheckpointError

    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    del state["layers.1.gen.q_proj.bias"]
    state["layers.9.und.q_proj.weight"] = torch.zeros(2)
    state["norm_und.weight"] = torch.ones(3)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError) as err:
        MoTModel.from_pretrained(tmp_path)
    text = str(err.value)
    assert "1 missing" in text and "layers.1.gen.q_proj.bias" in text
    assert "1 unexpected" in text and "layers.9.und.q_proj.weight" in text
    assert "norm_und.weight: model [64], checkpoint [3]" in text
    with pytest.raises(CheckpointError, match="missing config.json"):
        (tmp_path / "config.json").unlink()
        MoTModel.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        MoTModel.from_pretrained(tmp_path / "nope")


@torch.no_grad()
def test_guidance_branches_run_batched_against_their_own_caches(model):
    from tapestry.models.mot.model import batched_step_mask

    image = torch.randn(3, 8, 8)
    # cond: text + image + text; no_text: the image alone; uncond: nothing but a start token
    contexts = [
        Sequence(model).text([1, 2, 3]).vit(image).text([4, 5, 6, 7]),
        Sequence(model).text([1]).vit(image),
        Sequence(model).text([1]),
    ]
    caches, masks, alone, steps = [], [], [], []
    for ctx in contexts:
        e, x, p = ctx.tensors()
        cache = KVCache()
        model(e, x, p, dense_mask(ctx.spans), cache=cache, update_cache=True)
        c = ctx.end
        ctx.latents(lat(7), 0.8, "noise")
        e, x, p = ctx.tensors()
        rows = dense_mask(ctx.spans, rows=(c, ctx.end))
        alone.append(model(e[:, c:], x[:, c:], p[:, c:], rows, cache=cache)[0])
        caches.append(cache)
        masks.append(rows)
        steps.append((e[:, c:], x[:, c:], p[:, c:]))
    batched, lengths = KVCache.batch(caches)
    assert lengths == [contexts[0].end - 4, contexts[1].end - 4, contexts[2].end - 4]
    e = torch.cat([s[0] for s in steps])
    x = torch.cat([s[1] for s in steps])
    p = torch.cat([s[2] for s in steps])
    out = model(e, x, p, batched_step_mask(masks, lengths), cache=batched)
    for b in range(3):
        torch.testing.assert_close(out[b], alone[b], rtol=1e-5, atol=1e-5)
    assert (alone[0] - alone[2]).abs().max() > 1e-3  # the branches really differ
