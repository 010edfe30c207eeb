"""Steps of DuetGen's synthetic data pipeline (DuetGen §3, "Synthetic data"): a hierarchical seed
pool (domains -> subcategories -> seed questions, a file you can edit), an LLM that expands each
seed into new user instructions (told the other subcategories, so it does not drift into them),
an LLM that answers an instruction as an interleaved how-to (text steps, each with a prompt for
its picture), image generation through the generators of `incontext`, and validation.

Offline stand-ins answer every task deterministically from the request (templated variations
of the seed, generic steps built from the instruction's words, measurable checks): they exercise
the pipeline, they are not the O3 / Nano Banana quality the paper gets from commercial models.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tapestry.data.operators.objects import content_words
from tapestry.data.operators.vlm import _as_array, _text
from tapestry.data.providers import ChatRequest, Message, offline_responder
from tapestry.errors import TapestryError

# The built-in pool: the eight everyday domains of the paper's kind, two subcategories each, two
# seed questions per subcategory. `python -m tapestry.data.samples seeds FILE` writes it out to
# edit; point `seeds.path` at the edited file.
DEFAULT_POOL: dict[str, Any] = {"domains": [
    {"name": "Home & Living", "subcategories": [
        {"name": "Cleaning", "seeds": ["How do I descale an electric kettle?",
                                       "How can I get a red wine stain out of a carpet?"]},
        {"name": "Repairs", "seeds": ["How do I fix a dripping kitchen tap?",
                                      "How do I patch a small hole in drywall?"]}]},
    {"name": "Cooking & Food", "subcategories": [
        {"name": "Baking", "seeds": ["How do I bake a simple loaf of bread?", "How do I make banana muffins?"]},
        {"name": "Quick meals", "seeds": ["How do I make a vegetable stir-fry?", "How do I cook a fluffy omelette?"]}]},
    {"name": "Pets & Animal Caring", "subcategories": [
        {"name": "Dogs", "seeds": ["How do I teach a puppy to sit?", "How do I trim my dog's nails safely?"]},
        {"name": "Small pets", "seeds": ["How do I set up a hamster cage?", "How do I clean a fish tank?"]}]},
    {"name": "Transportation", "subcategories": [
        {"name": "Bicycles", "seeds": ["How do I fix a flat bicycle tyre?", "How do I adjust bicycle brakes?"]},
        {"name": "Cars", "seeds": ["How do I check my car's oil level?", "How do I jump-start a car battery?"]}]},
    {"name": "Gardening", "subcategories": [
        {"name": "Vegetables", "seeds": ["How do I grow tomatoes in pots?", "How do I start a herb garden?"]},
        {"name": "Houseplants", "seeds": ["How do I repot a houseplant?", "How do I propagate a pothos cutting?"]}]},
    {"name": "Crafts & DIY", "subcategories": [
        {"name": "Paper crafts", "seeds": ["How do I fold a paper crane?", "How do I make a pop-up card?"]},
        {"name": "Sewing", "seeds": ["How do I sew on a button?", "How do I hem a pair of trousers?"]}]},
    {"name": "Health & Fitness", "subcategories": [
        {"name": "Exercise", "seeds": ["How do I do a proper push-up?", "How do I stretch after a run?"]},
        {"name": "First aid", "seeds": ["How do I bandage a sprained ankle?", "How do I treat a minor burn?"]}]},
    {"name": "Technology", "subcategories": [
        {"name": "Computers", "seeds": ["How do I clean a laptop keyboard?", "How do I replace a laptop's RAM?"]},
        {"name": "Phones", "seeds": ["How do I apply a screen protector?", "How do I back up photos on my phone?"]}]},
]}


def check_pool(pool: Any, where: str) -> list[dict[str, Any]]:
    """The seeds of a pool as a flat list of {domain, subcategory, seed, siblings}; a bad pool is
    one error naming the file and the field."""
    if not isinstance(pool, dict) or not isinstance(pool.get("domains"), list) or not pool["domains"]:
        raise TapestryError(f"{where}: expected {{\"domains\": [{{\"name\", \"subcategories\": [...]}}]}}")
    seeds: list[dict[str, Any]] = []
    for i, domain in enumerate(pool["domains"]):
        at = f"{where}: domains[{i}]"
        if not isinstance(domain, dict) or not isinstance(domain.get("name"), str) or not domain["name"].strip():
            raise TapestryError(f"{at}.name: must be a non-empty string")
        subs = domain.get("subcategories")
        if not isinstance(subs, list) or not subs:
            raise TapestryError(f"{at}.subcategories: must be a non-empty list")
        names = []
        for j, sub in enumerate(subs):
            if not isinstance(sub, dict) or not isinstance(sub.get("name"), str) or not sub["name"].strip():
                raise TapestryError(f"{at}.subcategories[{j}].name: must be a non-empty string")
            names.append(sub["name"].strip())
        for j, sub in enumerate(subs):
            questions = sub.get("seeds")
            if not isinstance(questions, list) or not questions or not all(
                    isinstance(q, str) and q.strip() for q in questions):
                raise TapestryError(f"{at}.subcategories[{j}].seeds: must be a non-empty list of questions")
            for q in questions:
                seeds.append({"domain": domain["name"].strip(), "subcategory": names[j], "seed": q.strip(),
                              "siblings": [n for n in names if n != names[j]]})
    return seeds


@dataclass(frozen=True)
class SeedPool:
    name: ClassVar[str] = "seeds"
    version: ClassVar[str] = "1"

    path: str = ""  # a JSON pool file; empty: the built-in pool

    def load(self) -> list[dict[str, Any]]:
        if not self.path:
            return check_pool(DEFAULT_POOL, "built-in seed pool")
        try:
            pool = json.loads(Path(self.path).read_text(encoding="utf-8"))
        except OSError as e:
            raise TapestryError(f"seeds.path {self.path}: cannot read: {e.strerror or e}") from None
        except ValueError as e:
            raise TapestryError(f"seeds.path {self.path}: not valid JSON: {e}") from None
        return check_pool(pool, f"seeds.path {self.path}")


@dataclass(frozen=True)
class Expand:
    """LLM expansion of one seed into `per_seed` new instructions (DuetGen: O3, told the base
    category and the other subcategories to avoid duplicates)."""

    name: ClassVar[str] = "expand"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "duet-expand"

    per_seed: int = 4
    max_tokens: int = 800
    temperature: float = 0.7

    def request(self, seed: dict[str, Any], batch: int, seed_value: int) -> ChatRequest:
        siblings = ", ".join(seed["siblings"]) or "none"
        prompt = (
            f"Domain: {seed['domain']}\nSubcategory: {seed['subcategory']}\nOther subcategories (stay out of "
            f"them): {siblings}\nSeed question: {seed['seed']}\n\n"
            f"Write {self.per_seed} new, diverse questions a user might ask in this subcategory, each needing a "
            "step-by-step answer illustrated with pictures. Vary the situation, the tools and the goal; do not "
            "repeat the seed or each other" + (f" (batch {batch}: differ from earlier batches)" if batch else "")
            + '. Answer with one JSON object: {"instructions": ["...", ...]}')
        return ChatRequest([Message.system("You write diverse user requests for an illustrated how-to assistant."),
                            Message.user(prompt)], json_mode=True, max_tokens=self.max_tokens,
                           temperature=self.temperature, seed=seed_value, task=self.task,
                           prompt_version=self.version,
                           hints={"seed": seed["seed"], "batch": batch, "n": self.per_seed})

    def check(self, seed: str):
        def check(obj: Any) -> list[str]:
            items = obj.get("instructions") if isinstance(obj, dict) else None
            if not isinstance(items, list) or len(items) < self.per_seed:
                raise ValueError(f'the answer must be {{"instructions": [...]}} with {self.per_seed} questions')
            out = [_text(q, f"instructions[{i}]") for i, q in enumerate(items[: self.per_seed])]
            lowered = [q.lower() for q in out]
            if len(set(lowered)) < len(out):
                raise ValueError("the instructions repeat each other; make every one different")
            if seed.lower() in lowered:
                raise ValueError("an instruction repeats the seed question; write new ones")
            return out

        return check


URL = re.compile(r"https?://|www\.|<[a-z/][^>]*>", re.IGNORECASE)


@dataclass(frozen=True)
class Answer:
    """LLM answer of one instruction as an interleaved how-to: a title, an opening line, and
    steps each with its text and a prompt for the picture that shows it."""

    name: ClassVar[str] = "answer"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "duet-answer"

    min_steps: int = 2
    max_steps: int = 6
    min_prompt_words: int = 4
    max_tokens: int = 1500

    def request(self, instruction: str, seed_value: int) -> ChatRequest:
        prompt = (
            f"User request: {instruction}\n\nAnswer it as an illustrated step-by-step guide with "
            f"{self.min_steps} to {self.max_steps} steps. For each step write its text (one to three sentences) "
            "and a prompt for the picture that shows that step: the objects, hands or people, the setting and the "
            "camera view, consistent with the pictures before it. No links, no HTML. Answer with one JSON object: "
            '{"title": "...", "intro": "...", "steps": [{"text": "...", "image": "..."}]}')
        return ChatRequest([Message.system("You are a helpful assistant that answers with text and pictures."),
                            Message.user(prompt)], json_mode=True, max_tokens=self.max_tokens, seed=seed_value,
                           task=self.task, prompt_version=self.version, hints={"instruction": instruction,
                                                                                 "max_steps": self.max_steps})

    def check(self, obj: Any) -> dict[str, Any]:
        if not isinstance(obj, dict) or not isinstance(obj.get("steps"), list):
            raise ValueError('the answer must be a JSON object with "title", "intro" and a list "steps"')
        steps = obj["steps"]
        if not self.min_steps <= len(steps) <= self.max_steps:
            raise ValueError(f"'steps' must hold {self.min_steps} to {self.max_steps} steps, got {len(steps)}")
        out = []
        for i, step in enumerate(steps):
            if not isinstance(step, dict):
                raise ValueError(f"steps[{i}] must be an object with text and image")
            text = _text(step.get("text"), f"steps[{i}].text")
            image = _text(step.get("image"), f"steps[{i}].image")
            for field, value in (("text", text), ("image", image)):
                if URL.search(value):
                    raise ValueError(f"steps[{i}].{field} holds a link or HTML; write plain text")
            if len(image.split()) < self.min_prompt_words:
                raise ValueError(f"steps[{i}].image is too short to draw from: describe the picture in at least "
                                 f"{self.min_prompt_words} words")
            out.append({"text": text, "prompt": image})
        title, intro = _text(obj.get("title"), "'title'"), _text(obj.get("intro"), "'intro'")
        if URL.search(title + " " + intro):
            raise ValueError("the title or intro holds a link or HTML; write plain text")
        return {"title": title, "intro": intro, "steps": out}


@dataclass(frozen=True)
class Validate:
    """Validation of a generated sample before it is kept (rejections name the reason):
    blank or flat images; with `clip` (`local:/dir`, a CLIP checkpoint) the cosine similarity of
    each image with its step's picture prompt must reach `min_clip`; with `vlm` a VLM reviews the
    whole sequence (each picture matches its step, the pictures stay consistent) and says ok or
    lists the problems."""

    name: ClassVar[str] = "validate"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "duet-validate"
    local_fields: ClassVar[dict[str, str]] = {"clip": "image-text"}

    min_std: float = 6.0  # grey standard deviation below which an image is blank
    clip: str = ""  # "" (off) or "local:/dir" with a CLIP checkpoint
    min_clip: float = 0.2
    batch_size: int = 16
    vlm: bool = True
    max_tokens: int = 400

    def __post_init__(self) -> None:
        if self.clip and not self.clip.startswith("local:"):
            raise ValueError(f"validate.clip must be empty or 'local:/dir', got {self.clip!r}")

    def request(self, instruction: str, steps: list[dict[str, Any]], images: list[np.ndarray],
                seed_value: int) -> ChatRequest:
        content: list[Any] = [f"User request: {instruction}"]
        for k, (step, image) in enumerate(zip(steps, images), start=1):
            content += [f"Step {k}: {step['text']}", image]
        content.append("Review this illustrated answer. Is every picture a faithful illustration of its step, are "
                       "the pictures consistent with each other (same objects, setting and style), and is each "
                       "picture free of artefacts, unreadable text and errors? Answer with one JSON object: "
                       '{"ok": true or false, "problems": ["step N: what is wrong", ...]}')
        return ChatRequest([Message.user(*content)], json_mode=True, max_tokens=self.max_tokens, seed=seed_value,
                           task=self.task, prompt_version=self.version)

    @staticmethod
    def check(obj: Any) -> dict[str, Any]:
        if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
            raise ValueError('the answer must be a JSON object with a boolean "ok" and a list "problems"')
        problems = obj.get("problems") or []
        if not isinstance(problems, list) or not all(isinstance(p, str) for p in problems):
            raise ValueError("'problems' must be a list of strings")
        if not obj["ok"] and not any(p.strip() for p in problems):
            raise ValueError("a rejected sample needs at least one problem saying what is wrong")
        return {"ok": obj["ok"], "problems": [p.strip() for p in problems if p.strip()]}


# ------------------------------------------------------------ offline stand-ins
SITUATIONS = ("for a complete beginner", "with only basic household tools", "in a small apartment",
              "on a tight budget", "when I am short on time", "with a child helping", "for the first time outdoors",
              "without making a mess", "the way professionals do it", "safely, step by step")


@offline_responder(Expand.task)
def _offline_expand(request: ChatRequest, rng: random.Random) -> str:
    seed = request.hints.get("seed", "How do I do this?").rstrip("?")
    n = int(request.hints.get("n", 4))
    picks = rng.sample(SITUATIONS, min(n, len(SITUATIONS)))
    return json.dumps({"instructions": [f"{seed} {s}?" for s in picks]})


@offline_responder(Answer.task)
def _offline_answer(request: ChatRequest, rng: random.Random) -> str:
    instruction = request.hints.get("instruction", "")
    asking = {"how", "do", "does", "can", "what", "my", "me", "should", "way", "when", "why"}
    words = [w for w in re.findall(r"[a-z]+", instruction.lower())
             if w in content_words(instruction) and w not in asking]
    topic = " ".join(words[:3]) or "task"
    n = rng.randint(2, min(4, int(request.hints.get("max_steps", 4))))
    verbs = ("Prepare", "Start with", "Work on", "Check", "Finish")
    steps = [{"text": f"Step {k + 1}: {verbs[k % len(verbs)].lower()} the {topic}, slowly and carefully.",
              "image": f"A close-up photo of hands working on the {topic}, step {k + 1}, on a bright table"}
             for k in range(n)]
    return json.dumps({"title": f"Guide: {instruction.rstrip('?')}", "intro": f"Here is how, in {n} steps.",
                       "steps": steps})


@offline_responder(Validate.task)
def _offline_validate(request: ChatRequest, rng: random.Random) -> str:
    """Measurable problems only: a picture identical to the one before it, a flat picture."""
    images = [_as_array(im).astype(np.float32) for im in request.images()]
    problems = []
    for k, (a, b) in enumerate(zip(images, images[1:]), start=1):
        if a.shape == b.shape and float(np.abs(a - b).mean()) < 1.0:
            problems.append(f"step {k + 1}: the picture repeats step {k}")
    for k, image in enumerate(images, start=1):
        if float(image.mean(axis=2).std()) < 3.0:
            problems.append(f"step {k}: the picture is flat")
    return json.dumps({"ok": not problems, "problems": problems})
