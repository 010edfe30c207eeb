"""`tapestry convert SRC OUT`: a BAGEL-layout folder <-> a tapestry pipeline folder.

The direction follows SRC: a BAGEL release (ema.safetensors + llm_config.json) becomes a pipeline
folder, a pipeline folder becomes the release layout. Tensors keep their dtype and bits both ways.
`--dry-run` reads only the safetensors headers and JSON files and lists key coverage, shapes and
dtypes (exit 1 when keys are missing, unexpected or misshapen).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tapestry.errors import TapestryError


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _render(report: dict, console: Console, show_keys: int) -> None:
    w = report["weights"]
    console.print(f"[bold]{escape(report['folder'])}[/]: {report['layout']} layout")
    dtypes = ", ".join(f"{k} ×{v}" for k, v in w["dtypes"].items())
    console.print(f"{escape(w['file'])}: {w['tensors']} tensors, {w['parameters']:,} parameters, "
                  f"{_size(w['bytes'])} ({dtypes})")
    llm = report["config"]["llm"]
    console.print(f"decoder: {llm['num_layers']} layers × 2 experts, hidden {llm['hidden_size']}, heads "
                  f"{llm['num_heads']}/{llm['num_kv_heads']} kv, MLP {llm['intermediate_size']}, vocab {llm['vocab_size']}")
    for note in report["notes"]:
        console.print(f"[dim]note: {escape(note)}[/]")
    parts = [("weights", w)] + ([("ae", report["ae"])] if "ae" in report else [])
    for name, part in parts:
        if name == "ae":
            console.print(f"{escape(part['file'])}: {part['tensors']} tensors, {_size(part['bytes'])}, "
                          f"settings from {escape(part['settings_from'])}")
        state = "[green]every key maps[/]" if part["ok"] else "[red]does not fit[/]"
        console.print(f"{name}: {state}; missing {len(part['missing'])}, unexpected {len(part['unexpected'])}, "
                      f"shape mismatch {len(part['shape_mismatch'])}")
        for key in part["missing"][:20]:
            console.print(f"  missing: {escape(key)}")
        for key in part["unexpected"][:20]:
            console.print(f"  unexpected: {escape(key)}")
        for m in part["shape_mismatch"][:20]:
            console.print(f"  shape: {escape(m['key'])}: expected {m['expected']}, file {m['found']}")
    if show_keys:
        other = "tapestry" if report["layout"] == "bagel" else "bagel"
        table = Table("key", other, "dtype", "shape", title_justify="left",
                      title=f"first {min(show_keys, len(report['keys']))} of {len(report['keys'])} keys")
        for row in report["keys"][:show_keys]:
            table.add_row(escape(row["key"]), escape(str(row[other])), row["dtype"], str(row["shape"]))
        console.print(table)


def convert_command(
    src: Path = typer.Argument(..., help="A BAGEL-layout folder (ema.safetensors, llm_config.json, ...) or a pipeline folder."),
    out: Optional[Path] = typer.Argument(None, help="The folder to write (not needed with --dry-run)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Headers only: key coverage, shapes and dtypes; writes nothing."),
    keys: int = typer.Option(0, "--keys", help="With --dry-run: also list the first N keys with their mapping."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT even if it holds files convert did not write (its own earlier output is replaced without it)."),
) -> None:
    """Convert between BAGEL's released layout and a tapestry pipeline folder (bitwise both ways).

    Exit code 0 on success, 1 when the dry run finds keys that do not fit, 2 on bad input.

    Example:

        tapestry convert /models/BAGEL-7B-MoT --dry-run
        tapestry convert /models/BAGEL-7B-MoT pipelines/bagel
    """
    from tapestry.models.mot.bagel import bagel_to_pipeline, dry_run as run_dry, is_bagel_folder, pipeline_to_bagel

    console = Console(soft_wrap=True, highlight=False)
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        if not src.is_dir():
            raise TapestryError(f"{src}: no such folder")
        if dry_run:
            started = time.perf_counter()
            report = run_dry(src)
            report["seconds"] = round(time.perf_counter() - started, 4)
            if json_output:
                print(json.dumps(report))
            else:
                _render(report, console, keys)
                console.print(f"[dim]read headers only in {report['seconds']:.3f} s[/]")
            if not report["ok"]:
                raise typer.Exit(1)
            return
        if out is None:
            raise TapestryError("give OUT, the folder to write (or --dry-run)")
        if out.resolve() == src.resolve():
            raise TapestryError("OUT must differ from SRC")
        result = bagel_to_pipeline(src, out, overwrite) if is_bagel_folder(src) else pipeline_to_bagel(src, out, overwrite)
    except TapestryError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(2)
    if json_output:
        print(json.dumps(result))
    else:
        what = "pipeline folder" if is_bagel_folder(src) else "BAGEL-layout folder"
        console.print(f"wrote {escape(str(out))} ({what}): " + ", ".join(f"{k} {v}" for k, v in result.items() if k != "out"))
