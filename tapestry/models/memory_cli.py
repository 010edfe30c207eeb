"""`tapestry memory TARGET`: predicted peak memory per device, and what fits on 24 / 48 / 80 GB.

TARGET is a training config (.toml: the trainer's tokens per row, rows, LoRA, checkpointing,
FSDP settings), a checkpoint folder (pipeline or BAGEL layout: inference), or `bagel-7b` (the
release's shapes, without the files). Nothing is loaded but JSON files and safetensors headers.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tapestry.errors import TapestryError


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
