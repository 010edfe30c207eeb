"""The one function every executor runs per input, in whatever process it lands in.

A `Job` is plain data (picklable, small); the worker builds the pipeline and the provider from
it once per process and reuses them. Whatever goes wrong inside a pipeline ends as a failed
`InputResult` naming the error: one bad input never takes a run down.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Any

from tapestry.data.operators.base import Rejection
from tapestry.data.records import InputItem, InputResult


@dataclass(frozen=True)
class Job:
    pipeline: str
    config: dict[str, Any]  # the pipeline config as a dict (rebuilt in the worker)
    provider: Any  # ProviderConfig
    cache_dir: str | None
    budget_ledger: str | None
    item: InputItem


_BUILT: dict[tuple, tuple[Any, Any]] = {}


def configure_process(limit_threads: bool) -> None:
    """Prepares a process to run jobs. In a dedicated worker process (`limit_threads`) every
    library gets one thread, because the executor already runs one process per core (more threads
    would only fight over the cores). The inline executor runs jobs in the caller's process, whose
    settings (and the environment its children inherit) are not ours to change."""
    if limit_threads:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        try:
            import cv2

            cv2.setNumThreads(1)
        except ImportError:  # pragma: no cover - cv2 is a dependency of the video engine
            pass
    import tapestry.data.operators.vlm  # noqa: F401 - registers the offline responders


def _built(job: Job) -> tuple[Any, Any]:
    from tapestry.data.pipelines import build_pipeline, pipeline_class
    from tapestry.data.pipelines import config as config_io
    from tapestry.data.providers import make_provider

    key = (job.pipeline, repr(sorted(job.config.items())), job.provider, job.cache_dir, job.budget_ledger)
    if key not in _BUILT:
        configure_process(limit_threads=False)
        config = config_io.from_dict(pipeline_class(job.pipeline).config_class, job.config)
        _BUILT[key] = (build_pipeline(job.pipeline, config),
                       make_provider(job.provider, job.cache_dir, job.budget_ledger))
    return _BUILT[key]


def keep_valid(result: InputResult) -> InputResult:
    """Documents that fail validation become rejections here, in the worker, so the driver
    never meets an invalid Document when it writes a shard (DESIGN §13: never half-written)."""
    valid = []
    for doc in result.docs:
        problems = doc.validate()
        if problems:
            result.rejections.append(Rejection("document", "invalid", "; ".join(p.reason for p in problems)[:500],
                                               record=doc.id, failure=True))
        else:
            valid.append(doc)
    result.docs = valid
    return result


def run_job(job: Job) -> InputResult:
    try:
        pipeline, provider = _built(job)
        provider.take_usage()
        result = pipeline.process(job.item, provider)
        result.usage = provider.take_usage()
        return keep_valid(result)
    except Exception as e:  # noqa: BLE001 - the edge of a worker: report, never crash the run
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        at = f" at {os.path.basename(where.filename)}:{where.lineno}" if where else ""
        return InputResult(job.item.key, job.item.shown, failed=True, rejections=[
            Rejection("internal", "error", f"{type(e).__name__}: {e}{at}", failure=True)])
