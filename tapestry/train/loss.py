"""The training loss as one module: what DDP / FSDP2 wrap. The one training loss of every family.

FSDP2 gathers a module's shards only inside that module's forward, and a family's inputs and
heads (for `mot`: `embed_text`, `embed_images`, `embed_latents`, `logits`, `latent_velocity`)
are methods called outside the model's `forward`. `LossModule.forward` runs the whole step —
the family's `loss(model, batch)`: embeddings, decoder, heads, summed named parts — so every
parameter is used inside one forward of the wrapped root.

Means are over the *global* batch: each part's sum over this process's rows is divided by that
part's count over the rows of all processes (`Family.loss_counts`), times the world size because
DDP and FSDP average gradients. One process and N processes with the same global batch therefore
follow the same gradients, which the distributed test checks.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn


def part_weights(stage, names) -> dict[str, float]:
    """Weight of each loss part in a stage, by part name: `loss_weights[name]`, else
    `text_weight` / `flow_weight` for parts named "text" / "flow", else 1."""
    fixed = {"text": stage.text_weight, "flow": stage.flow_weight}
    return {name: float(stage.loss_weights.get(name, fixed.get(name, 1.0))) for name in names}


def loss_totals(family, counts: dict[str, int]) -> dict[str, int]:
    """The family's `loss_counts` in its `loss_parts` order (how logs list them), checked to
    name exactly those parts."""
    parts = tuple(family.loss_parts)
    if set(counts) != set(parts):
        raise ValueError(f"family {family.name!r} declares loss parts {list(parts)} but counted {sorted(counts)}")
    return {name: counts[name] for name in parts}


class LossModule(nn.Module):
    def __init__(self, model: nn.Module, family):
        super().__init__()
        self.model = model
        self.family = family  # a plain object (not a module): no parameters, nothing to wrap

    def forward(self, batch: Sequence[Any], totals: dict[str, int], weights: dict[str, float],
                world_size: int = 1) -> tuple[Tensor, Tensor]:
        """Returns (loss to backpropagate, detached sums of the parts in `totals` order)."""
        parts = self.family.loss(self.model, batch)
        missing = sorted(set(totals) - set(parts))
        if missing:
            raise ValueError(f"family {self.family.name!r} counted loss parts {missing} but its loss returned "
                             f"{sorted(parts)}")
        loss = sum(parts.values()) * 0.0  # keeps the graph whole when no part has anything to count
        for name, count in totals.items():
            if count:
                loss = loss + weights[name] * parts[name] / count
        return loss * world_size, torch.stack([parts[name].detach() for name in totals])
