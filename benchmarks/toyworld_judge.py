"""The ToyWorld judge against clean, corrupted and degraded renders, and its speed.

    python benchmarks/toyworld_judge.py [--quick]

Runs `tapestry.toyworld.selftest.run_self_test` at 64 px (the readable resolution the thresholds
are set for) and reports, as JSON lines: clean_mean (target 0.99), clean_min (0.97),
degraded_mean (0.9), worst_corruption_attribute (the highest mean sub-score any corruption
leaves on the attribute it broke; target <= 0.5), the strict figures clean_exact (0.99),
degraded_exact_full_chroma (0.9; degraded_exact, with 4:2:0 JPEG chroma, is informative) and
worst_corruption_exact (the highest exact rate any corruption leaves; target 0), and
ms_per_image (judge time per image including its share of the reference reading; informative). Then the same self-test at 32 px
(what the small models are trained at) and 128 px, reported with the same names under
`config.side`; thresholds are the issue's, held at 64 px only. `--quick`: 20 scenes instead of
200 (same sizes).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, log, parse_args  # noqa: E402

BENCH = "toyworld_judge"


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    from tapestry.toyworld.selftest import CORRUPTIONS, run_self_test

    n = 20 if args.quick else 200
    for side in (64, 32, 128):
        log(f"{BENCH}: self-test, {n} scenes at {side} px")
        start = time.perf_counter()
        report = run_self_test(n=n, seed=0, side=side)
        seconds = time.perf_counter() - start
        images = n * (3 + len(CORRUPTIONS))  # clean, degraded twice and each corruption per scene
        config = {"n": n, "seed": 0, "side": side}
        held = side == 64  # the thresholds apply at the readable resolution
        figure(BENCH, "clean_mean", report["clean_mean"], "score", 0.99 if held else None, True, config)
        figure(BENCH, "clean_min", report["clean_min"], "score", 0.97 if held else None, True, config)
        figure(BENCH, "degraded_mean", report["degraded"]["mean"], "score", 0.9 if held else None, True, config)
        worst = max(row["attribute"] for row in report["corruptions"].values() if row["attribute"] is not None)
        figure(BENCH, "worst_corruption_attribute", worst, "score", 0.5 if held else None, False, config)
        # The strict figure (issue 20): share of images judged exact.
        figure(BENCH, "clean_exact", report["clean_exact"], "rate", 0.99 if held else None, True, config)
        figure(BENCH, "degraded_exact_full_chroma", report["degraded"]["exact_full_chroma"], "rate",
               0.9 if held else None, True, config)
        figure(BENCH, "degraded_exact", report["degraded"]["exact"], "rate", None, True, config)
        worst = max(row["exact"] for row in report["corruptions"].values() if row["exact"] is not None)
        figure(BENCH, "worst_corruption_exact", worst, "rate", 0.0 if held else None, False, config)
        figure(BENCH, "ms_per_image", 1000 * seconds / images, "ms", None, False, config)


if __name__ == "__main__":
    main()
