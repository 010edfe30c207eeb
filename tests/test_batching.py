"""Batching across requests through the Runtime protocol: mot's `denoise_batch` /
`append_text_batch` give each request what its own call gives; concurrent generations through a
`BatchingRuntime` equal the same generations alone (with guidance branches too); a family without
a batched path (`OneByOne`, or a plugin runtime without the methods) is served one by one,
bitwise as alone."""

import copy
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tapestry.document import Document, ImageSegment, TextSegment
from tapestry.infer.batching import BatchingRuntime, with_step_batching
from tapestry.infer.engine import Engine, GenerationOptions
from tapestry.infer.pipeline import Pipeline
from tapestry.models.family import OneByOne

PROMPTS = ["A small red striped square sits in the centre, on a flat navy background.",
           "Build a column of three small orange dotted circles down the left side, one at a time from top "
           "to bottom, on a flat charcoal background.",
           "A tiny white dotted triangle is in the upper-left corner.",
           "Put a big green star on the right, then a little yellow heart on the left."]


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline.from_pretrained("default")


def _open(runtime, tok, doc):
    ctx = runtime.prefill(doc)
    runtime.append_text(ctx, [tok.boi_id])
    runtime.begin_image(ctx)
    return ctx


def test_mot_denoise_batch_equals_each_request_alone(pipeline):
    runtime, tok = pipeline.engine.runtime, pipeline.engine.tokenizer
    with torch.inference_mode():
        conds = [_open(runtime, tok, pipeline.document(p)) for p in PROMPTS]  # contexts of 4 lengths
        uncond = _open(runtime, tok, Document("u", []))
        assert len({c.cache.length for c in conds}) > 1
        items = [({"cond": conds[0]}, runtime.noise((64, 64), torch.Generator().manual_seed(0)), torch.tensor(0.9)),
                 ({"cond": conds[1], "uncond": uncond}, runtime.noise((64, 64), torch.Generator().manual_seed(1)),
                  torch.tensor(0.5)),
                 ({"cond": conds[2]}, runtime.noise((32, 64), torch.Generator().manual_seed(2)), torch.tensor(0.3)),
                 ({"cond": conds[3], "uncond": uncond}, runtime.noise((64, 64), torch.Generator().manual_seed(3)),
                  torch.tensor(0.1))]
        batched = runtime.denoise_batch(items)
        again = runtime.denoise_batch(items)  # the padded cache is reused for the next step
        for item, got, got_again in zip(items, batched, again):
            alone = runtime.denoise(*item)
            assert got.keys() == alone.keys()
            for name in alone:
                assert got[name].shape == alone[name].shape == item[1].shape
                torch.testing.assert_close(got[name], alone[name], rtol=1e-5, atol=1e-5)
                assert torch.equal(got[name], got_again[name])
        # the two requests' branches really differ: each row read its own cache
        assert not torch.allclose(batched[1]["cond"], batched[1]["uncond"])


def _assert_same_cache(runtime, a, b):
    for ka, kb, va, vb in zip(a.cache.keys, b.cache.keys, a.cache.values, b.cache.values):
        torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runtime.next_text(a), runtime.next_text(b), rtol=1e-4, atol=1e-4)


def _assert_next_steps_match(runtime, tok, alone, together):
    """Each cache was cut back to its own tokens: the next step alone still matches."""
    for ctx in alone + together:
        runtime.append_text(ctx, [tok.boi_id])
    for a, b in zip(alone, together):
        torch.testing.assert_close(runtime.next_text(a), runtime.next_text(b), rtol=1e-4, atol=1e-4)


def test_mot_append_text_batch_equals_each_request_alone(pipeline):
    runtime, tok = pipeline.engine.runtime, pipeline.engine.tokenizer
    with torch.inference_mode():
        contexts = [runtime.prefill(pipeline.document(p)) for p in PROMPTS]
        alone, together = copy.deepcopy(contexts), copy.deepcopy(contexts)
        steps = [[5], [17], [101], [250, 251]]  # three of one length batch; the two-token step runs alone
        for ctx, ids in zip(alone, steps):
            runtime.append_text(ctx, ids)
        runtime.append_text_batch(list(zip(together, steps)))
        for a, b in zip(alone, together):
            assert a.cache.length == b.cache.length and a.next_position == b.next_position
            assert a.length == b.length
            _assert_same_cache(runtime, a, b)
        _assert_next_steps_match(runtime, tok, alone, together)


def test_mot_append_image_batch_equals_each_request_alone(pipeline):
    runtime, tok = pipeline.engine.runtime, pipeline.engine.tokenizer
    drawn = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8))
             for i in range(4)]
    with torch.inference_mode():
        contexts = [_open(runtime, tok, pipeline.document(p)) for p in PROMPTS]  # caches of 4 lengths
        contexts.append(runtime.prefill(pipeline.document(PROMPTS[0])))  # a given image: no begin_image
        images = drawn + [drawn[0]]
        roles = ["target"] * 4 + ["context"]
        alone, together = copy.deepcopy(contexts), copy.deepcopy(contexts)
        for ctx, image, role in zip(alone, images, roles):
            runtime.append_image(ctx, image, role)
        encoded = [runtime.encode_image(ctx, image, role) for ctx, image, role in zip(together, images, roles)]
        assert all(a.cache.length == b.cache.length for a, b in zip(contexts, together))  # encoding changes nothing
        runtime.append_image_batch(list(zip(together, images, roles, encoded)))
        for a, b in zip(alone, together):
            assert a.cache.length == b.cache.length and a.next_position == b.next_position
            assert a.image_position is None and b.image_position is None
            assert [(x.mode, x.positions.tolist(), x.expert.tolist()) for x in a.blocks] == \
                [(x.mode, x.positions.tolist(), x.expert.tolist()) for x in b.blocks]
            _assert_same_cache(runtime, a, b)
        _assert_next_steps_match(runtime, tok, alone, together)


def _concurrently(batched_pipeline, batcher, jobs):
    results = [None] * len(jobs)
    errors = []

    def run(i):
        try:
            with batcher.session():
                results[i] = batched_pipeline.generate(jobs[i][0], **jobs[i][1])
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


class _MeetAfterPrefill:
    """The wrapped runtime, except that each generation's first `next_text` (the engine's first
    call after its prefill, between two batched calls) waits until every generation made it.

    Prefills run one at a time, so without this the first generation out finds the others busy
    and runs its steps alone in a free lane, and whether steps ever meet after that is up to the
    scheduler (on a loaded CI machine 65 of 66 batch calls held one step). Here every
    generation's first step is pending before any batch starts, so the first batch holds the
    steps of all generations not busy apart (at least the two unguided ones) and, with both
    lanes free, is split; what follows runs as the scheduler has it."""

    def __init__(self, runtime, generations: int):
        self._runtime = runtime
        self._all_prefilled = threading.Barrier(generations, timeout=60)
        self._local = threading.local()

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def next_text(self, context):
        if not getattr(self._local, "met", False):
            self._local.met = True
            self._all_prefilled.wait()
        return self._runtime.next_text(context)


def test_concurrent_generations_with_guidance_equal_alone(pipeline):
    jobs = [(PROMPTS[i], {"seed": 3 + i, "steps": 3, "guidance": "cfg" if i % 2 else "none",
                          "guidance_scales": {"scale": 2.0} if i % 2 else {}}) for i in range(len(PROMPTS))]
    alone = [pipeline.generate(p, **o) for p, o in jobs]
    # a wait long enough that the first batch never starts without a generation between calls
    batched, batcher = with_step_batching(pipeline, max_wait_s=60.0)
    assert isinstance(batched.engine.runtime, BatchingRuntime) and pipeline.engine.runtime is batcher.runtime
    batcher.runtime = _MeetAfterPrefill(batcher.runtime, len(jobs))
    together = _concurrently(batched, batcher, jobs)
    assert batcher.stats.timeouts == 0
    assert batcher.stats.rows > batcher.stats.forwards  # steps of several requests shared calls
    assert max(batcher.stats.sizes) >= 2
    assert batcher.stats.splits > 0  # and batches ran in two halves, one per lane
    _assert_like_alone(alone, together)


def _assert_like_alone(alone, together):
    for want, got in zip(alone, together, strict=True):
        assert [s.text for s in got.segments if s.type == "text"] == [s.text for s in want.segments if s.type == "text"]
        images = [(a.image, b.image) for a, b in zip(want.segments, got.segments) if a.type == "image"]
        assert images and len(got.segments) == len(want.segments)
        for a, b in images:
            a, b = np.asarray(a, dtype=int), np.asarray(b, dtype=int)
            # a batched matmul rounds differently in the last float bit; through uint8 that is at
            # most one grey level on a few pixels
            assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


def test_finished_images_joining_through_the_batched_steps_equal_alone(pipeline):
    # the join forward goes to the batched steps when others wait their turn apart: here always
    jobs = [(PROMPTS[i], {"seed": 5 + i, "steps": 3, "guidance": "cfg" if i % 2 else "none"}) for i in range(4)]
    alone = [pipeline.generate(p, **o) for p, o in jobs]
    batched, batcher = with_step_batching(pipeline, max_wait_s=0.05)
    batcher._room_apart = lambda: False
    together = _concurrently(batched, batcher, jobs)
    drawn = sum(s.type == "image" for doc in together for s in doc.segments)
    assert batcher.stats.kinds["image"] == drawn >= len(jobs)
    _assert_like_alone(alone, together)


def test_every_batch_starts_when_complete_never_by_waiting(pipeline):
    """Whoever completes a batch — the last step to join, a generation going busy or ending —
    starts it: with a wait of a minute, no batch ever waits it out (a missed wake-up would)."""
    jobs = [(PROMPTS[i], {"seed": 7 + i, "steps": 3}) for i in range(3)]
    batched, batcher = with_step_batching(pipeline, max_wait_s=60.0)
    _concurrently(batched, batcher, jobs)
    assert batcher.stats.forwards > 0 and batcher.stats.timeouts == 0


@pytest.mark.parametrize("how", ["goes busy", "ends"])
def test_a_generation_that_stops_being_waited_for_starts_the_others_batch(how):
    """A step waits for the generations between two calls; when the last of them goes busy (a
    decode) or ends, the waiting step runs at once, not when the wait runs out."""

    class Stub:  # only what the two calls below need; the batch methods fall back to one by one
        release = threading.Event()

        def denoise(self, contexts, x, t, batched=True):
            return {"cond": x}

        def decode(self, x, size):
            self.release.wait(30)
            return x

    stub = Stub()
    batcher = BatchingRuntime(stub, max_wait_s=60.0)
    b_inside, a_done = threading.Event(), threading.Event()

    def a():
        with batcher.session():
            b_inside.wait(10)
            batcher.denoise({"cond": None}, torch.zeros(1), torch.tensor(0.5))
        a_done.set()

    def b():
        with batcher.session():
            b_inside.set()
            while not batcher._pending:  # a's step waits for this generation
                time.sleep(0.01)
            if how == "goes busy":
                batcher.decode(torch.zeros(1), (1, 1))

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    try:
        assert a_done.wait(20), "the waiting step ran only when its wait ran out"
    finally:
        stub.release.set()
        for t in threads:
            t.join()
    assert batcher.stats.timeouts == 0 and batcher.stats.rows == 1


@pytest.mark.parametrize("lanes", [1, 2])
def test_two_lanes_run_the_halves_of_a_batch_at_once(lanes):
    """With two lanes a complete batch is split in two halves that run at the same time, in two
    threads (one per core); with one lane it runs whole. Each step gets its own answer."""

    class Stub:
        calls: list[int] = []
        both_inside = threading.Barrier(2, timeout=10)

        def denoise_batch(self, items, batched=True):
            self.calls.append(len(items))
            if lanes == 2:
                self.both_inside.wait()  # broken (an error in the steps) unless the halves overlap
            return [{"cond": x} for _, x, _ in items]

    batcher = BatchingRuntime(Stub(), max_wait_s=60.0, lanes=lanes)
    inside = threading.Barrier(4, timeout=10)
    out = [None] * 4

    def run(i):
        with batcher.session():
            inside.wait()  # all four live before any step, so the first batch is complete at four
            out[i] = batcher.denoise({"cond": None}, torch.full((1,), float(i)), torch.tensor(0.5))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [o["cond"].item() for o in out] == [0, 1, 2, 3]
    assert sorted(Stub.calls) == ([2, 2] if lanes == 2 else [4])
    assert batcher.stats.splits == (lanes == 2) and batcher.stats.timeouts == 0


# ------------------------------------------------------------------ families without a batched path
class _Plugin:
    """A runtime written before the batch methods existed: everything but them."""

    def __init__(self, runtime):
        self._runtime = runtime

    def __getattr__(self, name):
        if name in ("append_text_batch", "denoise_batch"):
            raise AttributeError(name)
        return getattr(self._runtime, name)


@pytest.mark.parametrize("lanes", [1, 2])
@pytest.mark.parametrize("plugin", [False, True])
def test_one_by_one_families_serve_concurrent_requests_bitwise_as_alone(plugin, lanes):
    from test_models_mmi import image, layout_of, tiny_config, tiny_vae

    from tapestry.models.common.tokenizer import train_bpe
    from tapestry.models.mmi.family import MMIRuntime
    from tapestry.models.mmi.model import MMIModel

    tok = train_bpe(["a red circle", "a blue square", "then", "the cat sat on the mat", "draw it"] * 20,
                    vocab_size=300)
    torch.manual_seed(0)
    model = MMIModel(tiny_config(tok)).eval()
    runtime = MMIRuntime(model, tok, tiny_vae(), layout_of(model.config))
    assert MMIRuntime.denoise_batch is OneByOne.denoise_batch
    engine = Engine(runtime)
    docs = [Document(f"d{i}", [TextSegment(["a red circle", "then", "draw it"][i]),
                               ImageSegment(role="context", image=image(i)), TextSegment("then"),
                               ImageSegment(role="target")]) for i in range(3)]
    options = [GenerationOptions(steps=2, guidance="cfg", seed=i) for i in range(3)]
    alone = [engine.generate(d, o) for d, o in zip(docs, options)]
    batcher = BatchingRuntime(_Plugin(runtime) if plugin else runtime, max_wait_s=0.05, lanes=lanes)
    batched = Engine(batcher)
    out = [None] * 3

    def run(i):
        with batcher.session():
            out[i] = batched.generate(docs[i], options[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if lanes == 1:  # (with two, a lone step may run at once in the free lane: nothing to meet)
        assert batcher.stats.rows > batcher.stats.forwards  # the steps met; the family ran them one by one
    for want, got in zip(alone, out):
        assert got.segments[3].image.tobytes() == want.segments[3].image.tobytes()
