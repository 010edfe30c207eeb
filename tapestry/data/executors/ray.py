"""The Ray executor: the same jobs as the local executor, as a Ray Data `map` over a dataset of
inputs, on a local Ray cluster (started here with `workers` CPUs) or on an existing one
(`address`, e.g. `ray://head:10001` or `auto`).

Each row carries one pickled `Job` and comes back with its pickled `InputResult` (Documents with
their images already encoded), so the driver writes shards and the manifest exactly as with the
local executor: same pipeline code, same order, same shards. On an existing cluster every node
needs tapestry and the input files at the same paths (a shared file system or object storage
mounted alike).
"""

from __future__ import annotations

import logging
import pickle
import socket
import warnings
from pathlib import Path
from typing import Any, Iterator

from tapestry.data.executors.worker import Job, configure_process, run_job
from tapestry.data.records import InputResult
from tapestry.errors import TapestryError


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast with a clear message when `host:port` (or `ray://host:port`) does not answer:
    Ray itself retries an unreachable head for minutes. `auto` and `local` are left to Ray."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise TapestryError(f"--ray-address {address!r}: expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise TapestryError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def _process_row(row: dict[str, Any]) -> dict[str, Any]:
    configure_process(limit_threads=True)  # a Ray worker process: cheap after the first call
    result = run_job(pickle.loads(row["job"]))
    return {"index": row["index"], "result": pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)}


class RayExecutor:
    name = "ray"

    def __init__(self, workers: int = 2, address: str | None = None):
        self.workers = max(1, workers)
        self.address = address

    def map(self, jobs: list[Job]) -> Iterator[tuple[int, InputResult]]:
        try:
            import ray
            import ray.data
        except ImportError:
            raise TapestryError("the ray executor needs Ray Data: pip install 'ray[data]'") from None
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
        started_here = False
        if self.address is not None:
            check_reachable(self.address)
        if not ray.is_initialized():
            package_root = str(Path(__file__).resolve().parents[3])
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "logging_level": logging.ERROR}
            if self.address is None:
                kwargs["num_cpus"] = self.workers
                # workers of a local cluster import tapestry from the same checkout as this driver
                kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": package_root}}
            try:
                ray.init(address=self.address, **kwargs)
            except Exception as e:  # noqa: BLE001 - ray raises many types for a bad address
                raise TapestryError(f"cannot start or reach Ray ({self.address or 'local cluster'}): {e}") from None
            started_here = True
        try:
            # Ray Data warns about its own deprecated settings whenever a context is copied.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data\..*")
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            context.execution_options.preserve_order = False  # the engine restores input order
            if not jobs:
                return
            rows = [{"index": i, "job": pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)}
                    for i, job in enumerate(jobs)]
            dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
                _process_row, num_cpus=1, compute=ray.data.TaskPoolStrategy(size=self.workers))
            for row in dataset.iter_rows():
                yield int(row["index"]), pickle.loads(row["result"])
        finally:
            if started_here:
                ray.shutdown()
