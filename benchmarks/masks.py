"""Attention masks from spans: dense [L, L] vs flex_attention BlockMask, build time and peak memory.

    python benchmarks/masks.py [--quick]

Figures per size L in {4k, 16k, 64k} (block size 128):
- block_mask_peak_mib: peak RSS growth while building the BlockMask. Target: an L×L-free budget
  of 128 bytes per token plus 128 bytes per (query block, key block) pair — memory ∝ blocks;
  one L×L bool mask would be L²/2²⁰ MiB (16 MiB at 4k, 4 GiB at 64k).
- block_mask_build_ms: median build time (target: 1 s at any size).
- dense_mask_peak_mib / build_speedup (dense time / block time) at 4k and 16k only: the dense
  mask at 64k needs several 4 GiB intermediates, more than this machine class should spend.

Each measurement runs in a fresh process so one size's allocations cannot hide another's.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, log, median_seconds, parse_args, reset_peak_rss, rss_kib  # noqa: E402

BENCH = "masks"
SIZES = (4096, 16384, 65536)
DENSE_SIZES = (4096, 16384)
BLOCK = 128


def packed_spans(length: int, seed: int = 0):
    """ToyWorld-like documents packed into one row: text, reference images as clean ViT tokens,
    a noisy target latent and its clean copy, more text; the tail is a padding document."""
    from tapestry.layout import Span

    rng = random.Random(seed)
    spans, pos, doc = [], 0, 0
    while True:
        pieces = [("causal", rng.randint(16, 64))]
        for _ in range(rng.randint(1, 3)):
            pieces += [("full", 64), ("causal", rng.randint(8, 40))]
        pieces += [("noise", 256), ("full", 256), ("causal", rng.randint(8, 48))]
        need = sum(n for _, n in pieces)
        if pos + need > length:
            break
        for mode, n in pieces:
            spans.append(Span(pos, pos + n, mode, doc))
            pos += n
        doc += 1
    if pos < length:
        spans.append(Span(pos, length, "causal", doc))
    return spans


def child(kind: str, length: int, repeats: int) -> dict:
    import torch

    from tapestry.layout import block_mask, dense_mask

    torch.set_num_threads(os.cpu_count() or 1)
    spans = packed_spans(length)
    build = (lambda: block_mask(spans, block_size=BLOCK)) if kind == "block" else (lambda: dense_mask(spans))
    # warm the code paths on a small layout first so lazy imports are not counted as mask memory
    (block_mask if kind == "block" else dense_mask)(packed_spans(2048))
    before, _ = rss_kib()
    exact = reset_peak_rss()
    result = build()
    _, peak = rss_kib()
    del result
    seconds = median_seconds(build, repeats, warmup=0)
    return {"peak_mib": max(0, peak - before) / 1024, "build_ms": seconds * 1e3, "exact_peak": exact,
            "documents": 1 + max(s.doc for s in spans)}


def measure(kind: str, length: int, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(length), str(repeats)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, length, repeats = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(child(kind, length, repeats)))
        return
    args = parse_args(__doc__.splitlines()[0])
    repeats = 3 if args.quick else 10
    for length in SIZES:
        log(f"{BENCH}: L = {length}")
        block = measure("block", length, repeats)
        n = -(-length // BLOCK)
        config = {"tokens": length, "block_size": BLOCK, "documents": block["documents"], "repeats": repeats,
                  "peak_from": "VmHWM reset" if block["exact_peak"] else "ru_maxrss"}
        budget_mib = (128 * length + 128 * n * n) / 2**20
        figure(BENCH, "block_mask_peak_mib", block["peak_mib"], "MiB", round(budget_mib, 3), False,
               {**config, "dense_bool_mib": length * length / 2**20})
        figure(BENCH, "block_mask_build_ms", block["build_ms"], "ms", 1000.0, False, config)
        if length in DENSE_SIZES:
            dense = measure("dense", length, repeats)
            figure(BENCH, "dense_mask_peak_mib", dense["peak_mib"], "MiB", None, False, config)
            figure(BENCH, "build_speedup", dense["build_ms"] / block["build_ms"], "x", 1.0, True,
                   {**config, "dense_ms": round(dense["build_ms"], 3), "block_ms": round(block["build_ms"], 3)})


if __name__ == "__main__":
    main()
