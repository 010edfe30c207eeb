"""The duet family (DuetGen): tiny Qwen2.5-VL + Wan / Cosmos models built offline from configs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image

from tapestry.document import Document, ImageSegment, TextSegment
from tapestry.models.common.tokenizer import train_bpe
from tapestry.models.duet import convert
from tapestry.models.duet.config import DiTConfig, DuetConfig, DuetConfigError
from tapestry.models.duet.dit import PackedDiT
from tapestry.models.duet.family import FAMILY, DuetRecipe
from tapestry.models.duet.mllm import cap_long_side, mrope_positions
from tapestry.models.duet.model import DuetModel
from tapestry.models.duet.sequence import DuetTokens, context_indices, layout_duet

WORDS = "a red circle moves left then a blue square grows and the green star turns yellow".split()


def _image(seed: int, size=(32, 32)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")


def _story(seed: int = 0) -> Document:
    """text, target image, text, target image, text, target image (a ToyWorld-like story)."""
    segments = []
    for i in range(3):
        segments.append(TextSegment(" ".join(WORDS[(i * 4) % 12:(i * 4) % 12 + 5]), "context"))
        segments.append(ImageSegment("target", image=_image(seed * 10 + i)))
    return Document(f"story-{seed}", segments)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([" ".join(WORDS)] * 4, 300)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return FAMILY.build(FAMILY.model_config(DuetRecipe(), tokenizer.vocab_size)).eval()


def _layout(model, tokenizer, doc, **kw):
    return layout_duet(doc, tokenizer, DuetTokens.from_tokenizer(tokenizer), model.mllm.images, **kw)


# ------------------------------------------------------------------------------------ the DiT
@pytest.mark.parametrize("kind", ["wan", "cosmos"])
def test_packed_dit_equals_the_diffusers_forward_on_equal_frames(kind):
    torch.manual_seed(0)
    cfg = DiTConfig(kind=kind, concat_padding_mask=False, max_size=[8, 16, 16],
                    extra_pos_embed_type="learnable" if kind == "cosmos" else "")
    dit = PackedDiT(cfg).eval()
    frames = [torch.randn(4, 8, 6) for _ in range(3)]
    times = torch.tensor([0.0, 0.0, 0.7])
    context = torch.randn(5, 32)
    with torch.no_grad():
        ours = dit(frames, times, context)
        video = torch.stack(frames, dim=1)[None]  # [1, C, T, H, W]
        if kind == "wan":  # Wan 2.2 TI2V: one timestep per token
            ref = dit.net(video, (times * 1000)[:, None].expand(3, 12).reshape(1, -1), context[None],
                          return_dict=False)[0][0]
        else:  # Cosmos-Predict: per-frame timesteps and a condition-mask channel
            mask = torch.zeros(1, 1, 3, 8, 6)
            mask[:, :, :2] = 1
            ref = dit.net(video, times.view(1, 1, 3, 1, 1), context[None], condition_mask=mask,
                          return_dict=False)[0][0]
    for i, v in enumerate(ours):
        assert torch.allclose(v, ref[:, i], atol=1e-5), (kind, i)


def test_mixed_sizes_pack_with_per_image_rotary_positions():
    torch.manual_seed(0)
    dit = PackedDiT(DiTConfig()).eval()
    a, b = torch.randn(4, 8, 8), torch.randn(4, 4, 12)
    context = torch.randn(3, 32)
    with torch.no_grad():
        out = dit([a, b], torch.tensor([0.0, 0.5]), context)
        shifted = dit([a, b], torch.tensor([0.0, 0.5]), context, time_index=[0, 2])
    assert [tuple(v.shape) for v in out] == [(4, 8, 8), (4, 4, 12)]
    assert not torch.allclose(out[1], shifted[1])  # the time index enters the rotary positions


@pytest.mark.parametrize("kind", ["wan", "cosmos"])
def test_guidance_branches_batch_into_one_forward_with_masked_contexts(kind):
    torch.manual_seed(0)
    cfg = DiTConfig(kind=kind, concat_padding_mask=kind == "cosmos", condition_mask=kind == "cosmos")
    dit = PackedDiT(cfg).eval()
    g = torch.Generator().manual_seed(1)
    frames = [[torch.randn(4, 8, 8, generator=g), torch.randn(4, 4, 12, generator=g)] for _ in range(3)]
    contexts = [torch.randn(n, 32, generator=g) for n in (7, 3, 5)]  # three lengths: two padded
    times = torch.tensor([[0.0, 0.4], [0.0, 0.4], [0.0, 0.9]])
    with torch.no_grad():
        batched = dit.forward_batch(frames, times, contexts)
        alone = [dit(f, t, c) for f, t, c in zip(frames, times, contexts)]
    for b in range(3):
        for v, ref in zip(batched[b], alone[b]):
            assert torch.allclose(v, ref, atol=1e-5), (kind, b)
            assert not torch.allclose(v, torch.zeros_like(v))
    with pytest.raises(ValueError, match="same frame sizes"):
        dit.forward_batch([frames[0], frames[1][:1]], times, contexts[:2])


def test_masked_wan_block_is_the_librarys_block_when_every_key_is_kept():
    from tapestry.models.duet.dit import _wan_block

    torch.manual_seed(0)
    dit = PackedDiT(DiTConfig()).eval()
    block = dit.net.blocks[0]
    d = block.scale_shift_table.shape[-1]
    hidden, encoder, temb = torch.randn(2, 6, d), torch.randn(2, 4, d), torch.randn(2, 6, 6, d)
    cos, sin = torch.randn(1, 6, 1, d // 2), torch.randn(1, 6, 1, d // 2)
    with torch.no_grad():
        ours = _wan_block(block, hidden, encoder, temb, (cos, sin), torch.ones(2, 1, 1, 4, dtype=torch.bool))
        ref = block(hidden, encoder, temb, (cos, sin))
        cut = _wan_block(block, hidden, encoder, temb, (cos, sin), torch.tensor([True, True, False, False])[None, None, None].expand(2, 1, 1, 4))
    assert torch.allclose(ours, ref, atol=1e-6)
    assert not torch.allclose(cut, ref, atol=1e-4)  # the mask is applied


# ------------------------------------------------------------------------------------ the MLLM
def test_long_side_capped_at_480_before_qwen_patching(model):
    image = Image.new("RGB", (960, 240))
    assert cap_long_side(image, 480).size == (480, 120)
    _, h, w = model.mllm.images.grid(image)
    assert w * model.config.mllm.patch_size <= 480 + 28 and h * model.config.mllm.patch_size <= 140
    pixel_values, grid = model.mllm.images([image])
    assert tuple(grid[0].tolist()) == model.mllm.images.grid(image)
    assert pixel_values.shape[0] == int(grid.prod())


def test_mrope_positions_equal_transformers_get_rope_index(model, tokenizer):
    layout = _layout(model, tokenizer, _story())
    ids = layout.ids[None]
    types = (ids == layout.image_token_id).int()
    ref, _ = model.mllm.hf.model.get_rope_index(ids, types, image_grid_thw=layout.grid_thw)
    assert torch.equal(layout.positions, ref[:, 0])
    # continuing from a prefix gives the same ids as laying out the whole
    cut = layout.images[1].bov
    head, start = mrope_positions(layout.ids[:cut], list(layout.grid_thw[:1]), layout.image_token_id, 2)
    tail, _ = mrope_positions(layout.ids[cut:], list(layout.grid_thw[1:]), layout.image_token_id, 2, start)
    assert torch.equal(torch.cat([head, tail], 1), layout.positions)


def test_bov_is_supervised_and_image_tokens_are_not(model, tokenizer):
    layout = _layout(model, tokenizer, _story())
    tokens = DuetTokens.from_tokenizer(tokenizer)
    supervised = layout.ids[1:][layout.labels[:-1] != -100].tolist()
    assert supervised.count(tokens.bov) == 3 and supervised[-1] == tokens.eos
    assert tokens.image_pad not in supervised and tokens.vision_end not in supervised
    assert all(int(layout.ids[im.bov]) == tokens.bov for im in layout.images)


# ------------------------------------------------------------------------------------ connector
def test_connector_reads_all_layers_or_only_the_last(model):
    from tapestry.models.duet.config import ConnectorConfig
    from tapestry.models.duet.connector import Connector

    layers = [torch.randn(5, 32) for _ in range(2)]
    changed = [layers[0] + 1.0 + torch.randn(5, 32), layers[1]]
    for mode, differs in (("all", True), ("last", False)):
        torch.manual_seed(0)
        c = Connector(ConnectorConfig(layers=mode), 32, 2, 48)
        assert c.in_dim == (64 if mode == "all" else 32)
        out = c(layers)
        assert out.shape == (5, 48)
        assert (not torch.allclose(out, c(changed))) == differs
    # each layer is normalized: scaling a layer does not change the output
    c = Connector(ConnectorConfig(), 32, 2, 48)
    assert torch.allclose(c(layers), c([layers[0] * 100, layers[1]]), atol=1e-4)


# ------------------------------------------------------------------------------------ losses
def _flow_loss(model, tokenizer, doc, seed=0, target=1):
    from tapestry.models.duet.model import FlowSample

    layout = _layout(model, tokenizer, doc)
    g = torch.Generator().manual_seed(seed)
    sample = model.flow_sample(layout, g)
    frames = [model.encode_image(layout.images[j].image) for j in range(target + 1)]
    x0 = frames[-1]
    noise = torch.randn(x0.shape, generator=g)
    frames[-1] = 0.5 * x0 + 0.5 * noise
    sample = FlowSample(target, frames, 0.5, noise - x0, False)
    with torch.no_grad():
        return float(model.flow_loss(layout, model.run_mllm(layout), sample))


def test_condition_frames_condition_earlier_images_only(model, tokenizer):
    doc = _story()
    base = _flow_loss(model, tokenizer, doc)
    earlier, later = copy.deepcopy(doc), copy.deepcopy(doc)
    earlier.segments[1].image = _image(99)  # image 0: a condition frame of target 1
    later.segments[5].image = _image(98)  # image 2: after target 1
    assert _flow_loss(model, tokenizer, earlier) != pytest.approx(base, abs=1e-6)
    assert _flow_loss(model, tokenizer, later) == base


def test_stage2_step_leaves_the_llm_bitwise_unchanged(tokenizer):
    torch.manual_seed(0)
    model = FAMILY.build(FAMILY.model_config(DuetRecipe(), tokenizer.vocab_size))
    model.mllm.requires_grad_(False)  # stage 2 freeze set
    before = {k: v.clone() for k, v in model.mllm.state_dict().items()}
    dit_before = {k: v.clone() for k, v in model.dit.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sums = model.loss_sums([_layout(model, tokenizer, _story())], torch.Generator().manual_seed(0))
    assert sums["flow"][1] == 1
    (sums["text"][0] + sums["flow"][0]).backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.mllm.state_dict().items())
    assert any(not torch.equal(dit_before[k], v) for k, v in model.dit.state_dict().items())


def test_stage1_trains_the_llm_only_on_next_tokens(tokenizer):
    torch.manual_seed(0)
    model = FAMILY.build(FAMILY.model_config(DuetRecipe(), tokenizer.vocab_size))
    model.connector.requires_grad_(False)
    model.dit.requires_grad_(False)
    sums = model.loss_sums([_layout(model, tokenizer, _story())], torch.Generator().manual_seed(0))
    assert sums["flow"][1] == 0 and sums["text"][1] > 0  # no flow work in stage 1
    sums["text"][0].backward()
    assert all(p.grad is None for p in model.dit.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mllm.parameters())


# ------------------------------------------------------------------------------------ guidance
def test_guidance_negative_drops_exactly_the_last_text_chunk(model, tokenizer):
    doc = _story()
    layout = _layout(model, tokenizer, doc)
    k = 2
    full = context_indices(layout, k).tolist()
    negative = context_indices(layout, k, drop_last_chunk=True).tolist()
    a, b = layout.images[k].chunk
    chunk = layout.ids[a:b].tolist()
    assert chunk == tokenizer.encode(doc.segments[4].text)  # the text since the previous image
    assert [i for i in full if i not in negative] == list(range(a, b))
    assert all(i in negative for i in range(layout.images[k - 1].start, layout.images[k - 1].end))

    # the runtime: the negative's context (the prompt without its last text chunk, the images
    # kept) reads exactly the cond context's hidden states minus the chunk's positions
    runtime = FAMILY.runtime(model, tokenizer)
    given = ImageSegment("context", image=doc.segments[1].image)
    full_doc = Document("p", [TextSegment(doc.segments[0].text), given, TextSegment(doc.segments[2].text)])
    negative_doc = Document("p", [TextSegment(doc.segments[0].text), given])
    contexts = {}
    for name, prompt in (("cond", full_doc), ("no_last_text", negative_doc)):
        ctx = runtime.prefill(prompt)
        runtime.append_text(ctx, [tokenizer.boi_id])
        runtime.begin_image(ctx)
        contexts[name] = ctx
    cond, neg = contexts["cond"], contexts["no_last_text"]
    assert len(cond.frames) == len(neg.frames) == 1 and torch.equal(cond.frames[0], neg.frames[0])
    derived = runtime._condition(cond, drop_last_chunk=True)
    assert runtime._condition(cond, False).shape[0] - derived.shape[0] == len(tokenizer.encode(doc.segments[2].text))
    assert torch.allclose(derived, runtime._condition(neg, False), atol=1e-5)
    x = runtime.noise((32, 32), torch.Generator().manual_seed(0))
    v = runtime.denoise(contexts, x, torch.tensor(0.5))
    assert v["cond"].shape == x.shape and not torch.allclose(v["cond"], v["no_last_text"])

    # batched, cond and the negative (same frames, shorter context) are one DiT forward; a branch
    # without the image (other frames) runs in its own; every velocity is the unbatched one
    uncond = runtime.prefill(Document("p", []))
    runtime.append_text(uncond, [tokenizer.boi_id])
    runtime.begin_image(uncond)
    contexts["uncond"] = uncond
    calls = []
    forward = model.dit.forward_batch

    def counted(frames, *args, **kwargs):
        calls.append(len(frames))
        return forward(frames, *args, **kwargs)

    model.dit.forward_batch = counted
    try:
        batched = runtime.denoise(contexts, x, torch.tensor(0.5), batched=True)
        assert sorted(calls) == [1, 2]
        calls.clear()
        one_by_one = runtime.denoise(contexts, x, torch.tensor(0.5), batched=False)
        assert calls == [1, 1, 1]
    finally:
        del model.dit.forward_batch
    assert list(batched) == ["cond", "no_last_text", "uncond"]
    for name in contexts:
        assert torch.allclose(batched[name], one_by_one[name], atol=1e-5), name


# ------------------------------------------------------------------------------------ inference
def test_runtime_kv_cache_matches_one_full_forward(model, tokenizer):
    doc = _story()
    runtime = FAMILY.runtime(model, tokenizer)
    prompt = Document("p", doc.segments[:1])
    ctx = runtime.prefill(prompt)
    ids = tokenizer.encode(" moves left")
    for token in ids:
        runtime.append_text(ctx, [token])
    runtime.append_text(ctx, [tokenizer.boi_id])
    runtime.begin_image(ctx)
    runtime.append_image(ctx, doc.segments[1].image, "target")
    whole = Document("w", [TextSegment(doc.segments[0].text + " moves left"),
                           ImageSegment("target", image=doc.segments[1].image)])
    layout = _layout(model, tokenizer, whole, close=False)
    assert ctx.ids == layout.ids.tolist()
    with torch.no_grad():
        out = model.run_mllm(layout)
    assert torch.allclose(runtime.next_text(ctx), out.logits[0, -1].float(), atol=1e-4)
    assert torch.allclose(ctx.layers[0], out.layers[0][0], atol=1e-4)


# ------------------------------------------------------------------------------------ checkpoints
def test_config_json_round_trip_and_clear_errors(tmp_path):
    cfg = DuetConfig(dit=DiTConfig(kind="cosmos"))
    assert DuetConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(DuetConfigError, match="connector.layers"):
        DuetConfig.from_dict({**cfg.to_dict(), "connector": {"layers": "middle"}})
    with pytest.raises(DuetConfigError, match="unknown field"):
        DuetConfig.from_dict({**cfg.to_dict(), "dit": {"kind": "wan", "depth": 3}})


def test_save_pretrained_round_trips_bitwise(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    again = DuetModel.from_pretrained(tmp_path / "m")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["family"] == "duet"


@pytest.mark.parametrize("kind", ["wan", "cosmos"])
def test_published_layouts_round_trip_bitwise(tmp_path, kind):
    torch.manual_seed(1)
    cfg = DuetConfig(dit=DiTConfig(kind=kind, use_crossattn_projection=kind == "cosmos", crossattn_proj_in_channels=64))
    model = DuetModel(cfg)
    qwen, pipe = tmp_path / "Qwen2.5-VL", tmp_path / "dit"
    convert.write_qwen(model.mllm, qwen, shards=2)
    convert.write_diffusers(model.dit.net, pipe / "transformer", max_shard_size="50KB")
    convert.write_diffusers(model.vae.net, pipe / "vae")
    index = json.loads((qwen / "model.safetensors.index.json").read_text())
    assert "model.layers.0.self_attn.q_proj.weight" in index["weight_map"]  # published key names
    assert "visual.patch_embed.proj.weight" in index["weight_map"] and "lm_head.weight" in index["weight_map"]
    assert json.loads((qwen / "config.json").read_text())["rope_scaling"]["type"] == "mrope"
    assert (pipe / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = convert.import_published(qwen, pipe, connector=cfg.connector)
    assert loaded.config.mllm == cfg.mllm
    assert loaded.config.dit.diffusers_config() == cfg.dit.diffusers_config()
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("connector."))


def test_published_loader_reports_missing_keys(tmp_path, model):
    from safetensors.torch import load_file, save_file

    convert.write_qwen(model.mllm, tmp_path / "q", shards=1)
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    state.pop("model.norm.weight")
    save_file(state, str(tmp_path / "q" / "model.safetensors"))
    report = convert.qwen_coverage(tmp_path / "q", model.mllm)
    assert report.missing == ["model.language_model.norm.weight"] and not report.unexpected
    with pytest.raises(convert.CheckpointError, match="missing"):
        convert.load_qwen(tmp_path / "q", model.mllm)


def _tied_head(mllm) -> bool:
    hf = mllm.hf
    return hf.lm_head.weight is hf.model.language_model.embed_tokens.weight


def _write_published(model, root):
    qwen, pipe = root / "Qwen2.5-VL", root / "dit"
    convert.write_qwen(model.mllm, qwen, shards=2)
    convert.write_diffusers(model.dit.net, pipe / "transformer")
    convert.write_diffusers(model.vae.net, pipe / "vae")
    return qwen, pipe


def _qwen_files(qwen) -> dict:
    """Every tensor of a sharded Qwen folder, by published name (shards read through the index)."""
    from safetensors.torch import load_file

    index = json.loads((qwen / "model.safetensors.index.json").read_text())["weight_map"]
    state = {}
    for file in sorted(set(index.values())):
        state.update(load_file(str(qwen / file)))
    assert sorted(state) == sorted(index)
    return state


def _rewrite_shard(qwen, key, change) -> None:
    """Apply `change(state)` to the shard holding `key` and index the shard's new keys."""
    from safetensors.torch import load_file, save_file

    path = qwen / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shard = index["weight_map"][key]
    state = load_file(str(qwen / shard))
    change(state)
    save_file(state, str(qwen / shard))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard} | {k: shard for k in state}
    path.write_text(json.dumps(index))


def test_tied_qwen_folder_has_no_lm_head_and_round_trips_bitwise(tmp_path):
    """A Qwen2.5-VL-3B-style folder: "tie_word_embeddings": true and no lm_head.weight."""
    from tapestry.models.duet.config import MLLMConfig

    torch.manual_seed(3)
    cfg = DuetConfig(mllm=MLLMConfig(tie_word_embeddings=True))
    model = DuetModel(cfg)
    assert _tied_head(model.mllm)
    qwen, pipe = _write_published(model, tmp_path)
    written = _qwen_files(qwen)
    assert "lm_head.weight" not in written and "model.embed_tokens.weight" in written  # the published 3B keys
    assert json.loads((qwen / "config.json").read_text())["tie_word_embeddings"] is True
    assert convert.qwen_coverage(qwen, model.mllm).ok

    loaded = convert.import_published(qwen, pipe, connector=cfg.connector)
    assert loaded.config.mllm == cfg.mllm and _tied_head(loaded.mllm)  # the head IS the embedding table
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("connector."))
    convert.write_qwen(loaded.mllm, tmp_path / "again", shards=2)  # and back: the same tensors, bitwise
    again = _qwen_files(tmp_path / "again")
    assert again.keys() == written.keys() and all(torch.equal(again[k], written[k]) for k in written)


def test_tie_flag_inside_text_config_ties_the_head(tmp_path):
    """transformers before 5 saved the flag in text_config; transformers ties on either."""
    from tapestry.models.duet.config import MLLMConfig

    model = DuetModel(DuetConfig(mllm=MLLMConfig(tie_word_embeddings=True)))
    qwen, _ = _write_published(model, tmp_path)
    data = json.loads((qwen / "config.json").read_text())
    data["text_config"] = {"tie_word_embeddings": data.pop("tie_word_embeddings")}
    (qwen / "config.json").write_text(json.dumps(data))
    assert convert.mllm_config_from_qwen(qwen).tie_word_embeddings


def test_tied_checkpoint_storing_lm_head_loads_only_when_it_equals_the_embeddings(tmp_path):
    from tapestry.models.duet.config import MLLMConfig
    from tapestry.models.duet.mllm import DuetMLLM

    torch.manual_seed(4)
    model = DuetModel(DuetConfig(mllm=MLLMConfig(tie_word_embeddings=True)))
    qwen, _ = _write_published(model, tmp_path)
    embed = model.mllm.hf.model.language_model.embed_tokens.weight.detach().clone()
    embed_key = "model.embed_tokens.weight"
    _rewrite_shard(qwen, embed_key, lambda state: state.update({"lm_head.weight": embed.clone()}))  # a redundant copy
    fresh = DuetMLLM(model.config.mllm)
    assert convert.qwen_coverage(qwen, fresh).ok
    convert.load_qwen(qwen, fresh)
    assert _tied_head(fresh) and torch.equal(fresh.hf.lm_head.weight, embed)

    _rewrite_shard(qwen, embed_key, lambda state: state.update({"lm_head.weight": embed + 1}))  # an untied head
    with pytest.raises(convert.CheckpointError, match="lm_head.weight differs from"):
        convert.load_qwen(qwen, DuetMLLM(model.config.mllm))


def test_untied_checkpoint_without_lm_head_is_one_clear_line(tmp_path, model):
    qwen, _ = _write_published(model, tmp_path)
    assert not model.config.mllm.tie_word_embeddings
    _rewrite_shard(qwen, "lm_head.weight", lambda state: state.pop("lm_head.weight"))
    assert convert.qwen_coverage(qwen, model.mllm).missing == ["lm_head.weight"]
    with pytest.raises(convert.CheckpointError) as err:
        convert.load_qwen(qwen, copy.deepcopy(model.mllm))
    message = str(err.value)
    assert "\n" not in message and "lm_head.weight" in message and '"tie_word_embeddings": true' in message


def test_tied_duet_checkpoint_stores_the_head_once_and_stays_tied(tmp_path, tokenizer):
    """save_pretrained and the export / EMA path (state of a meta skeleton's keys ->
    from_state_dict) keep one copy of the tied table and a tied model after loading."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from tapestry.models.common.checkpoint import expected_shapes

    recipe = DuetRecipe()
    recipe = replace(recipe, mllm=replace(recipe.mllm, tie_word_embeddings=True))
    config = FAMILY.model_config(recipe, tokenizer.vocab_size)
    torch.manual_seed(6)
    model = FAMILY.build(config)
    model.save_pretrained(tmp_path / "m")
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert "mllm.hf.lm_head.weight" not in stored and "mllm.hf.model.language_model.embed_tokens.weight" in stored
    again = FAMILY.from_pretrained(tmp_path / "m")
    assert _tied_head(again.mllm)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with torch.device("meta"):
        skeleton = FAMILY.build(config)
    keys = set(expected_shapes(skeleton))  # what export.py reads back from a training checkpoint
    assert "mllm.hf.lm_head.weight" not in keys
    exported = FAMILY.from_state_dict(config, {k: v for k, v in model.state_dict().items() if k in keys})
    assert _tied_head(exported.mllm)
    with torch.no_grad():  # tied for real: a change to the table is a change to the head
        exported.mllm.hf.model.language_model.embed_tokens.weight[0, 0] += 1.0
    assert torch.equal(exported.mllm.hf.lm_head.weight, exported.mllm.hf.model.language_model.embed_tokens.weight)


# ------------------------------------------------------------------------------------ the glue
def test_family_layout_prepare_and_loss_over_a_packed_row(model, tokenizer):
    from tapestry.layout import concat_layouts

    docs = [_story(0), Document("plain", [TextSegment("a red circle", "target")])]
    layout = FAMILY.layout_config(model.config, model.vae.downsample)
    row = concat_layouts([FAMILY.layout(d, tokenizer, layout, config=model.config) for d in docs], tokenizer.pad_id)
    counts = FAMILY.loss_counts([row])
    assert counts["flow"] == 1 and counts["text"] == int((row.labels != -100).sum())
    inputs = FAMILY.prepare(row, docs, layout, None, torch.Generator().manual_seed(3), config=model.config,
                            tokenizer=tokenizer)
    again = FAMILY.prepare(row, docs, layout, None, torch.Generator().manual_seed(3), config=model.config,
                           tokenizer=tokenizer)
    assert [(i.target, i.t, i.noise_seed) for i in inputs] == [(i.target, i.t, i.noise_seed) for i in again]
    assert inputs[1].target is None
    parts = FAMILY.loss(model, [inputs])
    assert set(parts) == {"text", "flow"} and float(parts["flow"]) > 0
    assert {FAMILY.group_of(n) for n, _ in model.named_parameters()} == set(FAMILY.param_groups)


@pytest.mark.parametrize("tied", [False, True])
def test_import_folder_builds_a_duet_checkpoint_with_bov(tmp_path, capsys, tied):
    from tokenizers import AddedToken

    from tapestry.models.common.tokenizer import QWEN2_SPECIALS, TextTokenizer
    from tapestry.models.duet.config import MLLMConfig

    qwen_tok = train_bpe([" ".join(WORDS)] * 4, 300, QWEN2_SPECIALS)
    qwen_tok.backend.add_special_tokens([AddedToken("<|video_pad|>", special=True)])
    torch.manual_seed(2)
    source = DuetModel(DuetConfig(mllm=MLLMConfig(vocab_size=qwen_tok.vocab_size, tie_word_embeddings=tied)))
    qwen = convert.write_qwen(source.mllm, tmp_path / "qwen", shards=2)
    (qwen / "tokenizer.json").write_text(qwen_tok.backend.to_str())  # a Qwen folder: tokenizer.json only
    convert.write_diffusers(source.dit.net, tmp_path / "wan" / "transformer")
    convert.write_diffusers(source.vae.net, tmp_path / "wan" / "vae")
    convert.write_model_index(tmp_path / "wan", "WanPipeline", "WanTransformer3DModel", "AutoencoderKLWan")

    assert convert.main([str(qwen), str(tmp_path / "wan")]) == 0  # coverage from headers only
    assert capsys.readouterr().out.count("keys: complete (0 missing, 0 unexpected, 0 shape mismatch)") == 3
    out = tmp_path / "duet"
    assert convert.main([str(qwen), str(tmp_path / "wan"), "--out", str(out)]) == 0
    assert convert.main([str(qwen), str(tmp_path / "wan"), "--out", str(out)]) == 2  # refuses a full folder
    tok = TextTokenizer.load(out)
    assert tok.backend.id_to_token(tok.boi_id) == "<BOV>" and tok.boi_id == qwen_tok.vocab_size
    model = DuetModel.from_pretrained(out)
    emb = model.mllm.hf.get_input_embeddings().weight
    assert emb.shape[0] == qwen_tok.vocab_size + 1
    assert torch.equal(emb[:-1], source.mllm.hf.get_input_embeddings().weight)
    assert torch.equal(model.dit.net.proj_out.weight, source.dit.net.proj_out.weight)
    head = model.mllm.hf.get_output_embeddings().weight
    assert model.config.mllm.tie_word_embeddings == tied and (head is emb) == tied  # <BOV> grew the tied table once
    assert head.shape[0] == emb.shape[0]


def test_initialize_loads_the_recipes_pretrained_toy_autoencoder(tmp_path, tokenizer):
    from dataclasses import replace

    from tapestry.models.duet.family import AutoencoderRecipe
    from tapestry.models.vae.toy import ToyAEConfig, ToyAutoencoder

    torch.manual_seed(5)
    ae = ToyAutoencoder(ToyAEConfig(channels=(8, 8, 8), encoder_blocks=(0, 0, 0), decoder_blocks=(0, 0, 0),
                                    latent_channels=4, norm_groups=4, resolution=32))
    ae.save_pretrained(tmp_path / "ae")
    recipe = replace(DuetRecipe(), autoencoder=AutoencoderRecipe(kind="toy", pretrained=str(tmp_path / "ae")))
    config = FAMILY.model_config(recipe, tokenizer.vocab_size)
    assert config.vae.kind == "toy" and config.vae.config["latent_channels"] == 4  # self-contained config
    model = FAMILY.build(config)
    FAMILY.initialize(model, recipe)
    assert all(torch.equal(a, b) for a, b in zip(model.vae.net.state_dict().values(), ae.state_dict().values()))
    assert not any(p.requires_grad for p in model.vae.parameters())
