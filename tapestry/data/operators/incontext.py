"""Steps of the synthetic in-context engine (ILLUME-X §4.2 multi-step in-context generation,
§4.3 multi-round self-reflection): a planner, a difference writer, a judge (model calls with
offline stand-ins) and the image generators.

- `Planner` (LLM): a global description and, per image, the text around it and a prompt for the
  image; on ToyWorld each step also carries its exact scene spec. Offline, the plan is a
  ToyWorld story drawn from the plan's seed (the world spec is the planner).
- `Differences` (VLM): what must change from image j to image j+1, written from image j and the
  two prompts before image j+1 is drawn; it guides the generator (offline: the difference of
  the two scene specs, or of the prompts' words).
- `Judge` (VLM): does the image follow its prompt? A verdict, a score and a critique the
  generator gets back on a retry. Offline it is the exact ToyWorld judge on the step's scene.
- `Generator`: draws one image from the prompt with the earlier images in context.
  `toyworld-renderer` renders the step's scene spec exactly (a stand-in for a model, clearly
  named; `flaw_rate` makes a share of first attempts wrong on purpose so the critique-and-retry
  rounds run); `checkpoint` is any tapestry checkpoint (`Pipeline.from_pretrained`, "default"
  the embedded one) given the previous images as context images; `images-api` is an external
  OpenAI-compatible images endpoint (text in, so the context travels as the difference);
  `images-edit` its edits endpoint with every earlier image attached; `placeholder` a labelled
  stand-in card for prompts that are not ToyWorld scenes. On a retry the judge's critique is
  prepended to the prompt (`attempt_prompt`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from tapestry.data.operators.objects import content_words
from tapestry.data.operators.vlm import _as_array, _text
from tapestry.data.providers import ChatRequest, Message, offline_responder


@dataclass(frozen=True)
class Planner:
    name: ClassVar[str] = "plan"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "incontext-plan"

    min_images: int = 2
    max_images: int = 6
    theme: str = "toyworld"  # what the plans are about; "toyworld" plans carry exact scene specs
    max_tokens: int = 2000

    def request(self, index: int, seed: int) -> ChatRequest:
        prompt = (
            f"Plan an illustrated sequence of {self.min_images} to {self.max_images} images about {self.theme!r} "
            "(plan number " + str(index) + "): a global description of the whole sequence, then for each image "
            "the sentence that goes before it and a complete prompt that describes the image alone (every "
            "object, its colour, pattern, size and position, and the background). Consecutive images should "
            "show the same objects changing step by step. Answer with one JSON object: "
            '{"global": "...", "steps": [{"text": "...", "prompt": "..."}]}')
        return ChatRequest([Message.system("You plan illustrated stories."), Message.user(prompt)], json_mode=True,
                           max_tokens=self.max_tokens, seed=seed, task=self.task, prompt_version=self.version,
                           hints={"plan_seed": seed * 1_000_003 + index, "theme": self.theme,
                                  "max_images": self.max_images})

    def check(self, obj: Any) -> dict[str, Any]:
        from tapestry.toyworld.spec import Scene, SpecError

        if not isinstance(obj, dict) or not isinstance(obj.get("steps"), list):
            raise ValueError('the answer must be a JSON object with "global" and a list "steps"')
        steps = obj["steps"]
        if not self.min_images <= len(steps) <= self.max_images:
            raise ValueError(f"'steps' must hold {self.min_images} to {self.max_images} images, got {len(steps)}")
        out = []
        for i, step in enumerate(steps):
            if not isinstance(step, dict):
                raise ValueError(f"steps[{i}] must be an object with text and prompt")
            item = {"text": _text(step.get("text"), f"steps[{i}].text"),
                    "prompt": _text(step.get("prompt"), f"steps[{i}].prompt")}
            if step.get("scene") is not None:
                try:
                    item["scene"] = Scene.from_dict(step["scene"], f"steps[{i}].scene").to_dict()
                except SpecError as e:
                    raise ValueError(str(e)) from None
            out.append(item)
        return {"global": _text(obj.get("global"), "'global'"), "steps": out}


@dataclass(frozen=True)
class Differences:
    name: ClassVar[str] = "differences"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "incontext-difference"

    max_tokens: int = 300

    def request(self, image: np.ndarray, before: dict[str, Any], after: dict[str, Any], seed: int) -> ChatRequest:
        prompt = (f"The image shows: {before['prompt']}\nThe next image must show: {after['prompt']}\n"
                  "Describe only what has to change from this image to the next (objects that move, appear, "
                  'disappear or change colour, pattern or size), in one or two sentences. Answer with one JSON '
                  'object: {"difference": "..."}')
        hints = {"before": before.get("scene"), "after": after.get("scene"),
                 "prompts": [before["prompt"], after["prompt"]]}
        return ChatRequest([Message.user(image, prompt)], json_mode=True, max_tokens=self.max_tokens, seed=seed,
                           task=self.task, prompt_version=self.version, hints=hints)

    @staticmethod
    def check(obj: Any) -> str:
        if not isinstance(obj, dict):
            raise ValueError('the answer must be a JSON object {"difference": "..."}')
        return _text(obj.get("difference"), "'difference'")


@dataclass(frozen=True)
class Judge:
    """Self-reflection: up to `rounds` retries of an image the judge rejects."""

    name: ClassVar[str] = "judge"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "incontext-judge"

    rounds: int = 2  # retries after a rejected image (0: no judging at all)
    # The offline (ToyWorld) judge accepts at this score: clean renders score 1.0, one entity
    # grown, shrunk, moved or recoloured 0.98 or less.
    min_score: float = 0.99
    max_tokens: int = 300

    def request(self, image: np.ndarray, step: dict[str, Any], seed: int) -> ChatRequest:
        prompt = (f"The image was drawn for this prompt: {step['prompt']}\nDoes it follow the prompt exactly (every "
                  "object with its colour, pattern, size and position, the background, nothing extra)? Answer with "
                  'one JSON object: {"ok": true or false, "score": 0..1, "critique": "what is wrong and how to fix '
                  'it, empty when ok"}')
        return ChatRequest([Message.user(image, prompt)], json_mode=True, max_tokens=self.max_tokens, seed=seed,
                           task=self.task, prompt_version=self.version,
                           hints={"scene": step.get("scene"), "min_score": self.min_score})

    @staticmethod
    def check(obj: Any) -> dict[str, Any]:
        if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
            raise ValueError('the answer must be a JSON object with a boolean "ok"')
        score = obj.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                                  or not 0 <= score <= 1):
            raise ValueError("'score' must be a number from 0 to 1 (or null)")
        critique = obj.get("critique") or ""
        if not isinstance(critique, str):
            raise ValueError("'critique' must be a string")
        if not obj["ok"] and not critique.strip():
            raise ValueError("a rejected image needs a critique saying what to fix")
        return {"ok": obj["ok"], "score": None if score is None else float(score), "critique": critique.strip()}


# ------------------------------------------------------------------ generators
def attempt_prompt(prompt: str, difference: str = "", feedback: str = "") -> str:
    """The text a generator draws from. Self-reflection feedback on the previous attempt is
    prepended to the prompt (ILLUME-X §4.3: "this feedback is then prepended to the original
    user prompt"); the difference from the previous image follows it."""
    text = prompt
    if difference:
        text += f"\nChanges from the previous picture: {difference}"
    if feedback:
        text = f"Feedback on the previous attempt: {feedback}\n{text}"
    return text


GENERATOR_KINDS = ("toyworld-renderer", "checkpoint", "images-api", "images-edit", "placeholder")


@dataclass(frozen=True)
class Generator:
    name: ClassVar[str] = "generator"
    version: ClassVar[str] = "2"

    kind: str = "toyworld-renderer"  # or "checkpoint", "images-api", "images-edit", "placeholder"
    checkpoint: str = "default"  # kind "checkpoint": a folder or a name `Pipeline.from_pretrained` knows
    context_images: int = 2  # kind "checkpoint": how many earlier images go in (0: all of them)
    # kinds "images-api" / "images-edit": an OpenAI-compatible images endpoint. images-api posts
    # {base_url}/images/generations (text only); images-edit posts {base_url}/images/edits with
    # every earlier image of the story attached (multipart), generations for the first image.
    # The answer is data[0].b64_json; the key is read from TAPESTRY_IMAGES_API_KEY, never stored.
    api_base_url: str = ""
    api_model: str = ""
    api_timeout_s: float = 120.0
    api_size: str = "1024x1024"
    side: int = 64
    flaw_rate: float = 0.0  # toyworld-renderer: share of first attempts drawn with one mistake on purpose
    steps: int | None = None  # kind "checkpoint": sampling steps (None: the checkpoint's default)

    def __post_init__(self) -> None:
        if self.kind not in GENERATOR_KINDS:
            raise ValueError(f"generator.kind must be one of {', '.join(GENERATOR_KINDS)}, got {self.kind!r}")
        if self.kind in ("images-api", "images-edit") and not (self.api_base_url and self.api_model):
            raise ValueError(f"generator.kind={self.kind} needs generator.api_base_url and generator.api_model")
        if not 0 <= self.flaw_rate <= 1:
            raise ValueError("generator.flaw_rate must be between 0 and 1")

    def build(self) -> Any:
        if self.kind == "toyworld-renderer":
            return ToyWorldRenderer(self.side, self.flaw_rate)
        if self.kind == "placeholder":
            return PlaceholderGenerator(self.side)
        if self.kind in ("images-api", "images-edit"):
            return ImagesApiGenerator(self.api_base_url, self.api_model, self.side, self.api_timeout_s,
                                      edit=self.kind == "images-edit", size=self.api_size)
        return CheckpointGenerator(self.checkpoint, self.side, self.steps, self.context_images)


class ToyWorldRenderer:
    """Not a model: renders the step's exact scene (the oracle a trained generator should match)."""

    def __init__(self, side: int, flaw_rate: float):
        self.side, self.flaw_rate = side, flaw_rate
        self.model = "toyworld-renderer"

    def draw(self, step: dict[str, Any], context: list[np.ndarray], difference: str, feedback: str, attempt: int,
             seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        from tapestry.toyworld.render import render_scene_array
        from tapestry.toyworld.spec import Scene
        from tapestry.toyworld.tasks import random_change

        if step.get("scene") is None:
            raise ValueError("the toyworld-renderer generator needs plans with scene specs (planner theme 'toyworld')")
        scene = Scene.from_dict(step["scene"])
        rng = np.random.default_rng(seed)
        flaw = None
        if attempt == 0 and rng.random() < self.flaw_rate:
            change = random_change(rng, scene, ("move", "recolour", "grow", "shrink"))
            scene, flaw = change.after, f"{change.kind} {change.name}"
        return render_scene_array(scene, self.side), ({"flaw": flaw} if flaw else {})


class PlaceholderGenerator:
    """Not a model: a deterministic card for any prompt (a colour from the prompt's words, the
    step's first words written on it, a band per earlier image) so that pipelines whose prompts
    are not ToyWorld scenes run end to end offline. Its pictures show nothing of the prompt."""

    def __init__(self, side: int):
        self.side = side
        self.model = "placeholder"

    def draw(self, step: dict[str, Any], context: list[np.ndarray], difference: str, feedback: str, attempt: int,
             seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        import hashlib

        from PIL import Image, ImageDraw

        digest = hashlib.sha256(f"{step['prompt']}|{seed}".encode()).digest()
        image = Image.new("RGB", (self.side, self.side), tuple(64 + b % 160 for b in digest[:3]))
        draw = ImageDraw.Draw(image)
        for k in range(len(context)):
            y = self.side - 4 * (k + 1)
            draw.rectangle([0, y, self.side, y + 2], fill=tuple(255 - b % 128 for b in digest[3 + k:6 + k]))
        words = step["prompt"].split()
        for line in range(3):
            draw.text((3, 3 + 11 * line), " ".join(words[2 * line:2 * line + 2])[:12], fill=(255, 255, 255))
        return np.asarray(image), {"placeholder": True}


class CheckpointGenerator:
    """A tapestry checkpoint through `tapestry.infer.Pipeline`: the earlier images (the last
    `context_images`, or all) as context images, then the attempt's prompt, one target image."""

    def __init__(self, checkpoint: str, side: int, steps: int | None, context_images: int = 2):
        from tapestry.infer.pipeline import Pipeline

        self.pipeline = Pipeline.from_pretrained(checkpoint)
        self.side, self.steps, self.context_images = side, steps, context_images
        self.model = f"checkpoint:{self.pipeline.checkpoint_hash}"

    def draw(self, step: dict[str, Any], context: list[np.ndarray], difference: str, feedback: str, attempt: int,
             seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        from PIL import Image

        from tapestry.document import Document, ImageSegment, TextSegment

        shown = context[-self.context_images:] if self.context_images > 0 else context
        segments: list[Any] = [ImageSegment("context", name=f"previous{k + 1}", image=Image.fromarray(img))
                               for k, img in enumerate(shown)]
        segments.append(TextSegment(attempt_prompt(step["prompt"], difference, feedback)))
        segments.append(ImageSegment("target", width=self.side, height=self.side))
        options: dict[str, Any] = {"seed": seed}
        if self.steps is not None:
            options["steps"] = self.steps
        made = self.pipeline.generate(Document("incontext", segments), **options)
        target = [s for s in made.images() if s.role == "target"]
        if not target or target[-1].image is None:
            raise ValueError("the checkpoint made no image")
        image = np.asarray(target[-1].image.convert("RGB").resize((self.side, self.side)))
        return image, {"checkpoint": self.pipeline.checkpoint, "checkpoint_hash": self.pipeline.checkpoint_hash}


def multipart_body(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """multipart/form-data for `fields` and (field name, file name, PNG bytes) files -> (body,
    Content-Type header). The boundary is derived from the content, so it never occurs in it."""
    import hashlib

    digest = hashlib.sha256()
    for value in [*fields.values(), *(data for _, _, data in files)]:
        digest.update(value.encode() if isinstance(value, str) else value)
    boundary = f"tapestry-{digest.hexdigest()[:32]}"
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class ImagesApiGenerator:
    """An external image API speaking OpenAI's images endpoints. `edit=False`: images/generations,
    text only, so the earlier images reach it as words (the difference from the previous one).
    `edit=True`: images/edits with every earlier image of the story attached as `image[]`, so
    the model sees them (the first image of a story, with nothing to edit, goes to generations)."""

    def __init__(self, base_url: str, model: str, side: int, timeout_s: float, edit: bool = False,
                 size: str = "1024x1024"):
        self.base_url, self.side, self.timeout_s = base_url.rstrip("/"), side, timeout_s
        self.model, self.edit, self.size = model, edit, size

    def draw(self, step: dict[str, Any], context: list[np.ndarray], difference: str, feedback: str, attempt: int,
             seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        import base64
        import io
        import os
        import urllib.error
        import urllib.request

        from PIL import Image

        from tapestry.data.providers.base import png_bytes

        prompt = attempt_prompt(step["prompt"], difference, feedback)
        headers: dict[str, str] = {}
        key = os.environ.get("TAPESTRY_IMAGES_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if self.edit and context:
            endpoint = f"{self.base_url}/images/edits"
            body, headers["Content-Type"] = multipart_body(
                {"model": self.model, "prompt": prompt, "n": "1", "size": self.size, "response_format": "b64_json"},
                [("image[]", f"previous{k + 1}.png", png_bytes(img)) for k, img in enumerate(context)])
        else:
            endpoint = f"{self.base_url}/images/generations"
            headers["Content-Type"] = "application/json"
            body = json.dumps({"model": self.model, "prompt": prompt, "n": 1, "size": self.size,
                               "response_format": "b64_json"}).encode()
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                answer = json.loads(response.read())
            data = base64.b64decode(answer["data"][0]["b64_json"])
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except urllib.error.HTTPError as e:
            raise OSError(f"{endpoint} answered {e.code}") from None
        except (urllib.error.URLError, TimeoutError) as e:
            raise OSError(f"cannot reach {self.base_url}: {getattr(e, 'reason', e)}") from None
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"the images API answered without a usable image: {e}") from None
        info: dict[str, Any] = {"images_api": self.model}
        if self.edit:
            info["edited_from"] = len(context)
        return np.asarray(image.resize((self.side, self.side))), info


# ------------------------------------------------------------ offline stand-ins
@offline_responder(Planner.task)
def _offline_plan(request: ChatRequest, rng: random.Random) -> str:
    """A ToyWorld story from the plan's seed: the world spec is the planner."""
    from tapestry.toyworld.tasks import describe_scene, plan_story

    seed = int(request.hints.get("plan_seed", 0)) % (2 ** 63)
    story = plan_story(np.random.default_rng(seed))
    words = np.random.default_rng(seed + 1)
    steps = []
    for k, scene in enumerate(story.scenes):
        text = story.intro if k == 0 else story.steps[k - 1]
        steps.append({"text": text, "prompt": describe_scene(words, scene), "scene": scene.to_dict()})
    from tapestry.toyworld.phrases import article

    cast = [f"{article(e.entity.describe())} {e.entity.describe()}" for e in story.scenes[0].entities]
    listing = cast[0] if len(cast) == 1 else ", ".join(cast[:-1]) + " and " + cast[-1]
    shown = min(len(story.scenes), int(request.hints.get("max_images", 6)))
    return json.dumps({"global": f"A story in {shown} pictures about {listing}: one change per "
                                 "picture, the same objects throughout.",
                       "steps": steps[: int(request.hints.get("max_images", 6))]})


def describe_difference(before: Any, after: Any) -> str:
    """What changed between two ToyWorld scenes, entity by entity (matched by key)."""
    from tapestry.toyworld.spec import CELL_NAMES

    def name(e: Any) -> str:
        return f"the {e.entity.describe()}"

    old = {e.key or str(i): e for i, e in enumerate(before.entities)}
    new = {e.key or str(i): e for i, e in enumerate(after.entities)}
    clauses = []
    for key, e in old.items():
        if key not in new:
            clauses.append(f"{name(e)} disappears")
            continue
        n = new[key]
        if n.entity.colour != e.entity.colour:
            clauses.append(f"{name(e)} turns {n.entity.colour}")
        if n.cell != e.cell:
            clauses.append(f"{name(e)} moves to the {CELL_NAMES[n.cell]}")
        if n.size != e.size:
            clauses.append(f"{name(e)} becomes {n.size}")
    clauses += [f"{name(n)} appears at the {CELL_NAMES[n.cell]}" for key, n in new.items() if key not in old]
    if before.background != after.background:
        clauses.append("the background changes")
    if not clauses:
        return "Nothing changes."
    text = "; ".join(clauses)
    return text[0].upper() + text[1:] + "."


@offline_responder(Differences.task)
def _offline_difference(request: ChatRequest, rng: random.Random) -> str:
    from tapestry.toyworld.spec import Scene

    before, after = request.hints.get("before"), request.hints.get("after")
    if before is not None and after is not None:
        text = describe_difference(Scene.from_dict(before), Scene.from_dict(after))
    else:
        a, b = (content_words(p) for p in request.hints.get("prompts", ["", ""]))
        added, gone = sorted(b - a)[:6], sorted(a - b)[:6]
        text = (f"Add or change: {', '.join(added) or 'nothing'}; no longer: {', '.join(gone) or 'nothing'}.")
    return json.dumps({"difference": text})


FLAW_WORDS = {"present": "missing", "cell": "in the wrong place", "colour": "wrong colour",
              "shape": "wrong shape", "pattern": "wrong pattern", "size": "wrong size"}


@offline_responder(Judge.task)
def _offline_judge(request: ChatRequest, rng: random.Random) -> str:
    """The exact ToyWorld judge on the step's scene; the critique names each entity it scored low."""
    from tapestry.toyworld.judge import judge_image

    scene = request.hints.get("scene")
    if scene is None:
        return json.dumps({"ok": True, "score": None, "critique": "not judged: the offline judge needs a ToyWorld scene"})
    result = judge_image(scene, _as_array(request.images()[0]))
    score = float(result["total"])
    ok = score >= float(request.hints.get("min_score", 0.99))
    from tapestry.toyworld.spec import CELL_NAMES, PlacedEntity

    problems = []
    for entity in result["per_entity"]:
        scores = entity["scores"]
        if (scores.get("total") or 0.0) < 0.99:
            placed = PlacedEntity.from_dict(entity["expected"])
            weak = [FLAW_WORDS.get(k, f"wrong {k}") for k, v in scores.items()
                    if k != "total" and v is not None and v < 0.95]
            problems.append(f"the {placed.size} {placed.entity.describe()} belongs at the {CELL_NAMES[placed.cell]} "
                            f"({', '.join(weak) or 'drawn badly'})")
    if result["n_extra"]:
        problems.append(f"{result['n_extra']} object(s) that the prompt does not ask for")
    if not ok and not problems:
        problems.append("the picture does not match the prompt")
    critique = "" if ok else "Fix: " + "; ".join(problems) + ". Draw exactly what the prompt says."
    return json.dumps({"ok": ok, "score": round(score, 4), "critique": critique})
