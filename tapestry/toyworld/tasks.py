"""ToyWorld tasks as Documents (DESIGN §3, §10).

    compose     1-4 reference images -> one target scene; inline ("A large <img:img1/> sits in
                the centre") and image-first ("Put the shape from the first image ...") from
                the same scene, so the placement ablation compares like with like.
    story       2-5 steps (move, grow, shrink, recolour, add, remove), text and target images
                alternating; entities keep their identity (`key`) across frames.
    edit        a context image + an instruction -> the edited image.
    understand  a context image + a question -> a short text answer.
    howto       a goal -> the model decides how many images (one per step) and writes them.

and one diagnostic task, outside toyworld-bench-v1 (DIAGNOSTIC_TASKS):

    copy        the target's own clean render as a context image + "Draw it again exactly."
                -> the target: what a model scores here bounds what it can reach when it must
                build the target from references and text (issue 20).

compose, copy and understand draw from a `World` (sampling.py): a restricted one (a few shapes,
colours, patterns, backgrounds; a number of entities) makes a tiny world for overfit runs. Its
documents carry `meta["toyworld"]["world"]` and the world's tag in their id; the default world
makes the same documents as before restrictions existed.

Every Document carries its world spec in `meta["toyworld"]` (task, layout, split, index, seed,
side, scenes, ...) and every target image its own scene in `meta["toyworld"]["scene"]`; that is
all the judge needs. Reference images show their entity at a random place, size and rotation on
a random background, so copying one is wrong by construction; targets are upright.

`sample(task, split, index, layout=..., seed=0, world=...)` is random access into a split
(splits.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from tapestry.document import Document, ImageSegment, TextSegment, from_markup
from tapestry.toyworld import phrases as ph
from tapestry.toyworld.render import render_scene
from tapestry.toyworld.sampling import (
    WORLD,
    World,
    pick,
    random_background,
    random_entity,
    random_scene,
    reference_scene,
)
from tapestry.toyworld.spec import (
    COLOURS,
    GRID_SIDE,
    MAX_ENTITIES,
    PATTERNS,
    SHAPES,
    Entity,
    PlacedEntity,
    Scene,
    SpecError,
)
from tapestry.toyworld.splits import draw

TASKS: tuple[str, ...] = ("compose", "story", "edit", "understand", "howto")  # the benchmark's
DIAGNOSTIC_TASKS: tuple[str, ...] = ("copy",)  # trained and judged like the others, never benchmarked
ALL_TASKS = TASKS + DIAGNOSTIC_TASKS
LAYOUTS: tuple[str, ...] = ("inline", "image-first")
TASK_CODES: dict[str, int] = {"compose": 1, "story": 2, "edit": 3, "understand": 4, "howto": 5, "copy": 6}
# Tasks that draw their scene from a World, and the entities per scene when the world leaves it
# open. story, edit and howto pick identities for their changes and lines themselves (recolour,
# add, a row of distinct colours) and always use the whole world.
WORLD_ENTITIES: dict[str, tuple[int, int]] = {"compose": (1, MAX_ENTITIES), "copy": (1, MAX_ENTITIES),
                                              "understand": (1, 4)}
DEFAULT_SIDE = 64
SPEC_VERSION = 1


def task_layouts(task: str) -> tuple[str, ...]:
    """The layouts a task is written in: story and howto interleave text and targets only."""
    return LAYOUTS if task in ("compose", "edit", "understand", "copy") else ("interleaved",)


def check_world(task: str, world: World) -> None:
    """SpecError, naming the first restricted field, when `task` cannot draw from `world`."""
    if not world.restricted:
        return
    field = next(f for f in ("shapes", "colours", "patterns", "backgrounds", "entities")
                 if getattr(world, f) != getattr(WORLD, f))
    if task not in WORLD_ENTITIES:
        raise SpecError(f"{field}: a {task} task draws from the whole world (its changes pick identities of "
                        f"their own); restrict {', '.join(WORLD_ENTITIES)} sources only")
    lo, hi = world.entity_range(WORLD_ENTITIES[task])
    if world.identities < hi:
        # scenes hold distinct identities, so each can be named unambiguously
        raise SpecError(f"entities: a {task} scene of up to {hi} entities needs {hi} distinct identities, but "
                        f"shapes x colours x patterns give {world.identities}; set entities = "
                        f"[1, {world.identities}] or name more")


def world_for(task: str, shapes: list[str] | None = None, colours: list[str] | None = None,
              patterns: list[str] | None = None, backgrounds: list[str] | None = None,
              entities: list[int] | None = None) -> World:
    """The World of a source's restriction fields (None: that field unrestricted), checked
    against `task`; a bad field raises SpecError naming it and the bad value."""
    given = {name: value for name, value in (("shapes", shapes), ("colours", colours), ("patterns", patterns),
                                             ("backgrounds", backgrounds)) if value is not None}
    bounds = None if entities is None else (tuple(entities) if isinstance(entities, (list, tuple)) else entities)
    world = World(**given, entities=bounds)
    check_world(task, world)
    return world


# ------------------------------------------------------------------ helpers
def _keyed(scene: Scene) -> Scene:
    return Scene(scene.background, tuple(e.with_(key=f"e{i + 1}") for i, e in enumerate(scene.entities)))


def _target(scene: Scene, side: int, name: str, step: int | None = None) -> ImageSegment:
    meta: dict[str, Any] = {"scene": scene.to_dict()}
    if step is not None:
        meta["step"] = step
    return ImageSegment(role="target", name=name, image=render_scene(scene, side), width=side, height=side,
                        meta={"toyworld": meta})


def _context_image(scene: Scene, side: int, name: str) -> ImageSegment:
    return ImageSegment(role="context", name=name, image=render_scene(scene, side), width=side, height=side,
                        meta={"toyworld": {"scene": scene.to_dict()}})


def _doc_id(task: str, split: str, index: int, seed: int, layout: str, world: World = WORLD) -> str:
    stream = f"-s{seed}" if split == "train" else ""
    suffix = f"-{layout}" if layout in LAYOUTS else ""
    tag = f"-w{world.tag()}" if world.restricted else ""
    return f"toyworld-{task}{tag}-{split}{stream}-{index:06d}{suffix}"


def _meta(task: str, layout: str, split: str, index: int, sample_seed: int, side: int,
          scenes: list[Scene], **extra: Any) -> dict[str, Any]:
    return {"toyworld": {"version": SPEC_VERSION, "task": task, "layout": layout, "split": split, "index": index,
                         "seed": sample_seed, "side": side, "scenes": [s.to_dict() for s in scenes], **extra}}


def _scene_clauses(rng: np.random.Generator, scene: Scene, order: list[int]) -> list[str]:
    """'a small red striped star sits in the top-left corner' for each entity in `order`."""
    out = []
    for i in order:
        e = scene.entities[i]
        out.append(f"{ph.full_description(rng, e)} {pick(rng, ph.VERBS)} {ph.cell_phrase(rng, e.cell)}")
    return out


def describe_scene(rng: np.random.Generator, scene: Scene) -> str:
    """One sentence stating every entity (all attributes, place) and the background."""
    order = list(rng.permutation(len(scene.entities)))
    return ph.sentence(f"{ph.join_clauses(rng, _scene_clauses(rng, scene, order))}, "
                       f"{ph.background_phrase(rng, scene.background)}")


# ------------------------------------------------------------------ compose
@dataclass
class ComposePlan:
    scene: Scene
    order: list[int]  # mention order of the scene's entities (= reference order)
    placements: list[tuple[str, Any]]  # per mention: ("cell", phrase) or ("relation", phrase)
    sizes: list[str]  # size words per mention
    verbs: list[str]
    references: list[Scene]
    background: str
    style: str  # "descriptive" | "imperative"
    imperative: str

    def content(self) -> Any:
        return {"scene": self.scene.fingerprint()}


def plan_compose(rng: np.random.Generator, world: World = WORLD) -> ComposePlan:
    scene = random_scene(rng, world.entity_range(WORLD_ENTITIES["compose"]), world=world)
    order = [int(i) for i in rng.permutation(len(scene.entities))]
    placements: list[tuple[str, Any]] = []
    for k, i in enumerate(order):
        e = scene.entities[i]
        rel = ph.relation(scene.entities[order[k - 1]].cell, e.cell) if k > 0 else None
        if rel is not None and rng.random() < 0.5:
            placements.append(("relation", pick(rng, ph.RELATIONS[rel])))
        else:
            placements.append(("cell", ph.cell_phrase(rng, e.cell)))
    return ComposePlan(
        scene=scene, order=order, placements=placements,
        sizes=[pick(rng, ph.SIZE_WORDS[scene.entities[i].size]) for i in order],
        verbs=[pick(rng, ph.VERBS) for _ in order],
        references=[reference_scene(scene.entities[i].entity, rng, world) for i in order],
        background=ph.background_phrase(rng, scene.background),
        style=pick(rng, ("descriptive", "imperative")),
        imperative=pick(rng, ("Draw", "Place", "Put", "Show")),
    )


def _where(placement: tuple[str, Any]) -> str:
    kind, phrase = placement
    return phrase if kind == "cell" else f"{phrase} it"


def compose_text_inline(plan: ComposePlan) -> str:
    """'A large [img1] sits in the centre, and a small [img2] is just left of it, on ...'."""
    clauses = []
    for k, placement in enumerate(plan.placements):
        size = plan.sizes[k]
        if plan.style == "imperative":
            clauses.append(f"{ph.article(size)} {size} [img{k + 1}] {_where(placement)}")
        else:
            clauses.append(f"{ph.article(size)} {size} [img{k + 1}] {plan.verbs[k]} {_where(placement)}")
    body = _join_fixed(clauses)
    if plan.style == "imperative":
        return ph.sentence(f"{plan.imperative} {body}, {plan.background}")
    return ph.sentence(f"{body}, {plan.background}")


def compose_text_image_first(plan: ComposePlan) -> str:
    """'Put the shape from the first image in the centre, large, and the one from the second
    image just left of it, small, on ...' (each ordinal phrase exactly once)."""
    from tapestry.markup import ordinal_phrase

    clauses = []
    for k, placement in enumerate(plan.placements):
        size = plan.sizes[k]
        source = ordinal_phrase(k + 1)
        if k == 0:
            thing = f"the shape from {source}" if plan.style == "imperative" else f"the shape in {source}"
        else:
            thing = f"the one from {source}"
        if plan.style == "imperative":
            clauses.append(f"{thing} {_where(placement)}, {size}")
        else:
            clauses.append(f"{thing} {plan.verbs[k]} {_where(placement)} and is {size}")
    body = _join_fixed(clauses)
    if plan.style == "imperative":
        return ph.sentence(f"{plan.imperative} {body}, {plan.background}")
    return ph.sentence(f"{body}, all {plan.background}")


def _join_fixed(clauses: list[str]) -> str:
    if len(clauses) == 1:
        return clauses[0]
    return ", ".join(clauses[:-1]) + ", and " + clauses[-1]


def build_compose(plan: ComposePlan, layout: str, doc_id: str, meta: dict[str, Any], side: int) -> Document:
    references = [render_scene(r, side) for r in plan.references]
    target = _target(plan.scene, side, "target")
    if layout == "inline":
        doc = from_markup(compose_text_inline(plan), images=references, id=doc_id, role="reference", meta=meta)
        for segment, ref in zip(doc.images(), plan.references):
            segment.meta = {"toyworld": {"scene": ref.to_dict()}}
        doc.segments.append(target)
        return doc
    segments: list = [ImageSegment(role="reference", name=f"img{k + 1}", image=image, width=side, height=side,
                                   meta={"toyworld": {"scene": ref.to_dict()}})
                      for k, (image, ref) in enumerate(zip(references, plan.references))]
    segments += [TextSegment(compose_text_image_first(plan)), target]
    return Document(doc_id, segments, meta)


# ------------------------------------------------------------ changes (story, edit)
CHANGES: tuple[str, ...] = ("move", "grow", "shrink", "recolour", "add", "remove")


@dataclass
class Change:
    kind: str
    key: str | None  # which entity (None for background changes)
    before: Scene
    after: Scene
    name: str  # how the text names the entity (in `before`), or the new entity's description


def _applicable(scene: Scene, kinds: tuple[str, ...]) -> list[str]:
    out = []
    for kind in kinds:
        if kind == "grow" and not any(e.size == "small" for e in scene.entities):
            continue
        if kind == "shrink" and not any(e.size == "large" for e in scene.entities):
            continue
        if kind == "add" and len(scene.entities) >= MAX_ENTITIES:
            continue
        if kind == "remove" and len(scene.entities) <= 1:
            continue
        out.append(kind)
    return out


def random_change(rng: np.random.Generator, scene: Scene, kinds: tuple[str, ...] = CHANGES,
                  next_key: int = 1) -> Change:
    """One change of `scene` (keys are kept; an added entity gets key e<next_key>)."""
    kind = pick(rng, _applicable(scene, kinds))
    entities = list(scene.entities)
    if kind == "add":
        identities = {e.entity for e in entities}
        placed = PlacedEntity(random_entity(rng, identities), pick(rng, tuple(scene.free_cells())),
                              pick(rng, ("small", "large")), 0.0, f"e{next_key}")
        after = Scene(scene.background, tuple(entities + [placed]))
        return Change(kind, placed.key, scene, after, ph.full_description(rng, placed))
    if kind == "background":
        while True:
            background = random_background(rng)
            if background != scene.background:
                break
        return Change(kind, None, scene, Scene(background, tuple(entities)), ph.background_noun(rng, background))
    pool = {"grow": [e for e in entities if e.size == "small"],
            "shrink": [e for e in entities if e.size == "large"]}.get(kind, entities)
    target = pool[int(rng.integers(len(pool)))]
    i = entities.index(target)
    name = ph.short_name(scene, target)
    if kind == "move":
        entities[i] = target.with_(cell=pick(rng, tuple(scene.free_cells())))
    elif kind == "grow":
        entities[i] = target.with_(size="large")
    elif kind == "shrink":
        entities[i] = target.with_(size="small")
    elif kind == "recolour":
        entities[i] = target.with_(colour=pick(rng, tuple(c for c in COLOURS if c != target.entity.colour)))
    elif kind == "remove":
        del entities[i]
    return Change(kind, target.key, scene, Scene(scene.background, tuple(entities)), name)


def _after_entity(change: Change) -> PlacedEntity | None:
    return next((e for e in change.after.entities if e.key == change.key), None)


def narrate(rng: np.random.Generator, change: Change) -> str:
    """A story step: 'Then the red star moves to the top-right corner.'"""
    lead = pick(rng, ("Then", "Next", "After that", "Now"))
    after = _after_entity(change)
    n = change.name
    if change.kind == "move":
        return ph.sentence(f"{lead} the {n} {pick(rng, ('moves', 'slides', 'jumps'))} {pick(rng, ph.CELL_DESTINATIONS[after.cell])}")
    if change.kind == "grow":
        return ph.sentence(f"{lead} the {n} {pick(rng, ('grows large', 'grows bigger', 'becomes large'))}")
    if change.kind == "shrink":
        return ph.sentence(f"{lead} the {n} {pick(rng, ('shrinks', 'becomes small', 'gets smaller'))}")
    if change.kind == "recolour":
        return ph.sentence(f"{lead} the {n} {pick(rng, ('turns', 'becomes', 'changes to'))} {after.entity.colour}")
    if change.kind == "add":
        return ph.sentence(f"{lead} {n} {pick(rng, ('appears', 'arrives', 'shows up'))} {ph.cell_phrase(rng, after.cell)}")
    if change.kind == "remove":
        return ph.sentence(f"{lead} the {n} {pick(rng, ('disappears', 'leaves', 'vanishes'))}")
    return ph.sentence(f"{lead} the background becomes {change.name}")


def instruct(rng: np.random.Generator, change: Change, where: str = "") -> str:
    """An edit instruction: 'Move the red star to the top-right corner.' `where` names the image
    ('in the first image') right after the entity."""
    after = _after_entity(change)
    n = f"the {change.name}{where}"
    if change.kind == "move":
        return ph.sentence(f"{pick(rng, ('Move', 'Shift'))} {n} {pick(rng, ph.CELL_DESTINATIONS[after.cell])}")
    if change.kind == "grow":
        return ph.sentence(f"{pick(rng, ('Make', 'Turn'))} {n} large")
    if change.kind == "shrink":
        return ph.sentence(f"{pick(rng, ('Make', 'Turn'))} {n} small")
    if change.kind == "recolour":
        return ph.sentence(pick(rng, (f"Recolour {n} {after.entity.colour}", f"Make {n} {after.entity.colour}",
                                      f"Paint {n} {after.entity.colour}")))
    if change.kind == "add":
        return ph.sentence(f"{pick(rng, ('Add', 'Put'))} {change.name} {ph.cell_phrase(rng, after.cell)}{where}")
    if change.kind == "remove":
        return ph.sentence(f"{pick(rng, ('Remove', 'Delete', 'Take away'))} {n}")
    verb = pick(rng, ("Change the background{where} to", "Replace the background{where} with", "Swap the background{where} for"))
    return ph.sentence(f"{verb.format(where=where)} {change.name}")


# ------------------------------------------------------------------ story
@dataclass
class StoryPlan:
    scenes: list[Scene]
    intro: str
    steps: list[str]

    def content(self) -> Any:
        return {"frames": [s.fingerprint() for s in self.scenes]}


def plan_story(rng: np.random.Generator) -> StoryPlan:
    scene = _keyed(random_scene(rng, (1, 3)))
    intro = describe_scene(rng, scene)
    scenes, steps = [scene], []
    next_key = len(scene.entities) + 1
    for _ in range(int(rng.integers(2, 6))):
        change = random_change(rng, scenes[-1], CHANGES, next_key)
        next_key += change.kind == "add"
        scenes.append(change.after)
        steps.append(narrate(rng, change))
    return StoryPlan(scenes, intro, steps)


def build_story(plan: StoryPlan, doc_id: str, meta: dict[str, Any], side: int) -> Document:
    segments: list = [TextSegment(plan.intro), _target(plan.scenes[0], side, "frame1", 0)]
    for k, (text, scene) in enumerate(zip(plan.steps, plan.scenes[1:]), start=1):
        segments += [TextSegment(text), _target(scene, side, f"frame{k + 1}", k)]
    return Document(doc_id, segments, meta)


# ------------------------------------------------------------------ edit
EDIT_CHANGES: tuple[str, ...] = CHANGES + ("background",)


@dataclass
class EditPlan:
    change: Change
    instruction_seed: int

    def content(self) -> Any:
        return {"source": self.change.before.fingerprint(), "target": self.change.after.fingerprint()}


def plan_edit(rng: np.random.Generator) -> EditPlan:
    scene = _keyed(random_scene(rng, (1, 3)))
    change = random_change(rng, scene, EDIT_CHANGES, len(scene.entities) + 1)
    return EditPlan(change, int(rng.integers(2**31)))


def build_edit(plan: EditPlan, layout: str, doc_id: str, meta: dict[str, Any], side: int) -> Document:
    rng = np.random.default_rng(plan.instruction_seed)
    source = _context_image(plan.change.before, side, "source")
    target = _target(plan.change.after, side, "target")
    if layout == "inline":
        lead = pick(rng, ("Here is <img:source/>.", "Take <img:source/>.", "Start from <img:source/>."))
        text = f"{lead} {instruct(rng, plan.change)}"
        return Document(doc_id, [TextSegment(text), source, target], meta)
    return Document(doc_id, [source, TextSegment(instruct(rng, plan.change, " in the first image")), target], meta)


# ---------------------------------------------------------------- understand
QUESTIONS: tuple[str, ...] = ("colour", "shape", "pattern", "size", "position", "count", "count_colour")


@dataclass
class UnderstandPlan:
    scene: Scene
    kind: str
    question: str
    answer: str
    about: int | None  # entity index the question is about

    def content(self) -> Any:
        return {"scene": self.scene.fingerprint(), "question": self.question}


def plan_understand(rng: np.random.Generator, world: World = WORLD) -> UnderstandPlan:
    scene = random_scene(rng, world.entity_range(WORLD_ENTITIES["understand"]), world=world)
    kind = pick(rng, QUESTIONS)
    i = int(rng.integers(len(scene.entities)))
    e = scene.entities[i]
    place = ph.cell_phrase(rng, e.cell)
    name = ph.short_name(scene, e)
    if kind == "colour":
        question = pick(rng, (f"What colour is the shape {place}?", f"What colour is the {e.entity.shape} {place}?"))
        answer = e.entity.colour
    elif kind == "shape":
        question = pick(rng, (f"What shape is {place}?", f"Which shape sits {place}?"))
        answer = e.entity.shape
    elif kind == "pattern":
        question = pick(rng, (f"What pattern does the {name} have?", f"Is the {name} solid, striped, dotted or ringed?"))
        answer = e.entity.pattern
    elif kind == "size":
        question = pick(rng, (f"Is the {name} small or large?", f"How big is the {name}: small or large?"))
        answer = e.size
    elif kind == "position":
        question = pick(rng, (f"Where is the {name}?", f"In which part of the picture is the {name}?"))
        answer = ph.canonical_position(e.cell)
    elif kind == "count":
        question = pick(rng, ("How many shapes are there?", "How many shapes does the picture show?"))
        answer = str(len(scene.entities))
    else:
        colour = pick(rng, world.colours)
        question = pick(rng, (f"How many {colour} shapes are there?", f"How many shapes are {colour}?"))
        answer = str(sum(x.entity.colour == colour for x in scene.entities))
        i = None
    return UnderstandPlan(scene, kind, question, answer, i if kind not in ("count",) else None)


def build_understand(plan: UnderstandPlan, layout: str, doc_id: str, meta: dict[str, Any], side: int) -> Document:
    image = _context_image(plan.scene, side, "picture")
    answer = TextSegment(ph.sentence(plan.answer) if plan.kind not in ("count", "count_colour") else plan.answer,
                         role="target")
    if layout == "inline":
        question = f"Look at <img:picture/>. {plan.question}"
        return Document(doc_id, [TextSegment(question), image, answer], meta)
    question = f"In the first image, {plan.question[0].lower()}{plan.question[1:]}"
    return Document(doc_id, [image, TextSegment(question), answer], meta)


# -------------------------------------------------------------------- copy
@dataclass
class CopyPlan:
    """The diagnostic upper bound of issue 20: the target's own clean render is given first, as
    a context image (ViT tokens and, with layout.context_as_vae, its clean VAE latents, as edit
    sources and story frames enter), and the model is asked to draw it again."""

    scene: Scene
    instruction_seed: int

    def content(self) -> Any:
        return {"scene": self.scene.fingerprint()}  # as compose's: a scene belongs to one split for both


COPY_LEADS: tuple[str, ...] = ("Here is <img:source/>.", "Take <img:source/>.", "Look at <img:source/>.")
COPY_ASKS: tuple[str, ...] = ("Draw it again exactly.", "Copy it exactly.", "Draw the same picture again.")
COPY_ASKS_IMAGE_FIRST: tuple[str, ...] = ("Draw the first image again exactly.", "Copy the first image exactly.",
                                          "Draw the same picture as the first image.")


def plan_copy(rng: np.random.Generator, world: World = WORLD) -> CopyPlan:
    scene = random_scene(rng, world.entity_range(WORLD_ENTITIES["copy"]), world=world)
    return CopyPlan(scene, int(rng.integers(2**31)))


def build_copy(plan: CopyPlan, layout: str, doc_id: str, meta: dict[str, Any], side: int) -> Document:
    rng = np.random.default_rng(plan.instruction_seed)
    source = _context_image(plan.scene, side, "source")
    target = _target(plan.scene, side, "target")
    if layout == "inline":
        text = f"{pick(rng, COPY_LEADS)} {pick(rng, COPY_ASKS)}"
        return Document(doc_id, [TextSegment(text), source, target], meta)
    return Document(doc_id, [source, TextSegment(pick(rng, COPY_ASKS_IMAGE_FIRST)), target], meta)


# ------------------------------------------------------------------- howto
HOWTO_LINES: dict[str, tuple[list[int], ...]] = {
    "row": ([0, 1, 2], [3, 4, 5], [6, 7, 8]),
    "column": ([0, 3, 6], [1, 4, 7], [2, 5, 8]),
    "diagonal": ([0, 4, 8], [2, 4, 6]),
    "corners": ([0, 2, 8, 6],),
}
LINE_NAMES = {
    ("row", 0): "along the top", ("row", 1): "across the middle", ("row", 2): "along the bottom",
    ("column", 0): "down the left side", ("column", 1): "down the middle", ("column", 2): "down the right side",
    ("diagonal", 0): "from the top-left corner to the bottom-right corner",
    ("diagonal", 1): "from the top-right corner to the bottom-left corner",
    ("corners", 0): "in the four corners",
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass
class HowtoPlan:
    scenes: list[Scene]  # one per image the model should produce
    goal: str
    steps: list[str]

    def content(self) -> Any:
        return {"frames": [s.fingerprint() for s in self.scenes]}


def plan_howto(rng: np.random.Generator) -> HowtoPlan:
    figure = pick(rng, tuple(HOWTO_LINES))
    which = int(rng.integers(len(HOWTO_LINES[figure])))
    cells = list(HOWTO_LINES[figure][which])
    if figure != "corners" and rng.random() < 0.5:
        cells.reverse()
    n = len(cells)
    shape, pattern, size = pick(rng, SHAPES), pick(rng, PATTERNS), pick(rng, ("small", "large"))
    same_colour = rng.random() < 0.5
    colours = [pick(rng, COLOURS)] * n if same_colour else [str(c) for c in rng.choice(COLOURS, n, replace=False)]
    per_image = 2 if (n == 4 and rng.random() < 0.4) else 1
    background = random_background(rng)
    entities = [PlacedEntity(Entity(shape, c, pattern), cell, size, 0.0, f"e{k + 1}")
                for k, (c, cell) in enumerate(zip(colours, cells))]
    scenes = [Scene(background, tuple(entities[:k])) for k in range(per_image, n + 1, per_image)]

    things = f"{size} {pattern} {ph.plural(shape)}"
    if same_colour:
        things = f"{size} {colours[0]} {pattern} {ph.plural(shape)}"
    line = LINE_NAMES[(figure, which)]
    order = "" if figure in ("corners", "diagonal") else {
        (0, 1): " from left to right", (0, -1): " from right to left",
        (1, 0): " from top to bottom", (-1, 0): " from bottom to top"}[_direction(cells)]
    if figure == "corners":
        order = " starting at the top-left and going clockwise"
    pace = "one at a time" if per_image == 1 else "two at a time"
    colour_note = "" if same_colour else f", coloured {', '.join(colours[:-1])} and {colours[-1]} in that order"
    shape_word = {"row": "row", "column": "column", "diagonal": "diagonal line", "corners": "set"}[figure]
    goal = pick(rng, (
        f"Build a {shape_word} of {NUMBER_WORDS[n]} {things} {line}{colour_note}, {pace}{order}, {ph.background_phrase(rng, background)}",
        f"Show how to lay out {NUMBER_WORDS[n]} {things} {line}{colour_note}, adding them {pace}{order}, {ph.background_phrase(rng, background)}",
    ))
    steps = []
    for k in range(len(scenes)):
        new = entities[k * per_image:(k + 1) * per_image]
        where = " and ".join(ph.cell_phrase(rng, e.cell) for e in new)
        lead = "First" if k == 0 else ("Finally" if k == len(scenes) - 1 else pick(rng, ("Next", "Then")))
        what = " and ".join(ph.full_description(rng, e) for e in new) if k == 0 or not same_colour else \
            ("another one" if per_image == 1 else "two more")
        steps.append(ph.sentence(f"{lead}, {pick(rng, ('add', 'place', 'put'))} {what} {where}"))
    return HowtoPlan(scenes, ph.sentence(goal), steps)


def _direction(cells: list[int]) -> tuple[int, int]:
    dr = cells[1] // GRID_SIDE - cells[0] // GRID_SIDE
    dc = cells[1] % GRID_SIDE - cells[0] % GRID_SIDE
    return (int(np.sign(dr)), int(np.sign(dc)))


def build_howto(plan: HowtoPlan, doc_id: str, meta: dict[str, Any], side: int) -> Document:
    segments: list = [TextSegment(plan.goal)]
    for k, (text, scene) in enumerate(zip(plan.steps, plan.scenes)):
        segments += [TextSegment(text, role="target"), _target(scene, side, f"step{k + 1}", k)]
    return Document(doc_id, segments, meta)


# ------------------------------------------------------------------ sample
PLANNERS = {"compose": plan_compose, "story": plan_story, "edit": plan_edit, "understand": plan_understand,
            "howto": plan_howto, "copy": plan_copy}


def sample(task: str, split: str, index: int, layout: str | None = None, seed: int = 0,
           side: int = DEFAULT_SIDE, world: World = WORLD) -> Document:
    """Document `index` of `task` in `split` (random access; same arguments -> same Document).

    `layout`: inline | image-first for compose, copy, edit and understand (default inline); story
    and howto are interleaved and accept either. `seed` numbers the train stream (test and val
    are fixed and take none). `side`: pixels of every image. `world`: what compose, copy and
    understand draw from (check_world says what else may be restricted)."""
    if task not in ALL_TASKS:
        raise SpecError(f"task: {task!r} is not a ToyWorld task; choose one of {', '.join(ALL_TASKS)}")
    layouts = task_layouts(task)
    if layout is None:
        layout = layouts[0]
    elif layout not in LAYOUTS + ("interleaved",):
        raise SpecError(f"layout: {layout!r} is not a layout; choose inline or image-first")
    if layout not in layouts:
        layout = layouts[0]  # story/howto: one interleaved layout whatever was asked
    if isinstance(side, bool) or not isinstance(side, int) or not 16 <= side <= 1024:
        raise SpecError(f"side: expected an image size in 16..1024 pixels, got {side!r}")
    check_world(task, world)
    planner = functools.partial(PLANNERS[task], world=world) if task in WORLD_ENTITIES else PLANNERS[task]
    plan, sample_seed, _ = draw(split, index, seed, TASK_CODES[task], planner, lambda p: p.content())
    doc_id = _doc_id(task, split, index, seed, layout, world)
    doc = _build(task, plan, layout, split, index, sample_seed, side, doc_id)
    if world.restricted:
        doc.meta["toyworld"]["world"] = world.to_dict()
    return doc


def _build(task: str, plan: Any, layout: str, split: str, index: int, sample_seed: int, side: int,
           doc_id: str) -> Document:
    if task == "compose":
        meta = _meta(task, layout, split, index, sample_seed, side, [plan.scene],
                     references=[r.to_dict() for r in plan.references])
        return build_compose(plan, layout, doc_id, meta, side)
    if task == "copy":
        return build_copy(plan, layout, doc_id, _meta(task, layout, split, index, sample_seed, side, [plan.scene]),
                          side)
    if task == "story":
        return build_story(plan, doc_id, _meta(task, layout, split, index, sample_seed, side, plan.scenes), side)
    if task == "edit":
        meta = _meta(task, layout, split, index, sample_seed, side, [plan.change.after],
                     source=plan.change.before.to_dict(), change=plan.change.kind)
        return build_edit(plan, layout, doc_id, meta, side)
    if task == "understand":
        meta = _meta(task, layout, split, index, sample_seed, side, [plan.scene], question=plan.question,
                     kind=plan.kind, answer=plan.answer)
        return build_understand(plan, layout, doc_id, meta, side)
    meta = _meta(task, layout, split, index, sample_seed, side, plan.scenes, goal=plan.goal)
    return build_howto(plan, doc_id, meta, side)


def samples(task: str, split: str, start: int, count: int, layout: str | None = None, seed: int = 0,
            side: int = DEFAULT_SIDE, world: World = WORLD) -> list[Document]:
    return [sample(task, split, i, layout, seed, side, world) for i in range(start, start + count)]


