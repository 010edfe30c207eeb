"""From a training run to an inference checkpoint.

    OUT/                                 a pipeline folder (tapestry.models.pipeline_folder)
        pipeline.json                    format, family, layout config, generation defaults
        config.json, model.safetensors   the family's from_pretrained(OUT) loads these
        tokenizer.json, tokenizer_specials.json
        vae/                             the autoencoder (its own from_pretrained folder)
        train_config.toml                the run's config, for the record
        export.json                      which run, step and weights (EMA or raw) this is

`Pipeline.from_pretrained(OUT)` generates with it.

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


def export_checkpoint(run_dir: str | Path, out: str | Path, step: int | None = None,
                      weights: str = "ema", overwrite: bool = False) -> dict[str, Any]:
    """Write OUT from the run's latest (or `step`) checkpoint; `weights` is "ema" or "model".
    An OUT holding files an earlier export did not write is refused unless `overwrite`."""
    import torch.distributed.checkpoint as dcp

    from tapestry.atomic import check_output_dir, output_dir
    from tapestry.models.common.checkpoint import expected_shapes
    from tapestry.models.pipeline_folder import save_pipeline
    from tapestry.train.loop import TOKENIZER_DIR, family_of, layout_for, load_tokenizer, model_config_for
    from tapestry.train.parallel import Dist

    run_dir, out = Path(run_dir), Path(out)
    check_output_dir(out, EXPORT_WRITER, overwrite)
    path = checkpoint_at(run_dir, step)
    config = load_config(path / "config.toml")
    tokenizer = load_tokenizer(config, run_dir, Dist()) if (run_dir / TOKENIZER_DIR).is_dir() or \
        config.model.tokenizer or config.model.init_from else None
    if tokenizer is None:
        raise ckpt.CheckpointError(f"{run_dir}: no tokenizer folder ({TOKENIZER_DIR}/) next to the checkpoints")
    codec = load_codec(config.model.vae)
    family = family_of(config)
    model_config = model_config_for(config, tokenizer, codec)
    with torch.device("meta"):
        model = family.build(model_config)
    # each tied tensor once, under its first name (what save_pretrained writes)
    keys = set(expected_shapes(model))
    shapes = {f"model.{k}": torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items() if k in keys}
    part = weights if weights == "model" else "ema"
    trainer = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    if part == "ema" and config.ema.decay == 0:
        part = "model"  # the run kept no EMA
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
    defaults = {"shift": config.data.timestep_shift}  # the engine's defaults for the rest
    with output_dir(out, EXPORT_WRITER, overwrite) as tmp:
        save_pipeline(tmp, exported, tokenizer, codec, layout_for(config, model_config, codec), defaults)
        (tmp / "train_config.toml").write_text((path / "config.toml").read_text(encoding="utf-8"), encoding="utf-8")
        info = {"run": str(run_dir), "checkpoint": path.name, "step": trainer["step"], "weights": part,
                "parameters": sum(p.numel() for p in exported.parameters())}
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return {**info, "out": str(out)}


def _parameter_names(model) -> set[str]:
    return {f"model.{n}" for n, _ in model.named_parameters()}
