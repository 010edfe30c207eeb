"""Model steps of the web engine (DuetGen §3), each a prompt + a strict answer check + an offline
stand-in.

- `WebImageCaption` (VLM): a caption, a category (photo, illustration, screenshot, diagram,
  document, chart, other) and whether the image belongs to the page's topic; images of a category
  not in `keep` or judged irrelevant are dropped.
- `Rewrite` (LLM): the page's cleaned blocks, images shown as [IMAGE k: caption], rewritten into
  a title and clean steps that each name the images that illustrate them. Checked: every image
  used once at most and only known ones, no links or HTML left, at least one step.
- `Dialog` (LLM, optional): the steps as the answer to a user's question: a question and a
  short assistant opening.

Offline answers: pixel statistics for the category, the alt text and colours for the caption,
and for the rewrite the page's own sentences minus links and boilerplate, steps cut at headings.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from tapestry.data.operators.vlm import _as_array, _text, colour_name
from tapestry.data.providers import ChatRequest, Message, offline_responder

CATEGORIES = ("photo", "illustration", "screenshot", "diagram", "document", "chart", "other")
_URL = re.compile(r"https?://|www\.|<[a-z/][^>]*>", re.IGNORECASE)
BOILERPLATE = re.compile(r"\b(click here|visit our|subscribe|sign up|newsletter|follow us|share this|"
                         r"cookie|all rights reserved|copyright|advertisement|read more)\b", re.IGNORECASE)


@dataclass(frozen=True)
class WebImageCaption:
    name: ClassVar[str] = "image-captions"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "web-image-caption"

    keep: tuple[str, ...] = ("photo", "illustration", "screenshot", "diagram")
    max_tokens: int = 300

    def request(self, image: np.ndarray, alt: str, context: str, title: str, seed: int) -> ChatRequest:
        prompt = (f"This image comes from a how-to page titled {title!r}. Its alt text: {alt!r}. The text "
                  f"around it: {context[:600]!r}.\nDescribe what the image shows in one sentence, give its "
                  f"category (one of {', '.join(CATEGORIES)}) and say whether it illustrates the page's "
                  'topic. Answer with one JSON object: {"caption": "...", "category": "...", "relevant": true}')
        return ChatRequest([Message.user(image, prompt)], json_mode=True, max_tokens=self.max_tokens, seed=seed,
                           task=self.task, prompt_version=self.version, hints={"alt": alt})

    @staticmethod
    def check(obj: Any) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise ValueError('the answer must be a JSON object with caption, category and relevant')
        category = obj.get("category")
        if category not in CATEGORIES:
            raise ValueError(f"'category' must be one of {', '.join(CATEGORIES)}, got {category!r}")
        if not isinstance(obj.get("relevant"), bool):
            raise ValueError("'relevant' must be true or false")
        return {"caption": _text(obj.get("caption"), "'caption'"), "category": category,
                "relevant": obj["relevant"]}


@dataclass(frozen=True)
class Rewrite:
    name: ClassVar[str] = "rewrite"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "howto-rewrite"

    max_steps: int = 30
    max_tokens: int = 2000

    def request(self, title: str, items: list[dict[str, Any]], seed: int) -> ChatRequest:
        lines = []
        for item in items:
            if item["kind"] == "image":
                lines.append(f"[IMAGE {item['key']}: {item['caption']}]")
            elif item["kind"] == "heading":
                lines.append(f"## {item['text']}")
            else:
                lines.append(item["text"])
        prompt = (
            f"Below is the main text of a how-to web page titled {title!r}, with its images shown as "
            "[IMAGE key: caption] where they stand.\n\n" + "\n\n".join(lines) + "\n\n"
            "Rewrite it as clean instructions: fix formatting errors, drop links, ads, sign-up prompts and "
            "anything off-topic, keep every useful detail. Split it into steps; attach each image to the step "
            "it illustrates (each image at most once, drop images that illustrate nothing). Answer with one "
            'JSON object: {"title": "...", "steps": [{"text": "...", "images": ["key", ...]}]}')
        return ChatRequest([Message.system("You edit how-to guides."), Message.user(prompt)], json_mode=True,
                           max_tokens=self.max_tokens, seed=seed, task=self.task, prompt_version=self.version,
                           hints={"title": title, "items": items})

    def check(self, keys: list[str]):
        def check(obj: Any) -> dict[str, Any]:
            if not isinstance(obj, dict) or not isinstance(obj.get("steps"), list) or not obj["steps"]:
                raise ValueError('the answer must be a JSON object with "title" and a non-empty list "steps"')
            title = _text(obj.get("title"), "'title'")
            steps, used = [], set()
            for i, step in enumerate(obj["steps"][: self.max_steps]):
                if not isinstance(step, dict):
                    raise ValueError(f"steps[{i}] must be an object with text and images")
                text = _text(step.get("text"), f"steps[{i}].text")
                if _URL.search(text):
                    raise ValueError(f"steps[{i}].text still holds a link or HTML: {_URL.search(text).group(0)!r}")
                images = step.get("images", [])
                if not isinstance(images, list) or not all(isinstance(k, str) for k in images):
                    raise ValueError(f"steps[{i}].images must be a list of image keys")
                for key in images:
                    if key not in keys:
                        raise ValueError(f"steps[{i}] names image {key!r}, which the page does not have "
                                         f"(images: {', '.join(keys) or 'none'})")
                    if key in used:
                        raise ValueError(f"image {key!r} is attached to more than one step")
                    used.add(key)
                steps.append({"text": text, "images": list(images)})
            return {"title": title, "steps": steps}

        return check


@dataclass(frozen=True)
class Dialog:
    name: ClassVar[str] = "dialog"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "howto-dialog"

    enabled: bool = False
    max_tokens: int = 300

    def request(self, title: str, steps: list[dict[str, Any]], seed: int) -> ChatRequest:
        listing = "\n".join(f"{k}. {s['text']}" for k, s in enumerate(steps, start=1))
        prompt = (f"These steps answer a how-to question ({title!r}):\n{listing}\n\nWrite the question a user "
                  "would ask to get them, in the user's own words, and the assistant's one-sentence opening "
                  'before the steps. Answer with one JSON object: {"question": "...", "opening": "..."}')
        return ChatRequest([Message.user(prompt)], json_mode=True, max_tokens=self.max_tokens, seed=seed,
                           task=self.task, prompt_version=self.version, hints={"title": title})

    @staticmethod
    def check(obj: Any) -> dict[str, str]:
        if not isinstance(obj, dict):
            raise ValueError('the answer must be a JSON object with "question" and "opening"')
        return {"question": _text(obj.get("question"), "'question'"), "opening": _text(obj.get("opening"), "'opening'")}


# ------------------------------------------------------------ offline stand-ins
def category_of(rgb: np.ndarray) -> str:
    """photo / illustration / document from pixel statistics: mostly white with dark strokes is
    a document page; few distinct colours is a drawing; anything else a photo."""
    small = rgb[:: max(1, rgb.shape[0] // 96), :: max(1, rgb.shape[1] // 96)].reshape(-1, 3)
    white = (small > 235).all(axis=1).mean()
    dark = (small < 60).all(axis=1).mean()
    if white > 0.6 and 0.01 < dark < 0.3:
        return "document"
    distinct = len(np.unique(small // 16, axis=0))
    return "illustration" if distinct < 24 else "photo"


@offline_responder(WebImageCaption.task)
def _offline_web_caption(request: ChatRequest, rng: random.Random) -> str:
    image = _as_array(request.images()[0])
    alt = request.hints.get("alt", "").strip()
    category = category_of(image)
    subject = alt if alt else f"a picture in mostly {colour_name(image)} tones"
    caption = f"{subject[0].upper()}{subject[1:]}" + ("" if subject.endswith(".") else ".")
    return json.dumps({"caption": caption, "category": category, "relevant": True})


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


@offline_responder(Rewrite.task)
def _offline_rewrite(request: ChatRequest, rng: random.Random) -> str:
    """Steps cut at headings; sentences with links or boilerplate dropped; each image attached to
    the step it stands in (after its text)."""
    steps: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    pending: list[str] = []  # images before any text: the first step takes them
    title = request.hints.get("title", "").strip()
    for item in request.hints.get("items", []):
        if item["kind"] == "heading":
            head = item["text"].rstrip(":.")
            current = {"head": "" if head.lower() == title.lower() else head, "text": [], "images": []}
            steps.append(current)
        elif item["kind"] == "text":
            kept = [s for s in _sentences(item["text"]) if not _URL.search(s) and not BOILERPLATE.search(s)]
            if not kept:
                continue
            if current is None:
                current = {"head": "", "text": [], "images": []}
                steps.append(current)
            current["text"] += kept
        else:
            (current["images"] if current is not None else pending).append(item["key"])
    out = []
    for step in steps:
        head = re.sub(r"^(step\s*\d+\s*[:.-]\s*)", "", step["head"], flags=re.IGNORECASE)
        text = " ".join(step["text"])
        if head and text:
            text = f"{head}: {text}"
        if text:
            out.append({"text": text, "images": pending + step["images"]})
            pending = []
        else:  # a heading with no text under it: its images go to the step before, or the next
            (out[-1]["images"] if out else pending).extend(step["images"])
    if pending and out:
        out[-1]["images"] += pending
    title = title or (out[0]["text"].split(":")[0] if out else "How-to")
    return json.dumps({"title": title, "steps": out})


@offline_responder(Dialog.task)
def _offline_dialog(request: ChatRequest, rng: random.Random) -> str:
    title = request.hints.get("title", "").strip().rstrip(".?!")
    topic = re.sub(r"^how\s+to\s+", "", title, flags=re.IGNORECASE) or "do this"
    topic = topic[0].lower() + topic[1:] if topic else topic
    question = rng.choice([f"How do I {topic}?", f"Can you show me how to {topic}?", f"What are the steps to {topic}?"])
    return json.dumps({"question": question, "opening": f"Here is how to {topic}, step by step."})
