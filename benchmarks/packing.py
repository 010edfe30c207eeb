"""Packing efficiency of ToyWorld documents into rows of a token budget (DESIGN §4, §12).

    python benchmarks/packing.py [--quick]

A mix of every ToyWorld task and layout (train split, 32 px images, the default model's token
grids) is laid out and packed best-fit decreasing (`tapestry.layout.pack_layouts`) at budgets of
2k, 8k and 32k tokens. The last row of a pack is only partly filled; a streaming loader carries
its documents over to the next step, so `efficiency` counts full rows only (the figure a long
training run sees) and `efficiency_with_tail` counts every row. Target: ≥ 0.98.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, log, parse_args  # noqa: E402

BENCH = "packing"
BUDGETS = (2048, 8192, 32768)
ROWS_AT_LARGEST = 5  # enough documents for this many rows at the largest budget


def main() -> None:
    parse_args(__doc__.splitlines()[0])
    from tapestry.layout import LayoutConfig, layout_document, pack_layouts
    from tapestry.models.common.tokenizer import train_bpe
    from tapestry.toyworld.tasks import TASKS, sample, task_layouts

    started = time.perf_counter()
    kinds = [(task, layout) for task in TASKS for layout in task_layouts(task)]
    docs = []
    index = 0
    layout_config = LayoutConfig(vit_patch=8, vae_downsample=4, latent_patch=2, target_size=(32, 32))
    phrasing = [s.text for i in range(30) for t, lay in kinds for s in sample(t, "train", i, lay, side=32).texts()]
    tokenizer = train_bpe(phrasing, vocab_size=1024)
    singles = []
    total = 0
    while total < ROWS_AT_LARGEST * BUDGETS[-1]:
        task, layout = kinds[index % len(kinds)]
        doc = sample(task, "train", index // len(kinds), layout, side=32)
        single = layout_document(doc, tokenizer, layout_config)
        singles.append(single)
        total += single.length
        index += 1
    log(f"{len(singles)} documents, {total} tokens, mean {total / len(singles):.0f} tokens "
        f"({time.perf_counter() - started:.1f} s to sample and lay out)")
    lengths = sorted(s.length for s in singles)
    for budget in BUDGETS:
        t0 = time.perf_counter()
        rows = pack_layouts(singles, budget, tokenizer.pad_id)
        seconds = time.perf_counter() - t0
        rows.sort(key=lambda r: -r.real_tokens)
        full = rows[:-1] if len(rows) > 1 else rows
        efficiency = sum(r.real_tokens for r in full) / (len(full) * budget)
        with_tail = sum(r.real_tokens for r in rows) / (len(rows) * budget)
        config = {"budget": budget, "documents": len(singles), "rows": len(rows), "tokens": total,
                  "doc_tokens_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]],
                  "pack_seconds": round(seconds, 3), "image_side": 32}
        figure(BENCH, "efficiency", efficiency, "fraction", 0.98, True, config)
        figure(BENCH, "efficiency_with_tail", with_tail, "fraction", None, True, config)


if __name__ == "__main__":
    main()
