"""The resume manifest: an append-only journal of what a data engine has finished.

    OUT/.tapestry/manifest.jsonl
      {"type": "run", "pipeline": ..., "fingerprint": ..., ...}        header, written once
      {"type": "commit", "seq": 0, "shard": "shard-000000.tar", "first": 0, "samples": 12,
       "inputs": [{"key": ..., "path": ..., "docs": 3, "rejections": [...], ...}, ...]}

A commit is made in two steps: the shard is written under a temporary name and renamed, then
the commit line is appended and fsynced. The line is the truth: a shard without a line (a kill
between the two steps) is an orphan and is deleted on the next start, together with temporary
files; a torn last line is dropped. So after any kill, the shards on disk are exactly those of
the committed inputs, and a rerun redoes the rest: no duplicate, no missing sample.

An input that failed (a bad file) is recorded with `failed: true` and tried again by the next
run (it produced nothing, so retrying cannot duplicate); the latest record of a key wins.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tapestry.atomic import atomic_write_text
from tapestry.errors import TapestryError

STATE_DIR = ".tapestry"  # hidden: `tapestry view OUT` and `scan` skip it
SHARD_PATTERN = re.compile(r"^shard-(\d{6,})\.tar$")


def shard_name(seq: int) -> str:
    return f"shard-{seq:06d}.tar"


@dataclass
class Manifest:
    out: Path
    header: dict[str, Any]
    commits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.out / STATE_DIR / "manifest.jsonl"

    # ------------------------------------------------------------- opening
    @classmethod
    def open(cls, out: str | os.PathLike, header: dict[str, Any]) -> tuple["Manifest", list[str]]:
        """Open (or start) the manifest of `out` for a run described by `header`; returns it and
        the names of files removed as leftovers of an interrupted run."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise TapestryError(f"--out {out} is a file; give a folder for the shards")
        manifest = cls(out, header)
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        if manifest.path.exists():
            manifest._load()
            previous = manifest.header
            if previous.get("fingerprint") != header.get("fingerprint"):
                raise TapestryError(
                    f"{out} holds the output of a different run (pipeline {previous.get('pipeline')!r}, "
                    f"config {previous.get('config')}, provider {previous.get('provider_model')!r}); "
                    "resuming it with other settings would mix two datasets. Use a new --out folder, "
                    "or rerun with the same pipeline, --set/--config options and provider.")
        else:
            if any(SHARD_PATTERN.match(p.name) for p in out.iterdir()):
                raise TapestryError(f"{out} holds shards but no {STATE_DIR}/manifest.jsonl: it was not "
                                    "written by this engine (or its manifest was deleted); use a new --out folder")
            atomic_write_text(manifest.path, json.dumps({"type": "run", **header}) + "\n")
        removed = manifest._remove_leftovers()
        return manifest, removed

    def _load(self) -> None:
        good: list[str] = []
        with open(self.path, "r", encoding="utf-8", errors="replace") as f:
            raw = f.read()
        lines = raw.split("\n")
        complete = lines[:-1] if not raw.endswith("\n") else lines  # a torn last line has no newline
        for line in complete:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                break  # torn or damaged: everything after it is not trusted
            if not good:
                if obj.get("type") != "run":
                    raise TapestryError(f"{self.path}: the first line is not a run header; delete the folder "
                                        "or use a new --out")
                self.header = {k: v for k, v in obj.items() if k != "type"}
            elif obj.get("type") == "commit":
                self.commits.append(obj)
            good.append(line)
        if len(good) != len([x for x in lines if x.strip()]):
            atomic_write_text(self.path, "\n".join(good) + "\n")

    def _remove_leftovers(self) -> list[str]:
        committed = {c["shard"] for c in self.commits if c.get("shard")}
        removed = []
        for entry in sorted(self.out.iterdir()):
            orphan = SHARD_PATTERN.match(entry.name) and entry.name not in committed
            temporary = entry.name.startswith(".shard-") and ".tmp-" in entry.name
            if entry.is_file() and (orphan or temporary):
                entry.unlink()
                removed.append(entry.name)
        return removed

    # ------------------------------------------------------------- queries
    def latest(self) -> dict[str, dict[str, Any]]:
        """key -> the latest record of that input."""
        records: dict[str, dict[str, Any]] = {}
        for commit in self.commits:
            for record in commit["inputs"]:
                records[record["key"]] = record
        return records

    def finished_keys(self) -> set[str]:
        return {key for key, record in self.latest().items() if not record.get("failed")}

    @property
    def next_seq(self) -> int:
        return sum(1 for c in self.commits if c.get("shard"))

    @property
    def next_key(self) -> int:
        return sum(int(c.get("samples", 0)) for c in self.commits)

    def shards(self) -> list[str]:
        return [c["shard"] for c in self.commits if c.get("shard")]

    def records(self) -> Iterator[dict[str, Any]]:
        for commit in self.commits:
            yield from commit["inputs"]

    # ------------------------------------------------------------- writing
    def append(self, shard: str | None, first: int, samples: int, inputs: list[dict[str, Any]]) -> None:
        commit = {"type": "commit", "seq": len(self.commits), "shard": shard, "first": first,
                  "samples": samples, "inputs": inputs}
        line = json.dumps(commit) + "\n"  # ASCII: a journal line must never fail to encode
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.commits.append(commit)
