"""`tapestry toyworld ...`: sample ToyWorld Documents, write the fixed benchmark, judge.

Mount in tapestry/cli.py with `app.add_typer(toyworld_cli.app, name="toyworld")`. Exit codes
follow the main CLI: 0 success, 1 a check failed (self-test thresholds, invalid documents),
2 misuse (bad option, bad path). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(name="toyworld", help="ToyWorld: a procedural world, its tasks as Documents, and an exact judge.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _group() -> None:
    """A world of shapes whose images a computer can judge exactly (DESIGN §10)."""


def _fail(message: str, code: int = 2) -> typer.Exit:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _progress(quiet: bool, total: int | None, what: str):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(what), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True, disable=quiet)


@app.command()
def sample(
    task: str = typer.Option("compose", help="compose | story | edit | understand | howto | copy (a diagnostic)."),
    layout: str = typer.Option("both", help="inline | image-first | both (compose, edit, understand; story and howto are interleaved)."),
    n: int = typer.Option(8, "--n", help="Documents per layout."),
    split: str = typer.Option("train", help="train | val | test."),
    seed: int = typer.Option(0, help="Train stream number (val and test are fixed sets: keep 0)."),
    start: int = typer.Option(0, help="Index of the first document in the split."),
    side: int = typer.Option(64, help="Image side in pixels (any size from 16 to 1024)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (replaced atomically if an earlier sample wrote it): one Document folder each, or shards."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out even if it holds files this command did not write."),
    shard: bool = typer.Option(False, "--shard", help="Write one webdataset shard <task>.tar instead of folders."),
    grid: Path | None = typer.Option(None, help="Also write a PNG contact sheet of the documents here."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write ToyWorld Documents of one task (spec in meta.toyworld, target images rendered).

    Example:

        tapestry toyworld sample --task compose --layout inline --n 8 --seed 0 --out samples/compose
    """
    from tapestry.atomic import OutputFolderError, check_output_dir, output_dir
    from tapestry.storage import save_folder, save_shard
    from tapestry.toyworld import tasks
    from tapestry.toyworld.spec import SpecError

    if task not in tasks.ALL_TASKS:
        raise _fail(f"--task {task!r} is not a task; choose one of {', '.join(tasks.ALL_TASKS)}")
    if layout == "both":
        layouts = list(tasks.task_layouts(task))
    elif layout in tasks.LAYOUTS:
        layouts = [layout] if layout in tasks.task_layouts(task) else list(tasks.task_layouts(task))
    else:
        raise _fail(f"--layout {layout!r}: choose inline, image-first or both")
    if n < 1 or start < 0:
        raise _fail("--n must be at least 1 and --start at least 0")
    try:
        check_output_dir(out, "tapestry toyworld sample", overwrite)
    except OutputFolderError as e:
        raise _fail(str(e)) from None
    docs = []
    try:
        with _progress(quiet, n * len(layouts), f"sampling {task}") as progress:
            bar = progress.add_task("sample", total=n * len(layouts))
            for index in range(start, start + n):
                for lay in layouts:
                    docs.append(tasks.sample(task, split, index, layout=lay, seed=seed, side=side))
                    progress.advance(bar)
    except SpecError as e:
        raise _fail(str(e)) from None
    with output_dir(out, "tapestry toyworld sample", overwrite) as tmp:
        if shard:
            save_shard(docs, tmp / f"{task}.tar")
        else:
            for doc in docs:
                save_folder(doc, tmp / doc.id)
    if grid is not None:
        from tapestry.atomic import atomic_file
        from tapestry.toyworld.preview import sheet

        with atomic_file(grid) as tmp_png:
            sheet(docs[:16]).save(tmp_png, format="PNG")
    if not quiet:
        Console(stderr=True).print(f"wrote {len(docs)} document(s) to {escape(str(out))}")


@app.command()
def bench(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the benchmark (replaced atomically if an earlier bench wrote it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out even if it holds files this command did not write."),
    compose: int = typer.Option(100, help="Compose scenes (each written in both layouts)."),
    story: int = typer.Option(100, help="Story documents."),
    edit: int = typer.Option(100, help="Edit scenes (each written in both layouts)."),
    understand: int = typer.Option(100, help="Understand questions (each written in both layouts)."),
    howto: int = typer.Option(50, help="How-to documents."),
    side: int = typer.Option(64, help="Image side in pixels."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; still prints the manifest."),
) -> None:
    """Write toyworld-bench-v1: the fixed test split, one shard per task plus manifest.json.

    The benchmark has no seed on purpose: it is the test split, the same on every machine
    (its sha256 sums are in the manifest).

    Example:

        tapestry toyworld bench --out bench/toyworld-v1 --compose 10 --story 10 --edit 10 --understand 10 --howto 5
    """
    from tapestry.atomic import OutputFolderError, check_output_dir
    from tapestry.toyworld.bench import BENCH_WRITER, write_bench
    from tapestry.toyworld.spec import SpecError

    sizes = {"compose": compose, "story": story, "edit": edit, "understand": understand, "howto": howto}
    try:
        check_output_dir(out, BENCH_WRITER, overwrite)
        with _progress(quiet, sum(sizes.values()), "writing toyworld-bench-v1") as progress:
            bar = progress.add_task("bench", total=sum(sizes.values()))
            manifest = write_bench(out, sizes, side, progress=lambda task, k: progress.advance(bar),
                                   overwrite=overwrite)
    except (SpecError, OutputFolderError) as e:
        raise _fail(str(e)) from None
    print(json.dumps(manifest, indent=None if quiet else 1))


@app.command()
def judge(
    pred: list[Path] | None = typer.Argument(None, help="Predicted Documents: folders, .json, .jsonl, .tar shards, or folders of them."),
    expected: Path | None = typer.Option(None, help="The benchmark folder/shards the predictions answer (matched by id); default: each prediction's own meta.toyworld."),
    self_test: bool = typer.Option(False, "--self-test", help="Check the judge itself on clean and corrupted renders (no PRED)."),
    n: int = typer.Option(100, "--n", help="Self-test: scenes (each clean, degraded twice and under 11 corruptions)."),
    seed: int = typer.Option(0, help="Self-test scenes, and the bootstrap of confidence intervals."),
    side: int = typer.Option(64, help="Self-test: image side in pixels."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (the report) and nothing else."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also write the report (with per-document scores) here, atomically."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Score generated ToyWorld Documents (per task, per layout, overall), or the judge itself.

    PRED: each Document's target images and answers are judged against its spec.

    --self-test: clean renders must average >= 0.99 (min >= 0.97) and be >= 0.99 exact; each corruption must push its attribute to <= 0.5, the total down and the exact rate to 0; mild blur + noise + JPEG must keep >= 0.9 graded (and >= 0.9 exact with full-resolution chroma). Exit 1 when one fails.

    Examples:

        tapestry toyworld judge --self-test --n 50 --json

        tapestry toyworld judge runs/model/outputs --expected bench/toyworld-v1 --json
    """
    if self_test:
        if pred:
            raise _fail("--self-test takes no PRED paths")
        if n < 1:
            raise _fail("--n must be at least 1")
        from tapestry.toyworld.selftest import run_self_test

        with _progress(quiet or json_output, n, "judge self-test") as progress:
            bar = progress.add_task("self-test", total=n)
            report = run_self_test(n=n, seed=seed, side=side, progress=lambda k: progress.update(bar, completed=k))
        _emit(report, json_output, out)
        if not report["ok"]:
            raise typer.Exit(1)
        return
    if not pred:
        raise _fail("give PRED paths to judge, or --self-test")
    report = _judge_paths(pred, expected, seed, quiet or json_output)
    _emit(report, json_output, out)
    if report["invalid"]:
        raise typer.Exit(1)


def _documents(path: Path):
    """Loaded samples under `path`; a benchmark folder is read through its manifest (so the
    manifest itself is not taken for a Document)."""
    from tapestry.storage import scan
    from tapestry.toyworld.splits import BENCH_NAME

    manifest = path / "manifest.json"
    if path.is_dir() and manifest.is_file():
        try:
            listing = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            listing = None
        if isinstance(listing, dict) and listing.get("name") == BENCH_NAME:
            for entry in listing.get("files", {}).values():
                yield from scan(path / entry["path"])
            return
    yield from scan(path)


def _judge_paths(paths: list[Path], expected_path: Path | None, seed: int, quiet: bool) -> dict:
    from tapestry.toyworld.evaluate import JudgeError, judge_document, summarize

    for p in paths + ([expected_path] if expected_path else []):
        if not p.exists():
            raise _fail(f"{p} does not exist")
    expected_docs: dict[str, object] = {}
    if expected_path is not None:
        for loaded in _documents(expected_path):
            if loaded.document is not None:
                expected_docs[loaded.document.id] = loaded.document
    results, invalid = [], []
    with _progress(quiet, None, "judging") as progress:
        bar = progress.add_task("judge", total=None)
        for path in paths:
            for loaded in _documents(path):
                progress.advance(bar)
                doc = loaded.document
                if doc is None:
                    invalid.extend(_problem_item(p) for p in loaded.problems)
                    continue
                reference = doc
                if expected_path is not None:
                    reference = expected_docs.get(doc.id)
                    if reference is None:
                        invalid.append({"source": loaded.source, "id": doc.id, "reason": "no expected document with this id"})
                        continue
                try:
                    results.append(judge_document(reference, doc))
                except JudgeError as e:
                    invalid.append({"source": loaded.source, "id": doc.id, "reason": str(e)})
    missing = sorted(set(expected_docs) - {r["id"] for r in results} - {i.get("id") for i in invalid})
    report = summarize(results, seed)
    report.update(judged=len(results), invalid=invalid, missing=missing, documents=results)
    return report


def _emit(report: dict, json_output: bool, out: Path | None) -> None:
    from tapestry.atomic import atomic_write_text

    if out is not None:
        atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    shown = {k: v for k, v in report.items() if k != "documents"}
    if json_output:
        print(json.dumps(shown))
        return
    console = Console(soft_wrap=True, highlight=False)
    if "clean_mean" in report:
        degraded = report["degraded"]
        console.print(f"clean mean {report['clean_mean']}  min {report['clean_min']}  exact {report['clean_exact']}  "
                      f"degraded mean {degraded['mean']}  exact {degraded['exact']} "
                      f"(full chroma {degraded['exact_full_chroma']})  ({report['n']} scenes at {report['side']} px)")
        for name, row in report["corruptions"].items():
            total = "-" if row["total"] is None else f"{row['total']:.3f}"
            console.print(f"  {name:17s} total {total}  attribute {row['attribute']}  exact {row['exact']}")
        console.print("[green]self-test passed[/]" if report["ok"] else
                      "[red]self-test failed:[/] " + escape("; ".join(report["failures"])))
        return
    exact = report["overall"]["exact"]
    console.print(f"judged {report['judged']} document(s): overall graded {report['overall']['mean']} "
                  f"(95% CI {report['overall']['ci95']}), exact {exact['mean']} (95% CI {exact['ci95']})")
    for name, row in report["layouts"].items():
        also = "".join(f"  {label} {row[key]['mean']}" for key, label in
                       (("persistence_exact", "persistence exact"), ("count_exact", "image count exact"))
                       if (row.get(key) or {}).get("mean") is not None)
        console.print(f"  {name:24s} n={row['n']:4d}  graded {row['mean']} {row['ci95']}  "
                      f"exact {row['exact']['mean']} {row['exact']['ci95']}{also}")
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    for item in report["invalid"]:
        err.print(f"[red]✗[/] {escape(problem_line(item))}")
    if report["missing"]:
        shown = ", ".join(report["missing"][:10]) + (" ..." if len(report["missing"]) > 10 else "")
        err.print(f"[red]✗[/] {len(report['missing'])} expected document(s) have no prediction: {escape(shown)}")


def _problem_item(problem) -> dict:
    """A loader's Problem as {source, id, reason}: the reason keeps the segment and field."""
    prefix = problem.source + (f": sample {problem.sample_id!r}" if problem.sample_id is not None else "") + ": "
    full = str(problem)
    item = {"source": problem.source, "reason": full[len(prefix):] if full.startswith(prefix) else problem.reason}
    if problem.sample_id is not None:
        item["id"] = problem.sample_id
    return item


def problem_line(item: dict) -> str:
    """`SOURCE: sample 'ID': REASON`, the shape of every other problem line tapestry prints."""
    where = item.get("source", "<unknown>")
    if item.get("id") is not None:
        where += f": sample {item['id']!r}"
    return f"{where}: {item.get('reason', 'invalid')}"
