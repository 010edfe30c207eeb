"""`tapestry data ...`: the data engines on the command line (mounted by `tapestry.cli`; also
runnable alone as `python -m tapestry.data ...`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from tapestry.errors import TapestryError

app = typer.Typer(
    name="data",
    help="Data engines: turn raw videos into interleaved training Documents (webdataset shards).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


@app.callback()
def _data() -> None:
    """Data engines: turn raw videos into interleaved training Documents (webdataset shards)."""


def _fail(message: str, code: int = 2) -> typer.Exit:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


@app.command()
def video(
    inputs: list[Path] = typer.Argument(..., help="Video files, or folders walked for video files."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the shards; its hidden .tapestry/ holds "
                             "the resume manifest, the rejection log and the summary."),
    pipeline: str = typer.Option("video-story", "--pipeline", "-p",
                                 help="video-story (ILLUME-X windows, three-level captions) or "
                                      "video-state-change (Inset pairs: cropped references + later frame)."),
    executor: str = typer.Option("local", "--executor", "-e", help="local (process pool) or ray (Ray Data)."),
    workers: int = typer.Option(2, "--workers", "-w", min=1, help="Worker processes (local) or CPUs (ray)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                              help="An existing Ray cluster (e.g. ray://head:10001 or auto); "
                                                   "default: start a local one."),
    provider: str = typer.Option("offline", "--provider",
                                 help="offline (deterministic, local) or openai (any OpenAI-compatible "
                                      "server: TAPESTRY_VLM_BASE_URL, TAPESTRY_VLM_MODEL, TAPESTRY_VLM_API_KEY)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name (openai provider; overrides the env)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="Server URL (openai provider; overrides the env)."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Model calls in flight per worker (openai)."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds before a model call is retried."),
    budget_tokens: Optional[int] = typer.Option(None, "--budget-tokens",
                                                help="Stop cleanly (exit 3) once this many tokens are spent."),
    budget_usd: Optional[float] = typer.Option(None, "--budget-usd",
                                               help="Stop cleanly (exit 3) once this much money is spent "
                                                    "(with --price-in/--price-out)."),
    price_in: float = typer.Option(0.0, "--price-in", help="Price per million prompt tokens."),
    price_out: float = typer.Option(0.0, "--price-out", help="Price per million completion tokens."),
    settings: list[str] = typer.Option([], "--set", help="Change one config field: SECTION.FIELD=VALUE, e.g. "
                                       "motion.min_mean=0.8 or windows.scales=2x1,5x3 (repeatable; see "
                                       "--show-config)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="A JSON file with config fields to change."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling and model calls; part of the config."),
    shard_size: int = typer.Option(256, "--shard-size", min=1, help="Documents per shard."),
    show_config: bool = typer.Option(False, "--show-config", help="Print the full pipeline config as JSON and exit."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary table."),
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
    from tapestry.data.engine import EngineOptions, run
    from tapestry.data.pipelines import build_config, pipeline_class
    from tapestry.data.pipelines import config as config_io
    from tapestry.data.providers import ProviderConfig

    try:
        cls = pipeline_class(pipeline)
        if ".mp4" not in cls.input_suffixes:
            raise TapestryError(f"pipeline {pipeline!r} does not read videos")
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
                            log=(lambda m: None) if quiet else (lambda m: err.print(escape(m))))
    try:
        summary = run([str(p) for p in inputs], options)
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
    console.print(f"{summary['video_seconds']:.1f} s of video in {summary['wall_seconds']:.1f} s "
                  f"({summary['realtime_factor'] or 0:.1f}x real time, "
                  f"{summary['workers']} {summary['executor']} worker(s))")
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
