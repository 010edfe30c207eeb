"""Quality of a checkpoint on a fixed slice of toyworld-bench-v1: exact and graded rates per task,
against the floors of issue 20, and how much its images depend on their references.

    python benchmarks/toyworld_quality.py [--quick] [--checkpoint default|DIR] [--out DIR]

Generates the first N scenes of each task of the test split (N = 10; --quick: 2) with
`tapestry.eval.toyworld.run_toyworld` (the same prompts, seeds and judge as `tapestry eval
toyworld`), and prints, as JSON lines (DESIGN §12), per task (and per layout for compose):
`<task>[_<layout>]_exact` and `_graded` with 95 % bootstrap intervals in `config.ci95`, story's
`persistence_exact` and how-to's `count_exact`. Targets are the issue's floors: compose exact
>= 0.50 and graded >= 0.80 in each layout; story graded >= 0.70; edit graded >= 0.80;
understand >= 0.90; howto graded >= 0.80 with image count exact >= 0.95. A slice this small is
a smoke reading (its intervals say how wide); the claims are made on the whole benchmark.

`reference_sensitivity`: over a few compose documents (inline; 6, --quick: 2), the mean
|Δ pixel| (0-255) of the generated target when only the first reference is swapped for another
identity (the reference's scene kept: same background, cell, size and rotation, another shape
and colour), divided by the mean |Δ| when only the seed changes. A model that reads its
references changes its image at least as much for a new identity as for new noise (target > 1;
the issue measured 0.03 for the first default).

Baselines work too (`--checkpoint oracle | copy-reference`): the oracle's rates are the judge's
ceiling (reference_sensitivity is not defined without a generator and is skipped).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, log, parse_args  # noqa: E402

BENCH = "toyworld_quality"
TASKS = ("compose", "story", "edit", "understand", "howto")
# task -> {figure: floor}; a None floor is reported without a target.
FLOORS = {
    "compose": {"exact": 0.50, "graded": 0.80},
    "story": {"graded": 0.70, "exact": None, "persistence_exact": None},
    "edit": {"graded": 0.80, "exact": None},
    "understand": {"exact": 0.90},
    "howto": {"graded": 0.80, "count_exact": 0.95, "exact": None},
}


def _options(parser) -> None:
    parser.add_argument("--checkpoint", default="default",
                        help="'default' (the shipped tapestry/assets/default), a pipeline folder, or a baseline")
    parser.add_argument("--out", default=None, help="keep the eval run here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="sample k is generated with seed + k")


def _value(block: dict, key: str) -> tuple[float | None, list[float] | None, int]:
    if key == "graded":
        return block["mean"], block["ci95"], block["n"]
    inner = block.get(key) or {}
    return inner.get("mean"), inner.get("ci95"), inner.get("n", 0)


def quality(args, n: int, out: Path) -> dict:
    from tapestry.eval.toyworld import ToyWorldEvalConfig, run_toyworld

    config = ToyWorldEvalConfig(checkpoint=args.checkpoint, split="test", n=n, tasks=TASKS, seed=args.seed)
    start = time.perf_counter()
    summary = run_toyworld(config, out, command=["benchmarks/toyworld_quality.py"] + sys.argv[1:])
    seconds = time.perf_counter() - start
    settings = json.loads((out / "run.json").read_text(encoding="utf-8"))["settings"]
    base = {"checkpoint": args.checkpoint, "checkpoint_hash": settings["checkpoint_hash"], "split": "test",
            "n_scenes_per_task": n, "seed": args.seed}
    for task, floors in FLOORS.items():
        blocks = {"": summary["tasks"][task]}
        if task == "compose":  # the floors hold in each layout
            blocks = {f"_{lay}": b for lay, b in summary["layouts"][task].items()}
        for suffix, block in blocks.items():
            for key, target in floors.items():
                value, ci, count = _value(block, key)
                if value is None:
                    continue
                figure(BENCH, f"{task}{suffix}_{key}", value, "rate" if key != "graded" else "score", target, True,
                       {**base, "task": task, "n": count, "ci95": ci})
    figure(BENCH, "overall_exact", summary["overall"]["exact"]["mean"], "rate", None, True,
           {**base, "n": summary["overall"]["n"], "ci95": summary["overall"]["exact"]["ci95"]})
    figure(BENCH, "overall_graded", summary["overall"]["mean"], "score", None, True,
           {**base, "n": summary["overall"]["n"], "ci95": summary["overall"]["ci95"]})
    figure(BENCH, "eval_seconds", seconds, "s", None, False, {**base, "documents": summary["samples"]})
    return base


def _swap_identity(scene_dict: dict) -> dict:
    """The same reference scene with another shape and colour (pattern kept)."""
    from tapestry.toyworld.spec import COLOURS, SHAPES

    entity = dict(scene_dict["entities"][0])
    entity["shape"] = SHAPES[(SHAPES.index(entity["shape"]) + 3) % len(SHAPES)]
    entity["colour"] = COLOURS[(COLOURS.index(entity["colour"]) + 3) % len(COLOURS)]
    return {**scene_dict, "entities": [entity, *scene_dict["entities"][1:]]}


def _target_pixels(doc) -> np.ndarray | None:
    from tapestry.document import ImageSegment
    from tapestry.toyworld.evaluate import _pixels

    for segment in doc.segments:
        if isinstance(segment, ImageSegment) and segment.role == "target":
            image = _pixels(segment)
            return None if image is None else np.asarray(image.convert("RGB"), dtype=np.float32)
    return None


def reference_sensitivity(args, docs: int, base: dict) -> None:
    from tapestry.document import ImageSegment
    from tapestry.eval.toyworld import prompt_of
    from tapestry.infer.pipeline import Pipeline
    from tapestry.toyworld.render import render_scene
    from tapestry.toyworld.spec import Scene
    from tapestry.toyworld.tasks import sample

    pipe = Pipeline.from_pretrained(args.checkpoint)
    by_reference, by_seed = [], []
    for index in range(docs):
        expected = sample("compose", "test", index, layout="inline")
        prompt = prompt_of(expected)
        swapped = prompt.copy()
        ref = next(s for s in swapped.segments if isinstance(s, ImageSegment) and s.role == "reference")
        scene = Scene.from_dict(_swap_identity(ref.meta["toyworld"]["scene"]))
        ref.image, ref.encoded, ref.src = render_scene(scene, expected.meta["toyworld"]["side"]), None, None
        seed = args.seed + index
        a = _target_pixels(pipe.generate(prompt, seed=seed))
        b = _target_pixels(pipe.generate(swapped, seed=seed))
        c = _target_pixels(pipe.generate(prompt, seed=seed + 1000))
        if a is None or b is None or c is None or a.shape != b.shape or a.shape != c.shape:
            log(f"{BENCH}: compose {index}: no comparable target image; skipped")
            continue
        by_reference.append(float(np.abs(a - b).mean()))
        by_seed.append(float(np.abs(a - c).mean()))
    if not by_seed:
        log(f"{BENCH}: reference_sensitivity: no document produced images")
        return
    ratio = float(np.mean(by_reference)) / max(float(np.mean(by_seed)), 1e-9)
    figure(BENCH, "reference_sensitivity", ratio, "x", 1.0, True,
           {**base, "documents": len(by_seed), "delta_reference": round(float(np.mean(by_reference)), 4),
            "delta_seed": round(float(np.mean(by_seed)), 4)})


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra=_options)
    n, docs = (2, 2) if args.quick else (10, 6)
    log(f"{BENCH}: {args.checkpoint} on the first {n} scenes of each task of toyworld-bench-v1")
    with tempfile.TemporaryDirectory(prefix="toyworld-quality-") as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "run"
        base = quality(args, n, out)
    if args.checkpoint in ("oracle", "copy-reference"):
        log(f"{BENCH}: reference_sensitivity needs a generator; skipped for the {args.checkpoint} baseline")
        return
    log(f"{BENCH}: reference_sensitivity over {docs} compose documents")
    reference_sensitivity(args, docs, base)


if __name__ == "__main__":
    main()
