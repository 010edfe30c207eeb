"""Model steps of the image engine (Inset §3.2, synthesizing from images), each a prompt + a
strict answer check + an offline stand-in, and the local mask fallback.

- `GlobalCaption` (VLM): one narrative caption of the whole image.
- `Detect` (detector): salient objects, each a short label and a box.
- `Masks` (segmenter): a polygon per box; when the segmenter fails or its mask is implausible
  (almost empty, or the whole box), OpenCV GrabCut on the box makes the mask locally.
- `ObjectCaptions` (VLM): one detailed caption per object crop (the paper's DAM step).
- `InlineWeave` (LLM): rewrites the global caption so each object's phrase carries its image
  slot, `"A <img:cat/> tabby cat naps on ..."`, with a phrase -> image map; `InlineWeave.check`
  validates it (schema, every slot bound to an object and every object slotted once, each phrase
  right after its slot and naming its object, the global caption's content kept).

Boxes and polygons are on the 0-1000 grid of `vlm.BOX_GRID`. Offline answers are measurements of
the pixels (colour regions, colours, positions) put into words; a detector request may carry
ground-truth objects in its hints (ToyWorld scenes), which the offline detector returns as they are.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from tapestry.data.operators.vlm import (
    BOX_GRID,
    _as_array,
    _box,
    _brightness_word,
    _text,
    _where,
    colour_name,
    crop_box,
)
from tapestry.data.providers import ChatRequest, Message, offline_responder
from tapestry.data.weave import LEADING_WORDS, weave
from tapestry.markup import scan_slots

STOP_WORDS = frozenset(LEADING_WORDS) | {
    "and", "or", "of", "in", "on", "at", "to", "with", "by", "for", "from", "is", "are", "be", "it", "as",
    "into", "onto", "near", "beside", "some", "very", "picture", "image", "photo", "shows", "there", "while",
    "which", "who", "s", "one", "two", "sits", "stands", "lies"}


def content_words(text: str) -> set[str]:
    """Lower-case words that carry meaning (no articles, prepositions, slot markup)."""
    plain = re.sub(r"<img:[^>]*/>|\[img\d+\]", " ", text.lower())
    return {w for w in re.findall(r"[a-z0-9]+", plain) if w not in STOP_WORDS and len(w) > 1}


def box_pixels(box: list[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A 0-1000 grid box as pixel (left, top, right, bottom), never empty."""
    left = int(np.clip(box[0] / BOX_GRID * width, 0, width - 1))
    top = int(np.clip(box[1] / BOX_GRID * height, 0, height - 1))
    right = int(np.clip(np.ceil(box[2] / BOX_GRID * width), left + 1, width))
    bottom = int(np.clip(np.ceil(box[3] / BOX_GRID * height), top + 1, height))
    return left, top, right, bottom


# ----------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class GlobalCaption:
    name: ClassVar[str] = "global-caption"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "global-caption"

    max_tokens: int = 300

    def request(self, image: np.ndarray, seed: int) -> ChatRequest:
        prompt = ("Describe this image in one to three sentences as a short narrative: the main "
                  "subjects, what they look like, what they do and where they are relative to each other "
                  'and the background. Answer with one JSON object: {"caption": "..."}')
        return ChatRequest([Message.user(image, prompt)], json_mode=True, max_tokens=self.max_tokens, seed=seed,
                           task=self.task, prompt_version=self.version)

    @staticmethod
    def check(obj: Any) -> str:
        if not isinstance(obj, dict):
            raise ValueError('the answer must be a JSON object {"caption": "..."}')
        return _text(obj.get("caption"), "'caption'")


@dataclass(frozen=True)
class Detect:
    name: ClassVar[str] = "detect"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "detect-objects"

    max_objects: int = 8  # asked of the detector (the box filter keeps fewer)
    max_tokens: int = 800
    # "provider": the run's chat provider (a grounding VLM, or offline); "local:/dir": an
    # open-vocabulary detector checkpoint (OWLv2 layout) run here, batched
    model: str = "provider"
    # what a local detector looks for; empty: the content words of the global caption
    queries: tuple[str, ...] = ()
    max_queries: int = 16
    query_template: str = "a photo of a {}"
    min_score: float = 0.1  # local detector: lowest box score kept
    batch_size: int = 8
    local_fields: ClassVar[dict[str, str]] = {"model": "detector"}

    def __post_init__(self) -> None:
        if self.model != "provider" and not self.model.startswith("local:"):
            raise ValueError(f"detect.model must be 'provider' or 'local:/dir', got {self.model!r}")
        if isinstance(self.queries, str):
            object.__setattr__(self, "queries", tuple(q.strip() for q in self.queries.split(",") if q.strip()))
        else:
            object.__setattr__(self, "queries", tuple(self.queries))

    def local_queries(self, caption: str) -> list[str]:
        """What the local detector is asked to find: `queries`, or the caption's content words."""
        if self.queries:
            return list(self.queries)[: self.max_queries]
        words = [w for w in re.findall(r"[a-z]+", caption.lower()) if w in content_words(caption)]
        return list(dict.fromkeys(words))[: self.max_queries] or ["object"]

    def request(self, image: np.ndarray, seed: int, truth: list[dict[str, Any]] | None = None) -> ChatRequest:
        prompt = (f"Find the salient objects in this image, at most {self.max_objects}: people, animals and "
                  "things a caption would name. For each give a short label (a noun phrase) and its box as "
                  f"[x0, y0, x1, y1] on a 0-{BOX_GRID} grid over the image. Answer with one JSON object: "
                  '{"objects": [{"label": "tabby cat", "box": [x0, y0, x1, y1]}]}')
        hints = {"objects": truth} if truth else {}
        return ChatRequest([Message.user(image, prompt)], json_mode=True, max_tokens=self.max_tokens, seed=seed,
                           task=self.task, prompt_version=self.version, hints=hints)

    def check(self, obj: Any) -> list[dict[str, Any]]:
        if not isinstance(obj, dict) or not isinstance(obj.get("objects"), list):
            raise ValueError('the answer must be a JSON object with a list "objects"')
        out = []
        for i, item in enumerate(obj["objects"][: self.max_objects]):
            if not isinstance(item, dict):
                raise ValueError(f"objects[{i}] must be an object with label and box")
            out.append({"label": _text(item.get("label"), f"objects[{i}].label"),
                        "box": _box(item.get("box"), f"objects[{i}].box")})
        return out


@dataclass(frozen=True)
class Masks:
    """Instance masks: `source` "provider" asks the segmenter and falls back to GrabCut when
    its answer fails or is implausible; "grabcut" uses GrabCut only (no model call);
    "local:/dir" runs a promptable segmenter checkpoint (SAM layout) on all boxes of the image
    at once, with GrabCut for the masks it makes implausible."""

    name: ClassVar[str] = "masks"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "segment-object"

    source: str = "provider"
    min_fill: float = 0.05  # a mask must cover this share of its box ...
    max_fill: float = 0.985  # ... and not all of it (that is the box, not an object)
    grabcut_iterations: int = 3
    grabcut_max_side: int = 320  # GrabCut runs on the image shrunk to this (its cost grows with pixels)
    max_tokens: int = 1200
    batch_size: int = 8
    local_fields: ClassVar[dict[str, str]] = {"source": "segmenter"}

    def __post_init__(self) -> None:
        if self.source not in ("provider", "grabcut") and not self.source.startswith("local:"):
            raise ValueError(f"masks.source must be 'provider', 'grabcut' or 'local:/dir', got {self.source!r}")

    def request(self, image: np.ndarray, obj: dict[str, Any], seed: int) -> ChatRequest:
        prompt = (f"Segment the {obj['label']} inside the box {[round(v) for v in obj['box']]} (0-{BOX_GRID} grid "
                  "over the image). Answer with one JSON object holding its outline as a polygon on the same "
                  'grid: {"polygon": [[x, y], [x, y], ...]}')
        return ChatRequest([Message.user(image, prompt)], json_mode=True, max_tokens=self.max_tokens, seed=seed,
                           task=self.task, prompt_version=self.version, hints={"box": obj["box"]})

    @staticmethod
    def check(obj: Any) -> list[list[float]]:
        points = obj.get("polygon") if isinstance(obj, dict) else None
        if not isinstance(points, list) or len(points) < 3:
            raise ValueError('the answer must be {"polygon": [[x, y], ...]} with at least 3 points')
        out = []
        for i, p in enumerate(points):
            if (not isinstance(p, (list, tuple)) or len(p) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)):
                raise ValueError(f"polygon[{i}] must be [x, y] with numbers")
            out.append([float(np.clip(p[0], 0, BOX_GRID)), float(np.clip(p[1], 0, BOX_GRID))])
        return out

    def fill(self, mask: np.ndarray, box: list[float]) -> float:
        """The share of the box that `mask` ([H, W] bool) covers inside it."""
        left, top, right, bottom = box_pixels(box, mask.shape[1], mask.shape[0])
        return float(mask[top:bottom, left:right].mean())

    def plausible(self, mask: np.ndarray, box: list[float]) -> bool:
        return self.min_fill <= self.fill(mask, box) <= self.max_fill


def polygon_mask(points: list[list[float]], width: int, height: int) -> np.ndarray:
    """[H, W] bool mask of a polygon given on the 0-1000 grid."""
    import cv2

    pts = np.array([[x / BOX_GRID * width, y / BOX_GRID * height] for x, y in points], dtype=np.float32)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def grabcut_mask(image: np.ndarray, box: list[float], iterations: int = 3, max_side: int = 320) -> np.ndarray:
    """[H, W] bool foreground mask from OpenCV GrabCut initialised with the box (everything
    outside it is background). Runs on a copy shrunk to `max_side`, then scaled back."""
    import cv2

    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else image
    sh, sw = small.shape[:2]
    left, top, right, bottom = box_pixels(box, sw, sh)
    full = mask = np.zeros((sh, sw), np.uint8)
    if right - left >= 3 and bottom - top >= 3 and (right - left, bottom - top) != (sw, sh):
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)  # GrabCut's GMM initialisation is random: keep it reproducible
        try:
            cv2.grabCut(cv2.cvtColor(np.ascontiguousarray(small), cv2.COLOR_RGB2BGR), mask,
                        (left, top, right - left, bottom - top), bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
            full = np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
        except cv2.error:  # a box of one colour has no foreground model: no mask
            full = np.zeros((sh, sw), np.uint8)
    if scale < 1:
        full = cv2.resize(full, (w, h), interpolation=cv2.INTER_NEAREST)
    return full.astype(bool)


def cutout(image: np.ndarray, mask: np.ndarray, box: list[float], pad: float = 0.05,
           background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """The box (with a margin) cropped from `image`, pixels outside `mask` set to `background`."""
    kept = np.where(mask[..., None], image, np.array(background, np.uint8))
    return crop_box(kept, box, pad)


@dataclass(frozen=True)
class ObjectCaptions:
    name: ClassVar[str] = "object-captions"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "object-caption"

    max_tokens: int = 200

    def request(self, crop: np.ndarray, obj: dict[str, Any], seed: int) -> ChatRequest:
        prompt = (f"This is a cut-out of the {obj['label']} from a larger picture (it was at the "
                  f"{_where(obj['box'])}). Describe it in one sentence: its colours, material, shape, pose and "
                  'anything distinctive. Answer with one JSON object: {"caption": "..."}')
        return ChatRequest([Message.user(crop, prompt)], json_mode=True, max_tokens=self.max_tokens, seed=seed,
                           task=self.task, prompt_version=self.version,
                           hints={"label": obj["label"], "box": obj["box"]})

    @staticmethod
    def check(obj: Any) -> str:
        if not isinstance(obj, dict):
            raise ValueError('the answer must be a JSON object {"caption": "..."}')
        return _text(obj.get("caption"), "'caption'")


@dataclass(frozen=True)
class InlineWeave:
    name: ClassVar[str] = "weave"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "inline-weave"

    min_caption_overlap: float = 0.5  # share of the global caption's content words the result keeps
    max_tokens: int = 600

    def request(self, global_caption: str, objects: dict[str, dict[str, Any]], seed: int) -> ChatRequest:
        listing = "\n".join(f"- {key}: {obj['label']} at the {_where(obj['box'])}: {obj['caption']}"
                            for key, obj in objects.items())
        example_key = next(iter(objects))
        prompt = (
            "Global caption of a picture:\n" + global_caption + "\n\nObjects cut out of it (key: label, "
            "position: detailed caption):\n" + listing + "\n\n"
            "Rewrite the global caption as one natural caption that mentions every object with a short "
            "descriptive phrase (compress its detailed caption into a few words) and keeps the meaning of the "
            "global caption. Put the object's image slot <img:KEY/> right before its phrase, after any "
            f"article: \"a <img:{example_key}/> {objects[example_key]['label']} ...\". Use each slot exactly once "
            "and no other slots. Answer with one JSON object: "
            '{"caption": "...", "phrases": {"' + '": "...", "'.join(objects) + '": "..."}}')
        return ChatRequest([Message.system("You write image captions."), Message.user(prompt)], json_mode=True,
                           max_tokens=self.max_tokens, seed=seed, task=self.task, prompt_version=self.version,
                           hints={"global": global_caption, "objects": {k: dict(v) for k, v in objects.items()}})

    def check(self, objects: dict[str, dict[str, Any]], global_caption: str):
        keys = list(objects)

        def check(obj: Any) -> dict[str, Any]:
            if not isinstance(obj, dict):
                raise ValueError('the answer must be a JSON object with "caption" and "phrases"')
            caption = _text(obj.get("caption"), "'caption'")
            phrases = obj.get("phrases")
            if not isinstance(phrases, dict) or sorted(phrases) != sorted(keys):
                raise ValueError(f"'phrases' must map exactly these keys to phrases: {', '.join(keys)}")
            phrases = {k: _text(phrases[k], f"phrases[{k!r}]") for k in keys}
            slots, issues = scan_slots(caption)
            if issues:
                raise ValueError(f"the caption has bad slot markup: {issues[0].reason}")
            if not slots:  # a plain caption: place the slots at the phrases ourselves
                woven = weave(caption, phrases)
            else:
                woven = caption
                seen: set[str] = set()
                for slot in slots:
                    if slot.name is None:
                        raise ValueError(f"slot {slot.markup} is numbered; name it <img:KEY/> with a key of "
                                         f"{', '.join(keys)}")
                    if slot.name not in phrases:
                        raise ValueError(f"slot {slot.markup} names no object (keys: {', '.join(keys)})")
                    if slot.name in seen:
                        raise ValueError(f"slot {slot.markup} appears more than once; use each slot once")
                    seen.add(slot.name)
                    after = re.sub(r"\s+", " ", caption[slot.end:]).strip().lower()
                    phrase = phrases[slot.name].lower()
                    first, _, rest = phrase.partition(" ")
                    bare = rest if rest and first in LEADING_WORDS else phrase
                    if not (after.startswith(phrase) or after.startswith(bare)):
                        raise ValueError(f"the phrase {phrases[slot.name]!r} for {slot.name!r} does not follow "
                                         f"its slot {slot.markup}")
                missing = [k for k in keys if k not in seen]
                if missing:
                    raise ValueError("object(s) without a slot: " + ", ".join(missing)
                                     + "; put <img:KEY/> right before each object's phrase")
            for key, phrase in phrases.items():
                about = content_words(objects[key]["label"]) | content_words(objects[key].get("caption", ""))
                if not content_words(phrase) & about:
                    raise ValueError(f"the phrase {phrase!r} for {key!r} does not name its object "
                                     f"({objects[key]['label']})")
            wanted = content_words(global_caption)
            kept = wanted & content_words(woven)
            if wanted and len(kept) < self.min_caption_overlap * len(wanted):
                lost = ", ".join(sorted(wanted - kept)[:8])
                raise ValueError(f"the caption drops the meaning of the global caption (missing: {lost})")
            plain = re.sub(r"\s*<img:[^>]*/>\s*", " ", woven).strip()
            return {"caption": woven, "plain": re.sub(r" {2,}", " ", plain), "phrases": phrases}

        return check


# ------------------------------------------------------------ offline stand-ins
def salient_regions(image: np.ndarray, max_regions: int = 6, min_area: float = 0.01) -> list[list[float]]:
    """Boxes (0-1000 grid) around the largest regions that stand out from the image's border
    colours: k-means colour clusters (Lab) split into connected parts, parts that touch the
    border a lot (background) left out, largest first."""
    import cv2

    h, w = image.shape[:2]
    side = 96
    small = cv2.resize(image, (max(8, round(side * w / max(h, w))), max(8, round(side * h / max(h, w)))),
                       interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    lab = cv2.cvtColor(cv2.GaussianBlur(small, (5, 5), 0), cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
    k = 5
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    cv2.setRNGSeed(0)
    _, labels, _ = cv2.kmeans(lab, k, None, criteria, 2, cv2.KMEANS_PP_CENTERS)
    labels = labels.reshape(sh, sw)
    border = np.zeros((sh, sw), bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    regions = []
    for cluster in range(k):
        count, parts, stats, _ = cv2.connectedComponentsWithStats((labels == cluster).astype(np.uint8))
        for part in range(1, count):
            x, y, bw, bh, area = stats[part]
            if area < min_area * sh * sw:
                continue
            region = parts == part
            touching = (region & border).sum() / max(1, border.sum())
            if touching > 0.15:  # hugs the frame: background
                continue
            regions.append((int(area), [x / sw * BOX_GRID, y / sh * BOX_GRID,
                                        (x + bw) / sw * BOX_GRID, (y + bh) / sh * BOX_GRID]))
    regions.sort(key=lambda r: (-r[0], r[1]))
    return [[round(v, 1) for v in box] for _, box in regions[:max_regions]]


@offline_responder(GlobalCaption.task)
def _offline_global(request: ChatRequest, rng: random.Random) -> str:
    image = _as_array(request.images()[0])
    h, w = image.shape[:2]
    shape = "wide" if w > 1.2 * h else "tall" if h > 1.2 * w else "square"
    top, bottom = float(image[: h // 2].mean()), float(image[h // 2:].mean())
    light = ("lighter at the top" if top > bottom + 12 else "lighter at the bottom" if bottom > top + 12
             else "evenly lit from top to bottom")
    article = _brightness_word(image)
    opening = rng.choice(["picture", "scene", "view"])
    return json.dumps({"caption": f"{article[0].upper()}{article[1:]}, {shape} {opening} in mostly "
                                  f"{colour_name(image)} tones, {light}."})


@offline_responder(Detect.task)
def _offline_detect(request: ChatRequest, rng: random.Random) -> str:
    truth = request.hints.get("objects")
    if truth:  # ground truth (ToyWorld scenes): the exact detector
        return json.dumps({"objects": [{"label": o["label"], "box": o["box"]} for o in truth]})
    image = _as_array(request.images()[0])
    objects, used = [], {}
    ordinals = ("", "second ", "third ", "fourth ", "fifth ", "sixth ")
    for box in salient_regions(image):
        colour = colour_name(crop_box(image, box))
        used[colour] = used.get(colour, 0) + 1
        objects.append({"label": f"{ordinals[used[colour] - 1]}{colour} region", "box": box})
    return json.dumps({"objects": objects})


@offline_responder(Masks.task)
def _offline_segment(request: ChatRequest, rng: random.Random) -> str:
    """The region inside the box whose colour differs most from the box's own border (Otsu on
    the Lab distance), its largest part, as a polygon."""
    import cv2

    image = _as_array(request.images()[0])
    h, w = image.shape[:2]
    left, top, right, bottom = box_pixels(request.hints["box"], w, h)
    patch = cv2.cvtColor(np.ascontiguousarray(image[top:bottom, left:right]), cv2.COLOR_RGB2LAB).astype(np.float32)
    ring = np.concatenate([patch[0], patch[-1], patch[:, 0], patch[:, -1]])
    distance = np.linalg.norm(patch - np.median(ring, axis=0), axis=2)
    scaled = np.clip(distance * (255.0 / max(1e-6, distance.max())), 0, 255).astype(np.uint8)
    _, inside = cv2.threshold(scaled, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return json.dumps({"polygon": []})
    outline = cv2.approxPolyDP(max(contours, key=cv2.contourArea), 1.0, True).reshape(-1, 2)
    polygon = [[round((x + left) / w * BOX_GRID, 1), round((y + top) / h * BOX_GRID, 1)] for x, y in outline]
    return json.dumps({"polygon": polygon})


@offline_responder(ObjectCaptions.task)
def _offline_object_caption(request: ChatRequest, rng: random.Random) -> str:
    crop = _as_array(request.images()[0])
    label = request.hints.get("label", "object")
    ch, cw = crop.shape[:2]
    form = "wider than tall" if cw > 1.3 * ch else "taller than wide" if ch > 1.3 * cw else "about as wide as tall"
    non_white = crop[(crop < 250).any(axis=2)]
    colour = colour_name(non_white if len(non_white) else crop)
    return json.dumps({"caption": f"The {label}, mostly {colour}, {form}, at the "
                                  f"{_where(request.hints.get('box', [0, 0, BOX_GRID, BOX_GRID]))} of the picture."})


@offline_responder(InlineWeave.task)
def _offline_weave(request: ChatRequest, rng: random.Random) -> str:
    objects = request.hints.get("objects", {})
    base = request.hints.get("global", "").strip().rstrip(".")
    clauses, phrases = [], {}
    for key, obj in objects.items():
        phrase = obj["label"]
        phrases[key] = phrase
        article = "an" if phrase[:1].lower() in "aeiou" else "a"
        clauses.append(f"{article} <img:{key}/> {phrase} at the {_where(obj['box'])}")
    lead = rng.choice(["It shows", "In it we see", "There is"])
    listing = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
    return json.dumps({"caption": f"{base}. {lead} {listing}.", "phrases": phrases})
