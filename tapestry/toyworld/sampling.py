"""Seeded random draws of ToyWorld specs. Every function takes a numpy Generator, so a seed
fixes the whole draw (tasks and splits build on this)."""

from __future__ import annotations

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
)


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def random_entity(rng: np.random.Generator, exclude: set[Entity] | None = None) -> Entity:
    """One of the 256 identities, uniformly, avoiding `exclude`."""
    while True:
        entity = Entity(pick(rng, SHAPES), pick(rng, COLOURS), pick(rng, PATTERNS))
        if not exclude or entity not in exclude:
            return entity


def random_background(rng: np.random.Generator, kind: str | None = None) -> Background:
    kind = kind or pick(rng, BACKGROUND_KINDS)
    if kind == "gradient":
        first, second = pick(rng, GRADIENT_PAIRS)
        if rng.integers(2):
            first, second = second, first
        return Background("gradient", (first, second), pick(rng, GRADIENT_DIRECTIONS))
    seed = int(rng.integers(2**31)) if kind == "noise" else 0
    return Background(kind, (pick(rng, BACKGROUND_COLOURS),), seed=seed)


def random_scene(rng: np.random.Generator, n_entities: int | tuple[int, int] = (1, MAX_ENTITIES),
                 rotate: bool = False, distinct: bool = True) -> Scene:
    """A background and `n_entities` (or a number drawn from the inclusive range) on distinct
    cells. Targets are upright (rotate=False): the text never states a pose. `distinct`: no two
    entities share an identity, so each can be named unambiguously."""
    if not isinstance(n_entities, int):
        n_entities = int(rng.integers(n_entities[0], n_entities[1] + 1))
    cells = rng.choice(N_CELLS, size=n_entities, replace=False)
    used: set[Entity] = set()
    placed = []
    for cell in cells:
        entity = random_entity(rng, used if distinct else None)
        used.add(entity)
        rotation = float(rng.uniform(0, 360)) if rotate else 0.0
        placed.append(PlacedEntity(entity, int(cell), pick(rng, SIZES), round(rotation, 1)))
    return Scene(random_background(rng), tuple(placed))


def reference_scene(entity: Entity, rng: np.random.Generator) -> Scene:
    """One entity at a random cell, size and rotation on a random background: what a reference
    image shows. Copying it into a target is wrong by construction (the text sets cell and size)."""
    placed = PlacedEntity(entity, int(rng.integers(N_CELLS)), pick(rng, SIZES), round(float(rng.uniform(0, 360)), 1))
    return Scene(random_background(rng), (placed,))
