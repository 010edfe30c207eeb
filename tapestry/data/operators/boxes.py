"""Filters for object boxes from a VLM or detector (Inset: "a filtering and sampling step to
remove low-quality candidates, e.g. extreme sizes"): area share, aspect ratio, duplicates, count.

Boxes are [x0, y0, x1, y1] on the 0-1000 grid of `vlm.BOX_GRID`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


def box_area(box: list[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def iou(a: list[float], b: list[float]) -> float:
    inter = box_area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class BoxFilter:
    name: ClassVar[str] = "boxes"
    version: ClassVar[str] = "1"

    min_area: float = 0.01  # share of the frame
    max_area: float = 0.9
    max_aspect: float = 6.0
    max_iou: float = 0.7  # a box overlapping a larger kept one this much is a duplicate
    max_objects: int = 3
    box_key: str = "source_box"  # which box of a correspondence the limits apply to

    def keep(self, objects: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The objects worth keeping, largest first, and counts of why others were dropped."""
        grid = 1000.0 * 1000.0
        dropped = {"too-small": 0, "too-large": 0, "aspect": 0, "duplicate": 0, "too-many": 0}
        candidates = []
        for obj in objects:
            box = obj[self.box_key]
            share = box_area(box) / grid
            width, height = box[2] - box[0], box[3] - box[1]
            if share < self.min_area:
                dropped["too-small"] += 1
            elif share > self.max_area:
                dropped["too-large"] += 1
            elif max(width, height) / max(1e-6, min(width, height)) > self.max_aspect:
                dropped["aspect"] += 1
            else:
                candidates.append(obj)
        candidates.sort(key=lambda o: -box_area(o[self.box_key]))
        kept: list[dict[str, Any]] = []
        for obj in candidates:
            if any(iou(obj[self.box_key], k[self.box_key]) > self.max_iou for k in kept):
                dropped["duplicate"] += 1
            elif len(kept) >= self.max_objects:
                dropped["too-many"] += 1
            else:
                kept.append(obj)
        return kept, {k: v for k, v in dropped.items() if v}
