"""`tapestry inspect DIR [--json]`: what a checkpoint folder is, before loading it.

Mount with `app.command("inspect")(inspect_command)` in tapestry/cli.py, or add `app` as a
sub-app. Exit codes follow the CLI's: 0 the checkpoint fits its model, 1 it does not (or cannot
be read), 2 the command was misused (no such folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table



def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def render(report: dict, console: Console, limit: int = 20) -> None:
    family = f"  family: [cyan]{report['family']}[/]" if report.get("family") else ""
    weights = report["weights"]
    if isinstance(weights, list):
        weights = ", ".join(weights)
    console.print(f"[bold]{escape(report['path'])}[/]{family}  layout: [cyan]{report['layout']}[/]"
                  + (f"  weights: {escape(weights)}" if weights else ""))
    for line in report.get("summary", []):
        console.print(escape(line))
    params = report["parameters"]
    if params["total"]:
        table = Table("component", "parameters", title=f"parameters: {_human(params['total'])}", title_justify="left")
        for name, count in params["by_component"].items():
            table.add_row(name, _human(count))
        console.print(table)
    if report["dtype"]:
        console.print("dtype: " + ", ".join(f"{k} ×{v}" for k, v in report["dtype"].items()))
    for name, info in report["other_files"].items():
        if info:
            console.print(f"also: {name} ({info['tensors']} tensors, {_human(info['parameters'])} parameters)")
    for note in report["notes"]:
        console.print(f"[dim]note: {escape(note)}[/]")
    for title, items in (("missing", report["missing"]), ("unexpected", report["unexpected"]),
                         ("shape mismatch", [f"{m['key']}: model {m['expected']}, file {m['found']}"
                                             for m in report["shape_mismatch"]])):
        if items:
            console.print(f"[red]{len(items)} {title}:[/]")
            for item in items[:limit]:
                console.print(f"  {escape(item)}")
            if len(items) > limit:
                console.print(f"  ... and {len(items) - limit} more (--json lists all)")
    for error in report["errors"]:
        console.print(f"[bold red]error:[/] {escape(error)}")
    console.print("[green]ok: every key present with the expected shape[/]" if report["ok"]
                  else "[red]not loadable as is[/]")


def inspect_command(
    path: Path = typer.Argument(..., help="A checkpoint folder: a tapestry checkpoint of any family, or a published "
                                          "layout a family reads (BAGEL; Qwen2.5-VL; diffusers Wan / Cosmos / Stable "
                                          "Diffusion; CLIP; LLaMA)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (family, layout, config, parameters, dtype, missing, unexpected, shape_mismatch, ok, ...)."),
) -> None:
    """Tell what a checkpoint folder is before loading it: family, layout, config, parameters
    per component, dtype and key coverage. Reads only file headers, never the tensors.

    Exit code 0 when the checkpoint fits the model it describes, 1 when it does not.

    Example:

        tapestry inspect ../shared/fixtures/bagel-tiny --json
    """
    # Imported here so `tapestry --help` and other commands do not pay for importing torch.
    from tapestry.models.common.checkpoint import CheckpointError
    from tapestry.models.inspection import inspect_checkpoint

    try:
        report = inspect_checkpoint(path)
    except CheckpointError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    if json_output:
        print(json.dumps(report))
    else:
        render(report, Console(soft_wrap=True, highlight=False))
    raise typer.Exit(0 if report["ok"] else 1)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("inspect")(inspect_command)
