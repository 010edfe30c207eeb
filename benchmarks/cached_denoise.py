"""Engine denoising step against a cached context vs recomputing the context every step.

    python benchmarks/cached_denoise.py [--quick]

The engine's own `Context.probe` runs one denoising step of N = 256 noisy latent tokens after a
context of C = 4096 clean tokens, once with the KV cache and once in recompute mode (the whole
context rerun each step, as code without a cache does). Ideal speedup ≈ (C + N) / N ≈ 17.

Figures: speedup (target ≥ 10×), cached_step_ms, max_abs_diff (cached vs recompute, ≤ 1e-3).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, log, parse_args  # noqa: E402
from _engine_setup import filled_context, random_model  # noqa: E402

BENCH = "cached_denoise"
CONTEXT, NOISY = 4096, 256


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = random_model()
    cached = filled_context(model, CONTEXT)
    recompute = filled_context(model, CONTEXT, recompute=True)
    d = model.config.llm.hidden_size
    noisy = torch.randn(NOISY, d) * 0.02
    expert = torch.ones(NOISY, dtype=torch.int64)
    position = torch.full((NOISY,), cached.next_position)
    rounds = 3 if args.quick else 7
    ratios, cached_times = [], []
    with torch.no_grad():
        a = cached.probe(noisy, expert, position)
        b = recompute.probe(noisy, expert, position)
        for _ in range(rounds):  # interleaved, so a busy machine slows both alike
            t0 = time.perf_counter()
            cached.probe(noisy, expert, position)
            t1 = time.perf_counter()
            recompute.probe(noisy, expert, position)
            t2 = time.perf_counter()
            ratios.append((t2 - t1) / (t1 - t0))
            cached_times.append(t1 - t0)
    config = {"context": CONTEXT, "noisy": NOISY, "hidden": d, "layers": model.config.llm.num_layers,
              "rounds": rounds, "threads": torch.get_num_threads()}
    log(f"cached {statistics.median(cached_times) * 1000:.1f} ms/step, ratio {statistics.median(ratios):.1f}x")
    figure(BENCH, "speedup", statistics.median(ratios), "x", 10, True, config)
    figure(BENCH, "cached_step_ms", statistics.median(cached_times) * 1000, "ms", None, False, config)
    figure(BENCH, "max_abs_diff", float((a - b).abs().max()), "abs", 1e-3, False, config)


if __name__ == "__main__":
    main()
