"""The benchmark output convention (DESIGN §12): one JSON object per figure on its own line.

    {"bench": ..., "metric": ..., "value": ..., "unit": ..., "target": ..., "higher_is_better": ...,
     "ok": ..., "config": {...}}

Benchmarks compare ratios inside one run; `--quick` keeps the sizes and lowers the repeats.
They reach a model family only through the registry (tapestry.models.family): `model_config`
below, and the family's `benchmark_parts()` for what they time beneath the protocol.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable


def parse_args(description: str, argv: list[str] | None = None, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="same measurement at the same sizes with fewer repeats (under a minute on 2 cores)")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def figure(bench: str, metric: str, value: float, unit: str, target: float | None,
           higher_is_better: bool, config: dict) -> dict:
    """Print one figure as a JSON line and return it. `ok` is null when there is no target."""
    if target is None:
        ok = None
    else:
        ok = bool(value >= target) if higher_is_better else bool(value <= target)
    record = {
        "bench": bench, "metric": metric, "value": round(float(value), 6), "unit": unit,
        "target": target, "higher_is_better": higher_is_better, "ok": ok, "config": config,
    }
    print(json.dumps(record), flush=True)
    return record


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_kib() -> tuple[int, int]:
    """(current, peak) resident set size of this process in KiB, from /proc (Linux)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(rest.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model_config(family: str, table: dict, vocab_size: int, latent_channels: int):
    """The model config of `family` that a training config's [model] table `table` (its recipe
    keys, e.g. {"llm": {...}, "use_vit": False}) gives, through the family registry."""
    from tapestry.models import family as families
    from tapestry.train.config import from_dict

    chosen = families.get(family)
    return chosen.model_config(from_dict(chosen.recipe, table, "model"), vocab_size, latent_channels)
