"""ToyWorld: a procedural world whose images a computer can judge exactly (DESIGN §10).

    spec.py       typed scenes (entities, cells, sizes, rotations, backgrounds) <-> JSON
    render.py     spec -> pixels, deterministic and anti-aliased at any resolution
    judge.py      pixels + spec -> scores (per entity and attribute, background, extras)
    selftest.py   the judge against clean, corrupted and degraded renders
    tasks.py      compose / story / edit / understand / howto as Documents
    splits.py     train / val / test walled by seed and content; toyworld-bench-v1
    evaluate.py   judging whole Documents (story persistence, how-to count, answers)
    cli.py        `tapestry toyworld sample | bench | judge`

The common entry points are importable from here without loading the rest up front.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "judge_image": "tapestry.toyworld.judge",
    "judge_document": "tapestry.toyworld.evaluate",
    "run_self_test": "tapestry.toyworld.selftest",
    "sample": "tapestry.toyworld.tasks",
    "render_scene": "tapestry.toyworld.render",
    "write_bench": "tapestry.toyworld.bench",
    "Scene": "tapestry.toyworld.spec",
    "Entity": "tapestry.toyworld.spec",
    "PlacedEntity": "tapestry.toyworld.spec",
    "Background": "tapestry.toyworld.spec",
}

__all__ = ["Background", "Entity", "PlacedEntity", "Scene", "judge_document", "judge_image", "render_scene",
           "run_self_test", "sample", "write_bench"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tapestry.toyworld' has no attribute {name!r}")
