"""Three guidance branches per denoising step: one batched forward vs one forward per branch.

    python benchmarks/guidance_batching.py [--quick]

The engine's `_denoise` with the Inset rule (branches cond, no_text, uncond, each on its own
cached context of a different length) runs with `batch_branches` on and off; same seed, so the
latents must agree. Figures: speedup (sequential / batched time per step; target > 1),
max_abs_diff (≤ 1e-4).
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

BENCH = "guidance_batching"
CONTEXTS = {"cond": 1024, "no_text": 768, "uncond": 256}
SIZE = (128, 128)  # with ×8 latents and 2×2 patches: 8×8 = 64 noisy tokens


class _Codec:
    downsample, latent_channels = 8, 8


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    import torch

    from tapestry.infer.engine import Engine, GenerationOptions
    from tapestry.layout import LayoutConfig

    torch.set_num_threads(os.cpu_count() or 1)
    model = random_model()
    engine = Engine.for_model(model, None, _Codec(), LayoutConfig(vae_downsample=8, latent_patch=2, max_latent_side=16))
    steps = 4 if args.quick else 10
    rounds = 2 if args.quick else 4

    def run(batch: bool):
        contexts = {name: filled_context(model, n) for name, n in CONTEXTS.items()}
        for ctx in contexts.values():
            engine.runtime.begin_image(ctx)
        options = GenerationOptions(steps=steps, guidance="inset", batch_branches=batch)
        generator = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        gen = engine._denoise(contexts, SIZE, options, generator, 0, {})
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            return stop.value, (time.perf_counter() - started) / steps

    ratios = []
    with torch.inference_mode():
        for _ in range(rounds):
            batched, t_batched = run(True)
            sequential, t_sequential = run(False)
            ratios.append(t_sequential / t_batched)
    config = {"branches": list(CONTEXTS), "contexts": list(CONTEXTS.values()), "noisy_tokens": 64,
              "steps": steps, "rounds": rounds, "hidden": model.config.llm.hidden_size,
              "threads": torch.get_num_threads()}
    log(f"batched {t_batched * 1000:.1f} ms/step, sequential {t_sequential * 1000:.1f} ms/step")
    figure(BENCH, "speedup", statistics.median(ratios), "x", 1.0, True, config)
    figure(BENCH, "max_abs_diff", float((batched - sequential).abs().max()), "abs", 1e-4, False, config)


if __name__ == "__main__":
    main()
