"""The training loop: one code path for one process, DDP and FSDP2, on CPU or GPU.

    train(config, run_dir, resume=False, quiet=False)

A step: pack the global batch (every process packs the same rows), take this process's rows,
attach pixels and noised latents (seeded per step and row), forward + backward through the
LossModule, clip, AdamW, EMA. The model is whatever family `model.family` names: the loop calls
only the family protocol (tapestry/models/family.py). A recipe that names adapters (`mot`:
[model.lora]) trains only them on the `init_from` model, and its checkpoints hold only them. At each stage start the model, its wrappers and the optimizer are
built afresh with that stage's freeze set and loaded from the checkpoint written at the end of
the previous stage — the same thing a resumed run does, which is why a stage change needs no
special case in DDP or FSDP2 and why resume matches an uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tapestry.errors import TapestryError
from tapestry.layout import LayoutConfig
from tapestry.models import family as families
from tapestry.train import checkpoint as ckpt
from tapestry.train.codecs import BatchEncoded, load_codec
from tapestry.train.config import TrainConfig, TrainConfigError, config_from_data, dump_toml
from tapestry.train.data import DocumentStream, build_source
from tapestry.train.loss import LossModule, loss_totals, part_weights
from tapestry.train.metrics import MetricsLog, Progress
from tapestry.train.optim import EMA, apply_freeze, build_optimizer, set_lr, stage_lr
from tapestry.train.packing import Packer
from tapestry.train.parallel import (
    Dist,
    all_reduce_sum,
    barrier,
    clip_grad_norm,
    fill_missing_grads,
    init_distributed,
    parallelize,
    shutdown,
)

CONFIG_FILE = "config.toml"
TOKENIZER_DIR = "tokenizer"
# Fields a resumed run may change; anything else would make it a different run.
RESUMABLE_CHANGES = ("stages.", "checkpoint.", "log.", "eval.", "parallel.")


class TrainError(TapestryError):
    """A run cannot start or continue; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# What a run is built from
# ---------------------------------------------------------------------------------------------


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): data}


def check_resumable(saved: TrainConfig, new: TrainConfig) -> None:
    from tapestry.train.config import to_dict

    a, b = _flatten(to_dict(saved)), _flatten(to_dict(new))
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if changed:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:8])
        raise TrainError(f"--resume with a config that changes what is trained ({shown}); only "
                         f"{', '.join(p.rstrip('.') for p in RESUMABLE_CHANGES)} may change. Resume with the "
                         "run's own config.toml, or start a new run folder")


def row_seed(seed: int, step: int, row: int) -> int:
    """Seed of the noise and timesteps of one row of one step (same in every process layout)."""
    return int(np.random.SeedSequence([seed, 0xF10, step, row]).generate_state(1)[0])


def codec_pixels(family, rows, documents, layout: LayoutConfig) -> list[torch.Tensor]:
    """The pixels the family's `prepare` will encode for these rows (to encode them in batches)."""
    return [pixels for row, docs in zip(rows, documents) for pixels in family.codec_pixels(row, docs, layout)]


def make_stream(config: TrainConfig) -> DocumentStream:
    return DocumentStream([build_source(s, config.seed) for s in config.data.sources], config.seed)


def default_weights(config: TrainConfig, stage) -> dict[str, float]:
    weights = {s.name: s.weight for s in config.data.sources}
    weights.update(stage.mixture)
    return weights


def tokenizer_texts(config: TrainConfig) -> list[str]:
    """Text of the first `model.tokenizer_docs` documents of an equal mixture of the sources
    (so every task's words are covered), plus English prose."""
    from tapestry.models.common.tokenizer import general_english

    stream = make_stream(config)
    equal = {s.name: 1.0 for s in config.data.sources}
    texts = []
    for _ in range(config.model.tokenizer_docs):
        doc = stream.draw(equal).document
        texts.extend(item for item in doc.reading_order() if isinstance(item, str))
    if config.model.tokenizer_english_chars:
        texts.extend(general_english(config.model.tokenizer_english_chars))
    return texts


def load_tokenizer(config: TrainConfig, run_dir: Path, d: Dist):
    from tapestry.models.common.tokenizer import TextTokenizer, train_bpe

    if config.model.tokenizer:
        return TextTokenizer.load(config.model.tokenizer)
    if config.model.init_from:
        return TextTokenizer.load(config.model.init_from)
    folder = run_dir / TOKENIZER_DIR
    if d.is_main and not (folder / "tokenizer.json").is_file():
        train_bpe(tokenizer_texts(config), config.model.vocab_size).save(folder)
    barrier(d)
    return TextTokenizer.load(folder)


def family_of(config: TrainConfig):
    return families.get(config.model.family)


def model_config_for(config: TrainConfig, tokenizer, codec):
    family = family_of(config)
    if config.model.init_from:
        return family.load_config(config.model.init_from)
    return family.model_config(config.model.arch, tokenizer.vocab_size, codec.latent_channels)


def layout_for(config: TrainConfig, model_config, codec) -> LayoutConfig:
    choices = config.layout
    return family_of(config).layout_config(
        model_config, codec.downsample, references_as_vae=choices.references_as_vae,
        context_as_vae=choices.context_as_vae, clean_copy=choices.clean_copy, noise_copies=choices.noise_copies, text_loss=choices.text_loss,
        target_size=tuple(choices.target_size), text_turns=choices.text_turns)


def add_adapters(config: TrainConfig, family, model) -> set[str] | None:
    """The adapters the recipe names (LoRA for `mot`), injected into `model`: their parameter
    names, or None when the recipe names none (or the family has none) and every parameter trains."""
    inject = getattr(family, "add_adapters", None)
    names = set(inject(model, config.model.arch)) if inject is not None else set()
    if names and not config.model.init_from:
        raise TrainConfigError("model: the recipe adds adapters, which fine-tune a pretrained model; set "
                               "model.init_from to its folder (a BAGEL-layout or tapestry pipeline folder)")
    return names or None


@dataclass
class Built:
    module: torch.nn.Module  # the LossModule, wrapped for DDP or sharded in place by FSDP2
    model: torch.nn.Module  # the family's model inside it
    optimizer: torch.optim.AdamW
    ema: EMA | None
    adapters: set[str] | None = None  # adapter parameter names (relative to the model); None: no adapters

    @property
    def saved_keys(self) -> set[str] | None:
        """Model entries a checkpoint keeps (names inside the LossModule): the adapters alone, or all."""
        return None if self.adapters is None else {f"model.{n}" for n in self.adapters}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, config: TrainConfig, run_dir: str | Path, d: Dist, quiet: bool = False):
        self.config, self.run_dir, self.d, self.quiet = config, Path(run_dir), d, quiet
        self.config_toml = dump_toml(config)
        self.family = family_of(config)
        self.tokenizer = load_tokenizer(config, self.run_dir, d)
        self.codec = load_codec(config.model.vae)
        self.batch_codec = BatchEncoded(self.codec)
        self.model_config = model_config_for(config, self.tokenizer, self.codec)
        self.layout = layout_for(config, self.model_config, self.codec)
        self.packer = Packer(make_stream(config), self.tokenizer, self.layout, config.dropout, config.seed,
                             config.data.budget, config.data.rows, config.data.lookahead,
                             functools.partial(self.family.layout, config=self.model_config))
        self._validation = None
        if config.data.rows % d.world_size:
            raise TrainConfigError(f"data.rows = {config.data.rows} does not split over {d.world_size} processes; "
                                   f"use a multiple of {d.world_size}")

    # -- building -------------------------------------------------------------------------------

    def build(self, stage) -> Built:
        torch.manual_seed(self.config.seed)  # the same initial weights in every process
        if self.config.model.init_from:
            model = self.family.from_pretrained(self.config.model.init_from, device=self.d.device)
        else:
            with torch.device(self.d.device):
                model = self.family.build(self.model_config)
            self.family.initialize(model, self.config.model.arch)  # pretrained parts the recipe names
        adapters = add_adapters(self.config, self.family, model)  # seeded above: the same in every process
        model.train()
        apply_freeze(model, stage.freeze, self.family, adapters)
        module = parallelize(LossModule(model, self.family), self.config.parallel, self.d)
        optimizer = build_optimizer(module, self.config, self.family)
        built = Built(module, model, optimizer, None, adapters)
        if self.config.ema.decay > 0:
            built.ema = EMA(module, self.config.ema.decay, built.saved_keys)
        return built

    # -- one step -------------------------------------------------------------------------------

    def step(self, built: Built, step: int, stage) -> dict[str, Any]:
        config, d = self.config, self.d
        started = time.perf_counter()
        batch = self.packer.next_batch(default_weights(config, stage))
        per_rank = config.data.rows // d.world_size
        mine = range(d.rank * per_rank, (d.rank + 1) * per_rank)
        family = self.family
        self.batch_codec.encode_all(codec_pixels(family, [batch.rows[r] for r in mine],
                                                 [batch.documents[r] for r in mine], self.layout))
        focus = {"focus_weight": config.data.focus_weight} if config.data.focus_weight else {}
        inputs = [family.prepare(batch.rows[r], batch.documents[r], self.layout, self.batch_codec,
                                 torch.Generator().manual_seed(row_seed(config.seed, step, r)),
                                 config.data.timestep_shift, config=self.model_config, tokenizer=self.tokenizer,
                                 **focus)
                  for r in mine]
        # part -> count over the global batch, in the family's loss_parts order
        totals = loss_totals(family, family.loss_counts(batch.rows, self.model_config))
        weights = part_weights(stage, totals)

        _, _, in_stage = config.stage_at(step)
        lr = stage_lr(config, stage, in_stage)
        set_lr(built.optimizer, stage, lr)
        built.optimizer.zero_grad(set_to_none=True)
        autocast = (torch.autocast(d.device.type, dtype=torch.bfloat16) if config.parallel.autocast == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            loss, sums = built.module(inputs, totals, weights, d.world_size)
        loss.backward()
        fill_missing_grads(built.module)
        grad_norm = clip_grad_norm(built.module, config.optim.grad_clip)
        built.optimizer.step()
        if built.ema is not None and step + 1 >= config.ema.start:
            if step + 1 == config.ema.start:
                built.ema.copy_from(built.module)
            else:
                built.ema.update(built.module)

        summed = dict(zip(totals, all_reduce_sum(d, sums).tolist()))
        parts = {name: summed[name] / count if count else 0.0 for name, count in totals.items()}
        total = 0.0
        for name, value in parts.items():
            total = total + weights[name] * value
        seconds = time.perf_counter() - started
        return {
            "step": step + 1, "stage": stage.name, "loss": total,
            **{f"{name}_loss": value for name, value in parts.items()}, "lr": lr, "grad_norm": grad_norm,
            "tokens": batch.real_tokens, "tokens_per_s": batch.real_tokens / seconds,
            "packing": batch.efficiency, "docs": self.packer.stream.drawn - len(self.packer.waiting),
            "seconds": seconds,
        }

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, built: Built, step: int, progress: Progress) -> dict[str, Any]:
        from tapestry.train import evaluate

        out: dict[str, Any] = {}
        ev = self.config.eval
        if ev.every and step % ev.every == 0:
            if self._validation is None:
                self._validation = evaluate.Validation(self.config, self.tokenizer, self.layout, self.codec,
                                                       self.model_config, self.d)
                if not self._validation.enabled:
                    progress.message("eval: no ToyWorld source to draw val documents from; validation skipped")
            if self._validation.enabled:
                out.update(self._validation.loss(built.module))
        if ev.judge_every and step % ev.judge_every == 0 and built.adapters is not None:
            if step == ev.judge_every:
                progress.message("eval: judged samples need a merged model; an adapter run exports one with "
                                 "`tapestry export --merge-lora` (skipped)")
        elif ev.judge_every and step % ev.judge_every == 0:
            docs = evaluate.val_documents(self.config, ev.judge_docs)
            judged = evaluate.judged_samples(built, self, docs, ev.judge_steps) if docs else None
            if judged is not None:
                out.update(judged)
            elif not docs:
                progress.message("eval: judged samples need ToyWorld sources; skipped")
        return out

    # -- the whole run --------------------------------------------------------------------------

    def save(self, built: Built, step: int, stage_index: int, tokens: int, lr: float) -> Path:
        trainer = {"stage": stage_index, "tokens": tokens, "lr": lr, "world_size": self.d.world_size,
                   "mode": self.d.mode}
        return ckpt.save_checkpoint(self.run_dir, step, self.d, built.module, built.optimizer, built.ema,
                                    trainer, self.packer.state(), self.config_toml, self.config.checkpoint.keep,
                                    built.saved_keys)

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Train to the end (or to global step `stop_after`, where a checkpoint is written)."""
        config, d = self.config, self.d
        latest = ckpt.latest_checkpoint(self.run_dir) if resume else None
        if not resume and ckpt.latest_checkpoint(self.run_dir) is not None:
            raise TrainError(f"{self.run_dir} already holds checkpoints; pass --resume to continue that run, "
                             "or choose another --out")
        step, tokens = 0, 0
        if latest is not None:
            import json

            trainer_state = json.loads((latest / "trainer.json").read_text(encoding="utf-8"))
            step, tokens = int(trainer_state["step"]), int(trainer_state["tokens"])
        if d.is_main:
            ckpt.clean_partials(self.run_dir)
        barrier(d)
        total = config.total_steps
        end = min(total, stop_after) if stop_after is not None else total
        metrics = MetricsLog(self.run_dir, d.is_main, config.log.tensorboard, step if latest is not None else None)
        progress = Progress(total, step, self.quiet or not d.is_main)
        if latest is not None:
            progress.message(f"resuming from {latest} (step {step})")
        record: dict[str, Any] | None = None
        last_lr = 0.0
        load_from = latest
        try:
            while step < end:
                stage_index, stage, _ = config.stage_at(step)
                stage_end = sum(s.steps for s in config.stages[: stage_index + 1])
                built = self.build(stage)
                if load_from is not None:
                    _, data_state = ckpt.load_checkpoint(load_from, d, built.module, built.optimizer, built.ema,
                                                         built.saved_keys)
                    if load_from == latest:  # within a run the packer already holds this state
                        self.packer.load_state(data_state)
                while step < min(stage_end, end):
                    record = self.step(built, step, stage)
                    step += 1
                    tokens += record["tokens"]
                    last_lr = record["lr"]
                    evaluated = self.evaluate(built, step, progress)
                    record.update(evaluated)
                    logged = step % config.log.every == 0 or step == total or bool(evaluated)
                    if logged:
                        metrics.write({**record, "tokens_seen": tokens})
                    progress.update(step, record if logged else None)
                    if step % config.checkpoint.every == 0 or step in (stage_end, end):
                        load_from = self.save(built, step, stage_index, tokens, last_lr)
                del built
        finally:
            progress.close()
            metrics.close()
        return {"step": step, "tokens": tokens, "last": record, "checkpoint": str(ckpt.latest_checkpoint(self.run_dir))}


def prepare_run_dir(config: TrainConfig, run_dir: Path, resume: bool, d: Dist) -> TrainConfig:
    """Check the run folder against the config and write the config into it (main process)."""
    saved_path = run_dir / CONFIG_FILE
    if resume and saved_path.is_file():
        from tapestry.train.config import load_config

        check_resumable(load_config(saved_path), config)
    if d.is_main:
        from tapestry.atomic import atomic_write_text

        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved_path, dump_toml(config))
    barrier(d)
    return config


def train(config: TrainConfig, run_dir: str | Path, resume: bool = False, quiet: bool = False,
          stop_after: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train (or with `resume`, continue) the run in `run_dir`; returns a small summary. A
    `run_dir` holding files training did not write is refused unless `overwrite`."""
    from tapestry.atomic import claim_output_dir

    d = init_distributed(config.parallel)
    try:
        run_dir = Path(run_dir)
        if not resume and d.is_main and ckpt.latest_checkpoint(run_dir) is not None:
            raise TrainError(f"{run_dir} already holds checkpoints; pass --resume to continue that run, "
                             "or choose another --out")
        if d.is_main:  # a run folder from before output markers resumes too (its names, below)
            claim_output_dir(run_dir, "tapestry train", overwrite,
                             legacy=(ckpt.CHECKPOINTS, CONFIG_FILE, "metrics.jsonl", TOKENIZER_DIR, "tensorboard"))
        prepare_run_dir(config, run_dir, resume, d)
        if d.is_main and not quiet:
            print(f"# tapestry train -> {run_dir}\n{dump_toml(config)}", flush=True)
        return Trainer(config, run_dir, d, quiet).run(resume, stop_after)
    finally:
        shutdown(d)


__all__ = ["Trainer", "TrainError", "train", "check_resumable", "config_from_data"]
