"""`tapestry vit pretrain`: the understanding encoder learns ToyWorld recognition first.

Mount in tapestry/cli.py with `app.add_typer(vit_cli.app, name="vit")`. Exit codes follow the
CLI's: 0 success, 2 misuse (bad config, foreign --out folder). torch is imported inside the
command so `tapestry --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(name="vit", help="The understanding encoder (ViT) of the mot family.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

_OWN_FILES = ("vit.safetensors", "encoder.json", "vit.safetensors.partial")


@app.callback()
def _group() -> None:
    """Pretrain the understanding encoder on ToyWorld recognition."""


def _fail(message: str, code: int = 2) -> typer.Exit:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


@app.command()
def pretrain(
    config: Path = typer.Argument(..., help="The training TOML whose [model.vit] the encoder is built from."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for vit.safetensors and encoder.json."),
    steps: int = typer.Option(3000, help="Optimizer steps (batch 128)."),
    images: int = typer.Option(16000, help="Rendered reference images to train on (plus --val held out)."),
    val: int = typer.Option(1000, help="Held-out references for the accuracy report."),
    seed: int = typer.Option(0, help="Seeds the weights and the rendered references."),
    threads: int = typer.Option(2, help="torch CPU threads."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into --out even if it holds files this command did not write (nothing there is deleted)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; still prints the report."),
) -> None:
    """Train the config's ViT to name the shape, colour, pattern, size and cell of one-entity
    ToyWorld references (the images compose prompts give), for `model.init_vit`.

    Example: tapestry vit pretrain configs/toyworld-default.toml --out runs/toy-vit
    """
    from tapestry.errors import TapestryError
    from tapestry.models.mot.encoder import EncoderPretrainConfig, pretrain as run
    from tapestry.train.config import load_config

    try:
        train_config = load_config(config)
    except TapestryError as exc:
        raise _fail(str(exc)) from None
    from tapestry.atomic import OutputFolderError, claim_output_dir

    try:  # a folder an earlier version wrote (only these files, no marker yet) is still this command's
        claim_output_dir(out, "tapestry vit pretrain", overwrite, legacy=_OWN_FILES)
    except OutputFolderError as exc:
        raise _fail(str(exc)) from None
    # references are drawn at the side the training data renders targets at
    vit_config, side = train_config.model.arch.vit, train_config.layout.target_size[0]
    settings = EncoderPretrainConfig(side=side, train_images=images, val_images=val, steps=steps, seed=seed, threads=threads)
    if quiet:
        report = run(vit_config, settings, out)
    else:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("pretraining the ViT", total=steps)
            report = run(vit_config, settings, out, lambda step, loss: bar.update(task, completed=step))
    val = report["val"]
    typer.echo(json.dumps({k: val[k] for k in ("shape", "colour", "pattern", "size", "cell", "identity_and_size")}))
    typer.echo(f"wrote {out}/vit.safetensors ({report['seconds']} s)")
