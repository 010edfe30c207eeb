"""`tapestry train` and `tapestry export`: the command-line face of tapestry.train.

Also runnable as a module, which is how torchrun starts it on several processes:

    torchrun --nproc_per_node 2 -m tapestry.train.cli train configs/test-tiny.toml --out runs/tiny \\
        --set parallel.mode=fsdp
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="Train interleaved models and export inference checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

TRAIN_HELP = """Train a model from a TOML config into RUN_DIR (checkpoints, metrics.jsonl, config.toml).

[bold]Examples[/]

  tapestry train configs/test-tiny.toml --out runs/tiny

  tapestry train configs/test-tiny.toml --out runs/tiny --set optim.lr=1e-3 --set stages.0.steps=40

  tapestry train configs/test-tiny.toml --out runs/tiny --resume

  torchrun --nproc_per_node 2 -m tapestry.train.cli train configs/test-tiny.toml --out runs/tiny-fsdp --set parallel.mode=fsdp

Interrupted runs continue with --resume from the latest complete checkpoint; a checkpoint that
was being written when the run died is ignored.
"""

EXPORT_HELP = """Write an inference checkpoint (EMA weights, config, tokenizer, layout, autoencoder) from a run.

[bold]Examples[/]

  tapestry export runs/tiny --out models/tiny

  tapestry export runs/tiny --out models/tiny --step 200 --raw

  tapestry export runs/inset-lora --out models/inset-adapters

  tapestry export runs/inset-lora --out models/inset --merge-lora

  tapestry export runs/default --out models/default --generation '{"guidance": "cfg", "guidance_scales": {"scale": 4.5}}'

The folder loads with Pipeline.from_pretrained(DIR) (any family); see docs/training.md for its contents.
A run that trained adapters (LoRA) exports them alone, in a folder that names its base model
(model.init_from); --merge-lora writes the base with the adapters folded into its weights instead.
"""


def _error(message: str, code: int = 2) -> typer.Exit:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


@app.command("train", help=TRAIN_HELP)
def train_command(
    config: Path = typer.Argument(..., help="TOML config (see configs/)."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoints, metrics.jsonl, config.toml."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint in --out."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config field: KEY=VALUE, e.g. optim.lr=3e-4 (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", help="No config print-out and no progress bar."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="Stop after this global step (a checkpoint is written there); --resume continues."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into --out even if it holds files training did not write."),
) -> None:
    from tapestry.allocator import keep_freed_memory
    from tapestry.errors import TapestryError
    from tapestry.train.config import load_config
    from tapestry.train.loop import train

    keep_freed_memory()
    try:
        cfg = load_config(config, list(set_ or []))
        summary = train(cfg, out, resume=resume, quiet=quiet, stop_after=stop_after, overwrite=overwrite)
    except TapestryError as exc:
        raise _error(str(exc)) from None
    if not quiet and summary is not None:
        last = summary.get("last") or {}
        print(json.dumps({"step": summary["step"], "loss": last.get("loss"), "checkpoint": summary["checkpoint"]}))


@app.command("export", help=EXPORT_HELP)
def export_command(
    run_dir: Path = typer.Argument(..., help="A run folder written by tapestry train."),
    out: Path = typer.Option(..., "--out", help="Folder to write (replaced atomically if an earlier export wrote it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out even if it holds files export did not write."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: the latest complete one)."),
    raw: bool = typer.Option(False, "--raw", help="Export the raw weights instead of the EMA."),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="A LoRA run: fold the adapters into the base weights and write one pipeline folder."),
    generation: Optional[str] = typer.Option(None, "--generation", help='Generation defaults to store, as JSON (GenerationOptions fields), e.g. \'{"guidance": "cfg", "guidance_scales": {"scale": 4.5}}\'.'),
) -> None:
    from tapestry.errors import TapestryError
    from tapestry.train.export import export_checkpoint

    try:
        chosen = json.loads(generation) if generation is not None else None
    except ValueError as e:
        raise _error(f"--generation: not JSON ({e})") from None
    if chosen is not None and not isinstance(chosen, dict):
        raise _error(f"--generation: expected a JSON object, got {type(chosen).__name__}")
    try:
        info = export_checkpoint(run_dir, out, step=step, weights="model" if raw else "ema", merge_lora=merge_lora,
                                 overwrite=overwrite, generation=chosen)
    except TapestryError as exc:
        raise _error(str(exc)) from None
    print(json.dumps(info))


def main() -> None:  # pragma: no cover - `python -m tapestry.train.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
