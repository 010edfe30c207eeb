"""Denoising against a KV cache vs recomputing the whole sequence, per step (DESIGN §7, §12).

    python benchmarks/cached_forward.py [--quick]

A context of C = 4096 tokens (text and clean image tokens of several documents' worth) is
prefilled once; each denoising step then runs only the N = 256 noisy latent tokens against the
cache. The baseline recomputes all C + N tokens every step. Ideal speedup ≈ (C + N) / N = 17.

Figures:
- speedup: recompute time / cached time per step, median over interleaved rounds (target ≥ 10×);
- cached_step_ms: the cached step's median wall time (no target: machine-dependent);
- max_abs_diff: the cached step's output vs the recomputed one's rows (target ≤ 1e-3) — a fast
  step that computes something else is not a speedup.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, log, median_seconds, model_config, parse_args  # noqa: E402

BENCH = "cached_forward"
CONTEXT, NOISY = 4096, 256


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    import torch

    from tapestry.layout import GEN, UND, Span, dense_mask
    from tapestry.models import family as families

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    mot = families.get("mot")
    config = model_config("mot", {"llm": {"hidden_size": 256, "intermediate_size": 704, "num_layers": 4, "num_heads": 4,
                                          "num_kv_heads": 2, "head_dim": 64},
                                  "use_vit": False, "latent": {"max_side": 16}}, vocab_size=1024, latent_channels=8)
    model, llm = mot.build(config).eval(), config.llm
    KVCache = mot.benchmark_parts().KVCache

    # context: alternating text (causal, und) and clean image tokens (full, gen), one document
    spans, experts, positions, pos, start = [], [], [], 0, 0
    while start < CONTEXT:
        for mode, n in (("causal", 192), ("full", 256)):
            n = min(n, CONTEXT - start)
            if n == 0:
                break
            spans.append(Span(start, start + n, mode))
            experts += [UND if mode == "causal" else GEN] * n
            positions += list(range(pos, pos + n)) if mode == "causal" else [pos] * n
            pos += n if mode == "causal" else 1
            start += n
    spans.append(Span(CONTEXT, CONTEXT + NOISY, "noise"))
    experts += [GEN] * NOISY
    positions += [pos] * NOISY

    total = CONTEXT + NOISY
    embeds = torch.randn(1, total, llm.hidden_size) * 0.5
    experts_t = torch.tensor([experts])
    positions_t = torch.tensor([positions])
    full_mask = dense_mask(spans)  # [C + N, C + N]
    step_rows = dense_mask(spans, rows=(CONTEXT, total))  # [N, C + N]

    with torch.no_grad():
        cache = KVCache()
        model(embeds[:, :CONTEXT], experts_t[:, :CONTEXT], positions_t[:, :CONTEXT],
              full_mask[:CONTEXT, :CONTEXT], cache=cache, update_cache=True)

        def recompute():
            return model(embeds, experts_t, positions_t, full_mask)[:, CONTEXT:]

        def cached():
            return model(embeds[:, CONTEXT:], experts_t[:, CONTEXT:], positions_t[:, CONTEXT:],
                         step_rows, cache=cache)

        diff = (recompute() - cached()).abs().max().item()
        repeats = 3 if args.quick else 8
        # interleave the two so a busy machine slows both alike: each round times one recompute
        # and the median of four cached steps; the figure is the median of the rounds' ratios
        ratios, fulls, steps = [], [], []
        cached()
        for r in range(repeats):
            log(f"{BENCH}: round {r + 1}/{repeats}")
            t_full = median_seconds(recompute, 1, warmup=0)
            t_cached = median_seconds(cached, 4, warmup=0)
            ratios.append(t_full / t_cached)
            fulls.append(t_full)
            steps.append(t_cached)
        t_full, t_cached = statistics.median(fulls), statistics.median(steps)

    config = {"context": CONTEXT, "noisy": NOISY, "hidden": llm.hidden_size, "layers": llm.num_layers,
              "heads": llm.num_heads, "kv_heads": llm.num_kv_heads, "threads": torch.get_num_threads(),
              "ideal": round(total / NOISY, 2), "recompute_ms": round(t_full * 1e3, 2),
              "cached_ms": round(t_cached * 1e3, 2), "repeats": repeats}
    figure(BENCH, "speedup", statistics.median(ratios), "x", 10.0, True, config)
    figure(BENCH, "cached_step_ms", t_cached * 1e3, "ms", None, False, config)
    figure(BENCH, "max_abs_diff", diff, "abs", 1e-3, False, config)


if __name__ == "__main__":
    main()
