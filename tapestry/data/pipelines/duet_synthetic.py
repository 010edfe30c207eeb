"""`duet-synthetic` (DuetGen §3, synthetic data): instructions expanded from a seed pool and
answered as interleaved how-tos with generated pictures, validated before they are kept.

Inputs are instruction numbers (`tapestry data synth --pipeline duet-synthetic --n N`).
Instruction k comes from seed `(k // per_seed) % seeds` of the pool (domains -> subcategories ->
seed questions; `seeds.path` an editable JSON file, the built-in pool by default), as variant
`k % per_seed` of that seed's expansion, in batch `k // (per_seed * seeds)` once the pool is
used up. Per instruction:

1. expand (LLM): the seed, its domain and the other subcategories -> `per_seed` new instructions;
2. answer (LLM): a title, an opening line and steps, each with a prompt for its picture;
3. images: the generator draws each step's picture with the earlier pictures in context
   (`generator.kind=images-edit` sends them all to an images/edits endpoint; `checkpoint` any
   tapestry checkpoint; `placeholder` a labelled offline stand-in);
4. validate: blank pictures, CLIP image-text similarity (`validate.clip=local:/dir`); then review:
   a VLM reviews the whole sequence; a failed sample is rejected with its reasons.

The Document is a conversation, as DuetGen trains on:

    User: <instruction>                        text, context
    Assistant: <title>. <intro>                text, target
    <step 1 text> [step1]  <step 2 text> ...   text + image, target
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from tapestry.data.operators.base import Rejected, Rejection, StageStats, ask_stage, operator_versions
from tapestry.data.operators.duet import Answer, Expand, SeedPool, Validate
from tapestry.data.operators.incontext import Generator
from tapestry.data.pipelines import config as config_io
from tapestry.data.providers import BudgetExhausted
from tapestry.data.providers.local import provenance as local_provenance
from tapestry.data.records import ImageEncoding, InputItem, InputResult, number_inputs
from tapestry.document import Document, TextSegment
from tapestry.errors import TapestryError


@dataclass(frozen=True)
class DuetOutput:
    image: ImageEncoding = field(default_factory=lambda: ImageEncoding("png"))


@dataclass(frozen=True)
class DuetSyntheticConfig:
    seeds: SeedPool = field(default_factory=SeedPool)
    expand: Expand = field(default_factory=Expand)
    answer: Answer = field(default_factory=Answer)
    generator: Generator = field(default_factory=lambda: Generator(kind="placeholder", side=128))
    validate: Validate = field(default_factory=Validate)
    output: DuetOutput = field(default_factory=DuetOutput)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.expand.per_seed < 1:
            raise ValueError("expand.per_seed must be at least 1")
        if self.generator.kind == "toyworld-renderer":
            raise ValueError("generator.kind=toyworld-renderer needs ToyWorld scenes; duet-synthetic prompts are "
                             "free text (use placeholder, checkpoint, images-api or images-edit)")


class DuetSynthetic:
    name: ClassVar[str] = "duet-synthetic"
    version: ClassVar[str] = "1"
    config_class: ClassVar[type] = DuetSyntheticConfig
    input_suffixes: ClassVar[tuple[str, ...]] = ()
    input_noun: ClassVar[str] = "plans"  # read by `tapestry data synth`, like incontext-synth
    stages: ClassVar[tuple[str, ...]] = ("expand", "answer", "generator", "validate", "review")

    def __init__(self, config: DuetSyntheticConfig):
        self.config = config
        self.fingerprint = config_io.fingerprint(config)
        self.pool = config.seeds.load()
        self._generator: Any = None
        self._clip: Any = None

    @staticmethod
    def discover(paths: list[str]) -> tuple[list[InputItem], list[InputResult]]:
        return number_inputs(paths, "instruction")

    @staticmethod
    def check_config(config: DuetSyntheticConfig) -> None:
        """Before any work: the seed pool must load (one error line naming the file and field)."""
        config.seeds.load()

    @property
    def generator(self) -> Any:
        if self._generator is None:
            self._generator = self.config.generator.build()
        return self._generator

    @property
    def clip(self) -> Any:
        if self._clip is None:
            from tapestry.data.providers.local import LocalEmbedder

            self._clip = LocalEmbedder(self.config.validate.clip, self.config.validate.name, role="image-text")
        return self._clip

    def process(self, item: InputItem, provider: Any) -> InputResult:
        stats = StageStats()
        result = InputResult(item.key, item.shown)
        try:
            result.docs.append(self.document(int(item.path), provider, stats))
        except Rejected as r:
            x = r.rejection
            result.rejections.append(Rejection(x.stage, x.code, x.detail, item.shown, x.failure))
        except BudgetExhausted as e:
            result.stopped = str(e)
            return result
        result.stats = stats.to_json()
        return result

    def pick(self, number: int) -> tuple[dict[str, Any], int, int]:
        """(seed, variant, batch) of instruction `number`."""
        per_seed = self.config.expand.per_seed
        index = number // per_seed
        return self.pool[index % len(self.pool)], number % per_seed, index // len(self.pool)

    def images(self, steps: list[dict[str, Any]], number: int, stats: StageStats) -> list[np.ndarray]:
        c = self.config
        images: list[np.ndarray] = []
        for j, step in enumerate(steps):
            difference = "" if j == 0 else f"the next step: {step['text']}"
            with stats.timed("generator"):
                stats.count("generator", seen=1)
                try:
                    image, _ = self.generator.draw(step, images, difference, "", 0,
                                                   (c.seed * 1_000_003 + number) * 101 + j)
                except TapestryError as e:
                    raise Rejected("generator", "unavailable", str(e)[:300], failure=True) from None
                except (ValueError, OSError) as e:
                    raise Rejected("generator", "failed", str(e)[:300], failure=True) from None
                stats.count("generator", kept=1)
            images.append(image)
        return images

    def validate(self, instruction: str, steps: list[dict[str, Any]], images: list[np.ndarray], provider: Any,
                 stats: StageStats) -> dict[str, Any]:
        c = self.config.validate
        report: dict[str, Any] = {}
        with stats.timed(c.name):
            stats.count(c.name, seen=1)
            flat = [k + 1 for k, img in enumerate(images) if float(img.astype(np.float32).mean(axis=2).std()) < c.min_std]
            if flat:
                raise Rejected(c.name, "blank-image", f"step(s) {', '.join(map(str, flat))}: grey std under {c.min_std:g}")
            if c.clip:
                scores = self.clip.similarity(images, [s["prompt"] for s in steps], c.batch_size)
                report["clip"] = [round(float(v), 4) for v in scores]
                low = [(k + 1, v) for k, v in enumerate(report["clip"]) if v < c.min_clip]
                if low:
                    raise Rejected(c.name, "low-clip-score", "; ".join(f"step {k}: image-text cosine {v:.3f}"
                                                                      for k, v in low) + f" < {c.min_clip:g}")
            stats.count(c.name, kept=1)
        if c.vlm:
            verdict = ask_stage("review", provider, c.request(instruction, steps, images, self.config.seed),
                                Validate.check, stats, count_kept=False)
            report["review"] = verdict
            if not verdict["ok"]:
                raise Rejected("review", "rejected", "; ".join(verdict["problems"])[:500])
            stats.count("review", kept=1)
        return report

    def document(self, number: int, provider: Any, stats: StageStats) -> Document:
        c = self.config
        seed, variant, batch = self.pick(number)
        instructions = ask_stage(c.expand.name, provider, c.expand.request(seed, batch, c.seed + batch),
                                 c.expand.check(seed["seed"]), stats)
        instruction = instructions[variant]
        answer = ask_stage(c.answer.name, provider, c.answer.request(instruction, c.seed), c.answer.check, stats)
        images = self.images(answer["steps"], number, stats)
        report = self.validate(instruction, answer["steps"], images, provider, stats)
        encode = c.output.image
        segments: list[Any] = [TextSegment(f"User: {instruction}", "context"),
                               TextSegment(f"Assistant: {answer['title']}. {answer['intro']}", "target")]
        for j, (step, image) in enumerate(zip(answer["steps"], images)):
            segments.append(TextSegment(step["text"], "target"))
            segments.append(encode.segment(image, "target", f"step{j + 1}", {"prompt": step["prompt"]}))
        meta: dict[str, Any] = {
            "source": {"domain": seed["domain"], "subcategory": seed["subcategory"], "seed": seed["seed"],
                       "variant": variant, "batch": batch, "instruction": instruction},
            "pipeline": {"name": self.name, "version": self.version, "config": self.fingerprint, "seed": c.seed,
                         "instruction": number},
            "operators": operator_versions(c.seeds, c.expand, c.answer, c.generator, c.validate),
            "provider": {"name": provider.name, "model": provider.model,
                         "prompts": {op.task: op.version for op in (c.expand, c.answer, c.validate)}},
            "generator": {"kind": c.generator.kind, "model": self.generator.model},
            "validation": report,
        }
        local = local_provenance(c)
        if local:
            meta["local_models"] = local
        return Document(f"duet-{c.seed}-{number:06d}", segments, meta)
