"""Executors run jobs (one per input) and yield `(index, InputResult)` in any order:
`local` (a process pool, the default) and `ray` (Ray Data, local or existing cluster)."""

from __future__ import annotations

from typing import Any

from tapestry.data.executors.worker import Job, run_job
from tapestry.errors import TapestryError

EXECUTORS = ("local", "ray")


def make_executor(name: str, workers: int = 2, ray_address: str | None = None) -> Any:
    if name == "local":
        from tapestry.data.executors.local import LocalExecutor

        return LocalExecutor(workers)
    if name == "ray":
        from tapestry.data.executors.ray import RayExecutor

        return RayExecutor(workers, ray_address)
    raise TapestryError(f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})")


__all__ = ["Job", "run_job", "make_executor", "EXECUTORS"]
