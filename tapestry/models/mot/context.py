"""A growing generation context: clean blocks of embeddings, their KV cache, their positions.

The context of one document only ever holds clean tokens (text, specials, finished images), all
of one document, so any block of new tokens — a text step, a noisy image being denoised, a
finished image joining — may see every cached token and itself. Within a new block, text is
causal and images are bidirectional (DESIGN §4). That is why a step needs no span bookkeeping
against the cache: its mask is "all of the cache" plus the block's own rule.

`recompute=True` keeps no cache and runs the whole context again at every step: the slow path
the cached one is tested against (and benchmarked against).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tapestry.masks import Span, SpanMode, dense_mask
from tapestry.models.mot.model import KVCache


@dataclass
class Block:
    embeds: Tensor  # [n, D]
    expert: Tensor  # [n]
    positions: Tensor  # [n]
    mode: SpanMode  # "causal" (text, specials) or "full" (a clean image)


def block_mask(n: int, mode: SpanMode) -> Tensor:
    """[n, n] rule inside one new block."""
    if mode == "causal":
        return torch.ones(n, n, dtype=torch.bool).tril()
    return torch.ones(n, n, dtype=torch.bool)


def step_mask(context_length: int, n: int, mode: SpanMode) -> Tensor:
    """[n, context_length + n]: every cached token, then the block's own rule."""
    return torch.cat([torch.ones(n, context_length, dtype=torch.bool), block_mask(n, mode)], dim=1)


@dataclass
class Context:
    model: object
    recompute: bool = False
    blocks: list[Block] = field(default_factory=list)
    cache: KVCache = field(default_factory=KVCache)
    next_position: int = 0
    last_hidden: Tensor | None = None  # final states of the last appended block (next-token logits)
    image_position: int | None = None  # the position of the image being drawn (MoTRuntime.begin_image)

    @property
    def length(self) -> int:
        return sum(b.embeds.shape[0] for b in self.blocks)

    def _all(self) -> tuple[Tensor, Tensor, Tensor, list[Span]]:
        spans, start = [], 0
        for b in self.blocks:
            n = b.embeds.shape[0]
            spans.append(Span(start, start + n, b.mode))
            start += n
        return (torch.cat([b.embeds for b in self.blocks]), torch.cat([b.expert for b in self.blocks]),
                torch.cat([b.positions for b in self.blocks]), spans)

    @torch.no_grad()
    def append(self, block: Block) -> Tensor:
        """Add a clean block to the context; returns its final hidden states [n, D]."""
        self.blocks.append(block)
        if self.recompute:
            embeds, expert, positions, spans = self._all()
            hidden = self.model(embeds[None], expert[None], positions[None], dense_mask(spans))[0]
            return hidden[-block.embeds.shape[0]:]
        mask = step_mask(self.cache.length, block.embeds.shape[0], block.mode)
        return self.model(block.embeds[None], block.expert[None], block.positions[None], mask,
                          cache=self.cache, update_cache=True)[0]

    @torch.no_grad()
    def prefill(self, blocks: list[Block]) -> Tensor:
        """Several clean blocks at once (a prompt); returns hidden states of the last block."""
        if not blocks:
            raise ValueError("nothing to prefill")
        if self.recompute or len(blocks) == 1:
            for block in blocks[:-1]:
                self.blocks.append(block)
            return self.append(blocks[-1])
        start = self.length
        self.blocks.extend(blocks)
        embeds = torch.cat([b.embeds for b in blocks])
        expert = torch.cat([b.expert for b in blocks])
        positions = torch.cat([b.positions for b in blocks])
        spans, cursor = [], 0
        for b in blocks:
            spans.append(Span(cursor, cursor + b.embeds.shape[0], b.mode))
            cursor += b.embeds.shape[0]
        mask = torch.cat([torch.ones(cursor, start, dtype=torch.bool), dense_mask(spans)], dim=1)
        hidden = self.model(embeds[None], expert[None], positions[None], mask, cache=self.cache, update_cache=True)[0]
        return hidden[-blocks[-1].embeds.shape[0]:]

    def take_positions(self, n: int = 1) -> Tensor:
        """Positions for n text tokens (each its own id)."""
        positions = torch.arange(self.next_position, self.next_position + n)
        self.next_position += n
        return positions

    def take_image_position(self) -> int:
        """One position id shared by every token of an image (noise steps and clean copy)."""
        position = self.next_position
        self.next_position += 1
        return position

    @torch.no_grad()
    def probe(self, embeds: Tensor, expert: Tensor, positions: Tensor) -> Tensor:
        """Run a bidirectional block (a noisy image) against the context without keeping it:
        one denoising step. Returns hidden states [n, D]."""
        if self.recompute:
            all_embeds, all_expert, all_positions, spans = self._all()
            n = embeds.shape[0]
            spans = spans + [Span(self.length, self.length + n, "noise")]
            hidden = self.model(torch.cat([all_embeds, embeds])[None], torch.cat([all_expert, expert])[None],
                                torch.cat([all_positions, positions])[None], dense_mask(spans))[0]
            return hidden[-n:]
        mask = step_mask(self.cache.length, embeds.shape[0], "full")
        return self.model(embeds[None], expert[None], positions[None], mask, cache=self.cache)[0]
