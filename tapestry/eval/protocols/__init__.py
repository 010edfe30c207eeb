"""The papers' judge protocols. Each module holds its prompts, the checks on the judge's answers
and its aggregation, with the paper it comes from, and exposes:

    NAME, SOURCE                 the protocol and its paper
    score(judge, sample) -> row  {"id", "category", "scores": {criterion: value | None},
                                  "missing": {criterion: reason}, ...}
    aggregate(rows) -> dict      the paper's numbers; missing criteria are left out and counted

    interleavebench   Inset (papers/000): image consistency 1-5 -> [0, 1]; text consistency by
                      pre-generated yes/no questions
    duetgen           DuetGen (papers/001): five 1-5 criteria
    ilscore           ILLUME-X (papers/002): D1-D4 on 0-10
    opening           OpenING (Zhou et al., CVPR 2025): seven 0-10 criteria
    isg               ISG-Bench (Chen et al., ICLR 2025): structural, block, image, holistic
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tapestry.document import Document, ImageSegment, TextSegment

PROTOCOLS = ("interleavebench", "duetgen", "ilscore", "opening", "isg")


def get(name: str):
    if name not in PROTOCOLS:
        from tapestry.eval.toyworld import EvalError

        raise EvalError(f"--protocol {name!r}: choose one of {', '.join(PROTOCOLS)}")
    return importlib.import_module(f"tapestry.eval.protocols.{name}")


@dataclass
class EvalSample:
    """One benchmark item with a model's answer."""

    id: str
    prompt: Document  # what the model was given
    output: Document | None  # what it produced (None: nothing was produced)
    golden: Document | None = None  # the benchmark's reference answer, where it has one
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # protocol data (yes/no questions, ISG graph)


def pixels(segment: ImageSegment):
    from tapestry.toyworld.evaluate import _pixels

    return _pixels(segment)


def document_parts(doc: Document | None, first_number: int = 0, label: str = "IMG") -> tuple[list, int]:
    """Text and images in reading order; each image is preceded by a tag `<IMG_k>` (numbered from
    `first_number`, OpenING's convention) so the judge can name it. Returns (parts, images)."""
    if doc is None:
        return ["(nothing)"], 0
    try:
        order = doc.reading_order()
    except Exception:  # noqa: BLE001 - unbound slots: fall back to segment order
        order = [s.text if isinstance(s, TextSegment) else s for s in doc.segments]
    parts: list = []
    k = first_number
    for item in order:
        if isinstance(item, str):
            if item.strip():
                parts.append(item.strip())
        else:
            image = pixels(item)
            if image is None:
                parts.append(f"<{label}_{k}>(missing image)</{label}_{k}>")
            else:
                parts += [f"<{label}_{k}>", image.convert("RGB"), f"</{label}_{k}>"]
            k += 1
    return parts or ["(nothing)"], k - first_number


def output_images(doc: Document | None) -> list:
    if doc is None:
        return []
    return [im for im in (pixels(s) for s in doc.segments if isinstance(s, ImageSegment)) if im is not None]


def output_text(doc: Document | None) -> str:
    if doc is None:
        return ""
    return "\n".join(s.text for s in doc.segments if isinstance(s, TextSegment) and s.text.strip())


def text_around(doc: Document, image_number: int) -> str:
    """The text next to the k-th image of `doc`: the text segments just before and after it."""
    images = [i for i, s in enumerate(doc.segments) if isinstance(s, ImageSegment)]
    at = images[image_number]
    near = [doc.segments[j] for j in (at - 1, at + 1) if 0 <= j < len(doc.segments)]
    return "\n".join(s.text for s in near if isinstance(s, TextSegment)) or "(no text next to this image)"


def mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def criterion_means(rows: list[dict], criteria: list[str], digits: int = 4) -> dict[str, dict[str, Any]]:
    """Per criterion: mean over the rows that have it, n, and how many are missing."""
    out = {}
    for c in criteria:
        values = [r["scores"].get(c) for r in rows]
        present = [v for v in values if v is not None]
        out[c] = {"mean": round(float(np.mean(present)), digits) if present else None, "n": len(present),
                  "missing": len(values) - len(present)}
    return out
