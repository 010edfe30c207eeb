"""Watching quality during training: a validation loss and judged ToyWorld samples.

Both use a fixed set of documents from the ToyWorld *val* split (never drawn by training,
tapestry.toyworld.splits), spread round-robin over the run's ToyWorld sources (task and layout),
so numbers from different steps compare like with like. Runs on Document shards only have no
val split here; their evaluation is skipped with a message.

    validation_loss   the training loss (no dropout, fixed noise) of the val documents packed
                      into rows; every process computes its rows, sums are all-reduced.
    judged_samples    the EMA weights (what `tapestry export` ships) generate the val
                      documents' targets with tapestry.infer's engine, and the ToyWorld judge
                      scores them; per task means and the overall mean (DESIGN §10: watch the
                      judge score during training, not only the loss).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from tapestry.document import Document
from tapestry.layout import pack_layouts
from tapestry.models import family as families
from tapestry.train.config import TrainConfig
from tapestry.train.data import ToyWorldSource
from tapestry.train.dropout import KEEP, apply_decision
from tapestry.train.loss import loss_totals
from tapestry.train.parallel import Dist, all_reduce_sum, barrier, unwrap


def val_documents(config: TrainConfig, count: int) -> list[Document]:
    """`count` fixed val documents, round-robin over the ToyWorld sources (empty without any)."""
    sources = [ToyWorldSource(s, config.seed, split="val") for s in config.data.sources if s.kind == "toyworld"]
    if not sources or count <= 0:
        return []
    return [sources[i % len(sources)].fetch(i // len(sources))[0] for i in range(count)]


class Validation:
    """The val rows, laid out and noised once, reused at every evaluation."""

    def __init__(self, config: TrainConfig, tokenizer, layout, codec, model_config, d: Dist):
        self.d = d
        family = families.get(config.model.family)
        docs = val_documents(config, config.eval.docs)
        self.inputs = []
        self.totals = None
        if not docs:
            return
        layout_fn = functools.partial(family.layout, config=model_config)
        layouts = [apply_decision(KEEP, doc, tokenizer, layout, layout_fn)[1] for doc in docs]
        budget = max(config.data.budget, max(x.length for x in layouts))
        rows = pack_layouts(layouts, budget, tokenizer.pad_id)
        by_id = {doc.id: doc for doc in docs}
        while len(rows) % d.world_size:  # every process takes the same number of rows
            from tapestry.layout import concat_layouts

            rows.append(concat_layouts([], tokenizer.pad_id, budget))
        self.totals = loss_totals(family, family.loss_counts(rows, model_config))
        per_rank = len(rows) // d.world_size
        for r in range(d.rank * per_rank, (d.rank + 1) * per_rank):
            row = rows[r]
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([config.seed, 0x7A1, r]).generate_state(1)[0]))
            self.inputs.append(family.prepare(row, [by_id[p.id] for p in row.documents], layout, codec, generator,
                                              config.data.timestep_shift, config=model_config, tokenizer=tokenizer))

    @property
    def enabled(self) -> bool:
        return self.totals is not None

    @torch.no_grad()
    def loss(self, module) -> dict[str, float]:
        weights = {name: 1.0 for name in self.totals}
        _, sums = module(self.inputs, self.totals, weights, self.d.world_size)
        summed = dict(zip(self.totals, all_reduce_sum(self.d, sums).tolist()))
        parts = {name: summed[name] / count if count else 0.0 for name, count in self.totals.items()}
        total = 0.0
        for value in parts.values():
            total = total + value
        return {"val_loss": total, **{f"val_{name}_loss": value for name, value in parts.items()}}


def ema_model(built, family, model_config, d: Dist):
    """A plain model of the family holding the EMA weights, frozen, on the main process (None
    elsewhere).

    Under FSDP2 every process takes part in gathering the shards (a full copy on the main
    process only: tiny models, opt-in through eval.judge_every)."""
    if built.ema is None:
        shadow = {n: p.detach() for n, p in unwrap(built.module).named_parameters()}
    else:
        shadow = built.ema.state_dict()
    full = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t) for n, t in shadow.items()}
    if not d.is_main:
        return None
    dtype = built.model.dtype
    state = {n.removeprefix("model."): t.detach().to("cpu", dtype) for n, t in full.items()}
    from tapestry.models.common.checkpoint import expected_shapes

    with torch.device("meta"):
        skeleton = family.build(model_config)
    keys = set(expected_shapes(skeleton))
    model = family.from_state_dict(model_config, {k: v for k, v in state.items() if k in keys})
    return model.eval().requires_grad_(False)


def judged_samples(built, trainer, docs: list[Document], steps: int) -> dict[str, Any] | None:
    """Generate and judge `docs` with the EMA weights; None on processes other than the main one,
    or when the inference engine is not available."""
    try:
        from tapestry.infer.engine import Engine, GenerationOptions
        from tapestry.toyworld.evaluate import judge_document, judge_prompt, summarize
    except ImportError:
        return None
    d = trainer.d
    model = ema_model(built, trainer.family, trainer.model_config, d)
    result = None
    if d.is_main:
        engine = Engine(trainer.family.runtime(model, trainer.tokenizer, trainer.codec, trainer.layout))
        options = GenerationOptions(seed=0, steps=steps, shift=trainer.config.data.timestep_shift,
                                    max_new_tokens=64, max_images=6)
        scores = [judge_document(doc, engine.generate(judge_prompt(doc), options)) for doc in docs]
        summary = summarize(scores)
        result = {"judge": summary["overall"]["mean"]}
        result.update({f"judge_{task}": block["mean"] for task, block in summary["tasks"].items()})
        result = {k: (v if v is not None and not math.isnan(v) else 0.0) for k, v in result.items()}
    barrier(d)
    return result
