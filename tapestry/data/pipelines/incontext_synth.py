"""`incontext-synth` (ILLUME-X §4.2-4.3): synthetic multi-image Documents from plans.

Inputs are plan numbers (`tapestry data synth --n N`), each seeded by its number and the config
seed. Per plan: the planner writes a global description and per-image texts and prompts; the
first image is drawn from its prompt; before each next image an LLM writes what must change from
the image before, and the generator draws it with the earlier images in context; with
self-reflection (`judge.rounds` > 0) a judge critiques each image and the generator retries with
the critique prepended to its prompt, up to `rounds` times. Rejected attempts stay in the Document as rounds:

    [global]                                   text, context
    [step 1 text] [frame1]                     text, image (target)
    [step 2 text] [change 1->2]                text, text
      [frame2-round1] [critique]               image (context), text: a rejected attempt
      [frame2]                                 image (target): the accepted (or last) attempt
    ...

On ToyWorld every target carries its scene in `meta.toyworld` and the Document
`meta.toyworld = {"task": "story", ...}`, so `tapestry toyworld judge` scores it; the last
judge verdict of each frame is in its meta too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from tapestry.data.operators.base import (
    Rejected,
    Rejection,
    StageStats,
    ask_stage,
    operator_versions,
)
from tapestry.data.operators.incontext import Differences, Generator, Judge, Planner
from tapestry.data.pipelines import config as config_io
from tapestry.data.providers import BudgetExhausted
from tapestry.data.records import ImageEncoding, InputItem, InputResult, number_inputs
from tapestry.document import Document, TextSegment
from tapestry.errors import TapestryError


@dataclass(frozen=True)
class SynthOutput:
    keep_rounds: bool = True  # rejected attempts and their critiques stay in the Document
    reject_unaccepted: bool = False  # drop plans whose last attempt the judge still rejects
    image: ImageEncoding = field(default_factory=lambda: ImageEncoding("png"))


@dataclass(frozen=True)
class IncontextSynthConfig:
    plan: Planner = field(default_factory=Planner)
    differences: Differences = field(default_factory=Differences)
    generator: Generator = field(default_factory=Generator)
    judge: Judge = field(default_factory=Judge)
    output: SynthOutput = field(default_factory=SynthOutput)
    seed: int = 0


class IncontextSynth:
    name: ClassVar[str] = "incontext-synth"
    version: ClassVar[str] = "1"
    config_class: ClassVar[type] = IncontextSynthConfig
    input_suffixes: ClassVar[tuple[str, ...]] = ()
    input_noun: ClassVar[str] = "plans"
    stages: ClassVar[tuple[str, ...]] = ("plan", "differences", "generator", "judge")

    def __init__(self, config: IncontextSynthConfig):
        self.config = config
        self.fingerprint = config_io.fingerprint(config)
        self._generator: Any = None  # built on first use, once per worker process

    @staticmethod
    def discover(paths: list[str]) -> tuple[list[InputItem], list[InputResult]]:
        """Plan numbers as inputs: key `plan:N` (resume skips finished plans), shown `plan-N`."""
        return number_inputs(paths, "plan")

    @property
    def generator(self) -> Any:
        if self._generator is None:
            self._generator = self.config.generator.build()
        return self._generator

    def process(self, item: InputItem, provider: Any) -> InputResult:
        stats = StageStats()
        result = InputResult(item.key, item.shown)
        try:
            result.docs.append(self.document(int(item.path), item.shown, provider, stats))
        except Rejected as r:
            x = r.rejection
            result.rejections.append(Rejection(x.stage, x.code, x.detail, item.shown, x.failure))
        except BudgetExhausted as e:
            result.stopped = str(e)
            return result
        result.stats = stats.to_json()
        return result

    def draw(self, step: dict[str, Any], context: list[np.ndarray], difference: str, feedback: str, attempt: int,
             seed: int, stats: StageStats) -> tuple[np.ndarray, dict[str, Any]]:
        with stats.timed("generator"):
            stats.count("generator", seen=1)
            try:
                image, info = self.generator.draw(step, context, difference, feedback, attempt, seed)
            except TapestryError as e:  # e.g. the checkpoint cannot be found or loaded
                raise Rejected("generator", "unavailable", str(e)[:300], failure=True) from None
            except (ValueError, OSError) as e:
                raise Rejected("generator", "failed", str(e)[:300], failure=True) from None
            stats.count("generator", kept=1)
        return image, info

    def document(self, number: int, record: str, provider: Any, stats: StageStats) -> Document:
        c = self.config
        plan = ask_stage(c.plan.name, provider, c.plan.request(number, c.seed), c.plan.check, stats)
        encode = c.output.image
        segments: list[Any] = [TextSegment(plan["global"])]
        images: list[np.ndarray] = []
        frames: list[dict[str, Any]] = []
        all_accepted = True
        for j, step in enumerate(plan["steps"]):
            segments.append(TextSegment(step["text"]))
            difference = ""
            if j > 0:
                difference = ask_stage(c.differences.name, provider,
                                       c.differences.request(images[-1], plan["steps"][j - 1], step, c.seed),
                                       Differences.check, stats)
                segments.append(TextSegment(difference))
            feedback = ""
            rounds: list[dict[str, Any]] = []
            seed = (c.seed * 1_000_003 + number) * 101 + j
            for attempt in range(c.judge.rounds + 1):
                image, info = self.draw(step, images, difference, feedback, attempt, seed * 7 + attempt, stats)
                verdict = None
                if c.judge.rounds > 0:
                    verdict = ask_stage(c.judge.name, provider, c.judge.request(image, step, c.seed), Judge.check,
                                        stats)
                rounds.append({"image": image, "info": info, "verdict": verdict})
                if verdict is None or verdict["ok"]:
                    break
                feedback = verdict["critique"]  # prepended to the next attempt's prompt
            final = rounds[-1]
            accepted = final["verdict"] is None or final["verdict"]["ok"]
            all_accepted &= accepted
            name = f"frame{j + 1}"
            if c.output.keep_rounds:
                for r, attempt_round in enumerate(rounds[:-1], start=1):
                    segments.append(encode.segment(attempt_round["image"], "context", f"{name}-round{r}",
                                                   {"round": r, "verdict": attempt_round["verdict"],
                                                    **attempt_round["info"]}))
                    segments.append(TextSegment(f"Critique: {attempt_round['verdict']['critique']}"))
            meta: dict[str, Any] = {"prompt": step["prompt"], "rounds": len(rounds), "verdict": final["verdict"],
                                    **final["info"]}
            if step.get("scene") is not None:
                meta["toyworld"] = {"scene": step["scene"], "step": j}
            segments.append(encode.segment(final["image"], "target", name, meta))
            images.append(final["image"])
            frames.append({"rounds": len(rounds), "accepted": accepted,
                           "score": final["verdict"]["score"] if final["verdict"] else None})
        if c.output.reject_unaccepted and not all_accepted:
            raise Rejected(c.judge.name, "not-accepted", "the judge still rejects "
                           f"{sum(not f['accepted'] for f in frames)} frame(s) after {c.judge.rounds} retries")
        meta = {
            "pipeline": {"name": self.name, "version": self.version, "config": self.fingerprint, "seed": c.seed,
                         "plan": number},
            "operators": operator_versions(c.plan, c.differences, c.generator, c.judge),
            "provider": {"name": provider.name, "model": provider.model,
                         "prompts": {op.task: op.version for op in (c.plan, c.differences, c.judge)}},
            "generator": {"kind": c.generator.kind, "model": self.generator.model},
            "frames": frames,
        }
        if all(step.get("scene") is not None for step in plan["steps"]):
            meta["toyworld"] = {"task": "story", "scenes": [step["scene"] for step in plan["steps"]]}
        return Document(f"incontext-{c.seed}-{number:06d}", segments, meta)
