"""The ToyWorld judge: scores an image against a scene spec from the pixels alone.

How an image is read (`analyse_image`), with no knowledge of how it was made:
1. Convert to RGB (transparent pixels on white), make it square, bring it to 32..128 px.
2. Classify pixels: ink (value < 0.2), white (neutral and brighter than the background can be),
   one of the seven hues (chroma >= 0.3, nearest hue), else background. ToyWorld backgrounds
   never reach these classes (spec.py chooses the colours so).
3. Foreground parts = connected coloured/white pixels with the ink around them; pieces of one
   entity cut apart by a pattern at low resolution are joined back when together they still fit
   one entity. Each part is refined by unmixing: every pixel near it is read as background +
   alpha * (colour - background), both colours measured locally; alpha >= 0.5 is inside, and
   alpha is the coverage of edge pixels, so shapes are compared below the pixel.
4. Per entity: colour (majority class), cell (coverage centroid), shape (soft IoU of the coverage
   with each of the 8 shapes drawn at the same centroid and area, best over rotations, with the
   templates softened to the image's own edge blur), size (radius from the area and the shape),
   pattern (correlation of the ink inside with the ink each pattern leaves in the fitted shape,
   best over the pattern's orientation; solid = almost no ink).
5. The background is what is left: its kind (plain / gradient / grid / noise) from a plane fit
   and the structure of the residual, its colours from the fitted plane.

How a scene is scored (`score_scene`): expected entities are matched one-to-one to entities read
so that the sum of per-entity scores is largest (Hungarian algorithm); an entity without an
admissible match (its colour, or at its cell) is missing. Every score lies in [0, 1]:

    entity = 0.15 present + 0.25 cell + 0.20 colour + 0.15 shape + 0.15 pattern + 0.10 size
    total  = 0.80 mean(entity) + 0.10 background + 0.10 no_extra,  no_extra = 1 / (1 + 2 extras)

Beside the graded total, each image is judged *exact* (binary, as GenEval scores prompts): every
scored entity is matched and each of its judged sub-scores (cell, colour, shape, pattern, size)
reaches EXACT_THRESHOLD, the background kind is right and its colour reaches the threshold, and
nothing extra is drawn. 0.5 is each ramp's decision point (in the cell, majority colour, own
shape/pattern above every rival, nearer the expected size than the other); the self-test
(selftest.py, docs/toyworld.md) shows clean renders at 1.0 on every sub-score and every
corrupted attribute at 0.0, so the threshold sits where degraded renders lose least.

Shape and pattern are judged relative to what the judge reads from a perfect rendering of the
expected scene at the same resolution (`readable`): a rival shape or pattern counts only if the
perfect rendering tells it apart, and an attribute (or entity) that the perfect rendering does
not show at all is not scored (None) and its weight goes to the rest. The judge is rotation-free:
targets are judged on identity, place and size, not on pose.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from tapestry.toyworld.render import (
    SIZE_FRACTION,
    Canvas,
    entity_box,
    inset_mask,
    pattern_masks,
    render_background,
    render_scene_array,
    shape_coverages,
    shape_outline,
    supersample_factor,
    unit_area,
)
from tapestry.toyworld.spec import (
    COLOURS,
    ENTITY_RGB,
    GRID_SIDE,
    INK_RGB,
    PATTERNS,
    SHAPES,
    PlacedEntity,
    Scene,
)

ENTITY_WEIGHTS: dict[str, float] = {"present": 0.15, "cell": 0.25, "colour": 0.20, "shape": 0.15,
                                    "pattern": 0.15, "size": 0.10}
SCENE_WEIGHTS: dict[str, float] = {"entities": 0.80, "background": 0.10, "no_extra": 0.10}
MIN_SIDE, MAX_SIDE = 32, 128
# An exact entity has every judged sub-score at or above its threshold (module docstring).
EXACT_THRESHOLDS: dict[str, float] = {"cell": 0.5, "colour": 0.5, "shape": 0.5, "pattern": 0.5, "size": 0.5,
                                      "background_colour": 0.5}

INK_VALUE = 0.2  # pixels darker than this are ink; backgrounds stay above 0.28
WHITE_VALUE, WHITE_CHROMA = 0.86, 0.2
HUE_CHROMA = 0.3  # backgrounds stay below 0.2
HUE_CLASSES: tuple[str, ...] = tuple(c for c in COLOURS if c != "white")
SYMMETRY_DEGREES: dict[str, float] = {"circle": 360.0, "square": 90.0, "triangle": 120.0, "star": 72.0,
                                      "diamond": 180.0, "hexagon": 60.0, "cross": 90.0, "heart": 360.0}
COARSE_STEP = 15.0
STRUCTURE_SIGMA = 6.0  # levels of residual std above which a background is grid or noise
GRID_PROFILE_RATIO = 0.45
GRADIENT_AMPLITUDE = 25.0  # levels of colour change across the image


def _hue_degrees(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    c = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return h * 60.0


HUE_CENTRES = _hue_degrees(np.array([ENTITY_RGB[c] for c in HUE_CLASSES], dtype=np.float32))
LABEL_BG, LABEL_INK = -1, -2  # labels >= 0 index COLOURS


# ------------------------------------------------------------------ input
def to_analysis_array(image: Any) -> np.ndarray:
    """Anything image-like -> [S, S, 3] float32 RGB with S in 32..128 (never raises on pixels).

    Arrays: [H, W], [H, W, C] or [C, H, W] with C in 1..4; uint8, or floats in 0..255 (floats
    whose maximum is at most 1 are taken as 0..1)."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
            arr = np.moveaxis(arr, 0, -1)  # [C, H, W] -> [H, W, C]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4)) or arr.size == 0:
            raise TypeError(f"expected an image array [H, W], [H, W, C] or [C, H, W], got shape {arr.shape}")
        if arr.dtype != np.uint8:
            values = np.nan_to_num(arr.astype(np.float64))
            if arr.dtype.kind == "f" and values.max(initial=0.0) <= 1.0:
                values = values * 255.0
            arr = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] in (1, 2):
            arr = arr[..., 0]
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")  # transparent pixels shown on white, as storage does
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        image = flat
    elif image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    side = w if w == h else round(math.sqrt(w * h))
    side = min(max(side, MIN_SIDE), MAX_SIDE)
    if (w, h) != (side, side):
        shrinking = w >= side and h >= side
        image = image.resize((side, side), Image.BOX if shrinking else Image.BICUBIC)
    return np.asarray(image, dtype=np.float32)


def white_threshold(value: np.ndarray, neutral: np.ndarray) -> float:
    """Value above which a neutral pixel is white. ToyWorld backgrounds stay below 0.80, so 0.86
    is always safe; on a flat, darker background a lower bar (down to 0.72) also catches the
    anti-aliased pixels of small white entities. The background's level and spread are read as
    the median and MAD of the neutral, non-ink pixels (entities are a minority of pixels)."""
    pool = value[neutral & (value >= INK_VALUE)]
    if pool.size == 0:
        return WHITE_VALUE
    median = float(np.median(pool))
    spread = 1.4826 * float(np.median(np.abs(pool - median)))
    return float(np.clip(median + max(0.1, 3.5 * spread), 0.72, WHITE_VALUE))


def classify_pixels(rgb: np.ndarray) -> np.ndarray:
    """[S, S] int labels: index into COLOURS, LABEL_INK or LABEL_BG."""
    value = rgb.max(axis=-1) / 255.0
    chroma = (rgb.max(axis=-1) - rgb.min(axis=-1)) / 255.0
    hue = _hue_degrees(rgb)
    dist = np.abs((hue[..., None] - HUE_CENTRES + 180.0) % 360.0 - 180.0)
    hue_label = np.array([COLOURS.index(c) for c in HUE_CLASSES])[dist.argmin(axis=-1)]
    labels = np.full(value.shape, LABEL_BG, dtype=np.int64)
    neutral = chroma < WHITE_CHROMA
    labels[neutral & (value >= white_threshold(value, neutral))] = COLOURS.index("white")
    chromatic = chroma >= HUE_CHROMA
    labels[chromatic] = hue_label[chromatic]
    labels[(value < INK_VALUE) & ~chromatic] = LABEL_INK
    return labels


# ------------------------------------------------------------------ blobs
@dataclass
class Blob:
    """One foreground entity as the judge sees it."""

    mask: np.ndarray  # [S, S] bool silhouette
    coverage: np.ndarray  # [S, S] float32: share of each pixel the entity covers
    area: float  # sum of coverage, in pixels
    centroid: tuple[float, float]  # continuous pixel coordinates (x, y)
    colour: str | None  # majority colour class, None for clutter
    colour_counts: dict[str, int]
    clutter: bool = False  # too large or too mixed to be an entity: never matched
    shape_iou: dict[str, float] = field(default_factory=dict)
    shape: str | None = None
    rotation: float = 0.0
    radius: float = 0.0
    pattern_iou: dict[str, float] = field(default_factory=dict)  # ink correlation per patterned pattern
    ink_share: float = 0.0  # of the inside, in [0, 1]
    pattern: str | None = None
    blur: float = 0.0  # edge softness (px) the shape templates were matched to

    def summary(self, side: int) -> dict[str, Any]:
        cell_px = side / GRID_SIDE
        col = min(GRID_SIDE - 1, max(0, int(self.centroid[0] // cell_px)))
        row = min(GRID_SIDE - 1, max(0, int(self.centroid[1] // cell_px)))
        out: dict[str, Any] = {"colour": self.colour, "cell": row * GRID_SIDE + col,
                               "centroid": [round(self.centroid[0] / side, 4), round(self.centroid[1] / side, 4)],
                               "area": round(self.area / side ** 2, 5)}
        if self.clutter:
            out["clutter"] = True
            return out
        out.update({"shape": self.shape, "pattern": self.pattern, "ink_share": round(self.ink_share, 4),
                    "radius": round(self.radius / cell_px, 4),
                    "shape_iou": {k: round(v, 4) for k, v in self.shape_iou.items()}})
        return out


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius + radius  # a rounder small disk than r^2


def _median_colour(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    if not mask.any():
        return None
    return np.median(rgb[mask], axis=0)


def _refine_silhouette(rgb: np.ndarray, labels: np.ndarray, seed: np.ndarray, label: int,
                       foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(silhouette, coverage) of the entity around `seed`, by local unmixing.

    Each pixel near the seed is read as background + alpha * (colour - background), with the
    background the median of a ring around the seed and the colour the median of the seed:
    alpha >= 0.5 is inside, and alpha itself is the coverage of edge pixels, so shapes can be
    compared below the pixel. Ink touching the entity, and holes, are inside with coverage 1."""
    near = ndimage.binary_dilation(seed, _disk(2))
    ring = ndimage.binary_dilation(seed, _disk(4)) & ~near & (labels == LABEL_BG)
    background = _median_colour(rgb, ring)
    if background is None:
        background = _median_colour(rgb, labels == LABEL_BG)
    colour = _median_colour(rgb, seed & (labels == label))
    alpha = np.zeros(seed.shape, dtype=np.float32)
    region = near & ~(foreground & ~seed)  # never another entity's pixels
    silhouette = seed & (labels == label)
    if background is not None and colour is not None:
        axis = colour - background
        norm = float(axis @ axis)
        if norm > 400.0:  # the two colours are at least 20 levels apart: unmixing is meaningful
            alpha[region] = np.clip(((rgb[region] - background) @ axis) / norm, 0.0, 1.0)
            silhouette = region & (alpha >= 0.5) & (labels != LABEL_INK)
    if not silhouette.any():
        silhouette = seed & (labels == label)
    ink = labels == LABEL_INK
    solid = np.zeros_like(seed)  # inside for sure: coverage 1 whatever alpha says
    if ink.any():
        ink_parts, _ = ndimage.label(ink)
        touching = np.unique(ink_parts[ndimage.binary_dilation(silhouette, _disk(1)) & ink])
        touching = touching[touching > 0]
        if touching.size:
            own_ink = np.isin(ink_parts, touching)
            # Pixels half ink, half entity colour are neither class (for white they are grey, like
            # a background); next to the entity's own ink they are inside.
            halo = ndimage.binary_dilation(own_ink, _disk(1)) & near & ~foreground
            solid |= own_ink | halo
    silhouette = silhouette | solid
    if background is not None:
        # Ink too light to be ink-class (a thin stripe at low resolution) is still darker than
        # the background toward ink: inside, where it lies within the entity's closed outline.
        # (Needed for white entities, whose ink mixtures are greys like a background's.)
        ink_axis = np.asarray(INK_RGB, dtype=np.float32) - background
        toward_ink = np.zeros(seed.shape, dtype=bool)
        toward_ink[region] = ((rgb[region] - background) @ ink_axis) / float(ink_axis @ ink_axis) >= 0.25
        closed = ndimage.binary_closing(np.pad(silhouette, 2), _disk(2))[2:-2, 2:-2]
        inky = closed & toward_ink & ~silhouette & ~foreground
        solid |= inky
        silhouette |= inky
    # Holes behind a one-pixel notch (a pattern element meeting the edge) are still inside.
    closed = ndimage.binary_closing(np.pad(silhouette, 1), EIGHT)[1:-1, 1:-1]
    filled = ndimage.binary_fill_holes(silhouette | (ndimage.binary_fill_holes(closed) & ~closed))
    solid |= filled & ~silhouette
    silhouette = filled
    parts, n = ndimage.label(silhouette, EIGHT)
    if n > 1:
        # The seed is one entity: keep every piece that holds some of it, bridged across the
        # one-pixel gaps (ink/colour mixtures) between them; drop pieces that hold none.
        keep = np.isin(parts, np.unique(parts[seed & silhouette])) & (parts > 0)
        bridged = ndimage.binary_closing(np.pad(keep, 1), EIGHT)[1:-1, 1:-1] | keep
        solid |= bridged & ~keep
        silhouette = bridged
    # Coverage: alpha on the silhouette's edge pixels and one pixel around it (a blurred edge
    # keeps its profile), 1 inside and where the entity is ink or a hole, 0 further out.
    reach = ndimage.binary_dilation(silhouette, _disk(1)) & region & ~(silhouette & solid)
    coverage = np.where(silhouette & solid, 1.0, 0.0).astype(np.float32)
    coverage[reach] = alpha[reach]
    coverage[ndimage.binary_erosion(silhouette, _disk(1))] = 1.0  # inside the edge is inside (ink too)
    return silhouette, coverage


def _centroid(weights: np.ndarray) -> tuple[float, float]:
    """Centroid of a mask or coverage map in continuous pixel coordinates."""
    w = weights.astype(np.float64)
    total = w.sum()
    if total <= 0:
        return weights.shape[1] / 2.0, weights.shape[0] / 2.0
    return (float((w.sum(axis=0) * (np.arange(w.shape[1]) + 0.5)).sum() / total),
            float((w.sum(axis=1) * (np.arange(w.shape[0]) + 0.5)).sum() / total))


def max_entity_area(side: int) -> float:
    r = SIZE_FRACTION["large"] * side / GRID_SIDE / 2.0
    return max(unit_area(s) for s in SHAPES) * r * r


def min_entity_area(side: int) -> float:
    r = SIZE_FRACTION["small"] * side / GRID_SIDE / 2.0
    return 0.3 * min(unit_area(s) for s in SHAPES) * r * r


EIGHT = np.ones((3, 3), dtype=bool)


def _group_fragments(mask: np.ndarray, min_area: float, reach: float) -> np.ndarray:
    """Connected parts of `mask`, where pieces smaller than an entity also join a neighbour:
    at low resolution a patterned entity breaks into pieces (a star's point cut off by a stripe)
    separated by pixels that are half ink, half colour. A piece joins anything within one pixel,
    and the nearest whole part within `reach` pixels. Whole parts never join each other."""
    parts, n = ndimage.label(mask, EIGHT)
    if n == 0:
        return parts
    sizes = np.bincount(parts.ravel())
    small = np.isin(parts, np.nonzero(sizes < min_area)[0]) & mask
    if not small.any():
        return parts
    bridged = mask | ndimage.binary_dilation(small, EIGHT)
    groups, n = ndimage.label(bridged, EIGHT)
    groups = np.where(mask, groups, 0)
    sizes = np.bincount(groups.ravel(), minlength=n + 1)
    big = (groups > 0) & (sizes[groups] >= min_area)
    if not big.any():
        return groups
    distance, (iy, ix) = ndimage.distance_transform_edt(~big, return_indices=True)
    nearest = groups[iy, ix]
    for g in np.unique(groups[(groups > 0) & ~big]):
        piece = groups == g
        if distance[piece].min() <= reach:
            groups[piece] = nearest[piece][distance[piece].argmin()]
    return groups


def _join_pieces(groups: np.ndarray, labels: np.ndarray, reach: float, side: int) -> np.ndarray:
    """Join parts within `reach` pixels when together they still fit one entity (no larger in
    area, and no wider, than the largest entity): at 32 px upright stripes can cut an entity into
    pieces of entity size. Two real entities, whatever their colours, never fit one."""
    ids = [int(g) for g in np.unique(groups) if g > 0]
    if not 2 <= len(ids) <= 24:  # many parts: clutter, not an entity broken in two
        return groups
    r_large = SIZE_FRACTION["large"] * side / GRID_SIDE / 2.0
    max_area, max_extent = 1.25 * max_entity_area(side), r_large + 1.0

    def colour(g: int) -> int:
        values = labels[(groups == g) & (labels >= 0)]
        return int(np.bincount(values).argmax()) if values.size else -1

    joined = True
    while joined:
        joined = False
        ids = sorted((int(g) for g in np.unique(groups) if g > 0), key=lambda g: -int((groups == g).sum()))
        for a in ids:
            near_a = ndimage.distance_transform_edt(groups != a) <= reach
            for b in ids:
                if b == a or not (near_a & (groups == b)).any():
                    continue
                ca, cb = colour(a), colour(b)
                # Pieces of another colour join only as a fringe (a quarter of the size or less):
                # an edge blended with a tinted background can read as the neighbouring hue.
                if ca >= 0 and cb >= 0 and ca != cb and (groups == b).sum() > 0.25 * (groups == a).sum():
                    continue
                union = (groups == a) | (groups == b)
                ys, xs = np.nonzero(union)
                extent = np.sqrt((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2).max()
                if ys.size <= max_area and extent <= max_extent:
                    groups = np.where(groups == b, a, groups)
                    joined = True
                    break
            if joined:
                break
    return groups


def find_blobs(rgb: np.ndarray, labels: np.ndarray) -> list[Blob]:
    """Entities as blobs, largest first. Ink joins the colour it touches before components are
    taken, so a stripe cutting a thin shape in two does not make two entities."""
    side = rgb.shape[0]
    foreground = labels >= 0
    min_area = min_entity_area(side)
    reach = max(3.0, 0.5 * SIZE_FRACTION["small"] * side / GRID_SIDE / 2.0)  # a two-pixel gap at least
    # Ink and the pixels around it (ink mixed with colour) hold an entity together; ToyWorld
    # backgrounds have no ink, so this never joins two entities.
    inked = ndimage.binary_dilation(labels == LABEL_INK, EIGHT)
    parts = _join_pieces(_group_fragments(foreground | inked, min_area, reach), labels, reach, side)
    seeds: list[tuple[np.ndarray, int, float]] = []  # (colour pixels, majority label, purity)
    for index, sl in enumerate(ndimage.find_objects(parts), start=1):
        if sl is None:
            continue
        whole = parts == index
        part = whole & foreground
        area = int(part.sum())
        # Small entities with patterns are mostly edge and ink at low resolution: count the ink.
        if int(whole.sum()) < min_area or area < max(3, 0.2 * min_area):
            continue
        counts = np.bincount(labels[part], minlength=len(COLOURS))
        major = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] >= max(min_area, 0.25 * area)]
        if len(major) > 1:
            # Entities of different colours touching: split by colour, minor labels to the nearest.
            seed_of = np.full(labels.shape, -1)
            for k, c in enumerate(major):
                seed_of[part & (labels == c)] = k
            _, (iy, ix) = ndimage.distance_transform_edt(seed_of < 0, return_indices=True)
            nearest = seed_of[iy, ix]
            for k, c in enumerate(major):
                sub = part & (nearest == k)
                sub_counts = np.bincount(labels[sub], minlength=len(COLOURS))
                seeds.append((sub, c, float(sub_counts[c] / max(int(sub.sum()), 1))))
        else:
            c = int(counts.argmax())
            seeds.append((part, c, float(counts[c] / area)))
    seeds.sort(key=lambda s: -int(s[0].sum()))
    blobs: list[Blob] = []
    too_big = 2.5 * max_entity_area(side)
    claimed = np.zeros(labels.shape, dtype=bool)
    for seed, c, purity in seeds:
        if (seed & claimed).sum() >= 0.5 * seed.sum():
            continue  # already inside a larger entity's silhouette
        if purity < 0.5 or seed.sum() > too_big:
            mask, coverage, clutter = seed, seed.astype(np.float32), True
        else:
            mask, coverage = _refine_silhouette(rgb, labels, seed, c, foreground)
            clutter = bool(mask.sum() > too_big)
        area = float(coverage.sum())
        if area < min_area:
            continue
        claimed |= mask
        counts = np.bincount(labels[mask & foreground], minlength=len(COLOURS))
        blobs.append(Blob(mask=mask, coverage=coverage, area=area, centroid=_centroid(coverage),
                          colour=None if clutter else COLOURS[c],
                          colour_counts={COLOURS[i]: int(v) for i, v in enumerate(counts) if v},
                          clutter=clutter))
    return blobs


# ------------------------------------------------------------------ shape
def _soft_iou(templates: np.ndarray, window: np.ndarray, outside: float) -> np.ndarray:
    """[N] soft IoU (sum of minima over sum of maxima) of N templates against a window of the
    observed coverage; `outside` is the observed coverage beyond the window."""
    inter = np.minimum(templates, window[None]).sum(axis=(1, 2))
    union = outside + window.sum() + templates.sum(axis=(1, 2)) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def _shape_ious(blob: Blob, shape: str, radius: float, angles, side: int, ss: int, blur: float = 0.0) -> np.ndarray:
    pad = math.ceil(2.5 * blur)
    box = entity_box(blob.centroid, radius + pad, side)
    x0, y0, w, h = box
    if w == 0 or h == 0:
        return np.zeros(len(angles))
    window = blob.coverage[y0:y0 + h, x0:x0 + w]
    templates = shape_coverages(shape, blob.centroid, radius, angles, box, ss)
    if blur > 0:
        templates = ndimage.gaussian_filter(templates, (0, blur, blur), mode="constant", truncate=2.5)
    return _soft_iou(templates, window, blob.area - float(window.sum()))


BLURS = (0.0, 0.4, 0.7, 1.0)  # pixels: the edge softness templates are matched to


REFINE_WITHIN = 0.1  # only shapes this close to the best coarse fit are refined


def fit_shape(blob: Blob, side: int) -> None:
    """Soft IoU of the entity's coverage against each shape drawn at its centroid with the same
    area, best over rotations: coarse steps within the shape's symmetry, then halving steps
    around the best (for the shapes that can matter: near the best fit). Templates are first
    softened to the image's own edge blur (measured on the best coarse fit), so that a blurred
    hexagon is compared with blurred circles, not with sharp ones."""
    ss = supersample_factor(side)

    def coarse_fit(blur: float) -> dict[str, tuple[float, float]]:
        out = {}
        for shape in SHAPES:
            radius = math.sqrt(blob.area / unit_area(shape))
            angles = [0.0] if shape == "circle" else list(np.arange(0.0, SYMMETRY_DEGREES[shape], COARSE_STEP))
            ious = _shape_ious(blob, shape, radius, angles, side, ss, blur)
            k = int(np.argmax(ious))
            out[shape] = (float(ious[k]), float(angles[k]))
        return out

    coarse = coarse_fit(0.0)
    lead = max(coarse, key=lambda k: coarse[k][0])
    radius = math.sqrt(blob.area / unit_area(lead))
    by_blur = [float(_shape_ious(blob, lead, radius, [coarse[lead][1]], side, ss, b)[0]) for b in BLURS]
    blob.blur = BLURS[int(np.argmax(by_blur))]
    if blob.blur > 0:
        coarse = coarse_fit(blob.blur)
    best = max(v[0] for v in coarse.values())
    for shape, (iou, angle) in coarse.items():
        if shape != "circle" and iou >= best - REFINE_WITHIN:
            radius = math.sqrt(blob.area / unit_area(shape))
            step = COARSE_STEP / 2
            while step >= 0.9:
                candidates = [angle - step, angle + step]
                ious = _shape_ious(blob, shape, radius, candidates, side, ss, blob.blur)
                k = int(np.argmax(ious))
                if ious[k] > iou:
                    iou, angle = float(ious[k]), candidates[k]
                step /= 2
        blob.shape_iou[shape] = iou
        coarse[shape] = (iou, angle)
    blob.shape = max(SHAPES, key=lambda k: blob.shape_iou[k])
    blob.rotation = coarse[blob.shape][1] % 360.0
    blob.radius = math.sqrt(blob.area / unit_area(blob.shape))


# ---------------------------------------------------------------- pattern
SOLID_INK_SHARE = 0.04  # ink share of the inside below which an entity reads as solid
PATTERN_SEARCH: dict[str, tuple[float, tuple[float, ...]]] = {
    # pattern: (angles searched from the fitted pose, stripe phases)
    "striped": (180.0, (0.0, 0.5)),
    "dotted": (90.0, (0.0,)),
    "ringed": (0.0, (0.0,)),
}


def fit_pattern(blob: Blob, rgb: np.ndarray, labels: np.ndarray) -> None:
    """Ink of the entity (each inner pixel unmixed between its colour and ink) against the ink
    each pattern leaves inside the fitted shape: correlation, best over the pattern's orientation
    (stripes may also be shifted by half a period). Solid means almost no ink."""
    side = rgb.shape[0]
    colour = _median_colour(rgb, blob.mask & (labels == COLOURS.index(blob.colour)))
    if colour is None:
        colour = np.asarray(ENTITY_RGB[blob.colour], dtype=np.float32)
    ink_rgb = np.asarray(INK_RGB, dtype=np.float32)
    axis = colour - ink_rgb
    # Edge pixels mix in the background, which unmixing would read as ink: judge the inside only.
    inner = ndimage.binary_erosion(blob.mask, _disk(1))
    inkiness = np.zeros(blob.mask.shape, dtype=np.float32)
    if float(axis @ axis) > 400.0:
        inkiness[inner] = np.clip(((colour - rgb[inner]) @ axis) / float(axis @ axis), 0.0, 1.0)
    blob.ink_share = float(inkiness[inner].sum() / max(int(inner.sum()), 1))
    ss = supersample_factor(side)
    box = entity_box(blob.centroid, blob.radius, side)
    x0, y0, w, h = box
    blob.pattern_iou = {}
    if w == 0 or h == 0:
        blob.pattern = "solid"
        return
    canvas = Canvas(*box, ss)
    allowed = inset_mask(canvas.polygon(shape_outline(blob.shape, blob.centroid, blob.radius, blob.rotation)),
                         blob.radius, ss)
    window = inner[y0:y0 + h, x0:x0 + w]
    if window.sum() < 3:
        blob.pattern = "solid"
        return
    observed = inkiness[y0:y0 + h, x0:x0 + w][window].astype(np.float64)
    observed -= observed.mean() if observed.size else 0.0
    observed_norm = float(np.sqrt((observed ** 2).sum()))

    def ious(pattern: str, angles: list[float], phases: list[float]) -> np.ndarray:
        # Normalized cross-correlation over the inside: blur, noise and JPEG lower the contrast
        # of the ink but keep where it is, and correlation ignores contrast.
        masks = pattern_masks(canvas, pattern, blob.shape, blob.centroid, blob.radius, angles, phases) & allowed
        templates = canvas.coverage(masks)[:, window].astype(np.float64)
        templates -= templates.mean(axis=1, keepdims=True)
        norms = np.sqrt((templates ** 2).sum(axis=1)) * observed_norm
        return np.where(norms > 1e-9, templates @ observed / np.maximum(norms, 1e-9), 0.0)

    for pattern, (span, phases) in PATTERN_SEARCH.items():
        angles = [blob.rotation + a for a in np.arange(0.0, span, COARSE_STEP)] if span else [blob.rotation]
        grid = [(a, ph) for a in angles for ph in phases]
        values = ious(pattern, [g[0] for g in grid], [g[1] for g in grid])
        k = int(np.argmax(values))
        best, (angle, phase) = float(values[k]), grid[k]
        if span:
            step = COARSE_STEP / 2
            while step >= 1.8:
                candidates = [angle - step, angle + step]
                values = ious(pattern, candidates, [phase, phase])
                k = int(np.argmax(values))
                if values[k] > best:
                    best, angle = float(values[k]), candidates[k]
                step /= 2
        blob.pattern_iou[pattern] = best
    if blob.ink_share < SOLID_INK_SHARE:
        blob.pattern = "solid"
    else:
        blob.pattern = max(blob.pattern_iou, key=blob.pattern_iou.get)


# ------------------------------------------------------------- background
@dataclass
class BackgroundReading:
    kind: str | None  # None when no background pixels are left
    mask: np.ndarray
    plane: np.ndarray | None  # [3, 3]: per channel (constant, x slope, y slope) over [0, 1]^2
    amplitude: float = 0.0
    residual_sigma: float = 0.0
    profile_ratio: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "amplitude": round(self.amplitude, 2),
                "residual_sigma": round(self.residual_sigma, 2), "profile_ratio": round(self.profile_ratio, 3)}


def _design(mask: np.ndarray) -> np.ndarray:
    side = mask.shape[0]
    ys, xs = np.nonzero(mask)
    return np.stack([np.ones(xs.size), (xs + 0.5) / side, (ys + 0.5) / side], axis=1)


def fit_plane(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    design = _design(mask)
    coeffs, *_ = np.linalg.lstsq(design, rgb[mask].astype(np.float64), rcond=None)
    return coeffs  # [3 (const, x, y), 3 channels]


def read_background(rgb: np.ndarray, labels: np.ndarray, blobs: list[Blob]) -> BackgroundReading:
    side = rgb.shape[0]
    occupied = labels != LABEL_BG
    for blob in blobs:
        occupied |= blob.mask
    mask = ~ndimage.binary_dilation(occupied, _disk(2))
    if mask.sum() < 0.05 * side * side:
        return BackgroundReading(None, mask, None)
    plane = fit_plane(rgb, mask)
    # Colour change between opposite corners, the larger diagonal: a gradient of any direction
    # shows its full contrast on one of them.
    amplitude = float(max(np.linalg.norm(plane[1] + plane[2]), np.linalg.norm(plane[1] - plane[2])))
    residual = (rgb[mask] - _design(mask) @ plane).mean(axis=1)  # luminance-like residual
    sigma = float(residual.std())
    # Grid lines are the same along a whole row or column; noise averages out in profiles.
    image = np.zeros((side, side))
    image[mask] = residual
    counts_x, counts_y = mask.sum(axis=0), mask.sum(axis=1)
    ok_x, ok_y = counts_x >= 0.2 * side, counts_y >= 0.2 * side
    col_profile = image.sum(axis=0)[ok_x] / counts_x[ok_x]
    row_profile = image.sum(axis=1)[ok_y] / counts_y[ok_y]
    ratio = 0.0
    if sigma > 1e-6 and col_profile.size > 2 and row_profile.size > 2:
        ratio = float((col_profile.var() + row_profile.var()) / (sigma ** 2))
    if sigma >= STRUCTURE_SIGMA:
        kind = "grid" if ratio >= GRID_PROFILE_RATIO else "noise"
    else:
        kind = "gradient" if amplitude >= GRADIENT_AMPLITUDE else "plain"
    return BackgroundReading(kind, mask, plane, amplitude, sigma, ratio)


def score_background(expected, reading: BackgroundReading, side: int,
                     reference_kind: str | None = None) -> dict[str, float]:
    """kind: 1 when the read kind is the expected one (or what a perfect rendering reads as at
    this resolution); colour: how far the fitted colour plane lies from the plane fitted to
    the expected background over the same pixels (full credit within 12 levels, none past 42)."""
    if reading.kind is None or reading.plane is None:
        return {"background": 0.0, "background_kind": 0.0, "background_colour": 0.0}
    kind = 1.0 if reading.kind in (expected.kind, reference_kind) else 0.0
    reference = render_background(expected, side)
    reference_plane = fit_plane(reference, reading.mask)
    design = _design(reading.mask)
    gap = np.linalg.norm(design @ (reading.plane - reference_plane), axis=1).mean()
    colour = float(np.clip(1.0 - (gap - 12.0) / 30.0, 0.0, 1.0))
    return {"background": 0.5 * kind + 0.5 * colour, "background_kind": kind, "background_colour": colour}


# ------------------------------------------------------------------ analysis
@dataclass
class Analysis:
    side: int
    rgb: np.ndarray
    labels: np.ndarray
    blobs: list[Blob]
    background: BackgroundReading


MAX_ANALYSED_BLOBS = 12


def analyse_image(image: Any) -> Analysis:
    """Read an image into blobs and a background (see the module docstring). Never raises on pixels."""
    rgb = to_analysis_array(image)
    labels = classify_pixels(rgb)
    blobs = find_blobs(rgb, labels)
    analysed = 0
    for blob in blobs:
        if blob.clutter:
            continue
        if analysed >= MAX_ANALYSED_BLOBS:
            blob.clutter = True  # counted as extra, not matched
            continue
        fit_shape(blob, rgb.shape[0])
        fit_pattern(blob, rgb, labels)
        analysed += 1
    return Analysis(rgb.shape[0], rgb, labels, blobs, read_background(rgb, labels, blobs))


# ----------------------------------------------------------------- scoring
def _clip01(x: float) -> float:
    return float(min(1.0, max(0.0, x)))


def cell_score(centroid: tuple[float, float], cell: int, side: int) -> float:
    """1 within 0.35 cell of the cell centre (Chebyshev), 0.5 on the cell border, 0 past 0.65."""
    step = side / GRID_SIDE
    dx = centroid[0] / step - (cell % GRID_SIDE + 0.5)
    dy = centroid[1] / step - (cell // GRID_SIDE + 0.5)
    return _clip01((0.65 - max(abs(dx), abs(dy))) / 0.3)


def colour_score(blob: Blob, colour: str) -> float:
    total = sum(blob.colour_counts.values())
    if total == 0:
        return 0.0
    return _clip01((blob.colour_counts.get(colour, 0) / total - 0.25) / 0.5)


def _contrast_score(own: float, best_other: float, margin: float) -> float:
    return _clip01(0.5 + (own - best_other) / (2 * margin))


# ------------------------------------------------------ what is readable
SHAPE_RESOLUTION = 0.015  # a rival shape must read this much worse on a perfect rendering
PATTERN_RESOLUTION = 0.05
PATTERNED: tuple[str, ...] = tuple(p for p in PATTERNS if p != "solid")


@dataclass(frozen=True)
class Readable:
    """What the judge can tell apart for one expected entity at the judged resolution, measured
    by reading a perfect rendering of the expected scene at that resolution. The judge never
    asks more of an image than it can read from a perfect one: at 32 px a small circle and a
    small hexagon are the same few pixels, and a small entity's pattern is not drawn at all."""

    shape_iou: float  # the perfect rendering's IoU with its own shape
    shape_rivals: tuple[str, ...]  # shapes it reads clearly worse than its own
    pattern_iou: float  # ... with its own pattern (0 for solid)
    pattern_rivals: tuple[str, ...] | None  # None: the pattern cannot be seen at this size
    radius: float | None = None  # radius the judge measures on the perfect rendering, in px
    visible: bool = True  # False: not even found on the perfect rendering (tiny, at low res)


ALL_READABLE = Readable(1.0, tuple(SHAPES), 1.0, PATTERNED)
INVISIBLE = Readable(1.0, tuple(SHAPES), 1.0, PATTERNED, None, False)


def _reference_blob(entity: PlacedEntity, analysis: Analysis) -> Blob | None:
    best, best_score = None, 0.0
    for blob in analysis.blobs:
        if blob.clutter or blob.colour != entity.entity.colour:
            continue
        score = cell_score(blob.centroid, entity.cell, analysis.side)
        if score > best_score:
            best, best_score = blob, score
    return best


@lru_cache(maxsize=512)
def _readable_cached(scene_json: str, side: int) -> tuple[tuple[Readable, ...], str | None, int]:
    scene = Scene.from_dict(json.loads(scene_json))
    reference = analyse_image(render_scene_array(scene, side))
    out = []
    used: set[int] = set()
    for e in scene.entities:
        blob = _reference_blob(e, reference)
        if blob is None or blob.shape is None:
            out.append(INVISIBLE)
            continue
        used.add(id(blob))
        own = blob.shape_iou[e.entity.shape]
        shape_rivals = tuple(k for k in SHAPES if k != e.entity.shape and blob.shape_iou[k] < own - SHAPE_RESOLUTION)
        if e.entity.pattern == "solid":
            pattern_iou, pattern_rivals = 0.0, PATTERNED
        elif blob.ink_share < SOLID_INK_SHARE + 0.04:
            pattern_iou, pattern_rivals = 0.0, None
        else:
            pattern_iou = blob.pattern_iou.get(e.entity.pattern, 0.0)
            pattern_rivals = tuple(k for k in PATTERNED if k != e.entity.pattern
                                   and blob.pattern_iou.get(k, 0.0) < pattern_iou - PATTERN_RESOLUTION)
        out.append(Readable(own, shape_rivals, pattern_iou, pattern_rivals, blob.radius))
    # What a perfect rendering shows beyond its entities (a fringe read as a piece at 32 px) is
    # not held against an image either.
    extras = sum(1 for b in reference.blobs if id(b) not in used)
    return tuple(out), reference.background.kind, extras


def readable(scene: Scene, side: int) -> tuple[tuple[Readable, ...], str | None, int]:
    """Per entity, what can be judged at `side` px; the background kind and the number of extra
    entities read from a perfect rendering (cached: a benchmark judges each scene once)."""
    return _readable_cached(json.dumps(scene.to_dict(), sort_keys=True), side)


def shape_score(blob: Blob, shape: str, read: Readable = ALL_READABLE) -> float | None:
    """Its own shape must fit better than every rival (by 0.02 IoU for full credit) and nearly
    as well as on a perfect rendering (full credit within 0.15, none 0.45 below)."""
    if not read.shape_rivals:
        return None
    own = blob.shape_iou.get(shape, 0.0)
    other = max(blob.shape_iou.get(k, 0.0) for k in read.shape_rivals)
    hi = min(read.shape_iou, 1.0) - 0.15
    return min(_contrast_score(own, other, 0.02), _clip01((own - (hi - 0.3)) / 0.3))


def pattern_score(blob: Blob, pattern: str, read: Readable = ALL_READABLE) -> float | None:
    """Solid: full credit up to 4% ink, none from 12%. Patterned: ink present (the same ramp
    reversed), its ink correlation with its own pattern above every rival (by 0.1 for full
    credit) and not far below a perfect rendering's (full credit within 0.3, none 0.6 below)."""
    solid_like = _clip01(1.0 - (blob.ink_share - SOLID_INK_SHARE) / 0.08)
    if pattern == "solid":
        return solid_like
    if read.pattern_rivals is None:
        return None
    own = blob.pattern_iou.get(pattern, 0.0)
    score = 1.0 - solid_like
    if read.pattern_rivals:
        other = max(blob.pattern_iou.get(k, 0.0) for k in read.pattern_rivals)
        score = min(score, _contrast_score(own, other, 0.1))
    hi = min(read.pattern_iou, 1.0) - 0.3
    return min(score, _clip01((own - (hi - 0.3)) / 0.3))


SIZE_LOG_GAP = math.log(SIZE_FRACTION["large"] / SIZE_FRACTION["small"])


def size_score(blob: Blob, size: str, side: int, read: Readable = ALL_READABLE,
               shape: str | None = None) -> float:
    """Radius against the radius measured the same way on a perfect rendering (so measurement
    bias cancels): full credit within a quarter of the small/large gap (in log radius), 0.5
    half-way, 0 beyond three quarters. The radius follows from the area and a shape: the
    expected one when it fits about as well as the best (shape doubts must not become size
    errors), else the best-fitting one (a star drawn as a big circle is a wrong shape of the
    right size)."""
    expected = read.radius or SIZE_FRACTION[size] * side / GRID_SIDE / 2.0
    radius = blob.radius
    if shape is not None and blob.shape_iou and blob.shape_iou.get(shape, 0.0) >= max(blob.shape_iou.values()) - 0.05:
        radius = math.sqrt(blob.area / unit_area(shape))
    off = abs(math.log(max(radius, 1e-6) / expected))
    return _clip01(1.0 - (off - SIZE_LOG_GAP / 4) / (SIZE_LOG_GAP / 2))


def _weighted(scores: dict[str, float | None]) -> float:
    judged = [k for k in ENTITY_WEIGHTS if scores.get(k) is not None]
    return sum(ENTITY_WEIGHTS[k] * scores[k] for k in judged) / sum(ENTITY_WEIGHTS[k] for k in judged)


def entity_scores(expected: PlacedEntity, blob: Blob, side: int,
                  read: Readable = ALL_READABLE) -> dict[str, float | None]:
    """Sub-scores of one blob as one expected entity; None marks what cannot be read at this
    resolution (its weight goes to the rest)."""
    scores: dict[str, float | None] = {
        "present": 1.0,
        "cell": cell_score(blob.centroid, expected.cell, side),
        "colour": colour_score(blob, expected.entity.colour),
        "shape": shape_score(blob, expected.entity.shape, read),
        "pattern": pattern_score(blob, expected.entity.pattern, read),
        "size": size_score(blob, expected.size, side, read, expected.entity.shape),
    }
    scores["total"] = _weighted(scores)
    return scores


def _missing(read: Readable, pattern: str) -> dict[str, float | None]:
    scores: dict[str, float | None] = {k: 0.0 for k in ENTITY_WEIGHTS}
    if not read.shape_rivals:
        scores["shape"] = None
    if pattern != "solid" and read.pattern_rivals is None:
        scores["pattern"] = None
    scores["total"] = 0.0
    return scores


def _admissible(expected: PlacedEntity, scores: dict[str, float | None]) -> bool:
    # A blob stands for an entity only if it has its colour or sits at its cell.
    return (scores["colour"] or 0.0) >= 0.5 or (scores["cell"] or 0.0) > 0.0


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def entity_exact(scores: dict[str, float | None]) -> bool:
    """Matched, and every sub-score the judge can read at this size past its threshold."""
    if (scores.get("present") or 0.0) < 1.0:
        return False
    return all(scores.get(k) is None or scores[k] >= EXACT_THRESHOLDS[k]
               for k in ("cell", "colour", "shape", "pattern", "size"))


def image_exact(per_entity: list[dict[str, Any]], background: dict[str, float], n_extra: int) -> bool:
    """Every scored entity exact, the background's kind and colour right, nothing extra."""
    return (n_extra == 0 and background["background_kind"] >= 1.0
            and background["background_colour"] >= EXACT_THRESHOLDS["background_colour"]
            and all(p["exact"] for p in per_entity if p.get("readable", True)))


def score_scene(expected: Scene, analysis: Analysis) -> dict[str, Any]:
    """Every sub-score of an analysed image against the expected scene, and the weighted total."""
    side = analysis.side
    reads, reference_kind, reference_extras = readable(expected, side)
    candidates = [b for b in analysis.blobs if not b.clutter]
    n_exp = len(expected.entities)
    table = [[entity_scores(e, b, side, reads[i]) for b in candidates] for i, e in enumerate(expected.entities)]
    # Columns: blobs, then one "missing" column per entity. Inadmissible pairs score below
    # missing so that missing wins over them. The assignment maximizes the summed entity score.
    gain = np.full((n_exp, len(candidates) + n_exp), -1.0)
    for i, row in enumerate(table):
        for j, scores in enumerate(row):
            if _admissible(expected.entities[i], scores):
                gain[i, j] = scores["total"]
        gain[i, len(candidates) + i] = 0.0
    rows, cols = linear_sum_assignment(gain, maximize=True)
    assigned = {int(r): int(c) for r, c in zip(rows, cols) if c < len(candidates) and gain[r, c] >= 0}
    per_entity = []
    for i, e in enumerate(expected.entities):
        j = assigned.get(i)
        scores = dict(table[i][j]) if j is not None else _missing(reads[i], e.entity.pattern)
        item = {"expected": e.to_dict(), "scores": {k: _round(v) for k, v in scores.items()},
                "found": candidates[j].summary(side) if j is not None else None,
                "exact": entity_exact(scores)}
        if not reads[i].visible:
            item["readable"] = False  # matched so it is not an extra, but not scored
        per_entity.append(item)
    matched = set(assigned.values())
    n_extra = sum(1 for b in analysis.blobs if b.clutter) + sum(1 for j in range(len(candidates)) if j not in matched)
    n_extra = max(0, n_extra - reference_extras)
    # An image with nothing in it earns nothing for having no extras.
    visible = any(r.visible for r in reads)
    no_extra = 1.0 / (1.0 + 2.0 * n_extra) if (matched or not visible) else 0.0  # one extra: 1/3
    background = score_background(expected.background, analysis.background, side, reference_kind)
    scored = [p for p in per_entity if p.get("readable", True)]
    sub: dict[str, float | None] = {}
    for k in ENTITY_WEIGHTS:
        values = [p["scores"][k] for p in scored if p["scores"][k] is not None]
        sub[k] = float(np.mean(values)) if values else None
    entities = float(np.mean([p["scores"]["total"] for p in scored])) if scored else None
    parts = {"entities": entities, "background": background["background"], "no_extra": no_extra}
    weight = sum(SCENE_WEIGHTS[k] for k, v in parts.items() if v is not None)
    total = sum(SCENE_WEIGHTS[k] * v for k, v in parts.items() if v is not None) / weight
    return {
        "total": round(total, 4),
        "exact": image_exact(per_entity, background, n_extra),
        **{k: _round(v) for k, v in sub.items()},
        "entities": _round(entities),
        **{k: round(v, 4) for k, v in background.items()},
        "no_extra": round(no_extra, 4),
        "n_extra": n_extra,
        "per_entity": per_entity,
        "background_read": analysis.background.summary(),
        "side": side,
    }


def judge_image(scene: Scene | dict, image: Any) -> dict[str, Any]:
    """Score one image (PIL or array, any size or mode) against a scene spec (Scene or its dict)."""
    if isinstance(scene, dict):
        scene = Scene.from_dict(scene)
    return score_scene(scene, analyse_image(image))
