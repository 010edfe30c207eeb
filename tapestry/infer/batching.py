"""Step batching across concurrent generations: the engine's branch batching extended to requests.

Each generation runs in its own thread, exactly as it would alone (`Engine.stream`), on its own
contexts. Their engines drive one `BatchingRuntime` standing in for the family's `Runtime`
(tapestry/models/family.py). The per-step calls of threads inside `session()` — a text step
(`append_text`), a denoising step (`denoise`) — meet there: once every live generation has a step
pending, one of the threads hands them all to the family at once, the text steps through
`append_text_batch` and the denoising steps through `denoise_batch`. The family runs what its
shapes allow as one forward (mot: caches right-padded into one batch, padding masked, then cut
back per request) and gives each generation its own answer; the threads go on.

A finished image joining its context is split in two where the family allows it
(`encode_image`, then `append_image_batch`). The encoders' convolutions (ViT, VAE encode) run
apart, like a decode: they cost about as much per image at batch 16 as alone. The forward that
adds the image's tokens to the cache (and its end marker's step) goes where there is room: right
after the encoders when no other generation waits for its turn apart, else to the batched steps,
where the images that several generations finish together join in one forward. (mot, profiled
on the default checkpoint: those two forwards were 8.6 ms of the ~32 ms a finished image cost
apart; decode and encoders the other 23. Images seldom finish at the same step, so the gain is
mostly in sharing that load between the two lanes, not in batching it.)

The other calls (a prefill, decoding an image, the encoders above, a family's whole
`append_image` when it does not split it) run in their own thread as they would alone, one at a
time (next to the batched step that runs meanwhile): sixteen of them at once fought over the GIL
and made a 3.5 ms prefill take 70 ms (profiled on the default checkpoint). While one runs or
waits its turn, its generation is "busy" and the others do not wait for it.
If a generation is neither pending nor busy (between two calls, in the engine's own code) the
others wait for it at most `max_wait_s` after the last step joined, then run without it. A
batch starts once complete: the step that completes it starts it in its own thread, and a
generation that goes busy or ends wakes the waiting threads only when that completes theirs.

Two batches may run at once (`lanes = 2`, one per core). When both lanes are free, a complete
batch is split in two halves (of one step kind each where the counts allow), and a thread of the
second half runs it; when one lane is busy, the steps of the generations outside it form the next
batch in the other. Steps inside a running batch count like busy ones: the others do not wait for
them. At the default's size a denoising forward is already bound by its matmuls at one request,
so what a batch of sixteen saves over two of eight is small, while a single lane left the second
core to the calls apart (docs/serve.md has the profile).

Why threads and not a rewritten engine loop: the engine stays one readable generator per
document, the family keeps its contexts, and a step that has no partner runs as it would alone.
A family without a batched path (`OneByOne`) still serves concurrent requests correctly.
"""

from __future__ import annotations

import copy
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tapestry.models.family import OneByOne


@dataclass(eq=False)
class _Step:
    kind: str  # "text" | "denoise" | "image"
    args: tuple  # text: (context, ids); denoise: (contexts, x, t, batched); image: (context, image, role, encoded)
    result: Any = None
    error: BaseException | None = None
    done: bool = False
    hand: "list[_Step] | None" = None  # a batch this step's thread is asked to run (in the other lane)


@dataclass
class BatchStats:
    forwards: int = 0  # batch calls handed to the family (one or more forwards each)
    rows: int = 0  # the steps they served
    sizes: dict[int, int] = field(default_factory=dict)  # steps per batch call -> how often
    kinds: dict[str, int] = field(default_factory=dict)  # step kind (text, denoise, image) -> steps served
    timeouts: int = 0  # batches started when the wait ran out, without a generation between calls
    splits: int = 0  # batches split in two, one half per lane


class BatchingRuntime:
    """A `Runtime` that batches the steps of concurrent generations (see the module docstring);
    every other attribute is the wrapped runtime's.

    Only threads inside `session()` take part; any other caller runs the runtime directly.
    """

    def __init__(self, runtime, max_wait_s: float = 0.02, lanes: int = 2):
        if lanes not in (1, 2):
            raise ValueError(f"lanes must be 1 or 2, got {lanes}")
        self.runtime = runtime
        self.max_wait_s = max_wait_s
        self.lanes = lanes
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._active = 0  # live sessions
        self._busy = 0  # of those, inside a call that is not batched (prefill, decode, ...)
        self._queued = 0  # of those, waiting for their turn at such a call
        self._pending: list[_Step] = []
        self._last_join = 0.0
        self._running = 0  # batches running (at most `lanes`)
        self._in_flight = 0  # steps inside them: their generations are not waited for either
        self._local = threading.local()
        self._solo = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self.__dict__["runtime"], name)

    @property
    def active(self) -> int:
        return self._active

    def _member(self) -> bool:
        return getattr(self._local, "member", False)

    @contextmanager
    def session(self):
        """One generation's thread joins the batch for the duration of the block."""
        with self._cond:
            self._active += 1
        self._local.member = True
        try:
            yield self
        finally:
            self._local.member = False
            with self._cond:
                self._active -= 1
                self._wake_if_ready()

    @contextmanager
    def _alone(self):
        """A call that runs in its own thread: the others need not wait for this generation."""
        if not self._member():
            yield
            return
        with self._cond:
            self._busy += 1
            self._queued += 1
            self._wake_if_ready()
        try:
            with self._solo:
                with self._cond:
                    self._queued -= 1
                yield
        finally:
            with self._cond:
                self._busy -= 1

    def _wake_if_ready(self) -> None:
        """(Holding the condition.) One generation fewer to wait for: wake the waiters if the
        steps pending now make a batch."""
        if self._pending and self._running < self.lanes and self._complete():
            self._cond.notify_all()

    def _complete(self) -> bool:
        """(Holding the condition.) Whether the pending steps are every generation's that could
        join now: the others are busy apart or have a step in a running batch."""
        return len(self._pending) >= self._active - self._busy - self._in_flight

    # -------------------------------------------------------------- the Runtime protocol
    def prefill(self, doc, recompute: bool = False):
        with self._alone():
            return self.runtime.prefill(doc, recompute)

    def append_image(self, context, image, role: str) -> None:
        if not self._member() or not self._joins_images_in_batches():
            with self._alone():
                self.runtime.append_image(context, image, role)
            return
        with self._alone():  # the encoders' convolutions: apart, next to the batched steps
            encoded = self.runtime.encode_image(context, image, role)
            if self._room_apart():
                self.runtime.append_image_batch([(context, image, role, encoded)])
                return
        self._step(_Step("image", (context, image, role, encoded)))

    def _room_apart(self) -> bool:
        """Whether a finished image's join forward may run apart, right after its encoders:
        when no other generation waits for its turn there."""
        return not self._queued

    def decode(self, x, size):
        with self._alone():
            return self.runtime.decode(x, size)

    def begin_image(self, context) -> None:
        self.runtime.begin_image(context)

    def next_text(self, context):
        return self.runtime.next_text(context)

    def noise(self, size, generator):
        return self.runtime.noise(size, generator)

    def append_text(self, context, ids: list[int]) -> None:
        if not self._member():
            return self.runtime.append_text(context, ids)
        self._step(_Step("text", (context, list(ids))))

    def denoise(self, contexts, x, t, batched: bool = True):
        if not self._member():
            return self.runtime.denoise(contexts, x, t, batched)
        return self._step(_Step("denoise", (contexts, x, t, batched)))

    def append_text_batch(self, items) -> None:
        self._batch_method("append_text_batch")(items)

    def denoise_batch(self, items, batched: bool = True):
        return self._batch_method("denoise_batch")(items, batched)

    def _joins_images_in_batches(self) -> bool:
        """Whether the family splits `append_image` into `encode_image` and `append_image_batch`
        (optional: without them a finished image joins in its own thread, as it would alone)."""
        return all(callable(getattr(self.runtime, name, None)) for name in ("encode_image", "append_image_batch"))

    # ------------------------------------------------------------------- the gathering
    def _step(self, step: _Step):
        batch = None
        with self._cond:
            self._pending.append(step)
            self._last_join = time.monotonic()
            # No wake-up here: the step that completes the batch is seen by its own thread just
            # below, and a waiter's deadline only moves later. (Waking every waiter at every
            # join made 4.7 wake-ups per step at ~10 live generations, each taking the GIL for
            # nothing; 1.2 without, measured on the default checkpoint.)
            while not step.done:
                if step.hand is not None:  # the thread that started a split batch gave us half
                    batch, step.hand = step.hand, None
                    break
                deadline = self._last_join + self.max_wait_s
                now = time.monotonic()
                free = self._running < self.lanes
                if free and step in self._pending:
                    complete = self._complete()
                    if complete or now >= deadline:
                        self.stats.timeouts += not complete
                        batch = self._start(step)
                        break
                self._cond.wait(timeout=max(deadline - now, 0.001) if free else None)
        if batch is not None:
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._running -= 1
                    self._in_flight -= len(batch)
                    self._cond.notify_all()
        if step.error is not None:
            raise step.error
        return step.result

    def _start(self, step: _Step) -> list[_Step]:
        """(Holding the condition.) Take every pending step as a batch; returns the part that
        `step`'s thread runs. When both lanes are free the batch is split in two halves of one
        kind each where it can be, and a thread of the other half runs it, on the other core.

        Why split: at the default's size a denoising forward is bound by its matmuls already at
        one request (two branches, 32 tokens: about 44 GFLOP/s in its linear layers on one core,
        53 at sixteen), so one batch of sixteen gains little over sixteen forwards, while the
        second core would idle. Two halves of eight, one per core, cost 1.45 ms per request-step
        each instead of 1.87 in one forward of sixteen (profiled on the default checkpoint)."""
        batch, self._pending = self._pending, []
        parts = [batch]
        if self.lanes - self._running >= 2 and len(batch) >= 2:
            batch = sorted(batch, key=lambda s: s.kind)  # halves of one kind where the counts allow
            half = (len(batch) + 1) // 2
            parts = [batch[:half], batch[half:]]
            if step not in parts[0]:
                parts.reverse()
            parts[1][0].hand = parts[1]
            self.stats.splits += 1
            self._cond.notify_all()
        self._running += len(parts)
        self._in_flight += sum(len(p) for p in parts)
        return parts[0]

    def _batch_method(self, name: str):
        """The family's batch method; a runtime written before the batch methods existed (a
        plugin) gets `OneByOne`'s: its requests run one by one, as they would alone."""
        method = getattr(self.runtime, name, None)
        return method if method is not None else getattr(OneByOne, name).__get__(self.runtime)

    def _run(self, batch: list[_Step]) -> None:
        groups: dict[tuple, list[_Step]] = {}
        for step in batch:
            groups.setdefault((step.kind, step.args[3]) if step.kind == "denoise" else (step.kind,), []).append(step)
        for key, group in groups.items():
            try:
                if key[0] == "text":
                    self._batch_method("append_text_batch")([s.args for s in group])
                elif key[0] == "image":
                    self.runtime.append_image_batch([s.args for s in group])
                else:
                    results = self._batch_method("denoise_batch")([s.args[:3] for s in group], key[1])
                    for s, r in zip(group, results, strict=True):
                        s.result = r
                self.stats.forwards += 1
                self.stats.rows += len(group)
                self.stats.sizes[len(group)] = self.stats.sizes.get(len(group), 0) + 1
                self.stats.kinds[key[0]] = self.stats.kinds.get(key[0], 0) + len(group)
            except BaseException as e:  # noqa: BLE001 - handed to each waiting thread, raised there
                for s in group:
                    s.error = e
            finally:
                for s in group:
                    s.done = True


def with_step_batching(pipeline, max_wait_s: float = 0.02, lanes: int = 2):
    """A copy of `pipeline` whose engine drives a new `BatchingRuntime` over its runtime.

    Returns (pipeline, batching runtime). Generations that should batch together each run in
    their own thread inside `with batcher.session():`; the original pipeline is left as it was.
    """
    batcher = BatchingRuntime(pipeline.engine.runtime, max_wait_s, lanes)
    engine = copy.copy(pipeline.engine)
    engine.runtime = batcher
    out = copy.copy(pipeline)
    out.engine = engine
    return out, batcher
