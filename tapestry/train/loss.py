"""The training loss as one module: what DDP / FSDP2 wrap.

FSDP2 gathers a module's shards only inside that module's forward, and the `mot` model's inputs
and heads (`embed_text`, `embed_images`, `embed_latents`, `logits`, `latent_velocity`) are methods
called outside `MoTModel.forward`. `LossModule.forward` runs the whole step — embeddings,
decoder, heads, losses — so every parameter is used inside one forward of the wrapped root.

Means are over the *global* batch: the loss is CE summed over this process's supervised tokens
divided by the number of supervised tokens of all processes (the same for the flow MSE), times
the world size because DDP and FSDP average gradients. One process and N processes with the same
global batch therefore follow the same gradients, which the distributed test checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tapestry.layout import IGNORE, SequenceLayout, dense_mask
from tapestry.models.mot.family import RowInputs, embed_row


@dataclass(frozen=True)
class Totals:
    """Loss denominators of the global batch, known to every process (all pack every row)."""

    text_tokens: int
    flow_elements: int


def batch_totals(rows: Sequence[SequenceLayout], latent_channels: int, latent_patch: int) -> Totals:
    text = sum(int((r.labels != IGNORE).sum()) for r in rows)
    flow = sum(p.grid[0] * p.grid[1] * latent_channels * latent_patch**2
               for r in rows for p in r.images if p.kind == "noise")
    return Totals(text, flow)


class LossModule(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Sequence[RowInputs], totals: Totals, text_weight: float = 1.0,
                flow_weight: float = 1.0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        """Returns (loss to backpropagate, detached [text CE sum, flow squared-error sum])."""
        model = self.model
        device = model.device
        rows = [inputs.row for inputs in batch]
        # embeds: [B, L, D]; expert, positions: [B, L]; masks: [B, L, L]
        embeds = torch.stack([embed_row(model, inputs) for inputs in batch])
        expert = torch.stack([r.expert for r in rows]).to(device)
        positions = torch.stack([r.position_ids for r in rows]).to(device)
        masks = torch.stack([dense_mask(r.spans) for r in rows]).to(device)
        hidden = model(embeds, expert, positions, masks)  # [B, L, D]

        labels = torch.stack([r.labels for r in rows]).to(device)  # [B, L]
        supervised = labels != IGNORE
        zero = hidden.sum() * 0.0  # keeps the graph whole when a term has nothing to sum
        text_sum = zero
        if supervised.any():
            logits = model.logits(hidden[supervised]).float()  # [N_text, V]
            text_sum = F.cross_entropy(logits, labels[supervised], reduction="sum")
        flow_sum = zero
        for b, inputs in enumerate(batch):
            for n, target in inputs.velocity_targets.items():
                placement = inputs.row.images[n]
                h, w = placement.grid
                # predicted: [C, h·p, w·p] velocity of this image's latents
                predicted = model.latent_velocity(hidden[b : b + 1, placement.start : placement.end], h, w)[0]
                flow_sum = flow_sum + (predicted.float() - target.to(device)).pow(2).sum()
        loss = zero
        if totals.text_tokens:
            loss = loss + text_weight * text_sum / totals.text_tokens
        if totals.flow_elements:
            loss = loss + flow_weight * flow_sum / totals.flow_elements
        return loss * world_size, torch.stack([text_sum.detach(), flow_sum.detach()])
