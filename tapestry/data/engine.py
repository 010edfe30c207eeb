"""The data engine's driver: inputs -> executor -> shards, manifest, rejection log, summary.

    summary = run(["videos/"], EngineOptions("video-story", config, ProviderConfig(), Path("out")))

Workers (local processes or Ray tasks) return one `InputResult` per input in any order; the
driver puts them back in input order and commits them: an input's Documents go into the current
shard (never split across two), and when the shard is full it is written atomically and one
manifest line records it with the inputs it finished (see `manifest`). Because commits follow
input order and Documents are deterministic, the local and Ray executors write identical shards.

Exit codes (`summary["exit_code"]`): 0 every input processed; 1 partial failure (some input
could not be read, or some model call failed: see the rejection log); 3 stopped early because
the provider budget ran out (rerun with a larger budget to continue); 130 interrupted. 2 is left
for usage errors found before any work (the CLI).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tapestry.atomic import atomic_write_text, check_output_dir, claim_output_dir
from tapestry.data.executors import Job, make_executor
from tapestry.data.manifest import STATE_DIR, Manifest, shard_name
from tapestry.data.operators.base import Rejection, StageStats
from tapestry.data.pipelines import config as config_io
from tapestry.data.pipelines import pipeline_class
from tapestry.data.providers import ProviderConfig
from tapestry.data.records import InputItem, InputResult
from tapestry.errors import TapestryError
from tapestry.storage import save_shard

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


@dataclass
class EngineOptions:
    pipeline: str
    config: Any  # the pipeline's config dataclass
    provider: ProviderConfig
    out: Path
    executor: str = "local"
    workers: int = 2
    ray_address: str | None = None
    shard_size: int = 256  # documents per shard (an input's documents are never split)
    shard_max_bytes: int = 1 << 30
    commit_every_s: float = 300.0  # also commit a part-filled shard this often (bounds lost work)
    cache_dir: Path | None = None  # provider response cache; default OUT/.tapestry/cache
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda message: None)
    overwrite: bool = False  # write into an --out that holds files the engine did not write


def discover_inputs(paths: list[str], suffixes: tuple[str, ...],
                    noun: str = "videos") -> tuple[list[InputItem], list[InputResult]]:
    """Files named on the command line are taken as they are (the decoder decides what they
    hold); folders are walked in sorted order for files with a known suffix. A folder with none
    is reported as a failed input (`inputs:no-{noun}`); duplicates (same resolved path) are dropped."""
    items: list[InputItem] = []
    failed: list[InputResult] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        item = InputItem.of(len(items), path)
        if item.key not in seen:
            seen.add(item.key)
            items.append(item)

    for raw in paths:
        path = str(raw)
        if os.path.isdir(path):
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [os.path.join(dirpath, n) for n in sorted(filenames)
                          if not n.startswith(".") and n.lower().endswith(suffixes)]
            if not found:
                folder = InputItem.of(-1, path)
                failed.append(InputResult(folder.key, folder.shown, failed=True, rejections=[Rejection(
                    "inputs", f"no-{noun}", f"no files ending in {', '.join(suffixes)} in this folder",
                    failure=True)]))
            for name in found:
                add(name)
        else:
            add(path)
    return items, failed


class InterruptGuard:
    """Ctrl-C and SIGTERM stop a run cleanly. While the driver waits for workers, the signal
    raises KeyboardInterrupt at once (nothing is half-done there); while it commits (writes a
    shard, appends to the manifest) the signal is held until the commit is complete."""

    def __init__(self) -> None:
        self.interrupted = False
        self.pending = False
        self._committing = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self._committing:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: signals stay as they are
            pass
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def committing(self, raise_pending: bool = True):
        """Hold signals inside; a signal that came meanwhile is raised after (or, with
        `raise_pending=False` for the last commit, only recorded)."""
        self._committing = True
        try:
            yield
        finally:
            self._committing = False
        if self.pending:
            self.pending = False
            self.interrupted = True
            if raise_pending:
                raise KeyboardInterrupt


class CommitBuffer:
    """Results in input order -> shards + manifest lines."""

    def __init__(self, manifest: Manifest, options: EngineOptions):
        self.manifest = manifest
        self.options = options
        self.docs: list[Any] = []
        self.inputs: list[dict[str, Any]] = []
        self.bytes = 0
        self.last_commit = time.monotonic()

    def add(self, result: InputResult) -> None:
        self.inputs.append(result.summary())
        self.docs.extend(result.docs)
        self.bytes += sum(len(s.encoded or b"") for d in result.docs for s in d.images())
        if len(self.docs) >= self.options.shard_size or self.bytes >= self.options.shard_max_bytes:
            self.flush()
        elif time.monotonic() - self.last_commit > self.options.commit_every_s:
            self.flush()

    def flush(self) -> None:
        if not self.inputs:
            return
        shard = None
        first = self.manifest.next_key
        if self.docs:
            shard = shard_name(self.manifest.next_seq)
            save_shard(self.docs, self.options.out / shard, start=first)
        self.manifest.append(shard, first, len(self.docs), self.inputs)
        self.docs, self.inputs, self.bytes = [], [], 0
        self.last_commit = time.monotonic()


def run_header(options: EngineOptions) -> dict[str, Any]:
    cls = pipeline_class(options.pipeline)
    config_fp = config_io.fingerprint(options.config)
    identity = json.dumps([cls.name, cls.version, config_fp, options.provider.kind, options.provider.model])
    return {"pipeline": cls.name, "pipeline_version": cls.version, "config": config_fp,
            "provider_kind": options.provider.kind, "provider_model": options.provider.model,
            "fingerprint": hashlib.sha256(identity.encode()).hexdigest()[:16],
            "config_values": config_io.to_dict(options.config)}


DATA_WRITER = "tapestry data"


def run(paths: list[str], options: EngineOptions) -> dict[str, Any]:
    """Process `paths` into `options.out`, resuming whatever an earlier run finished."""
    started = time.perf_counter()
    out = Path(options.out)
    cls = pipeline_class(options.pipeline)
    # Local model folders are checked here, at the edge: a wrong one is one line before any work.
    from tapestry.data.providers.local import check_config

    checked = check_config(options.config)
    if hasattr(cls, "check_config"):  # inputs a pipeline reads from its config (a seed pool)
        cls.check_config(options.config)
    for stage, info in checked.items():
        options.log(f"{stage}: local {info['model_type']} model {info['path']}")
    # Pipelines that make their inputs (synthetic data) name them themselves.
    discover = getattr(cls, "discover", None)
    if discover is None:
        missing = [str(p) for p in paths if not os.path.lexists(str(p))]
        if missing:  # a mistyped path fails before any folder is made or any work starts
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise TapestryError(f"no such input: {shown}; check the path(s) and rerun (nothing was written)")
    # a folder an engine filled before output markers existed resumes too
    legacy = (STATE_DIR, "shard-*.tar", ".shard-*")
    check_output_dir(out, DATA_WRITER, options.overwrite, legacy=legacy, resumable=True)
    items, pre_failed = (discover(paths) if discover is not None
                         else discover_inputs(paths, cls.input_suffixes, getattr(cls, "input_noun", "videos")))
    claim_output_dir(out, DATA_WRITER, options.overwrite, legacy=legacy)
    manifest, removed = Manifest.open(out, run_header(options))
    if removed:
        options.log(f"removed {len(removed)} leftover file(s) of an interrupted run: {', '.join(removed)}")
    finished = manifest.finished_keys()
    todo = [item for item in items if item.key not in finished]
    state = out / STATE_DIR
    cache_dir = str(options.cache_dir or state / "cache")
    jobs = [Job(options.pipeline, config_io.to_dict(options.config), options.provider, cache_dir,
                str(state / "budget.json"), item) for item in todo]
    if finished and len(todo) < len(items):
        options.log(f"resuming: {len(items) - len(todo)} of {len(items)} input(s) already done")

    buffer = CommitBuffer(manifest, options)
    this_run = {"processed": 0, "video_seconds": 0.0, "documents": 0}
    stopped: list[str] = []
    waiting: dict[int, InputResult] = {}  # finished out of order, waiting for earlier inputs
    executor = make_executor(options.executor, options.workers, options.ray_address)
    guard = InterruptGuard()
    progress = _progress(options.progress)
    with guard.installed():
        try:
            with guard.committing():
                for result in pre_failed:
                    buffer.add(result)
            with progress:
                task = progress.add_task(options.pipeline, total=len(jobs), video="0 s of video", docs="0 docs")
                next_index = 0
                results = executor.map(jobs)
                try:
                    for index, result in results:
                        waiting[index] = result
                        this_run["processed"] += 1
                        this_run["video_seconds"] += result.video_seconds
                        this_run["documents"] += len(result.docs)
                        progress.update(task, advance=1, video=f"{this_run['video_seconds']:.0f} s of video",
                                        docs=f"{this_run['documents']} docs")
                        with guard.committing():
                            while next_index in waiting:
                                ready = waiting.pop(next_index)
                                next_index += 1
                                if ready.stopped:
                                    stopped.append(ready.stopped)
                                else:
                                    buffer.add(ready)
                        if stopped:
                            break
                finally:
                    results.close()  # stops the workers (a no-op when they are done)
        except KeyboardInterrupt:
            guard.interrupted = True
        with guard.committing(raise_pending=False):
            # Whatever finished is kept, in input order, even after a stop or an interrupt.
            for index in sorted(waiting):
                if not waiting[index].stopped:
                    buffer.add(waiting[index])
            buffer.flush()
    wall = time.perf_counter() - started
    summary = summarize(manifest, items, pre_failed, this_run, wall, len(items) - len(todo), options)
    if stopped:
        summary["stopped"] = stopped[0]
        summary["exit_code"] = EXIT_STOPPED
    if guard.interrupted:
        summary["interrupted"] = True
        summary["exit_code"] = EXIT_INTERRUPTED
    with guard.installed(), guard.committing(raise_pending=False):
        write_logs(manifest, summary)
    if guard.interrupted and not summary.get("interrupted"):  # a signal during the last writes
        summary["interrupted"] = True
        summary["exit_code"] = EXIT_INTERRUPTED
    return summary


def summarize(manifest: Manifest, items: list[InputItem], pre_failed: list[InputResult],
              this_run: dict[str, Any], wall: float, skipped: int, options: EngineOptions) -> dict[str, Any]:
    latest = manifest.latest()
    keys = [item.key for item in items] + [r.key for r in pre_failed]
    records = [latest[k] for k in keys if k in latest]
    stages = StageStats()
    reasons: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    usage: Counter[str] = Counter()
    for record in latest.values():
        stages.merge(record.get("stats", {}))
        usage.update({k: v for k, v in record.get("usage", {}).items()})
        for r in record.get("rejections", []):
            reasons[f"{r['stage']}:{r['code']}"] += 1
            if r.get("failure"):
                failures[f"{r['stage']}:{r['code']}"] += 1
    failed_inputs = sum(1 for r in records if r.get("failed"))
    record_failures = sum(1 for r in records if not r.get("failed")
                          for x in r.get("rejections", []) if x.get("failure"))
    done = sum(1 for r in records if not r.get("failed"))
    exit_code = EXIT_PARTIAL if failed_inputs or record_failures else EXIT_OK
    order = {stage: i for i, stage in enumerate(pipeline_class(options.pipeline).stages)}
    stage_table = dict(sorted(stages.to_json().items(), key=lambda kv: order.get(kv[0], len(order))))
    video_seconds = this_run["video_seconds"]
    return {
        "pipeline": options.pipeline,
        "out": str(options.out),
        "executor": options.executor,
        "workers": options.workers,
        "inputs": {"total": len(keys), "done": done, "failed": failed_inputs, "skipped_as_done": skipped,
                   "processed_this_run": this_run["processed"],
                   "not_finished": max(0, len(keys) - len(records))},
        "documents": sum(r.get("docs", 0) for r in latest.values()),
        "documents_this_run": this_run["documents"],
        "shards": manifest.shards(),
        "stages": stage_table,
        "rejections": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "failures": dict(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))),
        "provider": {"kind": options.provider.kind, "model": options.provider.model,
                     **{k: round(v, 3) if isinstance(v, float) else v for k, v in usage.items()}},
        "video_seconds": round(video_seconds, 3),
        "wall_seconds": round(wall, 3),
        "realtime_factor": round(video_seconds / wall, 3) if wall > 0 else None,
        "rejection_log": str(Path(options.out) / STATE_DIR / "rejections.jsonl"),
        "exit_code": exit_code,
    }


def write_logs(manifest: Manifest, summary: dict[str, Any]) -> None:
    """The rejection log (one line per rejected record or input, latest attempt per input) and
    the summary, both derived from the manifest and rewritten atomically."""
    lines = []
    for record in manifest.latest().values():
        for r in record.get("rejections", []):
            lines.append(json.dumps({"input": record["path"], **r}, ensure_ascii=False))
    state = manifest.out / STATE_DIR
    atomic_write_text(state / "rejections.jsonl", "".join(line + "\n" for line in lines))
    atomic_write_text(state / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("inputs · {task.fields[video]} · {task.fields[docs]}"), TimeElapsedColumn(),
                    console=console, transient=True, disable=not enabled or not console.is_terminal)
