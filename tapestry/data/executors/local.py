"""The local executor: a pool of worker processes on this machine (one per core by default).

Results come back in completion order; the engine puts them back in input order. A few jobs
per worker are in flight at once, so memory holds only a handful of finished inputs. A worker
that dies (a crash inside a native decoder, say) breaks the pool: it is rebuilt, the jobs that
were in flight are tried again, and a job in flight at two crashes is reported as failed.
"""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Iterator

from tapestry.data.executors.worker import Job, configure_process, run_job
from tapestry.data.operators.base import Rejection
from tapestry.data.records import InputResult

MAX_CRASHES = 2


class LocalExecutor:
    name = "local"

    def __init__(self, workers: int = 2, jobs_per_worker: int = 2):
        self.workers = max(1, workers)
        self.in_flight = self.workers * max(1, jobs_per_worker)
        self._pool: ProcessPoolExecutor | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        # forkserver: workers fork from a clean server process, never from this one (which may
        # hold threads: the progress bar, a provider's pool), with the heavy modules preloaded.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["tapestry.data.executors.worker", "tapestry.data.pipelines",
                                        "scenedetect.detectors", "numpy", "cv2", "av"])
        return ProcessPoolExecutor(self.workers, mp_context=context, initializer=pool_worker_setup)

    def map(self, jobs: list[Job]) -> Iterator[tuple[int, InputResult]]:
        if self.workers == 1:
            configure_process(limit_threads=False)
            for index, job in enumerate(jobs):
                yield index, run_job(job)
            return
        pending = list(range(len(jobs)))[::-1]  # a stack: pop() takes the next in order
        crashes: dict[int, int] = {}
        running: dict[Future, int] = {}
        self._pool = self._new_pool()
        completed = False
        try:
            while pending or running:
                while pending and len(running) < self.in_flight:
                    index = pending.pop()
                    running[self._pool.submit(run_job, jobs[index])] = index
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                broken = False
                for future in done:
                    index = running.pop(future)
                    try:
                        yield index, future.result()
                    except BrokenProcessPool:
                        broken = True
                        crashes[index] = crashes.get(index, 0) + 1
                        if crashes[index] >= MAX_CRASHES:
                            yield index, _crashed(jobs[index])
                        else:
                            pending.append(index)
                if broken:
                    for index in running.values():  # every other job in flight died too
                        crashes[index] = crashes.get(index, 0) + 1
                        if crashes[index] >= MAX_CRASHES:
                            yield index, _crashed(jobs[index])
                        else:
                            pending.append(index)
                    running.clear()
                    pending.sort(reverse=True)
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._new_pool()
            completed = True
        finally:
            self.close(kill=not completed)

    def close(self, kill: bool = False) -> None:
        """Shut the pool down; `kill` (after an interrupt or an early stop) ends the workers at
        once instead of letting them finish inputs whose results nobody will commit."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list(getattr(pool, "_processes", {}).values()) if kill else []
        pool.shutdown(wait=not kill, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=5)


def pool_worker_setup() -> None:
    """Initializer of pool workers: Ctrl-C goes to the driver, which stops the workers itself
    (a worker interrupted mid-input would only report a spurious failure)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_process(limit_threads=True)


def _crashed(job: Job) -> InputResult:
    return InputResult(job.item.key, job.item.shown, failed=True, rejections=[Rejection(
        "internal", "worker-crashed", f"the worker process died {MAX_CRASHES} times while this input was "
        "being processed (a crash in a native library?)", failure=True)])
