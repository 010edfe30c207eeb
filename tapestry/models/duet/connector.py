"""The connector: LLM hidden states -> the DiT's text-conditioning input.

DuetGen (following Wang et al.) concatenates the hidden states of *all* decoder layers along
channels; each layer is first normalized to zero mean and unit std over its channels (layers
differ in scale by orders of magnitude; Cosmos-Predict2.5 normalizes its Qwen2.5-VL layers the
same way). An MLP maps the concatenation to the DiT's width. `layers = "last"` keeps only the
last layer: the paper's ablation. `kind = "identity"` passes the concatenation straight through,
for a DiT that projects it itself (Cosmos-Predict2.5-2B's `crossattn_proj` consumes exactly the
28 × 3584 = 100352 channels of Qwen2.5-VL-7B).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tapestry.models.duet.config import ConnectorConfig


def normalize_layer(hidden: Tensor, eps: float) -> Tensor:
    """(h − mean) / (std + eps) over the channel axis."""
    return (hidden - hidden.mean(dim=-1, keepdim=True)) / (hidden.std(dim=-1, keepdim=True) + eps)


class Connector(nn.Module):
    def __init__(self, config: ConnectorConfig, llm_hidden: int, llm_layers: int, out_dim: int):
        super().__init__()
        self.config = config
        self.in_dim = llm_hidden * (llm_layers if config.layers == "all" else 1)
        self.out_dim = out_dim
        if config.kind == "identity":
            if self.in_dim != out_dim:
                raise ValueError(f"connector.kind = identity needs the concatenated width {self.in_dim} to equal "
                                 f"the DiT's context width {out_dim}")
            self.mlp = nn.Identity()
        else:
            self.mlp = nn.Sequential(nn.Linear(self.in_dim, config.hidden_size), nn.GELU(approximate="tanh"),
                                     nn.Linear(config.hidden_size, out_dim))

    def select(self, layers: Sequence[Tensor]) -> list[Tensor]:
        return list(layers) if self.config.layers == "all" else [layers[-1]]

    def forward(self, layers: Sequence[Tensor]) -> Tensor:
        """layers: per decoder layer [..., S, D] -> [..., S, out_dim]."""
        chosen = [normalize_layer(h.float(), self.config.eps) for h in self.select(layers)]
        return self.mlp(torch.cat(chosen, dim=-1).to(self._dtype()))

    def _dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32
