"""`toyworld-bench-v1` on disk: the test split of every task as webdataset shards.

Lives apart from splits.py (which tasks.py imports to draw its samples), so the two never import
each other.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from tapestry.toyworld.spec import SpecError
from tapestry.toyworld.splits import BENCH_NAME, BENCH_SIDE, BENCH_SIZES


BENCH_WRITER = "tapestry toyworld bench"


def write_bench(out_dir: str | os.PathLike, sizes: dict[str, int] | None = None, side: int = BENCH_SIDE,
                progress: Callable[[str, int], None] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write `toyworld-bench-v1`: one webdataset shard per task (compose holds both layouts of
    each scene) and `manifest.json` with counts and checksums, from the test split. The folder
    appears whole or not at all; an existing one holding other files is refused unless `overwrite`."""
    from tapestry.atomic import output_dir
    from tapestry.storage import save_shard
    from tapestry.toyworld import tasks

    sizes = dict(BENCH_SIZES if sizes is None else sizes)
    for task, n in sizes.items():
        if task not in tasks.TASKS:
            raise SpecError(f"sizes: {task!r} is not a task; choose from {', '.join(tasks.TASKS)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise SpecError(f"sizes.{task}: expected an integer >= 0, got {n!r}")
    out_dir = Path(out_dir)
    manifest: dict[str, Any] = {"name": BENCH_NAME, "split": "test", "side": side, "sizes": sizes, "files": {}}
    with output_dir(out_dir, BENCH_WRITER, overwrite) as tmp:
        for task, n in sizes.items():
            docs = []
            for index in range(n):
                layouts = tasks.task_layouts(task)
                for layout in layouts:
                    docs.append(tasks.sample(task, "test", index, layout=layout, side=side))
                if progress is not None:
                    progress(task, index + 1)
            path = save_shard(docs, tmp / f"{task}.tar")
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            manifest["files"][task] = {"path": f"{task}.tar", "documents": len(docs), "sha256": digest}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest
