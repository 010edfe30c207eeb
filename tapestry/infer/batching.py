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


@dataclass
class BatchStats:
    forwards: int = 0  # batch calls handed to the family (one or more forwards each)
    rows: int = 0  # the steps they served
    sizes: dict[int, int] = field(default_factory=dict)  # steps per batch call -> how often
    kinds: dict[str, int] = field(default_factory=dict)  # step kind (text, denoise, image) -> steps served
    timeouts: int = 0  # batches started when the wait ran out, without a generation between calls


class BatchingRuntime:
    """A `Runtime` that batches the steps of concurrent generations (see the module docstring);
    every other attribute is the wrapped runtime's.

    Only threads inside `session()` take part; any other caller runs the runtime directly.
    """

    def __init__(self, runtime, max_wait_s: float = 0.02):
        self.runtime = runtime
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._active = 0  # live sessions
        self._busy = 0  # of those, inside a call that is not batched (prefill, decode, ...)
        self._queued = 0  # of those, waiting for their turn at such a call
        self._pending: list[_Step] = []
        self._last_join = 0.0
        self._running = False
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
        if self._pending and not self._running and len(self._pending) >= self._active - self._busy:
            self._cond.notify_all()

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
                deadline = self._last_join + self.max_wait_s
                now = time.monotonic()
                if not self._running and step in self._pending:
                    complete = len(self._pending) >= self._active - self._busy
                    if complete or now >= deadline:
                        self.stats.timeouts += not complete
                        batch, self._pending, self._running = self._pending, [], True
                        break
                self._cond.wait(timeout=max(deadline - now, 0.001) if not self._running else None)
        if batch is not None:
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()
        if step.error is not None:
            raise step.error
        return step.result

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


def with_step_batching(pipeline, max_wait_s: float = 0.02):
    """A copy of `pipeline` whose engine drives a new `BatchingRuntime` over its runtime.

    Returns (pipeline, batching runtime). Generations that should batch together each run in
    their own thread inside `with batcher.session():`; the original pipeline is left as it was.
    """
    batcher = BatchingRuntime(pipeline.engine.runtime, max_wait_s)
    engine = copy.copy(pipeline.engine)
    engine.runtime = batcher
    out = copy.copy(pipeline)
    out.engine = engine
    return out, batcher
