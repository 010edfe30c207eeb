"""From a training run to an inference checkpoint.

    OUT/                                 a pipeline folder (tapestry.models.pipeline_folder)
        pipeline.json                    format, family, layout config, generation defaults
        config.json, model.safetensors   the family's from_pretrained(OUT) loads these
        tokenizer.json, tokenizer_specials.json
        vae/                             the autoencoder (its own from_pretrained folder)
        train_config.toml                the run's config, for the record
        export.json                      which run, step and weights (EMA or raw) this is

`Pipeline.from_pretrained(OUT)` generates with it. A LoRA run exports its adapters alone
(OUT/adapter.json + the family's adapter files, naming `model.init_from` as the base), or with
`--merge-lora` the pipeline folder above with the adapters folded into the base weights.

The EMA weights (fp32) are written in the model's dtype. This runs in one process and is the
one place that holds a full copy of the weights; the checkpoint it reads may have been written
by any number of processes (torch.distributed.checkpoint re-shards on load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tapestry.train import checkpoint as ckpt
from tapestry.train.codecs import load_codec
from tapestry.train.config import load_config

EXPORT_FILE = "export.json"


def checkpoint_at(run_dir: Path, step: int | None) -> Path:
    found = ckpt.complete_checkpoints(run_dir)
    if not found:
        raise ckpt.CheckpointError(f"{run_dir}: no complete checkpoint to export (is this a run folder?)")
    if step is None:
        return found[-1]
    for path in found:
        if path.name == ckpt.checkpoint_name(step):
            return path
    raise ckpt.CheckpointError(f"{run_dir}: no complete checkpoint at step {step}; have "
                               f"{', '.join(p.name for p in found)}")


EXPORT_WRITER = "tapestry export"


def generation_defaults(config, chosen: dict[str, Any]) -> dict[str, Any]:
    """pipeline.json's generation record: the run's sampler shift, then `chosen` on top, checked
    as `Pipeline.from_pretrained` will read it (a bad field is one line, before any weights load)."""
    from tapestry.errors import TapestryError
    from tapestry.infer.engine import GenerationOptions
    from tapestry.models.common.config import section_from_dict

    defaults = {"shift": config.data.timestep_shift, **chosen}  # the engine's defaults for the rest
    options = section_from_dict(GenerationOptions, defaults, "--generation", TapestryError)
    try:
        options.check()
    except TapestryError as e:
        raise TapestryError(f"--generation: {e}") from None
    return defaults


def export_checkpoint(run_dir: str | Path, out: str | Path, step: int | None = None,
                      weights: str = "ema", merge_lora: bool = False, overwrite: bool = False,
                      generation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write OUT from the run's latest (or `step`) checkpoint; `weights` is "ema" or "model".

    `generation` (GenerationOptions fields, e.g. {"guidance": "cfg", "guidance_scales": {"scale":
    4.5}}) joins the folder's generation defaults beside the sampler shift the run trained with:
    settings chosen on val travel with the weights instead of being typed at every call.

    A run whose recipe adds adapters (LoRA) writes an adapter folder (the adapters alone, naming
    `model.init_from` as their base), or with `merge_lora` a pipeline folder of the base with the
    adapters folded into its weights. An OUT holding files an earlier export did not write is
    refused unless `overwrite`."""
    import torch.distributed.checkpoint as dcp

    from tapestry.atomic import check_output_dir, output_dir
    from tapestry.models.common.checkpoint import expected_shapes
    from tapestry.models.pipeline_folder import save_adapter_folder, save_pipeline
    from tapestry.train.loop import TOKENIZER_DIR, add_adapters, family_of, layout_for, load_tokenizer, model_config_for
    from tapestry.train.parallel import Dist

    run_dir, out = Path(run_dir), Path(out)
    check_output_dir(out, EXPORT_WRITER, overwrite)
    path = checkpoint_at(run_dir, step)
    config = load_config(path / "config.toml")
    defaults = generation_defaults(config, generation or {})
    tokenizer = load_tokenizer(config, run_dir, Dist()) if (run_dir / TOKENIZER_DIR).is_dir() or \
        config.model.tokenizer or config.model.init_from else None
    if tokenizer is None:
        raise ckpt.CheckpointError(f"{run_dir}: no tokenizer folder ({TOKENIZER_DIR}/) next to the checkpoints")
    codec = load_codec(config.model.vae)
    family = family_of(config)
    model_config = model_config_for(config, tokenizer, codec)
    with torch.device("meta"):
        model = family.build(model_config)
    adapters = add_adapters(config, family, model)
    if merge_lora and adapters is None:
        raise ckpt.CheckpointError(f"{run_dir}: this run trained no adapters (its recipe names none); export it "
                                   "without --merge-lora")
    trainer = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    part = weights if weights == "model" else "ema"
    if part == "ema" and config.ema.decay == 0:
        part = "model"  # the run kept no EMA
    layout = layout_for(config, model_config, codec)
    if adapters is not None:
        # the checkpoint holds the adapters alone: the base is init_from, read again
        base = Path(config.model.init_from)
        if not base.is_dir():
            raise ckpt.CheckpointError(f"{path}: the adapters' base model.init_from = {str(base)!r} is not a folder here")
        model = family.from_pretrained(base)
        add_adapters(config, family, model)
        params = dict(model.named_parameters())
        names = sorted(adapters)
        state = {part: {f"model.{n}": torch.empty(params[n].shape, dtype=torch.float32 if part == "ema" else
                                                  params[n].dtype) for n in names}}
        with ckpt.quiet_single_process():
            dcp.load(state, checkpoint_id=str(path / "state"))
        with torch.no_grad():
            for n in names:
                params[n].copy_(state[part][f"model.{n}"])
        exported = family.merge_adapters(model) if merge_lora else model
    else:
        # each tied tensor once, under its first name (what save_pretrained writes)
        keys = set(expected_shapes(model))
        shapes = {f"model.{k}": torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items() if k in keys}
        if part == "ema":
            # EMA holds parameters only (each tied tensor once); buffers come from the model state
            names = {n for n in shapes if n in _parameter_names(model)}
            state = {"ema": {n: torch.empty(shapes[n].shape, dtype=torch.float32) for n in names}}
        else:
            state = {"model": shapes}
        with ckpt.quiet_single_process():
            dcp.load(state, checkpoint_id=str(path / "state"))
        loaded = {k[len("model."):]: v for k, v in state[part].items()}
        dtype = next(iter(shapes.values())).dtype
        full = {k: v.to(dtype) for k, v in loaded.items()}
        exported = family.from_state_dict(model_config, full, source=str(path))
    with output_dir(out, EXPORT_WRITER, overwrite) as tmp:
        if adapters is not None and not merge_lora:
            save_adapter_folder(tmp, family, exported, config.model.arch, config.model.init_from, layout, defaults)
        else:
            save_pipeline(tmp, exported, tokenizer, codec, layout, defaults)
        (tmp / "train_config.toml").write_text((path / "config.toml").read_text(encoding="utf-8"), encoding="utf-8")
        info = {"run": str(run_dir), "checkpoint": path.name, "step": trainer["step"], "weights": part,
                "adapters": "merged" if merge_lora else ("alone" if adapters is not None else "none"),
                "parameters": sum(p.numel() for n, p in exported.named_parameters()
                                  if adapters is None or merge_lora or n in adapters)}
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return {**info, "out": str(out)}


def _parameter_names(model) -> set[str]:
    return {f"model.{n}" for n, _ in model.named_parameters()}
