"""Named parameter groups, freezing, AdamW, the learning-rate schedule and EMA.

Parameter groups are the model family's (`Family.param_groups` / `group_of`, e.g. `mot`:
embeddings, und, gen, vit, connector, latent_io, lm_head); every parameter belongs to exactly
one. A stage freezes groups by turning `requires_grad` off before the model is wrapped for
DDP/FSDP, so frozen weights get no gradient, no optimizer step and stay bitwise unchanged.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from tapestry.train.config import ScheduleConfig, StageConfig, TrainConfig
from tapestry.train.parallel import unwrap

# what wraps the model: DDP's "module." and the LossModule's "model."
_WRAPPER_PREFIX = re.compile(r"^(module\.)?model\.")


def group_of(name: str, family) -> str:
    """The parameter group of a parameter name, seen through any wrapper (LossModule, DDP)."""
    return family.group_of(_WRAPPER_PREFIX.sub("", name))


def named_groups(module: nn.Module, family) -> dict[str, list[tuple[str, nn.Parameter]]]:
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in family.param_groups}
    for name, param in module.named_parameters():  # tied weights appear once, under their first name
        groups[group_of(name, family)].append((name, param))
    return groups


def apply_freeze(module: nn.Module, freeze: list[str], family, adapters: set[str] | None = None) -> None:
    """Train every parameter outside the frozen groups; with `adapters` (names relative to the
    model, from `Family.add_adapters`), only those adapters, still minus the frozen groups (an
    adapter on a frozen expert stays frozen)."""
    for name, param in module.named_parameters():
        trainable = group_of(name, family) not in freeze
        if adapters is not None:
            trainable = trainable and _WRAPPER_PREFIX.sub("", name) in adapters
        param.requires_grad_(trainable)


def build_optimizer(module: nn.Module, config: TrainConfig, family) -> torch.optim.AdamW:
    """AdamW over every parameter, frozen or not, so the optimizer state keeps one structure
    through all stages. Param groups: one per named group and decay kind; 1-D tensors (norms,
    biases) take no weight decay."""
    o = config.optim
    param_groups = []
    for group, params in named_groups(module, family).items():
        for decay in (True, False):
            chosen = [p for _, p in params if (p.dim() >= 2) == decay]
            if chosen:
                param_groups.append({"params": chosen, "group": group,
                                     "weight_decay": o.weight_decay if decay else 0.0, "lr": o.lr})
    return torch.optim.AdamW(param_groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def stage_lr(config: TrainConfig, stage: StageConfig, step_in_stage: int) -> float:
    """Learning rate at a step of a stage: linear warm-up, then cosine (to min_lr_ratio) or constant."""
    schedule: ScheduleConfig = config.schedule
    peak = stage.lr or config.optim.lr
    warmup = schedule.warmup if stage.warmup < 0 else stage.warmup
    decay = stage.decay or schedule.decay
    if warmup and step_in_stage < warmup:
        return peak * (step_in_stage + 1) / warmup
    if decay == "constant":
        return peak
    span = max(1, stage.steps - warmup)
    progress = min(1.0, (step_in_stage - warmup) / span)
    floor = peak * schedule.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, stage: StageConfig, lr: float) -> None:
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr * stage.lr_scale.get(param_group["group"], 1.0)


def local(t: Tensor) -> Tensor:
    """The part of a tensor this process holds (the local shard of an FSDP2 DTensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """Exponential moving average of the parameters, in fp32, of each process's own shard.

    Under FSDP2 the shadow tensors are DTensors with the parameters' placements: each process
    holds and updates only its shard, so no process ever keeps a full copy (BAGEL's EMA kept
    full host copies and ran out of host RAM at scale).
    """

    def __init__(self, module: nn.Module, decay: float, names: set[str] | None = None):
        """`names` (of `unwrap(module)`'s parameters): track only these — a LoRA run's adapters,
        since the frozen base never moves and its average is itself."""
        self.decay = decay
        # names without a DDP wrapper's "module." prefix: the same in every mode, so checkpoints
        # written under DDP, FSDP2 or one process hold the same EMA keys
        self.only = names
        self.names = [n for n, _ in self._named(module)]
        self.shadow = [p.detach().to(torch.float32).clone() for _, p in self._named(module)]

    def _named(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in unwrap(module).named_parameters() if self.only is None or n in self.only]

    @torch.no_grad()
    def copy_from(self, module: nn.Module) -> None:
        for s, (_, p) in zip(self.shadow, self._named(module), strict=True):
            local(s).copy_(local(p.detach()))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = [local(p.detach()).to(torch.float32) for _, p in self._named(module)]
        torch._foreach_lerp_([local(s) for s in self.shadow], params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.shadow, strict=True))
