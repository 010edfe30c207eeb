"""`tapestry vae ...`: train and check autoencoders.

Mount in tapestry/cli.py with `app.add_typer(vae_cli.app, name="vae")`. Exit codes follow the
CLI's: 0 success, 1 the trained AE missed the judge gate (`--gate`), 2 misuse (bad folder, bad
option). torch is imported inside the commands so `tapestry --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(name="vae", help="Autoencoders between pixels and the flow model's latents.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)



@app.callback()
def _group() -> None:
    """Train and check autoencoders (the ToyWorld AE; FLUX-layout AEs load in Python)."""


REPORT_NAME = "report.json"
WRITER = "tapestry vae train"
JUDGE_GATE = 0.98  # DESIGN §10: the AE's reconstructions must score this before flow training
EXACT_GATE = 0.95  # issue 20: and this share of them must be exact (every entity and the background)


def _fail(message: str, code: int = 2) -> typer.Exit:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


@app.command()
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write config.json, model.safetensors and report.json (replaced atomically if an earlier vae train wrote it)."),
    steps: int = typer.Option(4000, help="Optimizer steps."),
    resolution: int = typer.Option(64, help="Image side in pixels (a multiple of 4)."),
    latent_channels: int = typer.Option(8, "--latent-channels", help="Channels of the ×4 latent grid (more: sharper reconstructions, wider generation tokens)."),
    seed: int = typer.Option(0, help="Seeds the weights and the stream of training scenes."),
    batch_size: int = typer.Option(8, "--batch-size", help="Scenes per step (rendered fresh each step)."),
    lr: float = typer.Option(2e-3, help="Peak learning rate (warm-up, then cosine)."),
    heldout: int = typer.Option(64, help="Held-out scenes for PSNR and the judge (a fixed set)."),
    judge: bool = typer.Option(True, "--judge/--no-judge", help="Score reconstructions with the ToyWorld judge."),
    gate: bool = typer.Option(False, "--gate", help=f"Exit 1 when the judge score of reconstructions is below {JUDGE_GATE} or their exact rate below {EXACT_GATE}."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out even if it holds files vae train did not write."),
    init: Path | None = typer.Option(None, "--init", help="Start from the autoencoder in this folder (a vae train output) instead of fresh weights: a fine-tune on new scenes; its config wins over --latent-channels and --resolution."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default). On a CPU shared with other jobs, 1 can be several times faster than all cores."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; still prints the report."),
) -> None:
    """Train the ToyWorld autoencoder (×4, 8 latent channels) on freshly rendered scenes.

    Prints and saves a JSON report with the reconstruction PSNR on a fixed held-out set and,
    with the judge, the judge score of the reconstructions next to that of the clean renders.

    Example:

        tapestry vae train --out runs/ae-toy --steps 20 --resolution 32 --heldout 8 --quiet
    """
    if steps < 1 or batch_size < 1 or heldout < 1 or latent_channels < 1:
        raise _fail("--steps, --batch-size, --heldout and --latent-channels must be at least 1")
    if resolution < 16 or resolution % 4:
        raise _fail(f"--resolution must be a multiple of 4 and at least 16, got {resolution}")
    from tapestry.atomic import OutputFolderError, check_output_dir, output_dir

    try:
        check_output_dir(out, WRITER, overwrite)
    except OutputFolderError as e:
        raise _fail(str(e)) from None

    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from tapestry.models.vae import train as training
    from tapestry.models.vae.toy import ToyAEConfig

    init_state = None
    if init is not None:
        from tapestry.models.common.checkpoint import CheckpointError
        from tapestry.models.vae.toy import ToyAutoencoder

        try:
            base = ToyAutoencoder.from_pretrained(init)
        except (CheckpointError, OSError, ValueError) as e:
            raise _fail(f"--init {init}: {e}") from None
        config = base.config
        config.scale_factor, config.shift_factor = 1.0, 0.0  # recalibrated after training
        resolution, latent_channels = config.resolution, config.latent_channels
        init_state = base.state_dict()
    else:
        config = ToyAEConfig(resolution=resolution, latent_channels=latent_channels)
    settings = training.TrainSettings(steps=steps, batch_size=batch_size, resolution=resolution, seed=seed,
                                      lr=lr, threads=threads or None, warmup=min(100, max(1, steps // 10)))
    progress = Progress(TextColumn("[bold]train AE"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), disable=quiet)
    from tapestry.allocator import keep_freed_memory

    keep_freed_memory()
    started = time.perf_counter()
    with progress:
        task = progress.add_task("train", total=steps, loss=float("nan"))

        def on_step(step: int, record: dict) -> None:
            progress.update(task, completed=step, loss=record["loss"])

        model, history = training.train(config, settings, on_step, init=init_state)
    train_seconds = time.perf_counter() - started

    scenes = training.heldout_scenes(heldout)
    with training.torch_threads(settings.threads), (
            Console(stderr=True).status("measuring reconstructions", spinner="dots") if not quiet else contextlib.nullcontext()):
        calibration = training.calibrate_latents(model, training.render_batch(scenes, resolution))
        metrics = training.evaluate(model, scenes, resolution, judge=judge)
    tail = history[-min(50, len(history)):]
    report = {
        # Every option spelled out, so the line reruns this exact training.
        "command": (f"tapestry vae train --out {out} --steps {steps} --resolution {resolution} --latent-channels {latent_channels} --seed {seed} "
                    f"--batch-size {batch_size} --lr {lr} --heldout {heldout}" + ("" if judge else " --no-judge")
                    + ("" if init is None else f" --init {init}")),
        "init": None if init is None else str(init),
        "checkpoint": str(out),
        "model": "toy_ae",
        "config": config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": training.settings_dict(settings),
        "train_seconds": round(train_seconds, 1),
        "steps_per_second": round(steps / train_seconds, 3),
        "final_loss": {k: round(sum(r[k] for r in tail) / len(tail), 5) for k in ("loss", "l1", "edge")},
        "loss_curve": [{"step": r["step"], "loss": round(r["loss"], 5)} for r in history[:: max(1, steps // 40)]],
        "latents": calibration | {"shape_at_resolution": [config.latent_channels, resolution // config.downsample,
                                                          resolution // config.downsample]},
        "heldout": metrics,
        "gate": {"judge_required": JUDGE_GATE, "judge": metrics.get("judge"),
                 "exact_required": EXACT_GATE, "exact": metrics.get("exact"),
                 "passed": None if "judge" not in metrics
                 else metrics["judge"] >= JUDGE_GATE and metrics["exact"] >= EXACT_GATE},
        "torch": torch.__version__,
    }
    with output_dir(out, WRITER, overwrite) as tmp:
        model.save_pretrained(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report))
    if not quiet:
        line = f"held-out PSNR {metrics['psnr']:.2f} dB"
        if "judge" in metrics:
            line += (f", judge {metrics['judge']:.4f} / exact {metrics['exact']:.3f} on reconstructions "
                     f"({metrics['judge_clean']:.4f} / {metrics['exact_clean']:.3f} on clean renders)")
        Console(stderr=True, highlight=False).print(f"[green]wrote {escape(str(out))}[/]: {line}")
    if gate and report["gate"]["passed"] is False:
        raise typer.Exit(1)
