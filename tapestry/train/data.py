"""Data sources, weighted mixtures and the resumable document stream.

A *source* yields Documents in a fixed order and can fetch the document at any position it has
handed out (`fetch(position)`); positions are small JSON values. A *stream* mixes sources by
weight with its own seeded generator. The stream's state — the generator state, every source's
next position and how many documents were drawn — is plain JSON and part of every checkpoint,
so a resumed run draws exactly the documents an uninterrupted run would have drawn next.

Sources:
    toyworld   the seeded ToyWorld train stream of one task and layout (tapestry.toyworld.tasks),
               optionally of a restricted world (shapes, colours, ... fields of the source)
    shards     Document files (webdataset .tar, .jsonl, .json, folders of them, or a glob), read
               in order; each epoch visits the files in a new seeded order
"""

from __future__ import annotations

import glob as globlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from tapestry.document import Document
from tapestry.errors import DocumentError, TapestryError
from tapestry.train.config import SourceConfig, TrainConfigError


class Source(Protocol):
    name: str

    def initial_position(self) -> Any: ...

    def fetch(self, position: Any) -> tuple[Document, Any, Any]:
        """(the document at `position` or the first after it, the position it was found at,
        the position after it)."""
        ...


# ---------------------------------------------------------------------------------------------
# ToyWorld
# ---------------------------------------------------------------------------------------------


def toyworld_tasks():
    try:
        from tapestry.toyworld import tasks
    except ImportError:
        raise TrainConfigError(
            "a toyworld source needs tapestry.toyworld.tasks, which is not in this checkout yet; "
            "train on Document shards instead (kind = \"shards\")") from None
    return tasks


class ToyWorldSource:
    """Document n of the ToyWorld `split` of one task and layout (random access by n). The train
    split is the stream numbered by the run's seed; val and test are fixed sets that no train
    seed ever reaches (tapestry.toyworld.splits). A restricted world applies to every split, so
    the val documents that watch a tiny-world run are tiny-world documents too."""

    def __init__(self, config: SourceConfig, seed: int, split: str = "train"):
        self.name, self.task, self.layout, self.side = config.name, config.task, config.layout, config.side
        self.seed, self.split = (seed if split == "train" else 0), split
        self._tasks = toyworld_tasks()
        if self.task not in self._tasks.ALL_TASKS:
            raise TrainConfigError(f"source {self.name!r}: task {self.task!r} is not one of {self._tasks.ALL_TASKS}")
        from tapestry.toyworld.spec import SpecError

        try:
            self.world = self._tasks.world_for(self.task, **config.world_fields())
        except SpecError as exc:
            raise TrainConfigError(f"source {self.name!r}: {exc}") from None

    def initial_position(self) -> int:
        return 0

    def fetch(self, position: int) -> tuple[Document, int, int]:
        doc = self._tasks.sample(self.task, self.split, int(position), layout=self.layout, seed=self.seed,
                                 side=self.side, world=self.world)
        return doc, int(position), int(position) + 1


# ---------------------------------------------------------------------------------------------
# Document shards
# ---------------------------------------------------------------------------------------------

SHARD_SUFFIXES = (".tar", ".jsonl", ".json")


def shard_files(path: str) -> list[Path]:
    """The Document files a shards source reads, in a fixed (sorted) order."""
    if any(c in path for c in "*?["):
        files = sorted(Path(p) for p in globlib.glob(path, recursive=True) if p.endswith(SHARD_SUFFIXES))
    elif Path(path).is_dir():
        root = Path(path)
        if (root / "doc.json").is_file():
            files = [root]
        else:
            files = []
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # temporaries of atomic writes
                files.extend(Path(dirpath) / f for f in sorted(filenames)
                             if f.endswith(SHARD_SUFFIXES) and not f.startswith("."))
    elif Path(path).is_file():
        files = [Path(path)]
    else:
        raise TrainConfigError(f"shards source: {path} does not exist")
    if not files:
        raise TrainConfigError(f"shards source: no {', '.join(SHARD_SUFFIXES)} files under {path}")
    return files


class ShardSource:
    """Documents of a list of files; position = [epoch, file number in that epoch's order, sample].

    Reading is sequential; a fetch at another position (a pending document after a resume)
    reopens the file and skips to the sample. An invalid sample stops training with its file, id
    and reason: it is never skipped silently.
    """

    def __init__(self, config: SourceConfig, seed: int):
        self.name, self.seed = config.name, seed
        self.files = shard_files(config.path)
        self._reader: Iterator | None = None
        self._reader_at: tuple[int, int, int] | None = None  # position the open reader yields next

    def initial_position(self) -> list[int]:
        return [0, 0, 0]

    def _order(self, epoch: int) -> list[Path]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
        return [self.files[i] for i in order]

    def _read(self, epoch: int, file_index: int, sample: int):
        from tapestry.storage import scan

        if self._reader_at != (epoch, file_index, sample):
            self._reader = iter(scan(self._order(epoch)[file_index]))
            for _ in range(sample):
                if next(self._reader, None) is None:
                    break
        loaded = next(self._reader, None)
        self._reader_at = (epoch, file_index, sample + 1)
        return loaded

    def fetch(self, position) -> tuple[Document, list[int], list[int]]:
        epoch, file_index, sample = (int(x) for x in position)
        empty_files = 0
        while True:
            if file_index >= len(self.files):
                epoch, file_index, sample = epoch + 1, 0, 0
            loaded = self._read(epoch, file_index, sample)
            if loaded is not None:
                break
            empty_files = empty_files + 1 if sample == 0 else 0
            if empty_files > len(self.files):
                raise TrainConfigError(f"shards source {self.name!r}: the files hold no documents")
            file_index, sample = file_index + 1, 0
        if loaded.problems:
            raise DocumentError(loaded.problems)
        return loaded.document, [epoch, file_index, sample], [epoch, file_index, sample + 1]


def build_source(config: SourceConfig, seed: int) -> Source:
    if config.kind == "toyworld":
        return ToyWorldSource(config, seed)
    if config.kind == "shards":
        return ShardSource(config, seed)
    raise TrainConfigError(f"unknown source kind {config.kind!r}")


# ---------------------------------------------------------------------------------------------
# The mixed stream
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drawn:
    """A document handed out by the stream, and how to fetch it again."""

    index: int  # how many documents the stream drew before this one (the document's identity)
    source: str
    position: Any
    document: Document

    def ref(self) -> dict[str, Any]:
        return {"index": self.index, "source": self.source, "position": self.position}


class DocumentStream:
    """Sources mixed by weight: each draw picks a source with the seeded generator, then takes
    that source's next document."""

    def __init__(self, sources: list[Source], seed: int):
        if not sources:
            raise TrainConfigError("a document stream needs at least one source")
        self.sources = {s.name: s for s in sources}
        self.names = [s.name for s in sources]
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x5EED])))
        self.positions = {s.name: s.initial_position() for s in sources}
        self.drawn = 0

    def draw(self, weights: dict[str, float]) -> Drawn:
        w = np.array([max(0.0, float(weights.get(n, 0.0))) for n in self.names], dtype=np.float64)
        if not w.sum() > 0:
            raise TrainConfigError(f"mixture weights {weights} give no source a positive weight")
        name = self.names[int(self.rng.choice(len(self.names), p=w / w.sum()))]
        doc, at, after = self.sources[name].fetch(self.positions[name])
        self.positions[name] = after
        drawn = Drawn(self.drawn, name, at, doc)
        self.drawn += 1
        return drawn

    def fetch(self, ref: dict[str, Any]) -> Drawn:
        """The document of an earlier draw, from its `ref()`."""
        if ref["source"] not in self.sources:
            raise TapestryError(f"checkpoint refers to data source {ref['source']!r}, which the config no longer has")
        doc, at, _ = self.sources[ref["source"]].fetch(ref["position"])
        return Drawn(int(ref["index"]), ref["source"], at, doc)

    def state(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "rng": self.rng.bit_generator.state, "positions": dict(self.positions)}

    def load_state(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.names) - set(state["positions"]))
        if missing:
            raise TapestryError(f"checkpoint data state has no position for source(s) {missing}")
        self.drawn = int(state["drawn"])
        self.rng.bit_generator.state = state["rng"]
        self.positions = {n: state["positions"][n] for n in self.names}
