"""`tapestry data ...`: the data engines on the command line (mounted by `tapestry.cli`; also
runnable alone as `python -m tapestry.data ...`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from tapestry.errors import TapestryError

app = typer.Typer(
    name="data",
    help="Data engines: turn videos, images, web pages and plans into interleaved training Documents.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


@app.callback()
def _data() -> None:
    """Data engines: turn videos, images, web pages and plans into interleaved training Documents
    (webdataset shards)."""


def _fail(message: str, code: int = 2) -> typer.Exit:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


# Options every engine command shares (one definition, four commands).
Executor = Annotated[str, typer.Option("--executor", "-e", help="local (process pool) or ray (Ray Data).")]
Workers = Annotated[int, typer.Option("--workers", "-w", min=1, help="Worker processes (local) or CPUs (ray).")]
RayAddress = Annotated[Optional[str], typer.Option(
    "--ray-address", help="An existing Ray cluster (e.g. ray://head:10001 or auto); default: start a local one.")]
ProviderKind = Annotated[str, typer.Option(
    "--provider", help="offline (deterministic, local) or openai (any OpenAI-compatible server: "
                       "TAPESTRY_VLM_BASE_URL, TAPESTRY_VLM_MODEL, TAPESTRY_VLM_API_KEY).")]
Model = Annotated[Optional[str], typer.Option("--model", help="Model name (openai provider; overrides the env).")]
BaseUrl = Annotated[Optional[str], typer.Option("--base-url", help="Server URL (openai provider; overrides the env).")]
Concurrency = Annotated[int, typer.Option("--concurrency", min=1, help="Model calls in flight per worker (openai).")]
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds before a model call is retried.")]
BudgetTokens = Annotated[Optional[int], typer.Option("--budget-tokens",
                                                     help="Stop cleanly (exit 3) once this many tokens are spent.")]
BudgetUsd = Annotated[Optional[float], typer.Option(
    "--budget-usd", help="Stop cleanly (exit 3) once this much money is spent (with --price-in/--price-out).")]
PriceIn = Annotated[float, typer.Option("--price-in", help="Price per million prompt tokens.")]
PriceOut = Annotated[float, typer.Option("--price-out", help="Price per million completion tokens.")]
Settings = Annotated[list[str], typer.Option(
    "--set", help="Change one config field: SECTION.FIELD=VALUE, e.g. motion.min_mean=0.8 (repeatable; see "
                  "--show-config).")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="A JSON file with config fields to change.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for sampling and model calls; part of the config.")]
ShardSize = Annotated[int, typer.Option("--shard-size", min=1, help="Documents per shard.")]
ShowConfig = Annotated[bool, typer.Option("--show-config", help="Print the full pipeline config as JSON and exit.")]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary table.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Folder for the shards; its hidden .tapestry/ holds the "
                                   "resume manifest, the rejection log and the summary.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Write into --out even if it holds files the engine did not write.")]


@app.command()
def video(
    inputs: list[Path] = typer.Argument(..., help="Video files, or folders walked for video files."),
    out: Out = ...,  # type: ignore[assignment]
    pipeline: str = typer.Option("video-story", "--pipeline", "-p",
                                 help="video-story (ILLUME-X windows, three-level captions) or "
                                      "video-state-change (Inset pairs: cropped references + later frame)."),
    executor: Executor = "local", workers: Workers = 2, ray_address: RayAddress = None,
    provider: ProviderKind = "offline", model: Model = None, base_url: BaseUrl = None,
    concurrency: Concurrency = 4, timeout: Timeout = 60.0, budget_tokens: BudgetTokens = None,
    budget_usd: BudgetUsd = None, price_in: PriceIn = 0.0, price_out: PriceOut = 0.0,
    settings: Settings = [],  # noqa: B006 - typer reads the default
    config_file: ConfigFile = None, seed: Seed = 0, shard_size: ShardSize = 256,
    show_config: ShowConfig = False, json_output: JsonOutput = False, quiet: Quiet = False,
    overwrite: Overwrite = False,
) -> None:
    """Videos -> webdataset shards of interleaved Documents, resumably.

    Each video is decoded once: shots, frames on a time grid, windows or pairs inside shots.

    Filters: sharpness, exposure, aesthetic, optical-flow motion, redundancy, ORB static pairs.

    Then VLM steps through the provider: three-level captions, or change check + correspondence.

    Rerun the same command after a kill to resume: nothing is duplicated or lost.

    Bad files go to OUT/.tapestry/rejections.jsonl with their reason; the run goes on.

    Exit code: 0 all done; 1 partial failure (bad files, failed model calls); 2 usage error;
    3 stopped by the budget (rerun to continue); 130 interrupted.

    Example:

        tapestry data video clips/ --pipeline video-story --out shards/story --json

        tapestry view shards/story -o story.html
    """
    _run_engine("videos", [str(p) for p in inputs], **{k: v for k, v in locals().items() if k != "inputs"})


@app.command()
def image(
    inputs: list[Path] = typer.Argument(..., help="Image files (PNG, JPEG, WebP), or folders walked for them."),
    out: Out = ...,  # type: ignore[assignment]
    pipeline: str = typer.Option("image-inline", "--pipeline", "-p",
                                 help="image-inline (Inset: objects cut out and woven into the caption)."),
    executor: Executor = "local", workers: Workers = 2, ray_address: RayAddress = None,
    provider: ProviderKind = "offline", model: Model = None, base_url: BaseUrl = None,
    concurrency: Concurrency = 4, timeout: Timeout = 60.0, budget_tokens: BudgetTokens = None,
    budget_usd: BudgetUsd = None, price_in: PriceIn = 0.0, price_out: PriceOut = 0.0,
    settings: Settings = [],  # noqa: B006 - typer reads the default
    config_file: ConfigFile = None, seed: Seed = 0, shard_size: ShardSize = 256,
    show_config: ShowConfig = False, json_output: JsonOutput = False, quiet: Quiet = False,
    overwrite: Overwrite = False,
) -> None:
    """Images -> inline interleaved captions (Inset), resumably.

    Per image: global caption (VLM), objects (detector), box filters, masks (segmenter, GrabCut
    fallback), cut-outs, object captions (VLM), one caption woven with a slot per object (LLM,
    validated, repaired). A NAME.json beside NAME.png with {"objects": [{"label", "box"}]} gives
    ground-truth boxes.

    Example:

        tapestry data image photos/ --out shards/inline --json
    """
    _run_engine("images", [str(p) for p in inputs], **{k: v for k, v in locals().items() if k != "inputs"})


@app.command()
def web(
    inputs: list[Path] = typer.Argument(..., help="HTML, markdown or WARC files (.warc, .warc.gz), or folders."),
    out: Out = ...,  # type: ignore[assignment]
    pipeline: str = typer.Option("web-howto", "--pipeline", "-p",
                                 help="web-howto (DuetGen: how-to pages -> clean steps, optional dialog)."),
    executor: Executor = "local", workers: Workers = 2, ray_address: RayAddress = None,
    provider: ProviderKind = "offline", model: Model = None, base_url: BaseUrl = None,
    concurrency: Concurrency = 4, timeout: Timeout = 60.0, budget_tokens: BudgetTokens = None,
    budget_usd: BudgetUsd = None, price_in: PriceIn = 0.0, price_out: PriceOut = 0.0,
    settings: Settings = [],  # noqa: B006 - typer reads the default
    config_file: ConfigFile = None, seed: Seed = 0, shard_size: ShardSize = 256,
    show_config: ShowConfig = False, json_output: JsonOutput = False, quiet: Quiet = False,
    overwrite: Overwrite = False,
) -> None:
    """How-to web pages -> clean interleaved Documents (DuetGen), resumably.

    Main content (trafilatura); images dropped when broken, tiny, icons, QR codes, ads or
    trackers; near-duplicate neighbours removed (perceptual hash); each image moved after the
    text that describes it; images captioned and categorized (VLM); text rewritten into steps
    and optionally a user/assistant dialog (LLM).

    Example:

        tapestry data web pages/ crawl.warc.gz --out shards/howto --set dialog.enabled=true --json
    """
    _run_engine("pages", [str(p) for p in inputs], **{k: v for k, v in locals().items() if k != "inputs"})


@app.command()
def synth(
    out: Out = ...,  # type: ignore[assignment]
    n: int = typer.Option(..., "--n", "-n", min=1, help="How many plans (one Document each)."),
    start: int = typer.Option(0, "--start", min=0, help="Index of the first plan (plans are seeded by index)."),
    pipeline: str = typer.Option("incontext-synth", "--pipeline", "-p",
                                 help="incontext-synth (ILLUME-X: planner, generator with images in context, "
                                      "differences, self-reflection rounds) or duet-synthetic (DuetGen: seed pool, "
                                      "expanded instructions, illustrated answers, validation)."),
    executor: Executor = "local", workers: Workers = 2, ray_address: RayAddress = None,
    provider: ProviderKind = "offline", model: Model = None, base_url: BaseUrl = None,
    concurrency: Concurrency = 4, timeout: Timeout = 60.0, budget_tokens: BudgetTokens = None,
    budget_usd: BudgetUsd = None, price_in: PriceIn = 0.0, price_out: PriceOut = 0.0,
    settings: Settings = [],  # noqa: B006 - typer reads the default
    config_file: ConfigFile = None, seed: Seed = 0, shard_size: ShardSize = 256,
    show_config: ShowConfig = False, json_output: JsonOutput = False, quiet: Quiet = False,
    overwrite: Overwrite = False,
) -> None:
    """Synthetic multi-image Documents (ILLUME-X in-context generation), resumably.

    A planner writes a plan with per-image prompts, a generator draws the images one by one with
    the earlier ones in context, an LLM describes the differences, a judge critiques and the
    generator retries (rounds kept in the Document). Offline, on ToyWorld, the planner is the
    world's exact spec and the judge its exact judge.

    duet-synthetic (DuetGen): instructions expanded from a seed pool (--set seeds.path=pool.json),
    answered as illustrated how-tos, pictures drawn with the earlier ones in context, validated.

    Example:

        tapestry data synth --n 8 --out shards/synth --json

        tapestry data synth -p duet-synthetic --n 8 --out shards/duet
    """
    paths = [str(k) for k in range(start, start + n)]
    _run_engine("plans", paths, **{k: v for k, v in locals().items() if k not in ("n", "start", "paths")})


def _run_engine(noun: str, inputs: list[str], *, out: Path, pipeline: str, executor: str, workers: int,
                ray_address: str | None, provider: str, model: str | None, base_url: str | None,
                concurrency: int, timeout: float, budget_tokens: int | None, budget_usd: float | None,
                price_in: float, price_out: float, settings: list[str], config_file: Path | None, seed: int,
                shard_size: int, show_config: bool, json_output: bool, quiet: bool, overwrite: bool = False) -> None:
    from tapestry.data.engine import EngineOptions, run
    from tapestry.data.pipelines import build_config, pipeline_class
    from tapestry.data.pipelines import config as config_io
    from tapestry.data.providers import ProviderConfig

    try:
        cls = pipeline_class(pipeline)
        if getattr(cls, "input_noun", "videos") != noun:
            raise TapestryError(f"pipeline {pipeline!r} does not read {noun}")
        config = build_config(pipeline, config_file, settings, seed)
    except TapestryError as e:
        raise _fail(str(e)) from None
    if show_config:
        print(json.dumps(config_io.to_dict(config), indent=1))
        return
    if executor not in ("local", "ray"):
        raise _fail(f"--executor must be 'local' or 'ray', got {executor!r}")
    if ray_address and executor != "ray":
        raise _fail("--ray-address needs --executor ray")
    try:
        provider_config = ProviderConfig.from_env(
            provider, **{k: v for k, v in {"model": model, "base_url": base_url}.items() if v is not None},
            timeout_s=timeout, max_concurrency=concurrency if provider != "offline" else 1,
            max_tokens_budget=budget_tokens, max_cost_budget=budget_usd, price_in=price_in,
            price_out=price_out, seed=seed)
    except (TapestryError, TypeError) as e:
        raise _fail(str(e)) from None
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    options = EngineOptions(pipeline, config, provider_config, out, executor, workers, ray_address, shard_size,
                            progress=not quiet and not json_output,
                            log=(lambda m: None) if quiet else (lambda m: err.print(escape(m))), overwrite=overwrite)
    try:
        summary = run(inputs, options)
    except TapestryError as e:
        raise _fail(str(e)) from None
    if json_output:
        print(json.dumps(summary, ensure_ascii=False))
    elif not quiet:
        _print_summary(summary)
    if summary["exit_code"]:
        raise typer.Exit(summary["exit_code"])


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    console = Console(soft_wrap=True, highlight=False)
    inputs = summary["inputs"]
    head = (f"{summary['pipeline']}: {inputs['done']} of {inputs['total']} input(s) done"
            + (f", {inputs['failed']} failed" if inputs["failed"] else "")
            + (f", {inputs['not_finished']} not finished" if inputs["not_finished"] else "")
            + (f" ({inputs['skipped_as_done']} already done before)" if inputs["skipped_as_done"] else "")
            + f" -> {summary['documents']} document(s) in {len(summary['shards'])} shard(s) at {summary['out']}")
    console.print(escape(head))
    workers = f"{summary['workers']} {summary['executor']} worker(s)"
    if summary["video_seconds"]:
        console.print(f"{summary['video_seconds']:.1f} s of video in {summary['wall_seconds']:.1f} s "
                      f"({summary['realtime_factor'] or 0:.1f}x real time, {workers})")
    else:
        processed, wall = inputs["processed_this_run"], summary["wall_seconds"]
        console.print(f"{processed} input(s) in {wall:.1f} s ({processed / wall if wall else 0:.2f} per second, "
                      f"{workers})")
    table = Table("stage", "in", "out", "seconds", title="stages", title_justify="left")
    for stage, values in summary["stages"].items():
        table.add_row(stage, str(values.get("in", 0)), str(values.get("out", 0)), f"{values.get('seconds', 0):.2f}")
    console.print(table)
    if summary["rejections"]:
        rejected = Table("reason", "count", title="rejections", title_justify="left")
        for reason, count in summary["rejections"].items():
            mark = " (failure)" if reason in summary["failures"] else ""
            rejected.add_row(escape(reason + mark), str(count))
        console.print(rejected)
        console.print(f"details: {escape(summary['rejection_log'])}")
    for key in ("stopped", "interrupted"):
        if summary.get(key):
            console.print(f"[yellow]{key}: {escape(str(summary[key]))} - rerun the same command to continue[/]")


def main() -> None:
    try:
        app()
    except TapestryError as e:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
