"""The ToyWorld renderer: spec -> pixels, deterministic, anti-aliased, at any resolution.

Colours (spec.py) are chosen so that a computer can separate them from pixels alone:
- entity colours are saturated (chroma >= 0.55) with hues at least 28 degrees apart, plus white;
- backgrounds are muted (chroma <= 0.19) and, noise and grid lines included, stay within values
  0.27..0.80, so no background pixel looks like an entity colour, like white (value >= 0.86) or
  like pattern ink (value < 0.2);
- patterns are drawn in near-black ink kept PATTERN_INSET * R inside the outline, so the edge of
  every entity is its own colour.

Geometry lives in the unit circle: every shape fits inside radius 1 around its area centroid,
which is placed at the cell centre. A shape drawn at radius R (pixels) spans about 2R pixels.
Anti-aliasing is area coverage sampled exactly at sub-pixel centres (then a box
filter), so the same spec gives the same pixels on every run.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from PIL import Image

from tapestry.toyworld.spec import (
    BACKGROUND_RGB,
    ENTITY_RGB,
    GRID_SIDE,
    INK_RGB,
    Background,
    Entity,
    Scene,
)

# Entity diameter as a fraction of the cell side. Large leaves a gap of 14% of a cell between
# neighbours (1.5 px at 32 px), so entities of one colour in adjacent cells never touch.
SIZE_FRACTION: dict[str, float] = {"small": 0.6, "large": 0.86}
NOISE_LATTICE = 16  # noise backgrounds: random values on a 16x16 lattice, smoothly interpolated
NOISE_AMPLITUDE = 24.0  # +- levels of luminance noise
GRID_LINES = 8  # grid backgrounds: lines at k/8 of the side
GRID_LINE_WIDTH = 1 / 40  # of the side
GRID_LINE_CONTRAST = 40.0  # levels; lines lighter on dark bases, darker on light ones
PATTERN_INSET = 0.15  # ink stays this far (in units of R) inside the outline


# ------------------------------------------------------------------ geometry
def _regular(n: int, radius: float = 1.0, phase: float = -90.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(phase + 360.0 * k / n)),
             radius * math.sin(math.radians(phase + 360.0 * k / n))) for k in range(n)]


def _star(points: int = 5, inner: float = 0.48) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = math.radians(-90.0 + 180.0 * k / points)
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _heart(n: int = 72) -> list[tuple[float, float]]:
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x, y))
    return pts


def _cross(half_width: float = 0.3, length: float = 0.95) -> list[tuple[float, float]]:
    w, l = half_width, length
    return [(-w, -l), (w, -l), (w, -w), (l, -w), (l, w), (w, w), (w, l), (-w, l), (-w, w), (-l, w),
            (-l, -w), (-w, -w)]


def _polygon_centroid(pts: np.ndarray) -> tuple[np.ndarray, float]:
    x, y = pts[:, 0], pts[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2.0
    cx = ((x + xn) * cross).sum() / (6.0 * area)
    cy = ((y + yn) * cross).sum() / (6.0 * area)
    return np.array([cx, cy]), abs(area)


@cache
def unit_polygon(shape: str) -> np.ndarray:
    """The outline of `shape` as [K, 2] points (image axes, y down), centroid at the origin,
    scaled so that every point lies within radius 1."""
    raw = {
        "circle": lambda: _regular(96),
        "square": lambda: [(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)],
        "triangle": lambda: _regular(3),
        "star": lambda: _star(),
        "diamond": lambda: [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)],
        "hexagon": lambda: _regular(6, phase=0.0),
        "cross": lambda: _cross(),
        "heart": lambda: _heart(),
    }[shape]()
    pts = np.asarray(raw, dtype=np.float64)
    centre, _ = _polygon_centroid(pts)
    pts = pts - centre
    pts = pts / np.sqrt((pts ** 2).sum(axis=1)).max()
    pts.flags.writeable = False
    return pts


@cache
def unit_area(shape: str) -> float:
    """Area of the unit shape (radius-1 frame); the judge turns a measured area into a radius."""
    return _polygon_centroid(unit_polygon(shape))[1]


# How large the pattern is drawn inside each shape (in units of R), so that stripes, dots and
# rings sit in the body of the shape rather than in its thin points.
PATTERN_SCALE: dict[str, float] = {"circle": 1.0, "square": 0.95, "triangle": 0.72, "star": 0.72,
                                   "diamond": 0.72, "hexagon": 0.95, "cross": 0.8, "heart": 0.82}


def cell_centre(cell: int, side: float) -> tuple[float, float]:
    """Centre of `cell` in continuous pixel coordinates (pixel i covers [i, i+1))."""
    step = side / GRID_SIDE
    return ((cell % GRID_SIDE + 0.5) * step, (cell // GRID_SIDE + 0.5) * step)


def entity_radius(size: str, side: float) -> float:
    return SIZE_FRACTION[size] * side / GRID_SIDE / 2.0


def supersample_factor(side: int) -> int:
    """Sub-pixels per pixel and axis: at least 4, and a canvas of at least 256 sub-pixels."""
    return max(4, math.ceil(256 / max(side, 1)))


def _rotate(pts: np.ndarray, degrees: float) -> np.ndarray:
    # Counter-clockwise on screen: with y pointing down, (1, 0) goes to (0, -1) at 90 degrees.
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return np.stack([pts[:, 0] * c + pts[:, 1] * s, -pts[:, 0] * s + pts[:, 1] * c], axis=1)


class Canvas:
    """Sub-pixel sample points over the pixel box [x0, x0+w) x [y0, y0+h), `ss` per pixel and axis.

    Shapes are rasterized exactly at sub-pixel centres (scanline parity for polygons, distance
    for discs) rather than with PIL's drawing, which rounds vertices to whole sub-pixels."""

    def __init__(self, x0: int, y0: int, w: int, h: int, ss: int):
        self.x0, self.y0, self.w, self.h, self.ss = x0, y0, w, h, ss
        self.xs = x0 + (np.arange(w * ss) + 0.5) / ss  # [W] sub-pixel centres, pixel units
        self.ys = y0 + (np.arange(h * ss) + 0.5) / ss  # [H]

    def polygons(self, pts: np.ndarray) -> np.ndarray:
        """[N, H, W] bool: sub-pixel centres inside each of N polygons ([N, K, 2] points, pixel
        units), even-odd rule. Batched because the judge draws many candidate poses at once."""
        H, W = self.ys.size, self.xs.size
        n = pts.shape[0]
        xa = (pts[..., 0] - self.x0) * self.ss  # [N, K]
        ya = (pts[..., 1] - self.y0) * self.ss
        xb = np.concatenate([xa[:, 1:], xa[:, :1]], axis=1)
        yb = np.concatenate([ya[:, 1:], ya[:, :1]], axis=1)
        centres = np.arange(H) + 0.5  # rows, in sub-pixel units
        lo, hi = np.minimum(ya, yb), np.maximum(ya, yb)
        # [N, H, K]; half-open so a horizontal edge never crosses and a vertex counts once
        crosses = (centres[None, :, None] >= lo[:, None, :]) & (centres[None, :, None] < hi[:, None, :])
        which, rows, edges = np.nonzero(crosses)
        if rows.size == 0:
            return np.zeros((n, H, W), dtype=bool)
        y0, y1 = ya[which, edges], yb[which, edges]
        x0, x1 = xa[which, edges], xb[which, edges]
        x = x0 + (centres[rows] - y0) / (y1 - y0) * (x1 - x0)
        # A crossing at x flips every sub-pixel whose centre j + 0.5 lies right of it.
        first = np.clip(np.floor(x - 0.5).astype(np.int64) + 1, 0, W)
        flips = np.bincount((which * H + rows) * (W + 1) + first, minlength=n * H * (W + 1))
        return (np.cumsum(flips.reshape(n, H, W + 1), axis=2)[..., :W] & 1).astype(bool)

    def polygon(self, pts: np.ndarray) -> np.ndarray:
        """[H, W] bool: sub-pixel centres inside one polygon ([K, 2] points)."""
        return self.polygons(pts[None])[0]

    def polygon_coverages(self, pts: np.ndarray) -> np.ndarray:
        """[N, h, w] float32 coverage of each pixel by each of N simple polygons ([N, K, 2]):
        exact along x (the inside length of each sub-pixel row within the pixel), sampled at
        `ss` rows per pixel along y. Cheaper and finer than counting sub-pixels."""
        H, w = self.ys.size, self.w
        n = pts.shape[0]
        xa = pts[..., 0] - self.x0  # [N, K], pixel units
        ya = (pts[..., 1] - self.y0) * self.ss  # sub-pixel rows
        xb = np.concatenate([xa[:, 1:], xa[:, :1]], axis=1)
        yb = np.concatenate([ya[:, 1:], ya[:, :1]], axis=1)
        centres = np.arange(H) + 0.5
        lo, hi = np.minimum(ya, yb), np.maximum(ya, yb)
        crosses = (centres[None, :, None] >= lo[:, None, :]) & (centres[None, :, None] < hi[:, None, :])
        which, rows, edges = np.nonzero(crosses)
        if rows.size == 0:
            return np.zeros((n, self.h, w), dtype=np.float32)
        y0, y1 = ya[which, edges], yb[which, edges]
        x0, x1 = xa[which, edges], xb[which, edges]
        x = x0 + (centres[rows] - y0) / (y1 - y0) * (x1 - x0)
        # Winding: an edge going down enters the inside to its right, going up leaves it (the
        # sign cancels for the other orientation through abs below).
        sign = np.where(y1 > y0, 1.0, -1.0)
        col = np.floor(x).astype(np.int64)
        base = (which * H + rows) * (w + 1)
        # Inside to the right of x: the part of column `col` right of x, and every later column.
        partial = (col >= 0) & (col < w)
        acc = np.bincount(base[partial] + col[partial], weights=sign[partial] * (1.0 - (x[partial] - col[partial])),
                          minlength=n * H * (w + 1))
        later = np.bincount(base + np.clip(col + 1, 0, w), weights=sign, minlength=n * H * (w + 1))
        rows_cov = acc.reshape(n, H, w + 1) + np.cumsum(later.reshape(n, H, w + 1), axis=2)
        rows_cov = np.abs(rows_cov[..., :w])
        return rows_cov.reshape(n, self.h, self.ss, w).mean(axis=2).astype(np.float32)

    def disc(self, centre: tuple[float, float], radius: float) -> np.ndarray:
        dx = self.xs[None, :] - centre[0]
        dy = self.ys[:, None] - centre[1]
        return dx * dx + dy * dy <= radius * radius

    def discs(self, centres: np.ndarray, radius: float) -> np.ndarray:
        """[N, H, W]: the union of M discs for each of N layouts ([N, M, 2] centres)."""
        dx = self.xs[None, None, None, :] - centres[..., 0, None, None]
        dy = self.ys[None, None, :, None] - centres[..., 1, None, None]
        return (dx * dx + dy * dy <= radius * radius).any(axis=1)

    def bands(self, centre: tuple[float, float], degrees: np.ndarray, period: float, half_width: float,
              offsets: np.ndarray | None = None) -> np.ndarray:
        """[N, H, W] parallel bars of half-width `half_width` every `period`, one through `centre`
        shifted by `offsets` (in periods); at rotation 0 the bars are vertical, and they turn with
        the shape."""
        a = np.radians(np.asarray(degrees, dtype=np.float64))[:, None, None]
        # Coordinate along the shape's own x axis (see _rotate).
        u = (self.xs[None, None, :] - centre[0]) * np.cos(a) - (self.ys[None, :, None] - centre[1]) * np.sin(a)
        if offsets is not None:
            u = u - np.asarray(offsets, dtype=np.float64)[:, None, None] * period
        return np.abs(u - period * np.round(u / period)) <= half_width

    def coverage(self, mask: np.ndarray) -> np.ndarray:
        """[..., h, w] float32 in [0, 1]: the share of each pixel's sub-pixels set in `mask`."""
        lead = mask.shape[:-2]
        blocks = mask.reshape(*lead, self.h, self.ss, self.w, self.ss)
        return blocks.sum(axis=(-3, -1), dtype=np.float32) / float(self.ss * self.ss)


def entity_box(centre: tuple[float, float], radius: float, side: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, w, h) that holds an entity, clipped to the image."""
    x0 = max(0, math.floor(centre[0] - radius) - 1)
    y0 = max(0, math.floor(centre[1] - radius) - 1)
    x1 = min(side, math.ceil(centre[0] + radius) + 1)
    y1 = min(side, math.ceil(centre[1] + radius) + 1)
    return x0, y0, max(0, x1 - x0), max(0, y1 - y0)


def shape_outline(shape: str, centre: tuple[float, float], radius: float, rotation: float) -> np.ndarray:
    return _rotate(np.asarray(unit_polygon(shape)), rotation) * radius + np.asarray(centre)


def shape_outlines(shape: str, centre: tuple[float, float], radius: float, rotations) -> np.ndarray:
    """[N, K, 2] outlines of `shape` at each rotation."""
    unit = np.asarray(unit_polygon(shape))
    a = np.radians(np.asarray(rotations, dtype=np.float64))[:, None]
    c, s = np.cos(a), np.sin(a)
    x = unit[None, :, 0] * c + unit[None, :, 1] * s
    y = -unit[None, :, 0] * s + unit[None, :, 1] * c
    return np.stack([x * radius + centre[0], y * radius + centre[1]], axis=-1)


def shape_coverages(shape: str, centre: tuple[float, float], radius: float, rotations,
                    box: tuple[int, int, int, int], ss: int) -> np.ndarray:
    """Coverage [N, h, w] of the silhouette of `shape` at each rotation inside the pixel box."""
    canvas = Canvas(*box, ss)
    return canvas.polygon_coverages(shape_outlines(shape, centre, radius, rotations))


def shape_coverage(shape: str, centre: tuple[float, float], radius: float, rotation: float,
                   box: tuple[int, int, int, int], ss: int) -> np.ndarray:
    """Coverage [h, w] of the silhouette of `shape` inside the pixel box `box`."""
    return shape_coverages(shape, centre, radius, [rotation], box, ss)[0]


DOT_LAYOUT = np.array([[0.0, 0.0], [0.56, 0.0], [-0.56, 0.0], [0.0, 0.56], [0.0, -0.56]])  # quincunx


def pattern_masks(canvas: Canvas, pattern: str, shape: str, centre: tuple[float, float], radius: float,
                  rotations, phases=None) -> np.ndarray:
    """[N, H, W] bool sub-pixel masks of a pattern's ink (before clipping to the shape), one per
    rotation. `phases` shift stripes across themselves (in periods); the renderer uses 0.

    striped: bars a quarter of a period wide either side of the centre line, one through the
    centre; dotted: a quincunx (one dot in the middle, four along the shape's axes); ringed: an
    annulus. All scale with PATTERN_SCALE[shape] * radius and turn with the shape."""
    rotations = np.atleast_1d(np.asarray(rotations, dtype=np.float64))
    rho = PATTERN_SCALE[shape] * radius
    n = rotations.size
    if pattern == "striped":
        return canvas.bands(centre, rotations, 0.56 * rho, 0.14 * rho, phases)
    if pattern == "dotted":
        a = np.radians(rotations)[:, None]
        c, s = np.cos(a), np.sin(a)
        unit = DOT_LAYOUT * rho
        x = unit[None, :, 0] * c + unit[None, :, 1] * s + centre[0]
        y = -unit[None, :, 0] * s + unit[None, :, 1] * c + centre[1]
        return canvas.discs(np.stack([x, y], axis=-1), 0.22 * rho)
    if pattern == "ringed":
        ring = canvas.disc(centre, 0.64 * rho) & ~canvas.disc(centre, 0.34 * rho)
        return np.broadcast_to(ring, (n, *ring.shape))
    return np.zeros((n, canvas.ys.size, canvas.xs.size), dtype=bool)


def pattern_mask(canvas: Canvas, pattern: str, shape: str, centre: tuple[float, float],
                 radius: float, rotation: float) -> np.ndarray:
    """[H, W] bool sub-pixel mask of a pattern's ink, before clipping to the shape."""
    return pattern_masks(canvas, pattern, shape, centre, radius, [rotation])[0]


def inset_mask(silhouette: np.ndarray, radius: float, ss: int) -> np.ndarray:
    """Sub-pixels at least PATTERN_INSET * R inside the outline: where ink may go, so that every
    silhouette edge is entity colour."""
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(np.pad(silhouette, 1))[1:-1, 1:-1]
    return depth > PATTERN_INSET * radius * ss


def entity_layers(entity: Entity, centre: tuple[float, float], radius: float, rotation: float,
                  box: tuple[int, int, int, int], ss: int) -> tuple[np.ndarray, np.ndarray]:
    """(silhouette coverage, ink coverage) of one entity in `box`; ink lies inside the silhouette."""
    canvas = Canvas(*box, ss)
    outline = shape_outline(entity.shape, centre, radius, rotation)
    coverage = canvas.polygon_coverages(outline[None])[0]
    if entity.pattern == "solid":
        return coverage, np.zeros_like(coverage)
    inside = canvas.polygon(outline)  # sub-pixels, for the inset that keeps ink off the edge
    ink = pattern_mask(canvas, entity.pattern, entity.shape, centre, radius, rotation)
    ink = ink & inset_mask(inside, radius, ss)
    return coverage, np.minimum(canvas.coverage(ink), coverage)


def paint_entity(canvas_rgb: np.ndarray, entity: Entity, centre: tuple[float, float], radius: float,
                 rotation: float, ss: int) -> None:
    """Composite one entity over `canvas_rgb` ([S, S, 3] float32, modified in place)."""
    side = canvas_rgb.shape[0]
    box = entity_box(centre, radius, side)
    x0, y0, w, h = box
    if w == 0 or h == 0:
        return
    silhouette, ink = entity_layers(entity, centre, radius, rotation, box, ss)
    colour = np.asarray(ENTITY_RGB[entity.colour], dtype=np.float32)
    ink_rgb = np.asarray(INK_RGB, dtype=np.float32)
    fill = (silhouette - ink)[..., None] * colour + ink[..., None] * ink_rgb
    region = canvas_rgb[y0:y0 + h, x0:x0 + w]
    region *= (1.0 - silhouette)[..., None]
    region += fill


# -------------------------------------------------------------- backgrounds
def _interval_coverage(side: int, centres: np.ndarray, width: float) -> np.ndarray:
    """[side] fraction of each pixel [i, i+1) covered by the union of [c - w/2, c + w/2]."""
    lo = np.arange(side, dtype=np.float64)[:, None]
    overlap = np.clip(np.minimum(lo + 1, centres[None, :] + width / 2)
                      - np.maximum(lo, centres[None, :] - width / 2), 0.0, None)
    return np.clip(overlap.sum(axis=1), 0.0, 1.0)


def render_background(background: Background, side: int) -> np.ndarray:
    """[side, side, 3] float32 in 0..255."""
    base = np.asarray(BACKGROUND_RGB[background.colours[0]], dtype=np.float32)
    if background.kind == "plain":
        return np.broadcast_to(base, (side, side, 3)).astype(np.float32)
    centres = (np.arange(side, dtype=np.float32) + 0.5) / side  # pixel centres in [0, 1]
    if background.kind == "gradient":
        end = np.asarray(BACKGROUND_RGB[background.colours[1]], dtype=np.float32)
        xs, ys = centres[None, :], centres[:, None]
        t = {"horizontal": xs + 0 * ys, "vertical": ys + 0 * xs, "diagonal": (xs + ys) / 2}[background.direction]
        return ((1 - t)[..., None] * base + t[..., None] * end).astype(np.float32)
    if background.kind == "grid":
        lines = np.arange(1, GRID_LINES) * side / GRID_LINES
        cov = _interval_coverage(side, lines, GRID_LINE_WIDTH * side).astype(np.float32)
        union = 1 - (1 - cov[None, :]) * (1 - cov[:, None])
        sign = 1.0 if base.mean() < 128 else -1.0
        return (base + sign * GRID_LINE_CONTRAST * union[..., None]).astype(np.float32)
    # noise: a seeded lattice, smoothly interpolated, so a spec looks alike at every resolution
    lattice = np.random.default_rng(background.seed).uniform(-1, 1, (NOISE_LATTICE, NOISE_LATTICE))
    field_image = Image.fromarray(lattice.astype(np.float32), mode="F").resize((side, side), Image.BICUBIC)
    values = np.clip(np.asarray(field_image, dtype=np.float32), -1.0, 1.0)
    return (base + NOISE_AMPLITUDE * values[..., None]).astype(np.float32)


# ------------------------------------------------------------------- scenes
MAX_SIDE = 2048


def render_layers(background: Background, entities, side: int = 64) -> np.ndarray:
    """[side, side, 3] uint8 of a background and any placed entities, without the Scene rules
    (the self-test uses it to draw images no valid scene describes: empty, or five entities)."""
    if isinstance(side, bool) or not isinstance(side, int) or not 8 <= side <= MAX_SIDE:
        from tapestry.toyworld.spec import SpecError

        raise SpecError(f"resolution must be an integer number of pixels in 8..{MAX_SIDE}, got {side!r}")
    canvas = render_background(background, side).copy()
    ss = supersample_factor(side)
    for placed in entities:
        paint_entity(canvas, placed.entity, cell_centre(placed.cell, side),
                     entity_radius(placed.size, side), placed.rotation, ss)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def render_scene_array(scene: Scene, side: int = 64) -> np.ndarray:
    """[side, side, 3] uint8; same spec and side -> same pixels."""
    return render_layers(scene.background, scene.entities, side)


def render_scene(scene: Scene, side: int = 64) -> Image.Image:
    """The scene as a `side` x `side` RGB image; same spec and side -> same pixels."""
    return Image.fromarray(render_scene_array(scene, side), mode="RGB")


def entity_mask(scene: Scene, height: int, width: int) -> np.ndarray:
    """[height, width] bool over a coarse grid laid on the image (a latent grid): True where a
    grid cell overlaps an entity's square: its centre ± its radius (`entity_box` without its
    one-pixel margin).

    Training weighs the flow loss there (`data.focus_weight`): an entity covers a few per cent of
    a scene, so an unweighted loss barely rewards drawing its shape right (issue 20)."""
    mask = np.zeros((height, width), dtype=bool)
    for placed in scene.entities:
        cx, cy = cell_centre(placed.cell, 1.0)
        r = entity_radius(placed.size, 1.0)
        x0, x1 = math.floor((cx - r) * width), math.ceil((cx + r) * width)
        y0, y1 = math.floor((cy - r) * height), math.ceil((cy + r) * height)
        mask[max(0, y0) : min(height, y1), max(0, x0) : min(width, x1)] = True
    return mask
