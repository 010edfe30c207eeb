"""The scheduler: a bounded queue in front of a fixed set of generation threads.

Up to `max_batch` generations run at once, each in its own thread on its own KV cache; with
batching on, their decoder forwards meet in one `StepBatcher` and run as one batched forward per
step. Up to `max_queue` more wait; beyond that a request is refused (429) before any work.
A job's events go to its asyncio queue as they happen; cancelling a job (client gone, timeout,
shutdown) stops its generation at the next event — within one denoising step or text token —
and the generator is closed so its caches are freed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tapestry.errors import TapestryError
from tapestry.infer.batching import with_step_batching
from tapestry.infer.events import Done, Error

log = logging.getLogger("tapestry.serve")
_FINISHED = object()


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass(eq=False)
class Job:
    doc: Any  # tapestry.document.Document
    options: dict
    loop: asyncio.AbstractEventLoop
    request_id: str = ""
    preview_steps: frozenset = frozenset()  # 1-based steps whose image_progress carries a preview
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    outcome: str = "queued"  # queued | running | done | error | cancelled
    steps_run: int = 0

    def cancel(self) -> None:
        self.cancelled.set()

    def _emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancel()

    async def next(self):
        """The next event, or None once the job has finished (after its last event)."""
        item = await self.events.get()
        return None if item is _FINISHED else item


class Scheduler:
    def __init__(self, pipeline, max_batch: int = 16, max_queue: int = 64, batching: bool = True,
                 metrics=None, max_wait_s: float = 0.02):
        self.base = pipeline
        self.batching = batching and max_batch > 1
        if self.batching:
            self.pipeline, self.batcher = with_step_batching(pipeline, max_wait_s)
        else:
            self.pipeline, self.batcher = pipeline, None
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.closed = False
        self.finished: dict[str, int] = {}  # outcome -> count
        self._running_jobs: set[Job] = set()
        self._threads = [threading.Thread(target=self._worker, name=f"tapestry-gen-{i}", daemon=True)
                         for i in range(max_batch if self.batching else 1)]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ admission
    def submit(self, jobs: list[Job]) -> None:
        """Admit all of `jobs` or none (QueueFull): a request's images are never half-served."""
        with self._lock:
            if self.closed:
                raise ShuttingDown()
            if self.waiting + self.running + len(jobs) > len(self._threads) + self.max_queue:
                raise QueueFull()
            self.waiting += len(jobs)
        self._gauges()
        for job in jobs:
            self._jobs.put(job)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_length.set(self.waiting)
            self.metrics.active.set(self.running)

    # -------------------------------------------------------------------- workers
    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self.waiting -= 1
                self.running += 1
                self._running_jobs.add(job)
            self._gauges()
            try:
                self._run(job)
            finally:
                with self._lock:
                    self.running -= 1
                    self._running_jobs.discard(job)
                    self.finished[job.outcome] = self.finished.get(job.outcome, 0) + 1
                self._gauges()
                job._emit(_FINISHED)

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            job.outcome = "cancelled"
            return
        job.started = time.perf_counter()
        job.outcome = "running"
        stream = self.pipeline.stream(job.doc, **job.options)
        session = self.batcher.session() if self.batcher is not None else _nothing()
        size = None  # (height, width) of the image being drawn
        try:
            with session:
                for event in stream:
                    if job.cancelled.is_set():
                        job.outcome = "cancelled"
                        return
                    if event.type == "image_started":
                        size = (event.height, event.width)
                    if event.type == "image_progress":
                        job.steps_run += 1
                        event.preview = None  # a low-resolution look at the image, when asked for
                        if event.step in job.preview_steps and event.latents is not None:
                            event.preview = self.pipeline.decode_latents(event.latents, size)
                    job._emit(event)
                    if isinstance(event, Done):
                        job.outcome = "done"
        except TapestryError as e:
            job.outcome = "error"
            job._emit(Error(str(e)))
        except Exception as e:  # noqa: BLE001 - the edge: one error event, the traceback in the log
            log.exception("generation failed (request %s)", job.request_id)
            job.outcome = "error"
            job._emit(Error(f"internal error: {type(e).__name__}: {e}"))
        finally:
            stream.close()  # frees the generation's caches even when it stopped early

    # ------------------------------------------------------------------- shutdown
    def close(self, grace_s: float = 10.0) -> None:
        """Refuse new work, cancel what has not started, let running work finish for `grace_s`,
        then cancel it too."""
        with self._lock:
            self.closed = True
        pending = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                pending.append(job)
        for job in pending:
            self._jobs.put(job)  # workers see them cancelled and answer them
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self.running or not self._jobs.empty()):
            time.sleep(0.02)
        with self._lock:
            running = list(self._running_jobs)
        for job in running:
            job.cancel()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=5)

    def stats(self) -> dict:
        batch = self.batcher.stats if self.batcher is not None else None
        return {"waiting": self.waiting, "running": self.running, "finished": dict(self.finished),
                "batched_forwards": batch.forwards if batch else 0, "batched_rows": batch.rows if batch else 0}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_ids = itertools.count(1)


def request_id() -> str:
    return f"req-{int(time.time()):x}-{next(_ids)}"
