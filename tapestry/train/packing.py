"""Packing the document stream into steps: `rows` rows of exactly `budget` tokens each.

Each step gathers candidates — the documents left over from earlier steps plus new draws, until
the step's capacity and `lookahead` more tokens are on the table — and places them best-fit
decreasing (largest first, each into the tightest row it fits). Candidates that do not fit wait
for the next step; one passed over MAX_WAIT times is placed before all others, and since any
document fits an empty row, none waits forever. The spare candidates are what lets small
documents fill the gaps large ones leave, which keeps packing efficiency near 1.

The packer's state is the stream's state plus the references of the waiting documents (source
and position, not their contents); a resumed run fetches them again and decides their dropout
again — both pure functions of the reference — so nothing is lost, skipped or seen twice.

All processes pack the same global step (cheap next to a forward pass) and each takes its own
rows; the data state is therefore the same on every rank and checkpoints do not depend on how
many processes wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tapestry.document import Document
from tapestry.errors import TapestryError
from tapestry.layout import LayoutConfig, SequenceLayout, concat_layouts, layout_document, packing_efficiency
from tapestry.train.config import DropoutConfig
from tapestry.train.data import DocumentStream, Drawn
from tapestry.train.dropout import Decision, apply_decision, decide, decision_rng

MAX_WAIT = 4  # steps a document may be passed over before it is placed ahead of larger ones


@dataclass
class Item:
    """A drawn document, cut by its dropout decision and laid out, ready to place."""

    drawn: Drawn
    decision: Decision
    document: Document  # after dropout
    layout: SequenceLayout  # single-document layout of `document`
    waited: int = 0  # steps this document was passed over

    @property
    def length(self) -> int:
        return self.layout.length


@dataclass
class StepBatch:
    """One optimizer step's global batch: every row with the documents packed into it."""

    rows: list[SequenceLayout]
    documents: list[list[Document]]  # per row, in packing order (row.documents[i] is documents[i])
    items: list[list[Item]] = field(default_factory=list)

    @property
    def real_tokens(self) -> int:
        return sum(r.real_tokens for r in self.rows)

    @property
    def efficiency(self) -> float:
        return packing_efficiency(self.rows)


class Packer:
    def __init__(self, stream: DocumentStream, tokenizer, layout: LayoutConfig, dropout: DropoutConfig,
                 seed: int, budget: int, rows: int, lookahead: int, layout_fn=layout_document):
        self.stream, self.tokenizer, self.layout, self.dropout = stream, tokenizer, layout, dropout
        self.layout_fn = layout_fn  # the family's Document -> SequenceLayout
        self.seed, self.budget, self.rows, self.lookahead = seed, budget, rows, lookahead
        self.waiting: list[Item] = []

    def prepare(self, drawn: Drawn) -> Item:
        decision = decide(self.dropout, decision_rng(self.seed, drawn.index), drawn.document)
        document, layout = apply_decision(decision, drawn.document, self.tokenizer, self.layout, self.layout_fn)
        if layout.length > self.budget:
            raise TapestryError(
                f"document {drawn.document.id!r} (source {drawn.source!r}, position {drawn.position}) needs "
                f"{layout.length} tokens, more than data.budget = {self.budget}; raise the budget "
                "or shorten the document")
        return Item(drawn, decision, document, layout)

    def next_batch(self, weights: dict[str, float]) -> StepBatch:
        capacity = self.rows * self.budget
        pool = list(self.waiting)
        # candidates: what waits, plus new draws until the step's capacity and `lookahead` more
        # tokens are on the table (bounded: at most about lookahead + one row's worth waits after)
        while sum(i.length for i in pool) < capacity + self.lookahead:
            pool.append(self.prepare(self.stream.draw(weights)))
        # best-fit decreasing, except that documents passed over MAX_WAIT times go first: the
        # largest-first order packs tightly, the age rule guarantees every document its turn
        overdue = sorted((i for i in pool if i.waited >= MAX_WAIT), key=lambda i: i.drawn.index)
        rest = sorted((i for i in pool if i.waited < MAX_WAIT), key=lambda i: (-i.length, i.drawn.index))
        placed: list[list[Item]] = [[] for _ in range(self.rows)]
        free = [self.budget] * self.rows
        waiting: list[Item] = []
        for item in overdue + rest:
            fits = [r for r in range(self.rows) if free[r] >= item.length]
            if not fits:
                item.waited += 1
                waiting.append(item)
                continue
            best = min(fits, key=lambda r: (free[r], r))  # the tightest row it fits
            placed[best].append(item)
            free[best] -= item.length
        self._tighten(placed, free, waiting)
        self.waiting = sorted(waiting, key=lambda i: i.drawn.index)
        for row in placed:  # documents sit in a row in the order they were drawn
            row.sort(key=lambda i: i.drawn.index)
        rows = [concat_layouts([i.layout for i in row], self.tokenizer.pad_id, self.budget) for row in placed]
        return StepBatch(rows, [[i.document for i in row] for row in placed], placed)

    @staticmethod
    def _tighten(placed: list[list[Item]], free: list[int], waiting: list[Item]) -> None:
        """Close the gaps best-fit leaves: swap a placed document for a waiting one that is longer
        by at most the row's free space, the largest such gain first, until none helps. An
        overdue document is never swapped out (its turn is guaranteed)."""
        for r, row in enumerate(placed):
            while free[r] > 0 and waiting:
                best = None
                for a, out in enumerate(row):
                    if out.waited >= MAX_WAIT:
                        continue
                    for b, into in enumerate(waiting):
                        gain = into.length - out.length
                        if 0 < gain <= free[r] and (best is None or gain > best[0]):
                            best = (gain, a, b)
                if best is None:
                    break
                gain, a, b = best
                row[a], waiting[b] = waiting[b], row[a]
                waiting[b].waited += 1
                free[r] -= gain

    def state(self) -> dict[str, Any]:
        return {"stream": self.stream.state(),
                "waiting": [{**i.drawn.ref(), "waited": i.waited} for i in self.waiting]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.stream.load_state(state["stream"])
        self.waiting = []
        for ref in state["waiting"]:
            item = self.prepare(self.stream.fetch(ref))
            item.waited = int(ref.get("waited", 0))
            self.waiting.append(item)
