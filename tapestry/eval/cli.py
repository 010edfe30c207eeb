"""`tapestry eval ...`: ToyWorld benchmark runs, ablations, judge protocols, embedding metrics.

Exit codes follow the main CLI: 0 success, 1 the run finished with missing samples or stopped on
its budget (what it had is written; rerun to resume), 2 misuse or bad input (the message names
the file, sample and field).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from tapestry.errors import TapestryError

app = typer.Typer(name="eval", help="Evaluation: ToyWorld benchmark, ablations, judge protocols, metrics.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
ablation_app = typer.Typer(name="ablation", help="The papers' ablations over the same ToyWorld scenes.",
                           no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(ablation_app, name="ablation")


def _fail(message: str, code: int = 2) -> typer.Exit:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _progress(quiet: bool, what: str):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(what), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True, disable=quiet)


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip())


def _config(checkpoint, split, n, tasks, layouts, side, seed, steps, bootstrap, guidance=None, scales=None):
    from tapestry.eval.toyworld import ToyWorldEvalConfig

    return ToyWorldEvalConfig(checkpoint=checkpoint, split=split, n=n, tasks=_split_list(tasks),
                              layouts=_split_list(layouts), side=side, seed=seed, steps=steps,
                              guidance=guidance, guidance_scales=scales or {}, bootstrap=bootstrap).check()


def _parse_scales(values: list[str]) -> dict[str, float]:
    out = {}
    for value in values:
        name, sep, number = value.partition("=")
        try:
            out[name.strip()] = float(number)
        except ValueError:
            raise TapestryError(f"--scale {value!r}: expected NAME=NUMBER, e.g. gamma_txt=8") from None
        if not sep or not name.strip():
            raise TapestryError(f"--scale {value!r}: expected NAME=NUMBER, e.g. gamma_txt=8")
    return out


def _run(fn, quiet: bool, what: str):
    try:
        with _progress(quiet, what) as progress:
            bar = progress.add_task(what, total=None)
            return fn(lambda k, total: progress.update(bar, completed=k, total=total))
    except TapestryError as e:
        raise _fail(str(e)) from None


def _command(ctx: typer.Context) -> list[str]:
    """The command as a user would type it again: every option spelled out (defaults included), so
    the report's line reproduces the run even if a default changes later."""
    words = ["tapestry", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if getattr(param, "param_type_name", "") != "option" or value is None or param.name in ("quiet", "json_output"):
            continue
        flag = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            if param.secondary_opts:
                words.append(flag if value else max(param.secondary_opts, key=len))
            elif value:
                words.append(flag)
            continue
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            words += [flag, str(item)]
    return words


OVERWRITE_HELP = "Write into --out even if it holds files this command did not write."
CHECKPOINT_HELP = "'default', a pipeline folder (tapestry export), or a baseline: oracle | copy-reference."


@app.command()
def toyworld(
    ctx: typer.Context,
    checkpoint: str = typer.Option("default", help=CHECKPOINT_HELP),
    split: str = typer.Option("test", help="test (toyworld-bench-v1) | val."),
    n: Optional[int] = typer.Option(None, "--n", help="First N scenes of each task (default: the whole benchmark)."),
    tasks: str = typer.Option("compose,story,edit,understand,howto", help="Comma-separated tasks."),
    layouts: str = typer.Option("inline,image-first,interleaved", help="Comma-separated layouts."),
    side: int = typer.Option(64, help="Image side in pixels (the benchmark's is 64)."),
    seed: int = typer.Option(0, help="Sample k is generated with seed + k; also seeds the bootstrap."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the checkpoint's)."),
    guidance: Optional[str] = typer.Option(None, help="none | cfg | illume | inset | bagel."),
    scale: list[str] = typer.Option([], "--scale", help="A guidance scale NAME=VALUE (gamma_txt=8, s1=4, ...). Repeat."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the 95 % intervals."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (resumable: rerun the same command after a kill)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print {overall, tasks: {task: {layout: mean}}, ci95, exact: {the same, strict}} only."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Generate the ToyWorld benchmark with a checkpoint and score it with the exact judge.

    Writes report.md, report.html (input / output / expected / score per sample), scores.jsonl,
    summary.json and scores_by_task.png (95 % bootstrap CIs). Rerun the same command after a kill:
    stored predictions and scores are reused, nothing is generated or scored twice.

    Example:

        tapestry eval toyworld --checkpoint default --split test --n 20 --out runs/eval/default --json
    """
    from tapestry.eval.report import json_summary
    from tapestry.eval.toyworld import run_toyworld

    try:
        config = _config(checkpoint, split, n, tasks, layouts, side, seed, steps, bootstrap, guidance,
                         _parse_scales(scale))
    except TapestryError as e:
        raise _fail(str(e)) from None
    summary = _run(lambda p: run_toyworld(config, out, _command(ctx), progress=p, overwrite=overwrite), quiet or json_output, "toyworld eval")
    if json_output:
        print(json.dumps(json_summary(summary)))
    else:
        console = Console(soft_wrap=True, highlight=False)
        exact = summary["overall"]["exact"]
        console.print(f"overall graded {summary['overall']['mean']} (95% CI {summary['overall']['ci95']}), "
                      f"exact {exact['mean']} (95% CI {exact['ci95']}); n={summary['overall']['n']}, "
                      f"missing {len(summary['missing'])}")
        for task, by in summary["layouts"].items():
            for lay, block in by.items():
                console.print(f"  {task + '/' + lay:24s} n={block['n']:4d}  graded {block['mean']} {block['ci95']}  "
                              f"exact {block['exact']['mean']} {block['exact']['ci95']}{_also(block)}")
        console.print(f"counts {summary['counts']}; report: {escape(str(out / 'report.md'))}")
    if summary["missing"]:
        raise typer.Exit(1)


def _also(block: dict) -> str:
    """Story's persistence and how-to's image count, strict, when the block has them."""
    parts = [f"{name} {block[key]['mean']}" for key, name in (("persistence_exact", "persistence exact"),
                                                            ("count_exact", "image count exact"))
             if (block.get(key) or {}).get("mean") is not None]
    return ("  " + "  ".join(parts)) if parts else ""


@ablation_app.command("placement")
def ablation_placement(
    ctx: typer.Context,
    inline: Optional[str] = typer.Option(None, "--inline", help="Checkpoint trained on inline documents only (with --image-first: the paper's two-model ablation)."),
    image_first: Optional[str] = typer.Option(None, "--image-first", help="Checkpoint trained on image-first documents only, same scenes and budget."),
    checkpoint: str = typer.Option("default", help="Without --inline/--image-first: one checkpoint judged in both layouts. " + CHECKPOINT_HELP),
    split: str = typer.Option("test", help="test | val."),
    n: Optional[int] = typer.Option(None, "--n", help="First N scenes of each task."),
    tasks: str = typer.Option("compose", help="compose, edit and/or understand (the tasks written in both layouts)."),
    side: int = typer.Option(64, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Generation and bootstrap seed."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples."),
    out: Path = typer.Option(..., "--out", "-o", help="Ablation folder (resumable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Inset's placement ablation: inline vs image-first on the same scenes, by number of references, graded and exact.

    With --inline and --image-first (the paper's way): two checkpoints trained with equal budgets
    on the same scenes, one on each layout, each judged in its own layout. With --checkpoint
    only: one model judged in both layouts. Differences are paired by scene.

    Examples:

        tapestry eval ablation placement --inline runs/placement-inline/export --image-first runs/placement-image-first/export --n 100 --out runs/ablation/placement

        tapestry eval ablation placement --checkpoint default --n 50 --out runs/ablation/placement-default
    """
    from tapestry.eval import ablation

    if (inline is None) != (image_first is None):
        raise _fail("give both --inline and --image-first (two models), or neither (--checkpoint)")
    try:
        config = _config(inline or checkpoint, split, n, tasks, "inline,image-first", side, seed, steps, bootstrap)
    except TapestryError as e:
        raise _fail(str(e)) from None
    result = _run(lambda p: ablation.placement(config, out, _command(ctx), p, inline, image_first, overwrite=overwrite),
                  quiet or json_output, "placement")
    _print_ablation(result, json_output, out)


@ablation_app.command("references")
def ablation_references(
    ctx: typer.Context,
    vit: str = typer.Option(..., help="Checkpoint trained with ViT-only references (Inset)."),
    vae: str = typer.Option(..., help="Checkpoint trained with ViT + VAE references (BAGEL)."),
    split: str = typer.Option("test", help="test | val."),
    n: Optional[int] = typer.Option(None, "--n", help="First N scenes of each task."),
    tasks: str = typer.Option("compose,story,edit", help="Comma-separated tasks."),
    side: int = typer.Option(64, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Generation and bootstrap seed."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples."),
    out: Path = typer.Option(..., "--out", "-o", help="Ablation folder (resumable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Inset's reference ablation: ViT-only vs ViT+VAE references (one checkpoint of each).

    Example:

        tapestry eval ablation references --vit runs/vit/export --vae runs/vae/export --n 50 --out runs/ablation/refs
    """
    from tapestry.eval import ablation

    try:
        config = _config(vit, split, n, tasks, "inline,image-first,interleaved", side, seed, steps, bootstrap)
    except TapestryError as e:
        raise _fail(str(e)) from None
    result = _run(lambda p: ablation.references(config, vit, vae, out, _command(ctx), p, overwrite=overwrite), quiet or json_output, "references")
    _print_ablation(result, json_output, out)


@ablation_app.command("compare")
def ablation_compare(
    ctx: typer.Context,
    a: str = typer.Option(..., "--a", help="The first checkpoint (e.g. trained with MMFS)."),
    b: str = typer.Option(..., "--b", help="The second, which differs from it in one switch."),
    names: str = typer.Option("a,b", help="Labels of the two, comma-separated (mmfs,no_mmfs)."),
    split: str = typer.Option("test", help="test | val."),
    n: Optional[int] = typer.Option(None, "--n", help="First N scenes of each task."),
    tasks: str = typer.Option("compose,story,edit", help="Comma-separated tasks."),
    layouts: str = typer.Option("inline,image-first,interleaved", help="Comma-separated layouts."),
    side: int = typer.Option(64, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Generation and bootstrap seed."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples."),
    out: Path = typer.Option(..., "--out", "-o", help="Ablation folder (resumable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Two checkpoints that differ in one switch, on the same samples, by task and number of references.

    For the papers' ablations at equal budget: MM-Interleaved's MMFS (with vs without) and
    DuetGen's connector (all layers vs the last). Graded and exact per row with CIs, and the
    difference A - B paired by sample.

    Example:

        tapestry eval ablation compare --a runs/mmi-toyworld/export --b runs/mmi-toyworld-nommfs/export --names mmfs,no_mmfs --out runs/ablation/mmfs
    """
    from tapestry.eval import ablation

    labels = tuple(x.strip() for x in names.split(","))
    if len(labels) != 2:
        raise _fail(f"--names: two labels, comma-separated (mmfs,no_mmfs), got {names!r}")
    try:
        config = _config(a, split, n, tasks, layouts, side, seed, steps, bootstrap)
        _config(b, split, n, tasks, layouts, side, seed, steps, bootstrap)
    except TapestryError as e:
        raise _fail(str(e)) from None
    result = _run(lambda p: ablation.compare(config, a, b, labels, out, _command(ctx), p, overwrite=overwrite),
                  quiet or json_output, "compare")
    _print_ablation(result, json_output, out)


@ablation_app.command("guidance")
def ablation_guidance(
    ctx: typer.Context,
    checkpoint: str = typer.Option("default", help=CHECKPOINT_HELP),
    rule: str = typer.Option("illume", help="cfg | illume | inset | bagel."),
    grid: list[str] = typer.Option([], "--grid", help="A scale and its values, NAME=V1,V2,... (gamma_txt=1,2,4,8). Repeat."),
    baseline: bool = typer.Option(True, help="Also run without guidance (the reference row)."),
    split: str = typer.Option("test", help="test | val."),
    n: Optional[int] = typer.Option(None, "--n", help="First N scenes of each task."),
    tasks: str = typer.Option("compose,story,edit", help="Comma-separated tasks."),
    side: int = typer.Option(64, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Generation and bootstrap seed."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples."),
    out: Path = typer.Option(..., "--out", "-o", help="Ablation folder (resumable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """A sweep of a guidance rule's scales (ILLUME-X's γ_txt/γ_img table), score vs scale plotted.

    Example:

        tapestry eval ablation guidance --rule illume --grid gamma_txt=1,4,8 --grid gamma_img=1 --n 20 --out runs/ablation/guidance
    """
    from tapestry.eval import ablation

    try:
        parsed: dict[str, list[float]] = {}
        for item in grid:
            name, sep, values = item.partition("=")
            if not sep or not name.strip():
                raise TapestryError(f"--grid {item!r}: expected NAME=V1,V2,...")
            try:
                parsed[name.strip()] = [float(v) for v in values.split(",") if v.strip()]
            except ValueError:
                raise TapestryError(f"--grid {item!r}: the values must be numbers") from None
        config = _config(checkpoint, split, n, tasks, "inline,image-first,interleaved", side, seed, steps, bootstrap)
        from tapestry.models.common.guidance import validate_scales

        for point in ablation.guidance_grid(parsed):
            validate_scales({"illume": "two_condition"}.get(rule, rule), **point)
    except (TapestryError, ValueError, KeyError) as e:
        raise _fail(str(e)) from None
    result = _run(lambda p: ablation.guidance(config, rule, parsed, out, _command(ctx), p, baseline, overwrite=overwrite), quiet or json_output,
                  "guidance sweep")
    _print_ablation(result, json_output, out)


def _print_ablation(result: dict, json_output: bool, out: Path) -> None:
    if json_output:
        print(json.dumps(result))
        return
    print((out / "report.md").read_text(encoding="utf-8"))


@app.command("judge")
def judge_command(
    ctx: typer.Context,
    protocol: str = typer.Option(..., help="interleavebench | duetgen | ilscore | opening | isg."),
    bench: Path = typer.Option(..., help="The benchmark: OpenING test_data.jsonl, ISG-Bench.jsonl, or tapestry Documents."),
    pred: Optional[Path] = typer.Option(None, help="The model's answers: OpenING folder of <uid>.json, ISG .jsonl (not for Documents: their targets are the answers)."),
    format: str = typer.Option("auto", "--format", help="opening | isg | documents | auto (from the protocol)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (resumable)."),
    limit: Optional[int] = typer.Option(None, help="Judge the first N samples only."),
    timeout: float = typer.Option(60.0, help="Seconds per judge call."),
    retries: int = typer.Option(4, help="Retries of a failed call (timeouts, 429, 5xx), with back-off."),
    concurrency: int = typer.Option(4, help="Judge calls in flight."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens-budget", help="Stop cleanly after this many tokens."),
    max_cost: Optional[float] = typer.Option(None, "--max-cost", help="Stop cleanly after this much money (with --price-in/--price-out)."),
    price_in: float = typer.Option(0.0, help="Price per million prompt tokens."),
    price_out: float = typer.Option(0.0, help="Price per million completion tokens."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Score a model's answers with a paper's judge protocol through an OpenAI-compatible VLM.

    The judge is configured from the environment: TAPESTRY_JUDGE_BASE_URL (e.g.
    http://localhost:8000/v1 for vLLM), TAPESTRY_JUDGE_MODEL, TAPESTRY_JUDGE_API_KEY. Calls are
    cached under OUT/cache and budgeted in OUT/budget.json; a failed judgement is reported missing
    with its reason, never scored 0. Exit 1 when a judgement is missing or the budget stopped
    the run (rerun to resume: stored judgements are reused).

    Example:

        tapestry eval judge --protocol opening --bench OpenING-benchmark/test_data.jsonl --pred gen_outputs/MyModel_output --out runs/judge/opening
    """
    from tapestry.atomic import check_output_dir
    from tapestry.eval import loaders, protocols
    from tapestry.eval.judge import Judge, JudgeConfig
    from tapestry.eval.runner import JUDGE_LEGACY, JUDGE_WRITER, run_protocol

    try:
        check_output_dir(out, JUDGE_WRITER, overwrite, legacy=JUDGE_LEGACY, resumable=True)
        module = protocols.get(protocol)
        kind = format if format != "auto" else {"opening": "opening", "isg": "isg"}.get(protocol, "documents")
        if kind == "opening":
            samples = loaders.load_opening(bench, pred)
        elif kind == "isg":
            samples = loaders.load_isg(bench, pred)
        elif kind == "documents":
            if pred is not None:
                raise TapestryError("--pred is not used with Documents: their target segments are the answers")
            samples = loaders.load_documents(bench)
        else:
            raise TapestryError(f"--format {format!r}: choose opening, isg, documents or auto")
        samples = samples[:limit] if limit else samples
        config = JudgeConfig.from_env(out / "cache", out / "budget.json", timeout_s=timeout, max_retries=retries,
                                      max_concurrency=concurrency, max_tokens_budget=max_tokens,
                                      max_cost_budget=max_cost, price_in=price_in, price_out=price_out)
        judge = Judge.from_config(config)
    except TapestryError as e:
        raise _fail(str(e)) from None
    summary = _run(lambda p: run_protocol(module, samples, judge, out, _command(ctx), p, overwrite=overwrite), quiet or json_output,
                   f"judging ({protocol})")
    if json_output:
        print(json.dumps({k: v for k, v in summary.items() if k != "missing"}))
    else:
        print((out / "report.md").read_text(encoding="utf-8"))
    if summary["stopped"] or summary["missing"]:
        raise typer.Exit(1)
