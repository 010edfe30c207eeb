"""`tapestry eval toyworld`: the fixed ToyWorld benchmark, generated and scored by the exact judge.

The samples are those of toyworld-bench-v1 (`tasks.sample(task, "test", index, layout)`, the same
on every machine; `--n` keeps the first N of each task). Each sample goes through three stages,
each stored under OUT as soon as it is done, so a killed run resumes where it stopped:

    OUT/predictions/<id>/   the generated Document (folder written atomically)
    OUT/scores/<id>.json    the judge's result for it (written atomically): graded total and exact

A rerun reuses a stored prediction instead of generating again and a stored score instead of
judging again: nothing is generated or scored twice. A rerun with other settings (checkpoint
hash, seed, steps, guidance, ...) into the same OUT is refused, so one folder never mixes runs.
A sample whose generation raises is recorded as missing with its reason, never as a 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tapestry
from tapestry.atomic import atomic_write_text
from tapestry.document import Document, ImageSegment, TextSegment
from tapestry.errors import TapestryError

# Predictors that need no checkpoint: reference points for the judge, and for tests.
BASELINES = ("oracle", "copy-reference")


class EvalError(TapestryError):
    """An evaluation cannot run as asked (bad option, a folder holding another run, ...)."""


@dataclass(frozen=True)
class ToyWorldEvalConfig:
    checkpoint: str = "default"  # "default", a pipeline folder, or a baseline ("oracle", "copy-reference")
    split: str = "test"  # test = toyworld-bench-v1; val for development
    n: int | None = None  # first N scenes of each task (None: the whole benchmark)
    tasks: tuple[str, ...] = ("compose", "story", "edit", "understand", "howto")
    layouts: tuple[str, ...] = ("inline", "image-first", "interleaved")
    side: int = 64
    seed: int = 0  # sample k (in benchmark order) is generated with seed + k
    steps: int | None = None  # None: the pipeline's default
    guidance: str | None = None
    guidance_scales: dict = field(default_factory=dict)
    max_new_tokens: int | None = None
    max_images: int | None = None
    bootstrap: int = 1000  # resamples for the 95 % intervals

    def check(self) -> "ToyWorldEvalConfig":
        from tapestry.toyworld.tasks import LAYOUTS, TASKS

        if self.split not in ("test", "val"):
            raise EvalError(f"--split {self.split!r}: the benchmark is the test split (val for development)")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise EvalError(f"--tasks {','.join(bad) or '(none)'}: choose from {', '.join(TASKS)}")
        bad = [x for x in self.layouts if x not in LAYOUTS + ("interleaved",)]
        if bad or not self.layouts:
            raise EvalError(f"--layouts {','.join(bad) or '(none)'}: choose from inline, image-first, interleaved")
        if self.n is not None and self.n < 1:
            raise EvalError(f"--n must be at least 1, got {self.n}")
        if not 16 <= self.side <= 1024:
            raise EvalError(f"--side must be in 16..1024, got {self.side}")
        if self.seed < 0 or self.bootstrap < 100:
            raise EvalError("--seed must be >= 0 and --bootstrap at least 100")
        return self


# ----------------------------------------------------------------- samples
def benchmark_documents(config: ToyWorldEvalConfig) -> list[Document]:
    """The expected Documents, in benchmark order (task, index, layout)."""
    from tapestry.toyworld.splits import BENCH_SIZES
    from tapestry.toyworld.tasks import sample, task_layouts

    docs = []
    for task in config.tasks:
        count = BENCH_SIZES[task] if config.n is None else min(config.n, BENCH_SIZES[task])
        layouts = [x for x in task_layouts(task) if x in config.layouts]
        for index in range(count):
            for layout in layouts:
                docs.append(sample(task, config.split, index, layout=layout, side=config.side))
    if not docs:
        raise EvalError(f"no samples: tasks {config.tasks} have none of the layouts {config.layouts}")
    return docs


def prompt_of(expected: Document) -> Document:
    """What the model is given: the training-time evaluation's rule (targets emptied; how-to
    keeps only its goal, N-to-M), so training curves and this benchmark read alike."""
    from tapestry.toyworld.evaluate import judge_prompt

    return judge_prompt(expected)


# ---------------------------------------------------------------- predictors
Predictor = Callable[[Document, Document, int], Document]  # (prompt, expected, seed) -> predicted


def oracle_predictor(prompt: Document, expected: Document, seed: int) -> Document:
    """Renders the spec: every target drawn from its scene, every answer the expected one."""
    from tapestry.toyworld.render import render_scene
    from tapestry.toyworld.spec import Scene

    spec = expected.meta["toyworld"]
    out = expected.copy()
    k = 0
    for segment in out.segments:
        if isinstance(segment, ImageSegment) and segment.role == "target":
            raw = segment.meta.get("toyworld", {}).get("scene") or spec["scenes"][k]
            segment.image, segment.encoded, segment.src = render_scene(Scene.from_dict(raw), spec["side"]), None, None
            k += 1
        elif isinstance(segment, TextSegment) and segment.role == "target" and spec["task"] == "understand":
            segment.text = str(spec["answer"])
    return out


def copy_reference_predictor(prompt: Document, expected: Document, seed: int) -> Document:
    """Pastes the first given image into every target and answers nothing: what a model that
    copies its references would score."""
    given = next((s for s in prompt.segments if isinstance(s, ImageSegment) and s.has_pixels), None)
    out = prompt.copy()
    targets = [s for s in expected.segments if isinstance(s, ImageSegment) and s.role == "target"]
    if not any(isinstance(s, ImageSegment) and s.role == "target" for s in out.segments):
        out.segments.extend(ImageSegment("target") for _ in targets)  # how-to: the right count
    for segment in out.segments:
        if isinstance(segment, ImageSegment) and segment.role == "target" and given is not None:
            segment.image, segment.encoded, segment.src = given.image, given.encoded, None
            if segment.image is None and given.encoded is not None:
                from tapestry.toyworld.evaluate import _pixels

                segment.image = _pixels(given)
        elif isinstance(segment, TextSegment) and segment.role == "target":
            segment.text = ""
    return out


@dataclass
class Generator:
    """A predictor plus what identifies it in a report."""

    predict: Predictor
    checkpoint: str
    checkpoint_hash: str
    options: dict[str, Any]


def make_generator(config: ToyWorldEvalConfig) -> Generator:
    if config.checkpoint == "oracle":
        return Generator(oracle_predictor, "oracle", "baseline:oracle", {})
    if config.checkpoint == "copy-reference":
        return Generator(copy_reference_predictor, "copy-reference", "baseline:copy-reference", {})
    from tapestry.infer.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(config.checkpoint)
    overrides = {"steps": config.steps, "guidance": config.guidance, "max_new_tokens": config.max_new_tokens,
                 "max_images": config.max_images}
    if config.guidance_scales:
        overrides["guidance_scales"] = dict(config.guidance_scales)
    options = pipe.options(**overrides)  # checked now: a bad option fails before any work

    def predict(prompt: Document, expected: Document, seed: int) -> Document:
        return pipe.generate(prompt, **{**overrides, "seed": seed})

    shown = dataclasses.asdict(options)
    shown.pop("seed", None)
    return Generator(predict, config.checkpoint, pipe.checkpoint_hash, shown)


# ------------------------------------------------------------------ the run
def settings_record(config: ToyWorldEvalConfig, generator: Generator) -> dict[str, Any]:
    """What makes two runs the same run (compared on resume)."""
    return {"benchmark": "toyworld-bench-v1" if config.split == "test" else "toyworld-val",
            "split": config.split, "n": config.n, "tasks": list(config.tasks), "layouts": list(config.layouts),
            "side": config.side, "seed": config.seed, "checkpoint": generator.checkpoint,
            "checkpoint_hash": generator.checkpoint_hash, "generation": generator.options}


def _check_same_run(out: Path, settings: dict[str, Any]) -> None:
    path = out / "run.json"
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError):
        raise EvalError(f"{path}: unreadable run record; remove it or choose another --out") from None
    for key in sorted(set(previous) | set(settings)):
        if json.dumps(previous.get(key), sort_keys=True) != json.dumps(settings.get(key), sort_keys=True):
            raise EvalError(f"{out} holds a run with other settings ({key}: {previous.get(key)!r} there, "
                            f"{settings.get(key)!r} now); choose another --out to keep both")


def _safe_name(doc_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in doc_id)


EVAL_WRITER = "tapestry eval toyworld"
# what a run folder held before output markers existed (it resumes): run.json first
EVAL_LEGACY = ("run.json", "scores", "predictions", "scores.jsonl", "summary.json", "report.*", "*.png")


def run_toyworld(config: ToyWorldEvalConfig, out: str | os.PathLike, command: list[str] | None = None,
                 generator: Generator | None = None,
                 progress: Callable[[int, int], None] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Generate (or reuse), judge (or reuse), summarize and report. Returns the summary. An `out`
    holding files an eval did not write is refused unless `overwrite`."""
    from tapestry.atomic import check_output_dir, claim_output_dir
    from tapestry.storage import load_folder, save_folder
    from tapestry.toyworld.evaluate import JudgeError, judge_document

    config.check()
    out = Path(out)
    check_output_dir(out, EVAL_WRITER, overwrite, legacy=EVAL_LEGACY, resumable=True)
    expected_docs = benchmark_documents(config)
    generator = generator or make_generator(config)
    settings = settings_record(config, generator)
    _check_same_run(out, settings)
    claim_output_dir(out, EVAL_WRITER, overwrite, legacy=EVAL_LEGACY)
    command = list(sys.argv if command is None else command)
    record = {"settings": settings, "command": command, "tapestry": tapestry.__version__}
    atomic_write_text(out / "run.json", json.dumps(record, indent=1) + "\n")
    counts = {"generated": 0, "reused_predictions": 0, "judged": 0, "reused_scores": 0}
    results = []
    for k, expected in enumerate(expected_docs):
        name = _safe_name(expected.id)
        score_path = out / "scores" / f"{name}.json"
        pred_dir = out / "predictions" / name
        sample_seed = config.seed + k
        if score_path.is_file():
            try:
                stored = json.loads(score_path.read_text(encoding="utf-8"))
            except ValueError:
                stored = None  # a torn file cannot happen (atomic writes), but a hand-edited one can
            # A score stored before the exact metric existed is judged again from its prediction.
            if isinstance(stored, dict) and ("exact" in stored or "total" not in stored):
                results.append(stored)
                counts["reused_scores"] += 1
                if progress:
                    progress(k + 1, len(expected_docs))
                continue
        result: dict[str, Any]
        predicted = None
        if (pred_dir / "doc.json").is_file():
            predicted = load_folder(pred_dir)
            counts["reused_predictions"] += 1
        else:
            try:
                predicted = generator.predict(prompt_of(expected), expected, sample_seed)
            except TapestryError as e:
                result = {"id": expected.id, "missing": f"generation failed: {e}"}
            else:
                save_folder(predicted, pred_dir)
                counts["generated"] += 1
        if predicted is not None:
            try:
                result = judge_document(expected, predicted)
                counts["judged"] += 1
            except JudgeError as e:
                result = {"id": expected.id, "missing": f"judge: {e}"}
        spec = expected.meta["toyworld"]
        result.update(task=spec["task"], layout=spec["layout"], index=spec["index"], seed=sample_seed,
                      references=len(spec.get("references") or []))
        atomic_write_text(score_path, json.dumps(result) + "\n")
        results.append(result)
        if progress:
            progress(k + 1, len(expected_docs))
    from tapestry.eval.report import summarize_toyworld, write_toyworld_report

    summary = summarize_toyworld(results, config.bootstrap, config.seed)
    summary["counts"] = counts
    write_toyworld_report(out, results, summary, record, expected_docs)
    return summary
