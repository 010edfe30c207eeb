"""Training checkpoints: atomic, resumable, the same for one process, DDP and FSDP2.

    RUN_DIR/checkpoints/step-00000200/
        state/            model, EMA and optimizer (torch.distributed.checkpoint)
        trainer.json      step, stage, tokens seen, learning rate, world size
        data.json         the packer's data state (stream position, waiting documents)
        rng/rank-N.pt     torch, numpy and python RNG states of process N
        config.toml       the resolved config of the run

Why torch.distributed.checkpoint (DCP) rather than gathering full state dicts: under FSDP2 each
process writes only its own shards (no process ever holds the whole model, the EMA or the
optimizer state — the host-RAM failure of gathered BAGEL checkpoints), and DCP re-shards on load,
so a checkpoint written by N processes loads into M processes or into one plain process. The
inference export (`export_checkpoint`) is the one place that builds a full copy, in one process,
as safetensors.

Atomicity: everything is written into `.step-N.partial/`, then renamed to `step-N/` (a rename
is atomic). A folder named `step-N` is therefore complete; a kill at any moment leaves at worst a
hidden partial folder, which `--resume` ignores and the next save removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tapestry.errors import TapestryError
from tapestry.train.parallel import Dist, barrier

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointError(TapestryError):
    """A training checkpoint is missing, incomplete or does not fit the run."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (partial folders are hidden and never listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / "trainer.json").is_file() and (path / "state" / ".metadata").is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def _remove(path: Path) -> None:
    # rename first so a kill mid-removal leaves a hidden folder, never a half-deleted step-N
    trash = path.parent / f".{path.name}.removing-{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_partials(run_dir: str | Path) -> None:
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def quiet_single_process():
    # DCP warns that it "assumes" one process when no process group exists; here that is the plan.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def training_state(module, optimizer, ema, model_keys: set[str] | None = None) -> dict[str, Any]:
    """The DCP state dict: model, optimizer (keyed by parameter name) and EMA shards.

    `model_keys`: keep only these model entries — a LoRA run's adapters. Its frozen base is
    `model.init_from`, read again when the run resumes or is exported, so a checkpoint of a
    7B-parameter fine-tune holds megabytes, not 15 GB."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = get_model_state_dict(module)
    if model_keys is not None:
        model = {k: v for k, v in model.items() if k in model_keys}
    state = {"model": model, "optim": get_optimizer_state_dict(module, optimizer)}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def save_checkpoint(run_dir: str | Path, step: int, d: Dist, module, optimizer, ema,
                    trainer: dict[str, Any], data_state: dict[str, Any], config_toml: str, keep: int,
                    model_keys: set[str] | None = None) -> Path:
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    partial = root / f".{final.name}.partial"
    if d.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
    barrier(d)
    with quiet_single_process():
        dcp.save(training_state(module, optimizer, ema, model_keys), checkpoint_id=str(partial / "state"))
    (partial / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), partial / "rng" / f"rank-{d.rank}.pt")
    barrier(d)
    if d.is_main:
        (partial / "data.json").write_text(json.dumps(data_state), encoding="utf-8")
        (partial / "config.toml").write_text(config_toml, encoding="utf-8")
        (partial / "trainer.json").write_text(json.dumps({**trainer, "step": step}, indent=1), encoding="utf-8")
        for path in partial.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():  # a re-run of the same step after a resume replaces it whole
            _remove(final)
        os.replace(partial, final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            _remove(old)
    barrier(d)
    return final


def load_checkpoint(path: str | Path, d: Dist, module, optimizer, ema,
                    model_keys: set[str] | None = None) -> tuple[dict, dict]:
    """Load model, optimizer and EMA into the (possibly wrapped) module; returns (trainer, data state).
    With `model_keys` (what `save_checkpoint` kept) the rest of the model stays as built.

    A parameter the checkpoint holds no optimizer state for (frozen until this stage) starts
    Adam afresh. RNG states are restored for this rank (rank 0's when the checkpoint had fewer
    processes).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    if not (path / "trainer.json").is_file() or not (path / "state" / ".metadata").is_file():
        raise CheckpointError(f"{path}: not a complete training checkpoint (no trainer.json or state/)")
    saved = set(dcp.FileSystemReader(str(path / "state")).read_metadata().state_dict_metadata)
    state = training_state(module, optimizer, ema, model_keys)
    # get_optimizer_state_dict fills an empty optimizer's state with a zero-lr step; keep only
    # what the checkpoint has, so a parameter never stepped before gets no made-up Adam state
    fresh = [fqn for fqn in state["optim"]["state"] if f"optim.state.{fqn}.step" not in saved]
    for fqn in fresh:
        del state["optim"]["state"][fqn]
    with quiet_single_process():
        dcp.load(state, checkpoint_id=str(path / "state"))
    set_model_state_dict(module, state["model"], options=StateDictOptions(strict=model_keys is None))
    set_optimizer_state_dict(module, optimizer, state["optim"])
    by_name = dict(_named_parameters(module))
    for fqn in fresh:
        optimizer.state.pop(by_name[fqn], None)
    rng_file = path / "rng" / f"rank-{d.rank}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng" / "rank-0.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    trainer = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    data_state = json.loads((path / "data.json").read_text(encoding="utf-8"))
    return trainer, data_state


def _named_parameters(module):
    # DCP names parameters without DDP's "module." prefix
    inner = module.module if hasattr(module, "module") and hasattr(module, "reducer") else module
    return inner.named_parameters()
