"""VLM steps of the video engines, each a prompt + a strict answer check + an offline stand-in.

- `StoryCaptions` (ILLUME-X §4.1 frame captioning): one call over a window's frames returns
  three levels: a global description (the narrative and causes), one description per frame
  (static attributes) and one per consecutive pair (what changed between them).
- `ChangeCheck` (Inset §3.2 dynamic state filtering): does the pair show a real change of
  action, pose or shape, rather than the same moment twice?
- `Correspondence` (Inset §3.2): the same entities in both frames, each with a box per frame,
  asked of the VLM with both frames at once instead of tracking across the gap.
- `Instruction` (Inset §3.2 cross-frame instruction synthesis): a description of the target
  frame in which each entity is named by a phrase; slots are woven in at those phrases.

Boxes are [x0, y0, x1, y1] on a 0-1000 grid over the frame (the convention of Qwen-VL and
others), so they do not depend on the resolution sent. The offline answers are measurements of
the pixels put into words, deterministic, so tests exercise the real parsing path.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from tapestry.data.providers import ChatRequest, Message, offline_responder
from tapestry.data.weave import weave

BOX_GRID = 1000


# ----------------------------------------------------------------------- checks
def _text(obj: Any, where: str) -> str:
    if not isinstance(obj, str) or not obj.strip():
        raise ValueError(f"{where} must be a non-empty string")
    return obj.strip()


def _box(obj: Any, where: str) -> list[float]:
    if (not isinstance(obj, (list, tuple)) or len(obj) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj)):
        raise ValueError(f"{where} must be [x0, y0, x1, y1] with numbers on a 0-{BOX_GRID} grid")
    x0, y0, x1, y1 = (float(v) for v in obj)
    if not (0 <= x0 < x1 <= BOX_GRID and 0 <= y0 < y1 <= BOX_GRID):
        raise ValueError(f"{where} = {list(obj)} is not a box with 0 <= x0 < x1 <= {BOX_GRID} and "
                         f"0 <= y0 < y1 <= {BOX_GRID}")
    return [x0, y0, x1, y1]


# ------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class StoryCaptions:
    name: ClassVar[str] = "captions"
    version: ClassVar[str] = "1"  # the prompt version
    task: ClassVar[str] = "story-captions"

    max_tokens: int = 1200
    temperature: float = 0.0

    def request(self, frames: list[np.ndarray], times: list[float], seed: int) -> ChatRequest:
        n = len(frames)
        prompt = (
            f"These {n} frames come from one shot of a video, in order, at "
            + ", ".join(f"{t:.1f} s" for t in times) + ".\n"
            "Describe them at three levels and answer with one JSON object:\n"
            '{"global": "...", "frames": ["...", ...], "transitions": ["...", ...]}\n'
            "- global: the overall story of the sequence: what happens, why, and how the actions "
            "follow from each other (2-3 sentences).\n"
            f"- frames: exactly {n} descriptions, one per frame: the objects, their colours, number, "
            "shapes and where they are relative to each other and the background.\n"
            f"- transitions: exactly {n - 1} descriptions, one per consecutive pair: what changed "
            "from one frame to the next - posture, orientation, expression and amount of motion of "
            "the subjects; tools, targets or agents they interact with; light, shadows and layout.")
        content: list[Any] = []
        for k, frame in enumerate(frames, start=1):
            content += [f"Frame {k}:", frame]
        content.append(prompt)
        return ChatRequest([Message.user(*content)], json_mode=True, max_tokens=self.max_tokens,
                           temperature=self.temperature, seed=seed, task=self.task,
                           prompt_version=self.version, hints={"times": times})

    @staticmethod
    def check(n: int):
        def check(obj: Any) -> dict[str, Any]:
            if not isinstance(obj, dict):
                raise ValueError("the answer must be a JSON object with global, frames, transitions")
            frames = obj.get("frames")
            transitions = obj.get("transitions")
            if not isinstance(frames, list) or len(frames) != n:
                raise ValueError(f"'frames' must be a list of exactly {n} strings")
            if not isinstance(transitions, list) or len(transitions) != n - 1:
                raise ValueError(f"'transitions' must be a list of exactly {n - 1} strings")
            return {"global": _text(obj.get("global"), "'global'"),
                    "frames": [_text(f, f"frames[{i}]") for i, f in enumerate(frames)],
                    "transitions": [_text(t, f"transitions[{i}]") for i, t in enumerate(transitions)]}

        return check


@dataclass(frozen=True)
class KeepDiscard:
    """ILLUME-X §4.1: after the cheap filters (sharpness, quality, motion, redundancy) a VLM looks
    at a window's frames and decides whether to keep it, judging content integrity the filters
    cannot see: subjects cut off or hidden, overlays, watermarks or subtitles over the content,
    transition effects and blank frames, frames that do not belong together. Its decision and
    reason go into the Document (`meta.keep_discard`) or the rejection log."""

    name: ClassVar[str] = "keep-discard"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "keep-discard"

    enabled: bool = True
    max_tokens: int = 200

    def request(self, frames: list[np.ndarray], times: list[float], seed: int) -> ChatRequest:
        content: list[Any] = []
        for k, frame in enumerate(frames, start=1):
            content += [f"Frame {k} ({times[k - 1]:.1f} s):", frame]
        content.append(
            f"These {len(frames)} frames are a candidate training sample: a short visual story from one video "
            "shot. Keep it only if the content is intact: the main subjects are visible and whole, no text "
            "overlay, watermark, subtitle or logo covers much of it, no frame is blank, a fade or a transition "
            "effect, and the frames show one continuous scene. Answer with one JSON object: "
            '{"keep": true or false, "reason": "one short sentence"}')
        return ChatRequest([Message.user(*content)], json_mode=True, max_tokens=self.max_tokens, seed=seed,
                           task=self.task, prompt_version=self.version)

    @staticmethod
    def check(obj: Any) -> dict[str, Any]:
        if not isinstance(obj, dict) or not isinstance(obj.get("keep"), bool):
            raise ValueError('the answer must be a JSON object with a boolean "keep" and a "reason"')
        return {"keep": obj["keep"], "reason": _text(obj.get("reason"), "'reason'")}


@dataclass(frozen=True)
class ChangeCheck:
    name: ClassVar[str] = "change-check"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "verify-change"

    max_tokens: int = 200

    def request(self, source: np.ndarray, target: np.ndarray, seed: int) -> ChatRequest:
        prompt = (
            "Image A is an earlier frame and image B a later frame of the same video shot. Does a "
            "subject visibly change between them in action, pose, shape or state (not only the "
            "camera moving or the light flickering)? Answer with one JSON object: "
            '{"changed": true or false, "kind": "action" | "pose" | "shape" | "state" | "none", '
            '"reason": "one short sentence"}')
        return ChatRequest([Message.user("Image A:", source, "Image B:", target, prompt)], json_mode=True,
                           max_tokens=self.max_tokens, seed=seed, task=self.task, prompt_version=self.version)

    @staticmethod
    def check(obj: Any) -> dict[str, Any]:
        if not isinstance(obj, dict) or not isinstance(obj.get("changed"), bool):
            raise ValueError('the answer must be a JSON object with a boolean "changed"')
        return {"changed": obj["changed"], "kind": str(obj.get("kind", "")),
                "reason": str(obj.get("reason", ""))}


@dataclass(frozen=True)
class Correspondence:
    name: ClassVar[str] = "correspondence"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "correspondence"

    max_objects: int = 4
    max_tokens: int = 800

    def request(self, source: np.ndarray, target: np.ndarray, seed: int) -> ChatRequest:
        prompt = (
            "Image A is an earlier frame and image B a later frame of the same video shot. Find the "
            f"entities (people, animals, objects) that appear in BOTH images, at most {self.max_objects}, "
            "preferring those whose state changes the most. For each give a short noun phrase, its "
            f"box in A and its box in B as [x0, y0, x1, y1] on a 0-{BOX_GRID} grid over the image, and "
            "what changed. Answer with one JSON object: "
            '{"objects": [{"name": "the red car", "source_box": [x0, y0, x1, y1], '
            '"target_box": [x0, y0, x1, y1], "change": "..."}]}')
        return ChatRequest([Message.user("Image A:", source, "Image B:", target, prompt)], json_mode=True,
                           max_tokens=self.max_tokens, seed=seed, task=self.task, prompt_version=self.version)

    def check(self, obj: Any) -> list[dict[str, Any]]:
        if not isinstance(obj, dict) or not isinstance(obj.get("objects"), list):
            raise ValueError('the answer must be a JSON object with a list "objects"')
        out = []
        for i, item in enumerate(obj["objects"][: self.max_objects]):
            if not isinstance(item, dict):
                raise ValueError(f"objects[{i}] must be an object")
            out.append({"name": _text(item.get("name"), f"objects[{i}].name"),
                        "source_box": _box(item.get("source_box"), f"objects[{i}].source_box"),
                        "target_box": _box(item.get("target_box"), f"objects[{i}].target_box"),
                        "change": str(item.get("change", ""))})
        return out


@dataclass(frozen=True)
class Instruction:
    name: ClassVar[str] = "instruction"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "instruction"

    max_tokens: int = 400

    def request(self, target: np.ndarray, crops: dict[str, np.ndarray], objects: dict[str, dict[str, Any]],
                seed: int) -> ChatRequest:
        listing = "\n".join(f"- {key}: {obj['name']} (changed: {obj.get('change') or 'unknown'})"
                            for key, obj in objects.items())
        prompt = (
            "The last image is the target frame. The images before it are crops of entities taken "
            "from an EARLIER frame:\n" + listing + "\n"
            "Write one or two sentences that describe the target frame so that someone who sees only "
            "the crops could draw it: name every entity with a short noun phrase and say its new "
            "state, pose or position. Answer with one JSON object: "
            '{"text": "...", "phrases": {"' + '": "...", "'.join(objects) + '": "..."}} '
            "where each phrase appears word for word in the text.")
        content: list[Any] = []
        for key, crop in crops.items():
            content += [f"{key}:", crop]
        content += ["Target frame:", target, prompt]
        return ChatRequest([Message.user(*content)], json_mode=True, max_tokens=self.max_tokens, seed=seed,
                           task=self.task, prompt_version=self.version,
                           hints={"objects": {k: dict(v) for k, v in objects.items()}})

    @staticmethod
    def check(keys: list[str]):
        def check(obj: Any) -> dict[str, Any]:
            if not isinstance(obj, dict):
                raise ValueError('the answer must be a JSON object with "text" and "phrases"')
            text = _text(obj.get("text"), "'text'")
            phrases = obj.get("phrases")
            if not isinstance(phrases, dict) or sorted(phrases) != sorted(keys):
                raise ValueError(f"'phrases' must map exactly these keys to phrases: {', '.join(keys)}")
            phrases = {k: _text(phrases[k], f"phrases[{k!r}]") for k in keys}
            return {"text": text, "phrases": phrases, "woven": weave(text, phrases)}

        return check


# ------------------------------------------------------------ offline stand-ins
HUE_NAMES = ((10, "red"), (22, "orange"), (34, "yellow"), (78, "green"), (96, "cyan"), (130, "blue"),
             (150, "purple"), (170, "pink"), (181, "red"))


def colour_name(rgb: np.ndarray) -> str:
    """The dominant colour of an [.., 3] uint8 RGB array, in one plain word."""
    import cv2

    pixels = rgb.reshape(-1, 1, 3).astype(np.uint8)
    hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV).reshape(-1, 3).astype(np.float32)
    value, saturation = hsv[:, 2].mean(), hsv[:, 1].mean()
    if value < 50:
        return "black"
    if saturation < 40:
        return "white" if value > 200 else "grey"
    hist = np.bincount(hsv[:, 0].astype(int), weights=hsv[:, 1], minlength=181)
    hue = int(np.argmax(np.convolve(hist, np.ones(7), mode="same")))
    return next(name for limit, name in HUE_NAMES if hue < limit)


def _brightness_word(rgb: np.ndarray) -> str:
    mean = float(rgb.mean())
    return "a dark" if mean < 70 else "a bright" if mean > 170 else "an evenly lit"


def _as_array(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)


def _shift(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Global translation from a to b (phase correlation), in fractions of the frame size."""
    import cv2

    ga = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY).astype(np.float32)
    if ga.shape != gb.shape:
        gb = cv2.resize(gb, (ga.shape[1], ga.shape[0]))
    (dx, dy), _ = cv2.phaseCorrelate(ga, gb)
    return dx / ga.shape[1], dy / ga.shape[0]


def changed_regions(a: np.ndarray, b: np.ndarray, max_regions: int = 3, min_area: float = 0.005) -> list[list[float]]:
    """Boxes (0-1000 grid) around the largest regions that differ between two frames."""
    import cv2

    small = (160, max(1, round(160 * a.shape[0] / a.shape[1])))
    ga = cv2.GaussianBlur(cv2.resize(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), small), (5, 5), 0)
    gb = cv2.GaussianBlur(cv2.resize(cv2.cvtColor(b, cv2.COLOR_RGB2GRAY), small), (5, 5), 0)
    mask = (cv2.absdiff(ga, gb) > 25).astype(np.uint8)
    mask = cv2.dilate(mask, np.ones((5, 5), np.uint8))
    count, _, boxes, _ = cv2.connectedComponentsWithStats(mask)
    h, w = mask.shape
    regions = []
    for x, y, bw, bh, area in boxes[1:count]:
        if area >= min_area * h * w:
            regions.append((int(area), [x / w * BOX_GRID, y / h * BOX_GRID,
                                        (x + bw) / w * BOX_GRID, (y + bh) / h * BOX_GRID]))
    regions.sort(key=lambda r: -r[0])
    return [[round(v, 1) for v in box] for _, box in regions[:max_regions]]


def crop_box(image: np.ndarray, box: list[float], pad: float = 0.0) -> np.ndarray:
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    px, py = (x1 - x0) * pad, (y1 - y0) * pad
    left = int(np.clip((x0 - px) / BOX_GRID * w, 0, w - 1))
    top = int(np.clip((y0 - py) / BOX_GRID * h, 0, h - 1))
    right = int(np.clip(np.ceil((x1 + px) / BOX_GRID * w), left + 1, w))
    bottom = int(np.clip(np.ceil((y1 + py) / BOX_GRID * h), top + 1, h))
    return image[top:bottom, left:right]


def _where(box: list[float]) -> str:
    cx, cy = (box[0] + box[2]) / 2 / BOX_GRID, (box[1] + box[3]) / 2 / BOX_GRID
    horizontal = "left" if cx < 0.38 else "right" if cx > 0.62 else "centre"
    vertical = "top" if cy < 0.38 else "bottom" if cy > 0.62 else "middle"
    return "centre" if (horizontal, vertical) == ("centre", "middle") else f"{vertical} {horizontal}"


def _direction(dx: float, dy: float) -> str:
    if max(abs(dx), abs(dy)) < 0.01:
        return "the view holds still"
    if abs(dx) >= abs(dy):
        return "the view shifts " + ("right" if dx < 0 else "left")
    return "the view shifts " + ("down" if dy < 0 else "up")


@offline_responder(StoryCaptions.task)
def _offline_story(request: ChatRequest, rng: random.Random) -> str:
    frames = [_as_array(im) for im in request.images()]
    times = request.hints.get("times") or list(range(len(frames)))
    described = []
    for k, frame in enumerate(frames, start=1):
        described.append(f"Frame {k} at {times[k - 1]:.1f} s: {_brightness_word(frame)} scene in mostly "
                         f"{colour_name(frame)} tones.")
    transitions = []
    for a, b in zip(frames, frames[1:]):
        regions = changed_regions(a, b)
        moved = (f"something changes near the {_where(regions[0])}" if regions else "nothing visible changes")
        delta = float(b.mean()) - float(a.mean())
        light = "it gets brighter" if delta > 8 else "it gets darker" if delta < -8 else "the light stays the same"
        transitions.append(f"{_direction(*_shift(a, b)).capitalize()}, {moved} and {light}.")
    opening = rng.choice(["A short sequence", "A single shot", "A continuous scene"])
    first_change = transitions[0][0].lower() + transitions[0][1:-1] if transitions else "nothing happens"
    story = (f"{opening} of {len(frames)} frames over {times[-1] - times[0]:.1f} seconds, mostly "
             f"{colour_name(frames[0])}; {first_change}.")
    return json.dumps({"global": story, "frames": described, "transitions": transitions})


@offline_responder(KeepDiscard.task)
def _offline_keep_discard(request: ChatRequest, rng: random.Random) -> str:
    """Discards windows with a nearly uniform frame (blank, a fade) or one mostly behind black
    bars; keeps the rest. Measurements, not judgement: a real VLM sees overlays and cut-off subjects."""
    problems, contrasts = [], []
    for k, frame in enumerate((_as_array(im) for im in request.images()), start=1):
        grey = frame.astype(np.float32).mean(axis=2)
        contrast = float(grey.std())
        contrasts.append(contrast)
        dark_rows = float((grey.mean(axis=1) < 16).mean())
        if contrast < 8:
            problems.append(f"frame {k} is nearly uniform (grey std {contrast:.1f})")
        elif dark_rows > 0.3:
            problems.append(f"frame {k} is {dark_rows:.0%} black bars")
    if problems:
        return json.dumps({"keep": False, "reason": "; ".join(problems).capitalize() + "."})
    return json.dumps({"keep": True, "reason": f"All {len(contrasts)} frames show content (grey std "
                                               f"{min(contrasts):.0f} to {max(contrasts):.0f}), no blank frame."})


@offline_responder(ChangeCheck.task)
def _offline_change(request: ChatRequest, rng: random.Random) -> str:
    a, b = (_as_array(im) for im in request.images()[:2])
    regions = changed_regions(a, b)
    changed = bool(regions)
    return json.dumps({"changed": changed, "kind": "state" if changed else "none",
                       "reason": f"{len(regions)} region(s) differ" if changed else "the frames match"})


@offline_responder(Correspondence.task)
def _offline_correspondence(request: ChatRequest, rng: random.Random) -> str:
    a, b = (_as_array(im) for im in request.images()[:2])
    objects = []
    used: dict[str, int] = {}
    ordinals = ("", "other ", "third ", "fourth ")
    for box in changed_regions(a, b):
        colour = colour_name(crop_box(a, box))
        used[colour] = used.get(colour, 0) + 1
        name = f"the {ordinals[min(used[colour], 4) - 1]}{colour} object"
        objects.append({"name": name, "source_box": box, "target_box": box,
                        "change": f"moves within the {_where(box)} of the frame"})
    return json.dumps({"objects": objects})


@offline_responder(Instruction.task)
def _offline_instruction(request: ChatRequest, rng: random.Random) -> str:
    objects = request.hints.get("objects", {})
    clauses, phrases = [], {}
    for key, obj in objects.items():
        phrase = obj["name"]
        phrases[key] = phrase
        clauses.append(f"{phrase} is now at the {_where(obj['target_box'])} of the frame")
    opener = rng.choice(["In the later frame", "A moment later", "Afterwards"])
    text = f"{opener}, " + "; ".join(clauses) + "."
    return json.dumps({"text": text, "phrases": phrases})
