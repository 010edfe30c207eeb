"""Seeded random draws of ToyWorld specs. Every function takes a numpy Generator, so a seed
fixes the whole draw (tasks and splits build on this).

A `World` says which identities, backgrounds and entity counts the draws come from. The default
is the whole world; a restricted one (2 shapes x 2 colours x 1 pattern, one entity) is for
diagnostics such as issue 20's overfit run. A restriction only shortens the option tuples the
draws pick from, so the default world makes exactly the draws it made before `World` existed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from tapestry.toyworld.spec import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    COLOURS,
    GRADIENT_DIRECTIONS,
    GRADIENT_PAIRS,
    MAX_ENTITIES,
    N_CELLS,
    PATTERNS,
    SHAPES,
    SIZES,
    Background,
    Entity,
    PlacedEntity,
    Scene,
    SpecError,
)


@dataclass(frozen=True)
class World:
    """The names each draw picks from, and the entities per scene ((min, max); None: the task's
    own range). Fields are checked on construction; a bad one raises SpecError naming it."""

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    patterns: tuple[str, ...] = PATTERNS
    backgrounds: tuple[str, ...] = BACKGROUND_KINDS
    entities: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name, noun, allowed in (("shapes", "shape", SHAPES), ("colours", "colour", COLOURS),
                                    ("patterns", "pattern", PATTERNS),
                                    ("backgrounds", "background kind", BACKGROUND_KINDS)):
            values = getattr(self, name)
            if isinstance(values, str) or not isinstance(values, (list, tuple)):
                raise SpecError(f"{name}: expected a list of {noun} names, got {values!r}")
            if not values:
                raise SpecError(f"{name}: [] is empty; name at least one of {', '.join(allowed)}")
            for value in values:
                if value not in allowed:
                    raise SpecError(f"{name}: {value!r} is not a {noun}; choose from {', '.join(allowed)}")
            if len(set(values)) != len(values):
                raise SpecError(f"{name}: {list(values)} names one twice (it would be drawn twice as often)")
            object.__setattr__(self, name, tuple(values))
        if self.entities is not None:
            bounds = self.entities
            if len(bounds) != 2 or any(isinstance(b, bool) or not isinstance(b, int) for b in bounds):
                raise SpecError(f"entities: {list(bounds)} is not [min, max] (two integers)")
            lo, hi = bounds
            if not 1 <= lo <= hi <= MAX_ENTITIES:
                raise SpecError(f"entities: [{lo}, {hi}] needs 1 <= min <= max <= {MAX_ENTITIES}")
            object.__setattr__(self, "entities", (lo, hi))

    @property
    def identities(self) -> int:
        """How many distinct identities (shape x colour x pattern) the world holds."""
        return len(self.shapes) * len(self.colours) * len(self.patterns)

    @property
    def restricted(self) -> bool:
        return self != WORLD

    def entity_range(self, task_range: tuple[int, int]) -> tuple[int, int]:
        return task_range if self.entities is None else self.entities

    def to_dict(self) -> dict:
        out = {"shapes": list(self.shapes), "colours": list(self.colours), "patterns": list(self.patterns),
               "backgrounds": list(self.backgrounds)}
        if self.entities is not None:
            out["entities"] = list(self.entities)
        return out

    def tag(self) -> str:
        """8 hex digits naming the world: restricted documents carry it in their id, so they never
        share an id with a document of another world."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


WORLD = World()  # the whole world: every draw below defaults to it


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def random_entity(rng: np.random.Generator, exclude: set[Entity] | None = None, world: World = WORLD) -> Entity:
    """One of the world's identities (all 256 by default), uniformly, avoiding `exclude`."""
    while True:
        entity = Entity(pick(rng, world.shapes), pick(rng, world.colours), pick(rng, world.patterns))
        if not exclude or entity not in exclude:
            return entity


def random_background(rng: np.random.Generator, kind: str | None = None, world: World = WORLD) -> Background:
    kind = kind or pick(rng, world.backgrounds)
    if kind == "gradient":
        first, second = pick(rng, GRADIENT_PAIRS)
        if rng.integers(2):
            first, second = second, first
        return Background("gradient", (first, second), pick(rng, GRADIENT_DIRECTIONS))
    seed = int(rng.integers(2**31)) if kind == "noise" else 0
    return Background(kind, (pick(rng, BACKGROUND_COLOURS),), seed=seed)


def random_scene(rng: np.random.Generator, n_entities: int | tuple[int, int] = (1, MAX_ENTITIES),
                 rotate: bool = False, distinct: bool = True, world: World = WORLD) -> Scene:
    """A background and `n_entities` (or a number drawn from the inclusive range) on distinct
    cells. Targets are upright (rotate=False): the text never states a pose. `distinct`: no two
    entities share an identity, so each can be named unambiguously (the caller keeps
    `n_entities` within `world.identities`)."""
    if not isinstance(n_entities, int):
        n_entities = int(rng.integers(n_entities[0], n_entities[1] + 1))
    cells = rng.choice(N_CELLS, size=n_entities, replace=False)
    used: set[Entity] = set()
    placed = []
    for cell in cells:
        entity = random_entity(rng, used if distinct else None, world)
        used.add(entity)
        rotation = float(rng.uniform(0, 360)) if rotate else 0.0
        placed.append(PlacedEntity(entity, int(cell), pick(rng, SIZES), round(rotation, 1)))
    return Scene(random_background(rng, world=world), tuple(placed))


def reference_scene(entity: Entity, rng: np.random.Generator, world: World = WORLD) -> Scene:
    """One entity at a random cell, size and rotation on a random background: what a reference
    image shows. Copying it into a target is wrong by construction (the text sets cell and size)."""
    placed = PlacedEntity(entity, int(rng.integers(N_CELLS)), pick(rng, SIZES), round(float(rng.uniform(0, 360)), 1))
    return Scene(random_background(rng, world=world), (placed,))
