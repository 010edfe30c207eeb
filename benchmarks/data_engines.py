"""Image and web data engine throughput with the offline provider on 2 cores.

    python benchmarks/data_engines.py [--quick]

Inputs are written locally before timing (`tapestry.data.samples`): for `image-inline` the
scikit-image photos astronaut, coffee, chelsea and rocket at half size (256-300 px a side),
each copied six times under new names (24 images); for `web-howto` the demo how-to pages
(an HTML page full of web mess, a markdown page, a WARC of two pages) with the HTML page copied
21 times (24 pages). Each timed run is the whole engine as the CLI runs it (`engine.run`
with 2 local workers: pool start, model steps through the offline provider, GrabCut and
trafilatura, image encoding, shard writes, manifest) on a fresh output folder, default configs.

Figures:
- images_per_s, image-inline (target 2: a 10k-image folder in under 1.5 h on 2 cores).
- pages_per_s, web-howto (target 5).
- stage_seconds_per_input, one per stage of each pipeline (busy seconds summed over workers,
  per image or page; no target): where the time goes.

- local_images_per_s, per local model stage (detect: OWLv2, masks: SAM with 2 boxes per image,
  embed: DINOv2 and CLIP, quality: the learned scorer) at batch 1 and batch 16 on the CPU, over 32
  scikit-image photos at 256 px, and local_batch_speedup (batch 16 / batch 1, target 1.5: batching
  must pay). The checkpoints are the tiny random-weight ones of `tapestry.data.tiny_models` unless
  `--models DIR` names a folder holding owlv2/, sam/, dinov2/, clip/ and quality.safetensors in the
  same layouts (real checkpoints, for real compute figures); `--skip-engines` measures only these.

`--quick` runs each pipeline once instead of taking the best of three rounds. The machine's load
average is recorded in each figure's config: other work on the two cores lowers every figure.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, log, parse_args  # noqa: E402

BENCH = "data_engines"
WORKERS = 2


def prepare(folder: Path) -> tuple[Path, Path]:
    from tapestry.data import samples

    photos, pages = folder / "photos", folder / "pages"
    for path in samples.write_photos(photos, toyworld=False):
        for k in range(1, 6):
            shutil.copyfile(path, path.with_name(f"{path.stem}-copy{k}{path.suffix}"))
    samples.write_pages(pages)
    for k in range(1, 21):  # same page, new names: new documents, the same amount of work each
        shutil.copyfile(pages / "coffee.html", pages / f"coffee-copy{k}.html")
    return photos, pages


def timed_run(inputs: Path, pipeline: str) -> dict:
    from tapestry.data.engine import EngineOptions, run
    from tapestry.data.pipelines import build_config
    from tapestry.data.providers import ProviderConfig

    out = Path(tempfile.mkdtemp(prefix="data-engines-out-"))
    try:
        options = EngineOptions(pipeline, build_config(pipeline), ProviderConfig(), out, workers=WORKERS,
                                progress=False)
        start = time.perf_counter()
        summary = run([str(inputs)], options)
        summary["wall_seconds"] = time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if summary["exit_code"] != 0:
        raise SystemExit(f"{pipeline} failed on the benchmark inputs: {summary['failures']}")
    return summary


def local_models(folder: Path, models: Path | None, repeats: int) -> None:
    """Images per second of each local model stage at batch 1 and 16 (best of `repeats`)."""
    import numpy as np
    import torch
    from skimage import data

    from tapestry.data.providers.local import LocalDetector, LocalEmbedder, LocalSegmenter
    from tapestry.data.providers.quality_net import LearnedQuality
    from tapestry.data.tiny_models import write_tiny_models

    if models is None:
        log("writing the tiny checkpoints ...")
        paths = write_tiny_models(folder / "models")
    else:
        paths = {k: models / k for k in ("owlv2", "sam", "dinov2", "clip")}
        paths["quality"] = models / "quality.safetensors"
    import cv2

    photos = [cv2.resize(getattr(data, name)(), (256, 256), interpolation=cv2.INTER_AREA)
              for name in ("astronaut", "coffee", "chelsea", "rocket")]
    images = [np.ascontiguousarray(np.roll(photos[k % 4], 7 * k, axis=1)) for k in range(32)]
    spec = lambda kind: f"local:{paths[kind]}"  # noqa: E731
    detector, segmenter = LocalDetector(spec("owlv2")), LocalSegmenter(spec("sam"))
    dino, clip = LocalEmbedder(spec("dinov2")), LocalEmbedder(spec("clip"), role="image-text")
    quality = LearnedQuality(spec("quality"))
    queries = [["person", "cup", "cat", "rocket"]] * len(images)
    boxes = [[[100.0, 100.0, 600.0, 700.0], [300.0, 200.0, 900.0, 900.0]]] * len(images)
    stages = {
        "detect": lambda b: detector.detect(images, queries, min_score=0.0, batch_size=b),
        "masks": lambda b: segmenter.segment(images, boxes, batch_size=b),
        "embed-dinov2": lambda b: dino.embed(images, batch_size=b),
        "embed-clip": lambda b: clip.embed(images, batch_size=b),
        "quality": lambda b: quality.score(images, batch_size=b),
    }
    base = {"device": "cpu", "images": len(images), "side": 256, "threads": torch.get_num_threads(),
            "checkpoints": "tiny random weights" if models is None else str(models), "repeats": repeats,
            "load_average_1m": round(os.getloadavg()[0], 2)}
    for stage, fn in stages.items():
        fn(1)  # warm up (first calls allocate)
        rates = {}
        for batch in (1, 16):
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                fn(batch)
                best = min(best, time.perf_counter() - start)
            rates[batch] = len(images) / best
            figure(BENCH, "local_images_per_s", rates[batch], "images/s", None, True,
                   {**base, "stage": stage, "batch": batch})
        figure(BENCH, "local_batch_speedup", rates[16] / rates[1], "x", 1.5, True, {**base, "stage": stage})


def main() -> None:
    def extra(parser) -> None:
        parser.add_argument("--models", type=Path, default=None,
                            help="folder with owlv2/, sam/, dinov2/, clip/, quality.safetensors (default: tiny ones)")
        parser.add_argument("--skip-engines", action="store_true", help="only the local model figures")

    args = parse_args(__doc__.splitlines()[0], extra=extra)
    repeats = 1 if args.quick else 3
    folder = Path(tempfile.mkdtemp(prefix="data-engines-in-"))
    try:
        local_models(folder, args.models, 2 if args.quick else 5)
        if args.skip_engines:
            return
        log("writing the benchmark inputs ...")
        photos, pages = prepare(folder)
        import webdataset  # noqa: F401 - a one-time cost of the shard writer, paid before timing

        best: dict[str, dict] = {}
        for round_ in range(repeats):
            for pipeline, inputs in (("image-inline", photos), ("web-howto", pages)):
                log(f"round {round_ + 1}/{repeats}: {pipeline} ...")
                summary = timed_run(inputs, pipeline)
                if pipeline not in best or summary["wall_seconds"] < best[pipeline]["wall_seconds"]:
                    best[pipeline] = summary
        base = {"provider": "offline", "workers": WORKERS, "executor": "local", "repeats": repeats,
                "cores": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)}
        for pipeline, metric, target, unit_of_work in (("image-inline", "images_per_s", 2.0, "images"),
                                                       ("web-howto", "pages_per_s", 5.0, "pages")):
            summary = best[pipeline]
            # a WARC holds several pages: count what the first stage saw, not the files
            count = summary["stages"]["load" if pipeline == "image-inline" else "extract"]["in"]
            figure(BENCH, metric, count / summary["wall_seconds"], f"{unit_of_work}/s", target, True,
                   {**base, "pipeline": pipeline, unit_of_work: count, "files": summary["inputs"]["total"],
                    "documents": summary["documents"], "wall_seconds": round(summary["wall_seconds"], 3)})
            for stage, values in summary["stages"].items():
                if values.get("seconds", 0) >= 0.0005:
                    figure(BENCH, "stage_seconds_per_input", values["seconds"] / count, "s", None, False,
                           {**base, "pipeline": pipeline, "stage": stage})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
