"""Next-token sampling as a plain function: greedy, temperature, top-p — seeded."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_token(
    logits: Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    banned: list[int] | None = None,
) -> int:
    """logits: [V] -> one token id. temperature 0 means greedy (argmax, ties to the lowest id).

    `banned` ids get probability 0 (e.g. BOI while filling a text target).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    logits = logits.float().clone()
    if banned:
        logits[banned] = float("-inf")
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))
