"""ToyWorld splits, disjoint by construction, and the fixed benchmark `toyworld-bench-v1`.

Two walls keep test and val out of training:
1. Seeds. Sample `index` of a split draws from the seed `SEED_BASE[split] + index` (train adds
   `seed << 40` for its stream number); the ranges never overlap, so no seed of test is ever
   drawn in train, whatever the index or stream.
2. Content. A drawn sample is kept only if the hash of what it asks for (its target scenes,
   question, ...; see tasks.py) falls in its split's share of 100 buckets: test 0-4, val 5-9,
   train 10-99; otherwise the draw is repeated with the next attempt number. So even a scene
   that two seeds happen to produce alike can only ever belong to one split.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from tapestry.toyworld.spec import SpecError

SPLITS: tuple[str, ...] = ("train", "val", "test")
SEED_BASE: dict[str, int] = {"test": 0, "val": 1 << 20, "train": 1 << 32}
FIXED_SPLIT_SIZE = 1 << 20  # test and val indices stay below this
STREAM_SHIFT = 40  # train stream `seed` occupies the bits above this
CONTENT_BUCKETS: dict[str, tuple[int, int]] = {"test": (0, 5), "val": (5, 10), "train": (10, 100)}
BENCH_NAME = "toyworld-bench-v1"
BENCH_SIZES: dict[str, int] = {"compose": 100, "story": 100, "edit": 100, "understand": 100, "howto": 50}
BENCH_SIDE = 64


def sample_seed(split: str, index: int, seed: int = 0) -> int:
    """The seed sample `index` of `split` draws from. test/val are fixed sets: `seed` must be 0."""
    if split not in SPLITS:
        raise SpecError(f"split: {split!r} is not a split; choose one of {', '.join(SPLITS)}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise SpecError(f"index: expected an integer >= 0, got {index!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError(f"seed: expected an integer >= 0, got {seed!r}")
    if split == "train":
        if index >= 1 << STREAM_SHIFT:
            raise SpecError(f"index: {index} is past the end of a train stream (2^{STREAM_SHIFT})")
        return SEED_BASE["train"] + (seed << STREAM_SHIFT) + index
    if seed != 0:
        raise SpecError(f"seed: the {split} split is a fixed set and takes no seed (got {seed}); "
                        "only the train stream is seeded")
    if index >= FIXED_SPLIT_SIZE:
        raise SpecError(f"index: the {split} split holds indices below {FIXED_SPLIT_SIZE}, got {index}")
    return SEED_BASE[split] + index


def split_of_seed(sample_seed_value: int) -> str:
    if sample_seed_value >= SEED_BASE["train"]:
        return "train"
    return "val" if sample_seed_value >= SEED_BASE["val"] else "test"


def content_bucket(content: Any) -> int:
    """0..99 from a JSON-able description of what a sample asks for."""
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return int(digest[:12], 16) % 100


def content_split(content: Any) -> str:
    bucket = content_bucket(content)
    return next(s for s, (lo, hi) in CONTENT_BUCKETS.items() if lo <= bucket < hi)


def draw(split: str, index: int, seed: int, task_code: int, plan: Callable[[Any], Any],
         content: Callable[[Any], Any]):
    """(plan, sample seed, attempt): the first attempt whose content belongs to `split`."""
    import numpy as np

    base = sample_seed(split, index, seed)
    for attempt in range(100_000):
        rng = np.random.default_rng([base, task_code, attempt])
        drawn = plan(rng)
        if content_split(content(drawn)) == split:
            return drawn, base, attempt
    raise RuntimeError(f"no {split} sample found for index {index} in 100000 attempts")  # p < 1e-2000
