"""Training configuration: typed dataclasses read from TOML, with dotted command-line overrides.

    config = load_config("configs/test-tiny.toml", ["optim.lr=3e-4", "stages.0.steps=20"])

Every field has a default, so a TOML file names only what it changes. Unknown keys are errors
that name the key and list the known ones (a typo must never train with a silent default). The
resolved config is written into the run folder as TOML (`dump_toml`) and is what `--resume`
reads back, so a resumed run cannot drift from the one it continues.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tapestry.errors import TapestryError
from tapestry.models import family as families


class TrainConfigError(TapestryError):
    """A training config (file or override) is invalid; the message names the key and the fix."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """[model]: the shared keys below, plus the keys of the family's recipe (`arch`), which sit
    in the same table (for `mot`: llm, vit, latent, use_vit, use_latent, init_vit; see the family's
    `recipe` in tapestry/models/<family>/family.py)."""

    family: str = families.DEFAULT_FAMILY  # the model family (tapestry.models.family registry)
    init_from: str = ""  # a save_pretrained folder to fine-tune from (Inset: start from a base)
    tokenizer: str = ""  # a tokenizer folder; "" trains a byte-level BPE on the data at start
    vocab_size: int = 1024  # size of that BPE
    tokenizer_docs: int = 2000  # documents of the mixture whose text trains it
    tokenizer_english_chars: int = 200_000  # plus this much English prose, so user prompts do not
    #                                         shatter into bytes (tapestry's general_english)
    vae: str = "pool:4"  # an autoencoder folder or ae.safetensors, or "pool:F" (F×F average pooling; tests only)
    arch: Any = None  # the family's recipe dataclass; None: its defaults

    def __post_init__(self) -> None:
        if self.arch is None:
            self.arch = families.get(self.family).recipe()


SHARED_MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "arch")


@dataclass
class LayoutChoices:
    """The choices of tapestry.layout.LayoutConfig that are not sizes (sizes come from the model)."""

    references_as_vae: bool = False  # Inset: references only through the ViT (no copy-paste)
    context_as_vae: bool = True
    clean_copy: bool = True
    noise_copies: int = 1  # noise spans per target image (tapestry.layout.LayoutConfig.noise_copies)
    text_loss: str = "targets"  # "targets" | "all"
    target_size: list[int] = field(default_factory=lambda: [64, 64])
    text_turns: bool = False  # each text run as a chat turn (BAGEL's <|im_start|> text <|im_end|>):
    #                           true when fine-tuning a BAGEL-layout checkpoint, which was trained so


SOURCE_KINDS = ("toyworld", "shards")


WORLD_FIELDS = ("shapes", "colours", "patterns", "backgrounds", "entities")


@dataclass
class SourceConfig:
    name: str = ""
    kind: str = "toyworld"  # "toyworld" (seeded train stream) | "shards" (Document files)
    weight: float = 1.0
    task: str = "compose"  # toyworld: compose | story | edit | understand | howto | copy (a diagnostic)
    layout: str = "inline"  # toyworld: inline | image-first (story and howto are interleaved)
    side: int = 64  # toyworld: pixels per image side
    path: str = ""  # shards: a .tar / .jsonl / .json file, a folder of them, or a glob
    # toyworld compose, copy and understand: a restricted world (tapestry.toyworld.sampling.World).
    # Absent (None): the whole world, and the very documents of an unrestricted stream.
    shapes: list[str] | None = None  # names from tapestry.toyworld.spec.SHAPES
    colours: list[str] | None = None  # ... COLOURS
    patterns: list[str] | None = None  # ... PATTERNS
    backgrounds: list[str] | None = None  # ... BACKGROUND_KINDS (plain, grid, gradient, noise)
    entities: list[int] | None = None  # [min, max] entities per scene, e.g. [1, 1]

    def world_fields(self) -> dict[str, Any]:
        """The restriction fields that are set."""
        return {name: getattr(self, name) for name in WORLD_FIELDS if getattr(self, name) is not None}


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    budget: int = 1024  # tokens per packed row
    rows: int = 4  # rows per optimizer step, over all processes (the global batch)
    lookahead: int = 512  # tokens of spare candidate documents per step, so rows pack tightly
    timestep_shift: float = 1.0  # flow-matching shift s (1.0 for tiny models, 3.0 at high res)
    # extra flow-loss weight on the latents of a ToyWorld target's entities (issue 20): a latent
    # inside an entity's box weighs 1 + focus_weight before each image's weights are scaled to
    # mean 1, so the loss's scale stays and only moves towards the entities; 0 = off.
    # Families that take it say so (`supports_focus_weight`).
    focus_weight: float = 0.0


DROPOUT_POLICIES = ("none", "bagel", "illume", "mmi")


@dataclass
class DropoutConfig:
    """Condition dropout (see tapestry.train.dropout). Rates are per document with a target image."""

    policy: str = "none"
    text: float = 0.1  # bagel and mmi: P(drop the text condition)
    vit: float = 0.3  # bagel: P(drop ViT tokens of given images)
    vae: float = 0.3  # bagel: P(drop VAE tokens of given images)
    keep: float = 0.8  # illume: P(keep both) ...
    drop_text: float = 0.1  # ... P(drop text only) ...
    drop_both: float = 0.1  # ... P(drop text and images); the three sum to 1
    text_scope: str = "all"  # dropped text: "all" of it, or the "last" chunk (since the previous image)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class ScheduleConfig:
    warmup: int = 0  # linear warm-up steps at the start of every stage
    decay: str = "cosine"  # "cosine" (to min_lr_ratio·lr at the stage end) | "constant"
    min_lr_ratio: float = 0.1


@dataclass
class EMAConfig:
    decay: float = 0.999  # 0 disables EMA (exports then use the raw weights)
    start: int = 0  # steps before EMA starts tracking (it copies the weights at that step)


@dataclass
class StageConfig:
    """A stretch of training with its own freeze set, learning rates and loss weights."""

    name: str = "main"
    steps: int = 100
    lr: float = 0.0  # 0: optim.lr
    warmup: int = -1  # -1: schedule.warmup
    decay: str = ""  # "": schedule.decay
    freeze: list[str] = field(default_factory=list)  # names of the family's parameter groups
    lr_scale: dict[str, float] = field(default_factory=dict)  # group -> multiplier of the stage lr
    # Loss part weights, by the names of the family's `loss_parts` (default 1 each):
    text_weight: float = 1.0  # the part named "text" (every built-in family's next-token CE)
    flow_weight: float = 1.0  # the part named "flow" (mot's and duet's flow-matching MSE)
    loss_weights: dict[str, float] = field(default_factory=dict)  # any part -> weight; wins over the two above
    mixture: dict[str, float] = field(default_factory=dict)  # source name -> weight override


@dataclass
class ParallelConfig:
    mode: str = "auto"  # "auto" (ddp under torchrun, else none) | "none" | "ddp" | "fsdp"
    device: str = "auto"  # "auto" (cuda when present) | "cpu" | "cuda"
    activation_checkpointing: bool = False  # recompute each decoder layer (the family's blocks) in backward
    cpu_offload: bool = False  # mode "fsdp": parameters, gradients and AdamW states live in host RAM
    #                           (FSDP2's CPUOffloadPolicy); each block is copied to the device for its
    #                           forward and backward, and the optimizer steps on the CPU
    compile: bool = False
    autocast: str = "none"  # "none" | "bf16"
    threads: int = 0  # torch CPU threads per process (0: torch's default); on a CPU shared with
    #                   other jobs fewer threads can be faster


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (the last step is always saved)
    keep: int = 3  # complete checkpoints kept; older ones are removed


@dataclass
class LogConfig:
    every: int = 10
    tensorboard: bool = False


@dataclass
class EvalConfig:
    every: int = 0  # steps between validation losses; 0 disables
    docs: int = 16  # fixed validation documents (ToyWorld val split, or shards)
    judge_every: int = 0  # steps between judged samples (tapestry.infer + the ToyWorld judge); 0 disables
    judge_docs: int = 8
    judge_steps: int = 20  # denoising steps per judged image


@dataclass
class TrainConfig:
    seed: int = 0  # weights, data order, dropout and noise; also the ToyWorld train stream number
    model: ModelConfig = field(default_factory=ModelConfig)
    layout: LayoutChoices = field(default_factory=LayoutChoices)
    data: DataConfig = field(default_factory=DataConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> tuple[int, StageConfig, int]:
        """(stage index, stage, step inside the stage) of global step `step` (0-based)."""
        begin = 0
        for i, stage in enumerate(self.stages):
            if step < begin + stage.steps:
                return i, stage, step - begin
            begin += stage.steps
        return len(self.stages) - 1, self.stages[-1], self.stages[-1].steps

    def validate(self) -> TrainConfig:
        def need(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise TrainConfigError(f"{key}: {message}")

        d = self.data
        need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        need(bool(d.sources), "data.sources", "add at least one [[data.sources]] table")
        names = [s.name for s in d.sources]
        need(len(set(names)) == len(names) and all(names), "data.sources",
             f"every source needs a unique name, got {names}")
        for i, s in enumerate(d.sources):
            key = f"data.sources.{i}"
            need(s.kind in SOURCE_KINDS, f"{key}.kind", f"{s.kind!r} is not one of {SOURCE_KINDS}")
            need(s.weight >= 0 and math.isfinite(s.weight), f"{key}.weight", f"must be >= 0, got {s.weight}")
            need(s.kind != "shards" or bool(s.path), f"{key}.path", "a shards source needs a path")
            need(s.layout in ("inline", "image-first"), f"{key}.layout", "must be inline or image-first")
            need(16 <= s.side <= 1024, f"{key}.side", f"must be 16..1024 pixels, got {s.side}")
            restricted = s.world_fields()
            if restricted:
                need(s.kind == "toyworld", f"{key}.{next(iter(restricted))}", f"restricts a ToyWorld stream; a "
                     f"{s.kind} source reads its documents as they are (remove the field)")
                from tapestry.toyworld.spec import SpecError
                from tapestry.toyworld.tasks import ALL_TASKS, world_for

                need(s.task in ALL_TASKS, f"{key}.task", f"{s.task!r} is not one of {ALL_TASKS}")
                try:
                    world_for(s.task, **restricted)
                except SpecError as exc:
                    raise TrainConfigError(f"{key}.{exc}") from None
        need(sum(s.weight for s in d.sources) > 0, "data.sources", "weights sum to 0")
        need(d.budget >= 8, "data.budget", f"must be >= 8 tokens, got {d.budget}")
        need(d.rows >= 1, "data.rows", f"must be >= 1, got {d.rows}")
        need(d.lookahead >= 0, "data.lookahead", f"must be >= 0, got {d.lookahead}")
        need(d.timestep_shift > 0, "data.timestep_shift", "must be > 0")
        need(d.focus_weight >= 0, "data.focus_weight", f"must be >= 0 (0 = off), got {d.focus_weight}")
        need(not d.focus_weight or getattr(families.get(self.model.family), "supports_focus_weight", False),
             "data.focus_weight", f"the {self.model.family} family does not weigh its image loss by region; "
             "leave it at 0")
        need(self.layout.text_loss in ("targets", "all"), "layout.text_loss", "must be targets or all")
        need(len(self.layout.target_size) == 2, "layout.target_size", "must be [height, width]")
        need(self.layout.noise_copies >= 1, "layout.noise_copies", "must be >= 1")

        p = self.dropout
        need(p.policy in DROPOUT_POLICIES, "dropout.policy", f"{p.policy!r} is not one of {DROPOUT_POLICIES}")
        for name in ("text", "vit", "vae", "keep", "drop_text", "drop_both"):
            value = getattr(p, name)
            need(0.0 <= value <= 1.0, f"dropout.{name}", f"a probability in [0, 1], got {value}")
        if p.policy == "illume":
            need(abs(p.keep + p.drop_text + p.drop_both - 1.0) < 1e-6, "dropout",
                 f"illume needs keep + drop_text + drop_both = 1, got {p.keep + p.drop_text + p.drop_both}")
        need(p.text_scope in ("all", "last"), "dropout.text_scope", "must be all or last")

        o = self.optim
        need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
        need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)")
        need(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables)")
        need(self.schedule.decay in ("cosine", "constant"), "schedule.decay", "must be cosine or constant")
        need(0 <= self.ema.decay < 1, "ema.decay", f"must be in [0, 1), got {self.ema.decay}")

        check_recipe = getattr(self.model.arch, "validate", None)
        if check_recipe is not None:  # the family's own checks of its [model] keys
            try:
                check_recipe()
            except TapestryError as exc:
                raise TrainConfigError(f"model.{exc}") from None
        family = families.get(self.model.family)
        groups, parts = family.param_groups, tuple(family.loss_parts)
        need(bool(self.stages), "stages", "add at least one [[stages]] table")
        for i, s in enumerate(self.stages):
            key = f"stages.{i}"
            need(s.steps >= 1, f"{key}.steps", f"must be >= 1, got {s.steps}")
            need(s.decay in ("", "cosine", "constant"), f"{key}.decay", "must be cosine, constant or empty")
            for group in list(s.freeze) + list(s.lr_scale):
                need(group in groups, f"{key}", f"unknown parameter group {group!r}; groups: {groups}")
            for source in s.mixture:
                need(source in names, f"{key}.mixture", f"unknown source {source!r}; sources: {names}")
            need(len(set(s.freeze)) < len(groups), f"{key}.freeze", "freezes every group; nothing would train")
            for part, weight in s.loss_weights.items():
                need(part in parts, f"{key}.loss_weights", f"family {family.name!r} has no loss part {part!r}; its "
                     f"parts: {list(parts)}")
                need(math.isfinite(weight) and weight >= 0, f"{key}.loss_weights.{part}", f"must be >= 0, got {weight}")
            for part, weight in (("text", s.text_weight), ("flow", s.flow_weight)):
                need(math.isfinite(weight) and weight >= 0, f"{key}.{part}_weight", f"must be >= 0, got {weight}")
                need(weight == 1.0 or part in parts, f"{key}.{part}_weight",
                     f"family {family.name!r} has no loss part {part!r} (its parts: {list(parts)}); set "
                     f"{key}.loss_weights.<part> instead")

        par = self.parallel
        need(par.mode in ("auto", "none", "ddp", "fsdp"), "parallel.mode", "auto, none, ddp or fsdp")
        need(par.device in ("auto", "cpu", "cuda"), "parallel.device", "auto, cpu or cuda")
        need(par.autocast in ("none", "bf16"), "parallel.autocast", "none or bf16")
        need(par.threads >= 0, "parallel.threads", "must be >= 0 (0: torch's default)")
        need(not par.cpu_offload or par.mode == "fsdp", "parallel.cpu_offload",
             f"offloads FSDP2's shards; it needs parallel.mode = \"fsdp\" (got {par.mode!r})")
        need(self.checkpoint.every >= 1, "checkpoint.every", "must be >= 1")
        need(self.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
        need(self.log.every >= 1, "log.every", "must be >= 1")
        return self


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass
# ---------------------------------------------------------------------------------------------


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(options[0], value, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise TrainConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(item, v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise TrainConfigError(f"{key}: expected a table, got {value!r}")
        return {str(k): _convert(item, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise TrainConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TrainConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TrainConfigError(f"{key}: unsupported field type {tp}")


def _model_from_dict(data: dict[str, Any], where: str) -> ModelConfig:
    """[model]: the shared keys, and the rest as the named family's recipe."""
    name = data.get("family", families.DEFAULT_FAMILY)
    if not isinstance(name, str):
        raise TrainConfigError(f"{where}.family: expected a string, got {name!r}")
    try:
        family = families.get(name)
    except families.FamilyError as exc:
        raise TrainConfigError(f"{where}.family: {exc}") from None
    shared = {k: v for k, v in data.items() if k in SHARED_MODEL_KEYS}
    rest = {k: v for k, v in data.items() if k not in SHARED_MODEL_KEYS}
    own = {f.name for f in dataclasses.fields(family.recipe)}
    unknown = sorted(set(rest) - own)
    if unknown:
        raise TrainConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(set(SHARED_MODEL_KEYS) | own)} "
                               f"(family {name!r})")
    hints = typing.get_type_hints(ModelConfig)
    values = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in shared.items()}
    return ModelConfig(**values, arch=from_dict(family.recipe, rest, where))


def from_dict(cls, data: Any, where: str = "config"):
    """Build dataclass `cls` from a TOML-like dict; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise TrainConfigError(f"{where}: expected a table, got {data!r}")
    if cls is ModelConfig:
        return _model_from_dict(data, where)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TrainConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    values = {k: _convert(hints[k], v, f"{where}.{k}" if where != "config" else k) for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise TrainConfigError(f"{where}: {exc}") from None


def to_dict(config) -> dict[str, Any]:
    """The config as the dict its TOML reads to ([model] with its family recipe's keys inline)."""
    if dataclasses.is_dataclass(config):
        return {k: to_dict(v) for k, v in _items(config)}
    if isinstance(config, list):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


# ---------------------------------------------------------------------------------------------
# Overrides: --set a.b.c=value
# ---------------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A TOML value (`3e-4`, `true`, `[0.9, 0.95]`, `"x"`); anything else is taken as a string,
    so `--set model.vae=pool:4` needs no quotes."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` to a raw config dict in place; list items are addressed by index
    (`stages.0.lr=1e-4`, `data.sources.1.weight=0.5`)."""
    if "=" not in assignment:
        raise TrainConfigError(f"override {assignment!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
    key, _, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise TrainConfigError(f"override {assignment!r}: empty part in key {key!r}")
    node: Any = data
    defaults = to_dict(TrainConfig())
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = _list_item(node, part, where)
        elif not isinstance(node, dict):
            raise TrainConfigError(f"override {assignment!r}: {'.'.join(parts[:depth])} is a value, not a table")
        else:
            if part not in node:
                node[part] = _default_at(defaults, parts[: depth + 1], where)
            node = node[part]
    last = parts[-1]
    value = parse_value(text.strip())
    if isinstance(node, list):
        index = _index(last, len(node), key)
        node[index] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise TrainConfigError(f"override {assignment!r}: {'.'.join(parts[:-1])} is not a table")


def _index(part: str, length: int, where: str) -> int:
    if not part.isdigit() or int(part) >= length:
        raise TrainConfigError(f"override {where}: {part!r} is not an index of a list of {length}")
    return int(part)


def _list_item(node: list, part: str, where: str):
    return node[_index(part, len(node), where)]


def _default_at(defaults: Any, parts: list[str], where: str):
    node = defaults
    for part in parts:
        if isinstance(node, list):
            node = node[_index(part, len(node), where)] if part.isdigit() and int(part) < len(node) else {}
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return {}
    return node if isinstance(node, (dict, list)) else {}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise TrainConfigError(f"{path}: not valid TOML ({exc})") from None
    return config_from_data(data, overrides, where=str(path))


def config_from_data(data: dict[str, Any], overrides: list[str] = (), where: str = "config") -> TrainConfig:
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return from_dict(TrainConfig, data).validate()
    except TrainConfigError as exc:
        raise TrainConfigError(f"{where}: {exc}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return {True: "inf", False: "-inf"}[value > 0] if math.isinf(value) else "nan"
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def dump_toml(config: TrainConfig) -> str:
    """The config as TOML that `load_config` reads back to an equal config.

    Walks the dataclasses (not their dicts) so sections become [tables], lists of sections become
    [[arrays of tables]] and free-form dicts (lr_scale, mixture) stay inline tables."""
    lines: list[str] = []

    def scalars_of(obj) -> list[str]:
        out = []
        for key, value in _items(obj):
            if dataclasses.is_dataclass(value) or _is_section_list(value) or value is None:
                continue  # None: a field left unset, which TOML writes by leaving it out
            out.append(f"{_toml_key(key)} = {_toml_value(value)}")
        return out

    def emit(prefix: str, obj) -> None:
        own = scalars_of(obj)
        if own:
            if prefix:
                lines.append(f"[{prefix}]")
            lines.extend(own)
            lines.append("")
        for key, value in _items(obj):
            name = f"{prefix}.{key}" if prefix else key
            if dataclasses.is_dataclass(value):
                emit(name, value)
            elif _is_section_list(value):
                for item in value:
                    lines.append(f"[[{name}]]")
                    lines.extend(scalars_of(item))
                    lines.append("")

    emit("", config)
    return "\n".join(lines).rstrip() + "\n"


def _items(obj) -> list[tuple[str, Any]]:
    """A section's fields in order; [model] holds its family recipe's fields in the same table."""
    if isinstance(obj, ModelConfig):
        shared = [(name, getattr(obj, name)) for name in SHARED_MODEL_KEYS]
        return [(f.name, getattr(obj.arch, f.name)) for f in dataclasses.fields(obj.arch)] + shared
    return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]


def _is_section_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(dataclasses.is_dataclass(v) for v in value)
