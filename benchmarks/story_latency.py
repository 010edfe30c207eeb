"""End-to-end latency of `tapestry generate` on a 3-image ToyWorld story with the default checkpoint.

    python benchmarks/story_latency.py [--quick] [--checkpoint default] [--steps N]

What a user waits for: a fresh `tapestry generate DOC --json` process (imports, checkpoint load,
prefill, text, denoising, VAE decode, writing the folder and its page) on the first `test` story
with three target images, at the checkpoint's own resolution. Figures: `seconds` (median wall
time of the whole command; target ≤ 10 s on 2 CPU cores) and, from the engine's own clock, the
per-phase split (prefill, text, denoise, vae) plus what is left for start-up and writing.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, log, parse_args  # noqa: E402

BENCH = "story_latency"
TARGET_IMAGES = 3


def story_with_targets(side: int, wanted: int):
    from tapestry.toyworld import sample

    for index in range(500):
        doc = sample("story", "test", index, side=side)
        if sum(1 for s in doc.images() if s.role == "target") == wanted:
            return doc
    raise SystemExit(f"no test story with {wanted} target images among the first 500")


def main() -> None:
    def extra(parser):
        parser.add_argument("--checkpoint", default="default", help="'default' or a pipeline folder")
        parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the checkpoint's)")

    args = parse_args(__doc__.splitlines()[0], extra=extra)
    from tapestry.infer.pipeline import resolve_checkpoint
    from tapestry.storage import save_folder
    from tapestry.train.evaluate import judge_prompt

    folder = resolve_checkpoint(args.checkpoint)
    pipeline_json = json.loads((folder / "pipeline.json").read_text())
    side = int(pipeline_json.get("layout", {}).get("target_size", [32, 32])[0])
    doc = story_with_targets(side, TARGET_IMAGES)
    repeats = 2 if args.quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        prompt = Path(tmp) / "prompt"
        # the targets go in without pixels: the engine must generate every one of them
        save_folder(judge_prompt(doc), prompt)
        command = [sys.executable, "-m", "tapestry", "generate", str(prompt), "--checkpoint", str(folder),
                   "--seed", "0", "--json", "--quiet"]
        if args.steps:
            command += ["--steps", str(args.steps)]
        walls, summaries = [], []
        for round_ in range(repeats + 1):  # the first run warms the page cache and is not counted
            out = Path(tmp) / f"out-{round_}"
            started = time.perf_counter()
            done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"tapestry generate failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
            if round_:
                walls.append(wall)
                summaries.append(json.loads(done.stdout.strip().splitlines()[-1]))
    seconds = statistics.median(walls)
    phases = {name: statistics.median(s["timings"].get(name, 0.0) for s in summaries)
              for name in ("prefill", "text", "denoise", "vae")}
    images = summaries[0]["images"]
    config = {"checkpoint": str(args.checkpoint), "checkpoint_hash": summaries[0]["checkpoint_hash"],
              "story": doc.id, "side": side, "target_images": TARGET_IMAGES, "images_generated": images,
              "repeats": repeats, "cpu_count": os.cpu_count(), "steps": args.steps}
    log(f"{doc.id}: {images} images, median {seconds:.2f} s end to end; "
        + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    figure(BENCH, "seconds", seconds, "s", 10.0, False, config)
    for name, value in phases.items():
        figure(BENCH, f"{name}_seconds", value, "s", None, False, config)
    engine_total = sum(phases.values())
    figure(BENCH, "startup_and_io_seconds", max(0.0, seconds - engine_total), "s", None, False, config)


if __name__ == "__main__":
    main()
