"""benchmarks/families.py's ToyWorld column: checkpoints scored on a slice of toyworld-bench-v1,
named by their own family, ratios to mot."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_toyworld_column_names_checkpoints_by_family_and_compares_them_to_mot(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import families
    finally:
        sys.path.pop(0)
    capsys.readouterr()
    families.main(["--toyworld", "default", "--toyworld", "default", "--toyworld-n", "1", "--toyworld-only"])
    figures = {r["metric"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    # the second checkpoint of one family is told apart, not written over
    for name in ("mot", "mot_2"):
        graded = figures[f"toyworld_graded_{name}"]
        assert 0.0 <= graded["value"] <= 1.0 and graded["config"]["n"] == 8, graded  # one scene per task and layout
        assert graded["config"]["family"] == "mot" and graded["config"]["checkpoint_hash"].startswith("sha256:")
        assert 0.0 <= figures[f"toyworld_exact_{name}"]["value"] <= 1.0
        for task, n in (("compose", 2), ("story", 1), ("edit", 2), ("understand", 2), ("howto", 1)):
            assert figures[f"toyworld_{task}_graded_{name}"]["config"]["n"] == n
    # same checkpoint, same seeds: the ratio is exactly one, and only the speed figures are skipped
    assert figures["toyworld_graded_ratio_mot_2_mot"]["value"] == 1.0
    assert not any(m.startswith(("image_latency", "train_")) for m in figures)
