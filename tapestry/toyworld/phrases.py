"""Natural wording for ToyWorld tasks: several phrasings of every place, size, relation,
background and change, picked at random, so a model learns the world rather than one sentence.

Every phrase must state its fact exactly: a cell phrase names one cell, a relation names an
adjacent cell, a description picks out exactly one entity of the scene.
"""

from __future__ import annotations

import re

import numpy as np

from tapestry.toyworld.sampling import pick
from tapestry.toyworld.spec import (
    CELL_NAMES,
    GRID_SIDE,
    Background,
    PlacedEntity,
    Scene,
)

CELL_PHRASES: dict[int, tuple[str, ...]] = {
    0: ("in the top-left corner", "at the top left", "in the upper-left corner"),
    1: ("at the top", "in the top middle", "at the top centre"),
    2: ("in the top-right corner", "at the top right", "in the upper-right corner"),
    3: ("on the left", "at the middle left", "on the left side"),
    4: ("in the centre", "in the middle", "right in the centre"),
    5: ("on the right", "at the middle right", "on the right side"),
    6: ("in the bottom-left corner", "at the bottom left", "in the lower-left corner"),
    7: ("at the bottom", "in the bottom middle", "at the bottom centre"),
    8: ("in the bottom-right corner", "at the bottom right", "in the lower-right corner"),
}
# Where a moved entity goes: "to the top-left corner".
CELL_DESTINATIONS: dict[int, tuple[str, ...]] = {
    0: ("to the top-left corner", "to the top left"), 1: ("to the top", "to the top middle"),
    2: ("to the top-right corner", "to the top right"), 3: ("to the left side", "to the middle left"),
    4: ("to the centre", "to the middle"), 5: ("to the right side", "to the middle right"),
    6: ("to the bottom-left corner", "to the bottom left"), 7: ("to the bottom", "to the bottom middle"),
    8: ("to the bottom-right corner", "to the bottom right"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
PATTERN_WORDS: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain-coloured"), "striped": ("striped",), "dotted": ("dotted", "spotted"),
    "ringed": ("ringed",),
}
VERBS: tuple[str, ...] = ("sits", "is", "rests", "stands")
# (d_row, d_col) -> phrases saying "B is <phrase> A"
RELATIONS: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 1): ("just right of", "immediately to the right of", "directly right of"),
    (0, -1): ("just left of", "immediately to the left of", "directly left of"),
    (-1, 0): ("directly above", "just above", "right above"),
    (1, 0): ("directly below", "just below", "right beneath"),
    (-1, -1): ("diagonally up and to the left of",), (-1, 1): ("diagonally up and to the right of",),
    (1, -1): ("diagonally down and to the left of",), (1, 1): ("diagonally down and to the right of",),
}
GRADIENT_ENDS: dict[str, tuple[str, str]] = {
    "horizontal": ("on the left", "on the right"), "vertical": ("at the top", "at the bottom"),
    "diagonal": ("in the top-left corner", "in the bottom-right corner"),
}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    return shape + "es" if shape.endswith(("s", "x", "ch", "sh")) else shape + "s"


def cell_phrase(rng: np.random.Generator, cell: int) -> str:
    return pick(rng, CELL_PHRASES[cell])


def relation(a_cell: int, b_cell: int) -> tuple[int, int] | None:
    """The (d_row, d_col) of b relative to a when they are neighbours (8-neighbourhood)."""
    dr = b_cell // GRID_SIDE - a_cell // GRID_SIDE
    dc = b_cell % GRID_SIDE - a_cell % GRID_SIDE
    return (dr, dc) if (dr, dc) in RELATIONS else None


def background_phrase(rng: np.random.Generator, background: Background) -> str:
    c = background.colours
    if background.kind == "plain":
        return pick(rng, (f"on a plain {c[0]} background", f"against a plain {c[0]} backdrop",
                          f"on a flat {c[0]} background"))
    if background.kind == "grid":
        return pick(rng, (f"on a {c[0]} grid", f"over a {c[0]} grid background", f"on a {c[0]} background with grid lines"))
    if background.kind == "noise":
        return pick(rng, (f"on a noisy {c[0]} background", f"on a mottled {c[0]} background",
                          f"against a speckled {c[0]} backdrop"))
    first, second = GRADIENT_ENDS[background.direction]
    return pick(rng, (f"on a background fading from {c[0]} {first} to {c[1]} {second}",
                      f"on a gradient from {c[0]} {first} to {c[1]} {second}"))


def background_noun(rng: np.random.Generator, background: Background) -> str:
    """'a plain sand background', 'a slate grid', 'a gradient from fog at the top to ...'."""
    c = background.colours
    if background.kind == "plain":
        return pick(rng, (f"a plain {c[0]} background", f"a flat {c[0]} background"))
    if background.kind == "grid":
        return pick(rng, (f"a {c[0]} grid", f"a {c[0]} background with grid lines"))
    if background.kind == "noise":
        return pick(rng, (f"a noisy {c[0]} background", f"a mottled {c[0]} background"))
    first, second = GRADIENT_ENDS[background.direction]
    return f"a gradient from {c[0]} {first} to {c[1]} {second}"


def full_description(rng: np.random.Generator, placed: PlacedEntity, with_size: bool = True) -> str:
    """'a large red striped star' (every attribute stated; the article included)."""
    e = placed.entity
    words = ([pick(rng, SIZE_WORDS[placed.size])] if with_size else []) + [e.colour, pick(rng, PATTERN_WORDS[e.pattern]), e.shape]
    text = " ".join(words)
    return f"{article(text)} {text}"


def short_name(scene: Scene, placed: PlacedEntity) -> str:
    """The shortest 'colour shape' style name that picks out `placed` alone in `scene`
    ('star', 'red star', 'red striped star', 'large red striped star', 'star in the centre')."""
    e = placed.entity
    others = [o for o in scene.entities if o is not placed and o != placed]
    candidates = [
        (e.shape,), (e.colour, e.shape), (e.colour, e.pattern, e.shape),
        (placed.size, e.colour, e.pattern, e.shape),
    ]
    fields = [("shape",), ("colour", "shape"), ("colour", "pattern", "shape"), ("size", "colour", "pattern", "shape")]
    for words, keys in zip(candidates, fields):
        if not any(all(_field(o, k) == _field(placed, k) for k in keys) for o in others):
            return " ".join(words)
    return f"{e.colour} {e.shape} {CELL_PHRASES[placed.cell][0]}"


def _field(p: PlacedEntity, key: str) -> str:
    return p.size if key == "size" else getattr(p.entity, key)


def sentence(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "?", "!")) else ".")


def join_clauses(rng: np.random.Generator, clauses: list[str]) -> str:
    if len(clauses) == 1:
        return clauses[0]
    glue = pick(rng, (", and ", "; "))
    return ", ".join(clauses[:-1]) + glue + clauses[-1] if glue == ", and " else "; ".join(clauses)


# ------------------------------------------------------------ understand answers
_NUMBER_WORDS = {"zero": "0", "none": "0", "no": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9"}
_SYNONYMS = {
    "center": "centre", "middle": "centre", "grey": "gray", "big": "large", "little": "small",
    "stripes": "striped", "stripy": "striped", "stripe": "striped", "spotted": "dotted", "dots": "dotted",
    "spots": "dotted", "rings": "ringed", "ring": "ringed", "plain": "solid",
    "upper": "top", "lower": "bottom", "circles": "circle", "squares": "square", "triangles": "triangle",
    "stars": "star", "diamonds": "diamond", "hexagons": "hexagon", "crosses": "cross", "hearts": "heart",
}
_FILLER = {"a", "an", "the", "it", "is", "its", "it's", "corner", "side", "one", "shape", "of", "image", "in", "at", "on"}


def normalize_answer(text: str) -> str:
    """Lowercase, words only, synonyms and number words mapped, filler dropped, place phrases
    in a canonical order: 'The upper-left corner.' -> 'top left'; 'Three' -> '3'."""
    words = re.findall(r"[a-z0-9]+", str(text).lower().replace("'", ""))
    out = []
    for w in words:
        w = _NUMBER_WORDS.get(w, _SYNONYMS.get(w, w))
        if w not in _FILLER:
            out.append(w)
    if len(out) == 2 and out[0] in ("left", "right") and out[1] in ("top", "bottom"):
        out.reverse()  # "left top" -> "top left"
    if out in (["centre", "left"], ["centre", "right"], ["centre", "top"], ["centre", "bottom"]):
        out = out[1:]  # "middle left" -> "left", "top centre" handled below
    if out in (["top", "centre"], ["bottom", "centre"], ["left", "centre"], ["right", "centre"]):
        out = out[:1]
    return " ".join(out)


def canonical_position(cell: int) -> str:
    """The answer to 'where is it?': 'top-left', 'centre', ..."""
    return CELL_NAMES[cell]
