"""The `mot` family's own commands: `tapestry convert`, `tapestry memory` and `tapestry vit`.

tapestry/cli.py mounts `COMMANDS` and `GROUPS` (below) through the family registry
(`tapestry.models.family.command_line`). Only typer and rich are imported here; each command
imports torch and the model when it runs, so `tapestry --help` stays fast. Exit codes follow the
CLI's: 0 success, 1 the command's check failed (convert --dry-run), 2 bad input.

`tapestry convert SRC OUT`: a BAGEL-layout folder <-> a tapestry pipeline folder. The direction
follows SRC: a BAGEL release (ema.safetensors + llm_config.json) becomes a pipeline folder, a
pipeline folder becomes the release layout. Tensors keep their dtype and bits both ways.
`--dry-run` reads only the safetensors headers and JSON files and lists key coverage, shapes and
dtypes (exit 1 when keys are missing, unexpected or misshapen).

`tapestry memory TARGET`: predicted peak memory per device, and what fits on 24 / 48 / 80 GB.
TARGET is a training config (.toml: the trainer's tokens per row, rows, LoRA, checkpointing,
FSDP settings), a checkpoint folder (pipeline or BAGEL layout: inference), or `bagel-7b` (the
release's shapes, without the files). Nothing is loaded but JSON files and safetensors headers.

`tapestry vit pretrain`: the understanding encoder learns ToyWorld recognition first.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tapestry.errors import TapestryError


# ---------------------------------------------------------------------------------------------
# tapestry convert
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# tapestry memory
# ---------------------------------------------------------------------------------------------


def _model_config(source: str):
    from tapestry.models.mot.bagel import BAGEL_7B, is_bagel_folder
    from tapestry.models.mot.config import MoTConfig
    from tapestry.models.mot.convert import bagel_config

    if source.lower() in ("bagel-7b", "bagel-7b-mot"):
        return BAGEL_7B
    path = Path(source)
    if is_bagel_folder(path):
        return bagel_config(path)[0]
    if (path / "config.json").is_file():
        return MoTConfig.load(path / "config.json")
    raise TapestryError(f"{source}: not a BAGEL-layout or pipeline folder; give one, or bagel-7b for the release's shapes")


def _train_plan(path: Path, model: Optional[str]):
    from tapestry.models.mot.memory import Plan
    from tapestry.train.config import load_config

    config = load_config(path)
    source = model or config.model.init_from
    if not source:
        raise TapestryError(f"{path}: model.init_from is empty; pass --model DIR or --model bagel-7b")
    if not model and not Path(source).is_dir():
        raise TapestryError(f"{path}: model.init_from = {source!r} is not a folder here; pass --model bagel-7b "
                            "to use the release's shapes")
    cfg = _model_config(source)
    lora = getattr(config.model.arch, "lora", None)  # the mot recipe's [model.lora]
    adapted = lora is not None and lora.rank > 0
    par = config.parallel
    world = 1  # the processes come from torchrun, not the config: --world-size N for FSDP2 over N
    plan = Plan(mode="train", dtype="bf16" if par.autocast == "bf16" or adapted else "fp32",
                tokens=config.data.budget, rows=max(1, config.data.rows // world),
                activation_checkpointing=par.activation_checkpointing, offload=par.cpu_offload,
                world_size=world if par.mode == "fsdp" else 1, ema=config.ema.decay > 0)
    if adapted:
        plan = replace(plan, lora_rank=lora.rank, lora_modules=list(lora.modules), lora_experts=list(lora.experts))
    return cfg, plan


def memory_command(
    target: str = typer.Argument(..., help="A training config (.toml), a checkpoint folder (pipeline or BAGEL layout), or bagel-7b."),
    model: Optional[str] = typer.Option(None, "--model", help="Training: the model's shapes from this folder or bagel-7b (default: model.init_from)."),
    mode: Optional[str] = typer.Option(None, help="inference | train (default: train for a .toml, else inference)."),
    dtype: Optional[str] = typer.Option(None, help="bf16 | fp32 | fp16 (weights and activations)."),
    quant: str = typer.Option("none", help="Inference: none | int8 | int4 weight-only."),
    offload: Optional[bool] = typer.Option(None, "--offload/--no-offload", help="Inference: layer-wise CPU offload; training: FSDP2 CPU offload."),
    tokens: Optional[int] = typer.Option(None, help="Inference: context tokens; training: tokens per row."),
    rows: Optional[int] = typer.Option(None, help="Training: rows per device and step."),
    image_tokens: int = typer.Option(4096, help="Inference: latent tokens of the image being drawn (1024 px: 4096)."),
    branches: int = typer.Option(1, help="Inference: guidance branches (cfg: 2, bagel: 3)."),
    lora_rank: Optional[int] = typer.Option(None, help="Training: LoRA rank (0: full fine-tune)."),
    checkpointing: Optional[bool] = typer.Option(None, "--checkpointing/--no-checkpointing", help="Training: activation checkpointing per decoder layer."),
    world_size: Optional[int] = typer.Option(None, help="Training: FSDP2 shards."),
    device: str = typer.Option("cuda", help="cuda | cpu (int4 is packed to ½ byte on CUDA only)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Predict peak memory per device (weights, gradients, optimizer states, activations, KV
    cache) and list which options fit on 24 / 48 / 80 GB.

    Example:

        tapestry memory bagel-7b --quant int8
        tapestry memory configs/bagel-lora-inset.toml --model bagel-7b
    """
    from tapestry.models.mot.memory import GiB, Plan, estimate, fits, human

    err = Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        if target.endswith(".toml"):
            cfg, plan = _train_plan(Path(target), model)
        else:
            cfg, plan = _model_config(target), Plan(mode="inference")
        changes = {k: v for k, v in dict(mode=mode, dtype=dtype, tokens=tokens, rows=rows, lora_rank=lora_rank,
                                         activation_checkpointing=checkpointing, world_size=world_size,
                                         offload=offload).items() if v is not None}
        plan = replace(plan, **changes, quant=quant, image_tokens=image_tokens, branches=branches, device=device).validate()
        est = estimate(cfg, plan)
        table_rows = fits(cfg, plan)
    except TapestryError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(2)
    if json_output:
        print(json.dumps({"plan": est.plan, "parts_bytes": est.parts, "peak_bytes": est.peak, "options": table_rows}))
        return
    console = Console(soft_wrap=True, highlight=False)
    llm = cfg.llm
    console.print(f"model: {llm.num_layers} layers × 2 experts, hidden {llm.hidden_size}, vocab {llm.vocab_size}; "
                  f"{plan.mode}, {plan.dtype}" + (f", {plan.quant}" if plan.quant != "none" else "")
                  + (f", LoRA r{plan.lora_rank}" if plan.mode == "train" and plan.lora_rank else "")
                  + (", activation checkpointing" if plan.mode == "train" and plan.activation_checkpointing else "")
                  + (", offload" if plan.offload else "")
                  + (f", {plan.tokens} tokens × {plan.rows} rows" if plan.mode == "train" else
                     f", {plan.tokens} context + {plan.image_tokens} image tokens × {plan.branches} branch(es)"))
    parts = Table("part", "per device", title_justify="left", title="predicted peak")
    for name, value in est.parts.items():
        parts.add_row(name, human(value))
    parts.add_row("[bold]peak[/]", f"[bold]{human(est.peak)}[/]")
    console.print(parts)
    options = Table("option", "peak", "24 GB", "48 GB", "80 GB", title_justify="left", title="what fits (95 % of the device)")
    for row in table_rows:
        options.add_row(row["option"], human(row["peak_bytes"]),
                        *("yes" if row[f"fits_{b}"] else "-" for b in (24, 48, 80)))
    console.print(options)
    del GiB


# ---------------------------------------------------------------------------------------------
# tapestry vit
# ---------------------------------------------------------------------------------------------


vit_app = typer.Typer(name="vit", help="The understanding encoder (ViT) of the mot family.",
                      no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

_VIT_FILES = ("vit.safetensors", "encoder.json", "vit.safetensors.partial")  # what pretrain writes


@vit_app.callback()
def _group() -> None:
    """Pretrain the understanding encoder on ToyWorld recognition."""


def _fail(message: str, code: int = 2) -> typer.Exit:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


@vit_app.command()
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
    from tapestry.models.mot.encoder import EncoderPretrainConfig, pretrain as run
    from tapestry.train.config import load_config

    try:
        train_config = load_config(config)
    except TapestryError as exc:
        raise _fail(str(exc)) from None
    from tapestry.atomic import OutputFolderError, claim_output_dir

    try:  # a folder an earlier version wrote (only these files, no marker yet) is still this command's
        claim_output_dir(out, "tapestry vit pretrain", overwrite, legacy=_VIT_FILES)
    except OutputFolderError as exc:
        raise _fail(str(exc)) from None
    # references are drawn at the side the training data renders targets at
    vit_config, side = train_config.model.arch.vit, train_config.layout.target_size[0]
    settings = EncoderPretrainConfig(side=side, train_images=images, val_images=val, steps=steps, seed=seed, threads=threads)
    from tapestry.allocator import keep_freed_memory

    keep_freed_memory()
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


# what tapestry/cli.py mounts (through tapestry.models.family.command_line)
COMMANDS = {"convert": convert_command, "memory": memory_command}
GROUPS = {"vit": vit_app}
