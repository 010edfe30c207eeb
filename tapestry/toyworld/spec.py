"""The ToyWorld spec: typed, validated, JSON-serializable descriptions of scenes (DESIGN §10).

An *entity* is an identity (shape × colour × pattern = 256 of them). A *placed entity* puts one on
a cell of the 3×3 grid with a size and a rotation. A *scene* is a background plus 1–4 placed
entities on distinct cells. Specs travel inside Document metadata (`to_dict` / `from_dict`), so
`from_dict` is an edge: it names the exact field and the allowed values when something is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from tapestry.errors import TapestryError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "heart")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "ringed")
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "grid", "gradient", "noise")
# Muted tones only: every background pixel stays far from the entity colours (see render.py).
BACKGROUND_COLOURS: tuple[str, ...] = ("stone", "slate", "sand", "moss", "clay", "dusk", "fog", "charcoal")
GRADIENT_DIRECTIONS: tuple[str, ...] = ("horizontal", "vertical", "diagonal")
# The world's colours. Entity colours are saturated (chroma >= 0.55) with hues at least 28
# degrees apart, plus white; background tones are muted (chroma <= 0.19, value 0.36..0.70) so
# that no background pixel can pass for an entity colour, for white or for pattern ink.
ENTITY_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 50),
    "orange": (245, 130, 20),
    "yellow": (235, 225, 35),
    "green": (25, 195, 55),
    "cyan": (30, 200, 215),
    "blue": (45, 85, 235),
    "purple": (155, 60, 220),
    "white": (248, 248, 248),
}
INK_RGB: tuple[int, int, int] = (22, 22, 22)  # patterns are drawn in this near-black
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "stone": (142, 142, 136),
    "slate": (96, 112, 134),
    "sand": (178, 166, 138),
    "moss": (108, 128, 92),
    "clay": (158, 128, 112),
    "dusk": (124, 98, 124),
    "fog": (160, 168, 178),
    "charcoal": (92, 92, 96),
}
# A gradient must change enough to be seen (and judged) as one: its two colours differ by at
# least this many levels (RGB distance).
GRADIENT_MIN_CONTRAST = 45.0


def _contrast(a: str, b: str) -> float:
    return math.dist(BACKGROUND_RGB[a], BACKGROUND_RGB[b])


GRADIENT_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (a, b) for i, a in enumerate(BACKGROUND_COLOURS) for b in BACKGROUND_COLOURS[i + 1:]
    if _contrast(a, b) >= GRADIENT_MIN_CONTRAST)
GRID_SIDE = 3
N_CELLS = GRID_SIDE * GRID_SIDE
MAX_ENTITIES = 4
# Cells in reading order: 0 1 2 / 3 4 5 / 6 7 8.
CELL_NAMES: tuple[str, ...] = (
    "top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right",
)


class SpecError(TapestryError):
    """A ToyWorld spec is invalid; the message names the field, the bad value and what is allowed."""


def _choice(value: Any, allowed: tuple[str, ...], where: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise SpecError(f"{where}: {value!r} is not allowed; choose one of {', '.join(allowed)}")
    return value


def _int(value: Any, where: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}: expected an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        upper = f"..{hi}" if hi is not None else " or more"
        raise SpecError(f"{where}: {value} is out of range (allowed {lo}{upper})")
    return value


def _object(obj: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(obj, dict):
        raise SpecError(f"{where}: expected an object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(required) - set(optional), key=str)
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))} "
                        f"(allowed: {', '.join(required + optional)})")
    missing = [k for k in required if k not in obj]
    if missing:
        raise SpecError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
    return obj


@dataclass(frozen=True)
class Entity:
    """An identity: what stays the same when an entity moves, grows or shrinks."""

    shape: str
    colour: str
    pattern: str = "solid"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "entity") -> None:
        _choice(self.shape, SHAPES, f"{where}.shape")
        _choice(self.colour, COLOURS, f"{where}.colour")
        _choice(self.pattern, PATTERNS, f"{where}.pattern")

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "pattern": self.pattern}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "entity") -> Entity:
        obj = _object(obj, where, ("shape", "colour"), ("pattern",))
        shape = _choice(obj["shape"], SHAPES, f"{where}.shape")
        colour = _choice(obj["colour"], COLOURS, f"{where}.colour")
        pattern = _choice(obj.get("pattern", "solid"), PATTERNS, f"{where}.pattern")
        return cls(shape, colour, pattern)

    def describe(self) -> str:
        """'red striped star' (solid is said 'solid' so that every attribute is stated)."""
        return f"{self.colour} {self.pattern} {self.shape}"


@dataclass(frozen=True)
class PlacedEntity:
    """An entity on the 3×3 grid. `key` names it across the frames of a story (identity)."""

    entity: Entity
    cell: int
    size: str = "large"
    rotation: float = 0.0  # degrees, counter-clockwise on screen
    key: str | None = None

    def __post_init__(self) -> None:
        self.validate()
        # One canonical spelling of each angle, so equal scenes have equal JSON.
        object.__setattr__(self, "rotation", round(float(self.rotation) % 360.0, 3) % 360.0)

    def validate(self, where: str = "entity") -> None:
        if not isinstance(self.entity, Entity):
            raise SpecError(f"{where}.entity: expected an Entity, got {type(self.entity).__name__}")
        self.entity.validate(where)
        _int(self.cell, f"{where}.cell", 0, N_CELLS - 1)
        _choice(self.size, SIZES, f"{where}.size")
        if isinstance(self.rotation, bool) or not isinstance(self.rotation, (int, float)) \
                or not math.isfinite(self.rotation):
            raise SpecError(f"{where}.rotation: expected a finite number of degrees, got {self.rotation!r}")
        if self.key is not None and (not isinstance(self.key, str) or not self.key):
            raise SpecError(f"{where}.key: expected a non-empty string or null, got {self.key!r}")

    @property
    def row(self) -> int:
        return self.cell // GRID_SIDE

    @property
    def col(self) -> int:
        return self.cell % GRID_SIDE

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.entity.to_dict(), "cell": self.cell, "size": self.size,
                               "rotation": self.rotation}
        if self.key is not None:
            out["key"] = self.key
        return out

    @classmethod
    def from_dict(cls, obj: Any, where: str = "entity") -> PlacedEntity:
        obj = _object(obj, where, ("shape", "colour", "cell"), ("pattern", "size", "rotation", "key"))
        entity = Entity.from_dict({k: obj[k] for k in ("shape", "colour", "pattern") if k in obj}, where)
        rotation = obj.get("rotation", 0.0)
        if isinstance(rotation, bool) or not isinstance(rotation, (int, float)) or not math.isfinite(rotation):
            raise SpecError(f"{where}.rotation: expected a finite number of degrees, got {rotation!r}")
        return cls(entity, _int(obj["cell"], f"{where}.cell", 0, N_CELLS - 1),
                   _choice(obj.get("size", "large"), SIZES, f"{where}.size"), float(rotation),
                   obj.get("key"))

    def with_(self, **changes: Any) -> PlacedEntity:
        """A copy with some fields changed; `shape`, `colour`, `pattern` change the identity."""
        ident = {k: changes.pop(k) for k in ("shape", "colour", "pattern") if k in changes}
        if ident:
            changes["entity"] = replace(self.entity, **ident)
        return replace(self, **changes)


@dataclass(frozen=True)
class Background:
    """plain: one colour; grid: base colour (lines a shade apart); gradient: two colours along a
    direction (first colour at the left / top / top-left); noise: base colour + `seed`."""

    kind: str = "plain"
    colours: tuple[str, ...] = ("stone",)
    direction: str | None = None  # gradients only
    seed: int = 0  # noise only

    def __post_init__(self) -> None:
        object.__setattr__(self, "colours", tuple(self.colours))
        if self.kind == "gradient" and self.direction is None:
            object.__setattr__(self, "direction", "horizontal")
        self.validate()

    def validate(self, where: str = "background") -> None:
        _choice(self.kind, BACKGROUND_KINDS, f"{where}.kind")
        want = 2 if self.kind == "gradient" else 1
        if len(self.colours) != want:
            raise SpecError(f"{where}.colours: a {self.kind} background takes {want} colour(s), "
                            f"got {len(self.colours)}")
        for i, c in enumerate(self.colours):
            _choice(c, BACKGROUND_COLOURS, f"{where}.colours[{i}]")
        if self.kind == "gradient":
            if _contrast(*self.colours) < GRADIENT_MIN_CONTRAST:
                raise SpecError(
                    f"{where}.colours: {self.colours[0]!r} and {self.colours[1]!r} are too alike for a "
                    f"gradient (need {GRADIENT_MIN_CONTRAST:g} levels apart); pairs that work: "
                    + ", ".join(f"{a}/{b}" for a, b in GRADIENT_PAIRS))
            _choice(self.direction, GRADIENT_DIRECTIONS, f"{where}.direction")
        elif self.direction is not None:
            raise SpecError(f"{where}.direction: only gradients have a direction (this is {self.kind})")
        _int(self.seed, f"{where}.seed", 0)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "colours": list(self.colours)}
        if self.direction is not None:
            out["direction"] = self.direction
        if self.kind == "noise":
            out["seed"] = self.seed
        return out

    @classmethod
    def from_dict(cls, obj: Any, where: str = "background") -> Background:
        obj = _object(obj, where, ("kind", "colours"), ("direction", "seed"))
        colours = obj["colours"]
        if not isinstance(colours, (list, tuple)):
            raise SpecError(f"{where}.colours: expected a list of colour names, got {type(colours).__name__}")
        return cls(_choice(obj["kind"], BACKGROUND_KINDS, f"{where}.kind"), tuple(colours),
                   obj.get("direction"), _int(obj.get("seed", 0), f"{where}.seed", 0))


@dataclass(frozen=True)
class Scene:
    background: Background
    entities: tuple[PlacedEntity, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entities", tuple(self.entities))
        self.validate()

    def validate(self, where: str = "scene") -> None:
        if not isinstance(self.background, Background):
            raise SpecError(f"{where}.background: expected a Background, got {type(self.background).__name__}")
        self.background.validate(f"{where}.background")
        if not 1 <= len(self.entities) <= MAX_ENTITIES:
            raise SpecError(f"{where}.entities: a scene holds 1 to {MAX_ENTITIES} entities, got {len(self.entities)}")
        cells: dict[int, int] = {}
        keys: dict[str, int] = {}
        for i, e in enumerate(self.entities):
            if not isinstance(e, PlacedEntity):
                raise SpecError(f"{where}.entities[{i}]: expected a PlacedEntity, got {type(e).__name__}")
            e.validate(f"{where}.entities[{i}]")
            if e.cell in cells:
                raise SpecError(f"{where}.entities[{i}].cell: cell {e.cell} ({CELL_NAMES[e.cell]}) is already "
                                f"taken by entities[{cells[e.cell]}]; each cell holds one entity")
            cells[e.cell] = i
            if e.key is not None:
                if e.key in keys:
                    raise SpecError(f"{where}.entities[{i}].key: {e.key!r} is already used by entities[{keys[e.key]}]")
                keys[e.key] = i

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background.to_dict(), "entities": [e.to_dict() for e in self.entities]}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "scene") -> Scene:
        obj = _object(obj, where, ("background", "entities"))
        raw = obj["entities"]
        if not isinstance(raw, (list, tuple)):
            raise SpecError(f"{where}.entities: expected a list, got {type(raw).__name__}")
        return cls(Background.from_dict(obj["background"], f"{where}.background"),
                   tuple(PlacedEntity.from_dict(e, f"{where}.entities[{i}]") for i, e in enumerate(raw)))

    def fingerprint(self) -> str:
        """A content hash that ignores rotation (targets are judged rotation-free) and keys."""
        content = {"background": self.background.to_dict(),
                   "entities": sorted((e.entity.to_dict() | {"cell": e.cell, "size": e.size}
                                       for e in self.entities), key=lambda d: d["cell"])}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def free_cells(self) -> list[int]:
        taken = {e.cell for e in self.entities}
        return [c for c in range(N_CELLS) if c not in taken]

    def entity_at(self, cell: int) -> PlacedEntity | None:
        return next((e for e in self.entities if e.cell == cell), None)
