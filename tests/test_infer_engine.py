import pytest
import torch

from test_models_mot_family import AvgPoolCodec, picture
from tapestry.document import Document, ImageSegment, TextSegment, from_markup
from tapestry.infer.engine import Engine, GenerationError, GenerationOptions
from tapestry.infer.events import Done, ImageDone, ImageProgress, ImageStarted, TextDelta
from tapestry.models.common.tokenizer import train_bpe
from conftest import tiny_mot_config
from tapestry.models.mot.family import layout_config_for
from tapestry.models.mot.model import MoTModel


@pytest.fixture(scope="module")
def engine():
    tokenizer = train_bpe(["A red circle sits left of a blue star.", "Then it moves.", "red", "draw 1 2 3"] * 20,
                          vocab_size=300)
    torch.manual_seed(0)
    config = tiny_mot_config(tokenizer.vocab_size, layers=2)
    model = MoTModel(config)
    torch.nn.init.normal_(model.latent_out.weight, std=0.05)  # a fresh head predicts 0; make it speak
    return Engine.for_model(model, tokenizer, AvgPoolCodec(), layout_config_for(config, 4, target_size=(32, 32)))


def story():
    doc = from_markup("A [img1] sits left of a [img2].", [picture((200, 0, 0)), picture((0, 0, 200))], id="s")
    doc.segments += [ImageSegment("target", width=32, height=32), TextSegment("Then it moves."),
                     ImageSegment("target", width=32, height=32), TextSegment("What colour?"),
                     TextSegment("", role="target")]
    return doc


def run(engine, doc, **options):
    events = list(engine.stream(doc, GenerationOptions(**options)))
    latents = [e.latents for e in events if isinstance(e, ImageDone)]
    return events, latents


@pytest.mark.parametrize("rule", ["none", "cfg", "illume", "inset", "bagel"])
def test_cached_equals_recompute_and_batched_equals_sequential(engine, rule):
    options = dict(seed=3, steps=3, guidance=rule, max_new_tokens=4)
    events, cached = run(engine, story(), **options)
    _, recomputed = run(engine, story(), recompute=True, **options)
    _, sequential = run(engine, story(), batch_branches=False, **options)
    assert len(cached) == 2
    for a, b, c in zip(cached, recomputed, sequential):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
        assert torch.allclose(a, c, atol=1e-5), (a - c).abs().max()
    final = events[-1]
    assert isinstance(final, Done) and final.stop_reason == "targets_filled"


def test_event_stream_and_filled_targets(engine):
    events, _ = run(engine, story(), seed=0, steps=2, max_new_tokens=3)
    kinds = [e.type for e in events if e.type != "text_delta"]
    assert kinds == ["image_started", "image_progress", "image_progress", "image_done"] * 2 + ["done"]
    started = [e for e in events if isinstance(e, ImageStarted)]
    assert [(e.index, e.segment, e.height, e.width, e.steps) for e in started] == [(0, 3, 32, 32, 2), (1, 5, 32, 32, 2)]
    doc = events[-1].document
    assert doc.segments[3].image.size == (32, 32) and doc.segments[5].image.size == (32, 32)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert doc.segments[7].text == text
    generation = doc.meta["generation"]
    assert (generation["seed"], generation["steps"], generation["sampler"]) == (0, 2, "euler")
    assert doc.validate() == []


def test_seed_determinism(engine):
    _, a = run(engine, story(), seed=7, steps=2, max_new_tokens=2)
    _, b = run(engine, story(), seed=7, steps=2, max_new_tokens=2)
    _, c = run(engine, story(), seed=8, steps=2, max_new_tokens=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("rule, neutral, strong", [
    ("cfg", {"scale": 1.0}, {"scale": 4.0}),
    ("illume", {"gamma_txt": 1.0, "gamma_img": 1.0}, {"gamma_txt": 8.0, "gamma_img": 1.0}),
    ("inset", {"s1": 1.0, "s2": 1.0}, {"s1": 4.0, "s2": 1.5}),
    ("bagel", {"text_scale": 1.0, "image_scale": 1.0, "renorm": "none"}, {"text_scale": 4.0, "image_scale": 2.0}),
])
def test_guidance_parameters_reach_the_engine(engine, rule, neutral, strong):
    """Every rule at scale 1 is the conditional prediction; at other scales it is not."""
    base = dict(seed=1, steps=3, max_new_tokens=2)
    _, plain = run(engine, story(), guidance="none", **base)
    _, unit = run(engine, story(), guidance=rule, guidance_scales=neutral, **base)
    _, guided = run(engine, story(), guidance=rule, guidance_scales=strong, **base)
    assert torch.allclose(plain[0], unit[0], atol=1e-5)
    assert not torch.allclose(plain[0], guided[0], atol=1e-3)


@pytest.mark.parametrize("options, message", [
    (dict(steps=0), "--steps must be at least 1"),
    (dict(guidance="magic"), "unknown guidance rule 'magic'"),
    (dict(guidance="inset", guidance_scales={"s1": -1}), "s1 must be >= 0"),
    (dict(guidance="cfg", guidance_scales={"gamma": 2}), "does not take ['gamma']"),
    (dict(top_p=0), "top_p must lie in (0, 1]"),
    (dict(image_size=(0, 32)), "image size must be between 1 and 4096"),
])
def test_bad_options_are_refused_before_work(engine, options, message):
    with pytest.raises(GenerationError) as info:
        list(engine.stream(story(), GenerationOptions(**options)))
    assert message in str(info.value)


def test_free_run_stops_at_token_budget_and_image_cap(engine):
    doc = Document("free", [TextSegment("draw")])
    events, _ = run(engine, doc, seed=0, steps=1, max_new_tokens=6, temperature=1.0, max_images=0)
    done = events[-1]
    assert done.stop_reason in ("eos", "max_tokens")
    assert not any(isinstance(e, ImageStarted) for e in events)  # max_images=0 bans BOI
    generation = done.document.meta["generation"]
    assert generation["new_images"] == 0
    assert generation["new_tokens"] == 6 if done.stop_reason == "max_tokens" else generation["new_tokens"] < 6


def test_engine_outputs_carry_no_autograd_graph_and_grad_mode_does_not_leak(engine):
    with torch.enable_grad():
        modes = []
        events = []
        for event in engine.stream(story(), GenerationOptions(steps=2, guidance="inset")):
            modes.append(torch.is_inference_mode_enabled())
            events.append(event)
    assert not any(modes), "the consumer's code between events runs in its own grad mode"
    latents = [e.latents for e in events if isinstance(e, ImageDone)]
    assert latents and all(x.grad_fn is None and not x.requires_grad for x in latents)


def _recording(engine, monkeypatch):
    seen = []
    prefill = engine.runtime.prefill

    def record(doc, recompute=False):
        seen.append(doc)
        return prefill(doc, recompute)

    monkeypatch.setattr(engine.runtime, "prefill", record)
    return seen


def _texts(doc):
    return [s.text for s in doc.segments if isinstance(s, TextSegment)]


@pytest.mark.parametrize("rule", ["cfg", "illume", "inset", "bagel", "duetgen"])
def test_guidance_branches_after_model_written_text(engine, monkeypatch, rule):
    """Branches drop text whoever wrote it; "the last text chunk" is the text since the previous
    image; DuetGen's negative keeps every condition image (the drawn ones too)."""
    from tapestry.models.common.guidance import required_branches

    doc = from_markup("A [img1] sits left of a [img2].", [picture((200, 0, 0)), picture((0, 0, 200))], id="w")
    # (a text target needs placeholder text: an empty segment has no place in reading order)
    doc.segments += [TextSegment("?", role="target"), ImageSegment("target", width=32, height=32),
                     TextSegment("Then it moves."), ImageSegment("target", width=32, height=32)]
    seen = _recording(engine, monkeypatch)
    result = engine.generate(doc, GenerationOptions(seed=0, steps=1, guidance=rule, temperature=1.0,
                                                    max_new_tokens=4))
    written = result.segments[3].text
    assert written, "the model wrote no text; pick another seed"
    branches = [b for b in required_branches(rule) if b != "cond"]
    assert len(seen) == 1 + 2 * len(branches)  # the main context, then each branch for each image
    first = dict(zip(branches, seen[1 : 1 + len(branches)]))
    second = dict(zip(branches, seen[1 + len(branches):]))
    prompt = ["A ", " sits left of a ", "."]
    for name, branch in first.items():
        images = [s for s in branch.segments if isinstance(s, ImageSegment)]
        if name in ("no_text", "uncond"):
            assert _texts(branch) == []
        if name == "no_last_text":  # the prompt's tail after [img2] and the model's words go
            assert _texts(branch) == prompt[:2] and len(images) == 2
        if name == "no_image":
            assert _texts(branch) == prompt + [written] and images == []
    for name, branch in second.items():
        images = [s for s in branch.segments if isinstance(s, ImageSegment)]
        if name in ("no_text", "uncond"):
            assert _texts(branch) == []
        if name == "no_last_text":  # only the text since the drawn image goes; it stays a condition
            assert _texts(branch) == prompt + [written] and len(images) == 3
        if name == "no_image":
            assert _texts(branch) == prompt + [written, "Then it moves."] and images == []
