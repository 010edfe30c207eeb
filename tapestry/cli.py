"""`tapestry ...`: the command line. Each command checks its inputs before doing any work and
ends with exit 0 (success), 1 (some input was invalid) or 2 (the command itself was misused)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

import tapestry
from tapestry.errors import TapestryError

app = typer.Typer(
    name="tapestry",
    help="Interleaved image-text generation: documents, data engines, models, training, inference, judges.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        print(f"tapestry {tapestry.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                 callback=_version_callback, is_eager=True),
) -> None:
    """tapestry reads and writes interleaved Documents (text with images inside sentences)."""


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one clear error line to stderr and return the Exit to raise."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _progress(quiet: bool, what: str):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn(f"{{task.completed}} {what}"), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True, disable=quiet)


@app.command()
def validate(
    paths: list[Path] = typer.Argument(..., help="Document folders, .json, .jsonl, .tar shards, or folders of them."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object per problem, then {\"checked\": N, \"invalid\": M}."),
    max_pixels: int = typer.Option(36_000_000, help="Refuse images with more pixels than this (decompression bombs)."),
    max_images: int = typer.Option(64, help="Refuse documents with more images than this."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Check Documents and print every problem with its location.

    Exit code 0 when every document is valid, 1 when any is invalid.

    Example:

        tapestry validate examples/cat-and-cup examples/invalid --json
    """
    from tapestry.document import Limits
    from tapestry.storage import scan

    limits = Limits(max_pixels=max_pixels, max_images=max_images)
    console = Console(soft_wrap=True, highlight=False)
    checked = invalid = 0
    with _progress(quiet or json_output, "documents checked") as progress:
        task = progress.add_task("validate")
        for path in paths:
            for loaded in scan(path, limits):
                checked += 1
                progress.advance(task)
                if not loaded.problems:
                    continue
                invalid += 1
                for problem in loaded.problems:
                    if json_output:
                        print(json.dumps(problem.to_json(), ensure_ascii=False))
                    else:
                        console.print(f"[red]✗[/] {escape(str(problem))}")
    if json_output:
        print(json.dumps({"checked": checked, "invalid": invalid}))
    else:
        colour = "red" if invalid else "green"
        console.print(f"[{colour}]checked {checked} document(s): {checked - invalid} valid, {invalid} invalid[/]")
    if invalid:
        raise typer.Exit(1)


@app.command()
def view(
    paths: list[Path] = typer.Argument(..., help="Document folders, .json, .jsonl, .tar shards, or folders of them."),
    out: Path = typer.Option(Path("page.html"), "--out", "-o", help="The HTML page to write."),
    limit: int = typer.Option(500, help="Show at most this many documents."),
    title: Optional[str] = typer.Option(None, help="Page title (default: the paths)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Write one self-contained HTML page showing Documents as a person reads them.

    Images sit where they stand in the sentence; references, context and targets are marked.
    Invalid samples are shown with their problems (and the exit code is 1).

    Example:

        tapestry view examples/robot-vase -o page.html
    """
    from tapestry.atomic import atomic_write_text
    from tapestry.storage import scan
    from tapestry.viewer import render_page

    if out.exists() and out.is_dir():
        raise fail(f"--out {out} is a folder; give a file name such as page.html")
    samples = []
    with _progress(quiet, "documents read") as progress:
        task = progress.add_task("view")
        for path in paths:
            for loaded in scan(path):
                if len(samples) >= limit:
                    break
                samples.append(loaded)
                progress.advance(task)
    page = render_page(samples, title or " ".join(str(p) for p in paths))
    atomic_write_text(out, page)
    invalid = sum(1 for s in samples if s.problems)
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    for loaded in samples:
        for problem in loaded.problems:
            err.print(f"[red]✗[/] {escape(str(problem))}")
    if not quiet:
        print(f"wrote {out} ({len(samples) - invalid} document(s), {invalid} invalid)")
    if invalid:
        raise typer.Exit(1)


# Command groups living beside their code; each module imports its heavy parts lazily.
from tapestry.data.cli import app as data_app  # noqa: E402
from tapestry.eval.cli import app as eval_app  # noqa: E402
from tapestry.infer.cli import generate_command  # noqa: E402
from tapestry.models import family as families  # noqa: E402
from tapestry.models.inspect_cli import inspect_command  # noqa: E402
from tapestry.serve.cli import serve_command  # noqa: E402
from tapestry.models.vae_cli import app as vae_app  # noqa: E402
from tapestry.toyworld.cli import app as toyworld_app  # noqa: E402
from tapestry.train.cli import EXPORT_HELP, TRAIN_HELP, export_command, train_command  # noqa: E402

# a family's own commands live in its folder (mot: convert, memory, vit); the registry hands
# them over without importing the model
family_commands, family_groups = families.command_line()

app.command("generate")(generate_command)
app.command("inspect")(inspect_command)
for name, command in family_commands.items():
    app.command(name)(command)
app.command("serve")(serve_command)
app.command("train", help=TRAIN_HELP)(train_command)
app.command("export", help=EXPORT_HELP)(export_command)
app.add_typer(toyworld_app, name="toyworld")
app.add_typer(data_app, name="data", help="Data engines: videos, images, web pages and synthetic plans -> Document shards.")
app.add_typer(vae_app, name="vae")
for name, group in family_groups.items():
    app.add_typer(group, name=name)
app.add_typer(eval_app, name="eval")


def os_error_line(e: OSError) -> str:
    """`cannot write PATH: reason` for a file-system refusal (permissions, a file where a folder
    should be, a full disk); the path is the one the operating system named."""
    path = e.filename if e.filename is not None else "a file"
    if e.filename2 is not None:
        path = f"{path} -> {e.filename2}"
    return f"cannot write {path}: {e.strerror or e}"


def main() -> None:
    try:
        app()
    except TapestryError as e:  # an input mistake found late still ends in one clear line
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)
    except OSError as e:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(os_error_line(e))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
