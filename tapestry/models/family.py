"""Model families behind one protocol (DESIGN §5), and the registry that finds them by name.

Training (`tapestry.train`), inference (`tapestry.infer`) and evaluation (`tapestry.eval`) never
import a family's folder and never branch on a family: they look the family up here by the
`family` field of a checkpoint's `config.json` / `pipeline.json` (or `model.family` of a
training config) and call only the methods below. Nothing else outside the folder imports it
either (serving, the CLI, benchmarks/; tests/test_family_protocol.py checks). A family's folder
(`tapestry/models/<family>/`) holds its config, model, glue (an object implementing `Family`),
converters for upstream checkpoint layouts and its own commands; it registers that object
with `register`.

Built-in families are imported lazily the first time they are asked for (`BUILTIN`), so
importing this module imports no family. A family outside the package (a plugin, or the
test-only family of tests/test_family_protocol.py) calls `register(MyFamily())` once.

The protocol, in the order a model's life uses it
--------------------------------------------------

Config and weights
    recipe                      dataclass of the keys this family reads from a training
                                config's [model] table (besides the shared ones: family,
                                init_from, tokenizer, vocab_size, tokenizer_*, vae)
    model_config(recipe, vocab_size, latent_channels) -> config
                                the typed model config (has `to_json()`), sizes filled in from
                                the tokenizer and the autoencoder
    load_config(folder) -> config
                                typed configs have `to_dict()` / `to_json()` carrying
                                `"family": name` (how a model's family is found again)
    build(config) -> nn.Module  fresh weights (seeded by the caller's torch RNG); may run under
                                `torch.device("meta")`
    initialize(model, recipe)   load pretrained parts a training recipe names into a fresh
                                model (mot: `init_vit`); a no-op when it names none
    from_pretrained(folder, device) / model.save_pretrained(folder)
                                `config.json` (with `"family": name`) + safetensors
    from_state_dict(config, state, source) -> nn.Module
                                a model holding exactly `state` (strict keys); export and EMA
    layout_config(config, downsample, **choices) -> LayoutConfig
                                the token grids this model reads (sizes come from the model)

Training
    layout(doc, tokenizer, layout, supervise_text, *, config) -> SequenceLayout
                                Document -> the family's packed sequence (tapestry.layout);
                                condition dropout cuts the Document before this is called;
                                `config` is the model config (sizes the layout does not carry)
    prepare(row, documents, layout, codec, generator, timestep_shift, *, config, tokenizer)
                                a packed row + its Documents -> the model's inputs (pixels,
                                noised latents, targets), seeded by `generator`; a family
                                with `supports_focus_weight = True` also takes
                                `focus_weight=` (train config `data.focus_weight`), passed
                                only when it is not 0
    codec_pixels(row, documents, layout) -> [Tensor [3, H, W]]
                                the pixels `prepare` will encode (batched ahead of time)
    loss_parts: tuple[str]      the names of the parts `loss` and `loss_counts` return, in the
                                order logs show them (mot: ("text", "flow"); mmi: ("text",
                                "image"))
    loss_counts(rows, config) -> {part: count}
                                denominators of each loss part over the *global* batch
    loss(model, batch) -> {part: summed loss tensor}
                                the named parts, summed over this process's rows; train/loss.py
                                divides by the global counts and weighs each part by the stage's
                                `loss_weights[part]` (`text_weight` / `flow_weight` are that
                                weight for parts named "text" / "flow"; default 1)
    param_groups: tuple[str]    names of parameter groups (freeze sets, per-group lr); every
    group_of(name) -> str       parameter (name relative to the model) belongs to one
    blocks(model) -> [nn.Module]
                                the repeated units activation checkpointing, compile and FSDP2
                                wrap

Adapters (optional: a family without these methods trains every parameter)
    add_adapters(model, recipe) -> [name]
                                inject the adapters the recipe names (mot: peft LoRA from
                                [model.lora], experts and modules chosen there) and return their
                                parameter names (empty: none asked for). train/ then trains only
                                those (minus frozen groups), keeps only them in checkpoints and
                                EMA, and re-reads the base from `init_from`
    save_adapters(model, recipe, folder, base) / load_adapters(model, folder)
                                the adapters alone, in the family's own files
    merge_adapters(model) -> model
                                fold them into the base weights: a plain model again

Upstream layouts (optional)
    is_upstream(folder) / read_upstream(folder, device)
                                a released checkpoint read in place (mot: BAGEL's layout)

Inference
    runtime(model, tokenizer, codec, layout) -> Runtime (below): what the engine drives

Looking at a folder (optional: `tapestry inspect`)
    inspect(folder) -> report | None
                                what a folder of this family holds — its own checkpoint or a
                                published layout it reads — from JSON configs and safetensors
                                headers only (tapestry.models.inspection.new_report's keys);
                                None when the folder is nothing this family reads

Measured alone (optional: benchmarks/)
    benchmark_parts() -> namespace
                                the family's own pieces that a benchmark times directly, beyond
                                the protocol (mot: KVCache, Context, Block, the memory
                                estimator, BAGEL_7B; mmi: MMFS); code meant for every family
                                never uses it, and benchmarks/ import no family folder

Its own commands (optional: `tapestry <command>`)
    A family's commands that fit no other family (mot: `tapestry convert`, `memory`, `vit`)
    live in its folder, in the module `BUILTIN_COMMANDS` names, as `COMMANDS` (name -> command
    function) and `GROUPS` (name -> typer.Typer); tapestry/cli.py mounts them through
    `command_line()`. They are found by module name rather than on the family object because
    `tapestry --help` must not import torch and the model: that module imports typer and rich
    only, and its commands import the rest when they run.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from tapestry.errors import TapestryError

if TYPE_CHECKING:  # annotations only: importing the registry (as tapestry/cli.py does) imports no torch
    from torch import Tensor

# name -> module that registers it when imported (the families that ship in the package)
BUILTIN: dict[str, str] = {"mot": "tapestry.models.mot.family", "duet": "tapestry.models.duet.family",
                            "mmi": "tapestry.models.mmi.family"}
# name -> module of the family's own `tapestry` commands ("Its own commands" above)
BUILTIN_COMMANDS: dict[str, str] = {"mot": "tapestry.models.mot.cli"}
DEFAULT_FAMILY = "mot"


class FamilyError(TapestryError):
    """A family name that nobody registered, or a checkpoint that names none."""


@runtime_checkable
class Runtime(Protocol):
    """One model ready to generate: what `tapestry.infer.engine` drives, and all it drives.

    A *context* is the family's cached state of one Document prefix (a KV cache, features of
    the images so far, ...): opaque to the engine, which only hands it back. Guidance branches
    are separate contexts built from separate (condition-dropped) Documents.

        context = prefill(doc, recompute)  # every given segment of `doc` (no targets), opened
                                           # after the last one (no end-of-document token);
                                           # an empty doc is just the begin-of-document token
        append_text(context, ids)          # text tokens (including BOI/EOI/EOS the engine chose)
        append_image(context, image, role) # a finished image joins: a given one whole (its
                                           # begin/end markers included), or — after
                                           # begin_image — the one just drawn, at its place,
                                           # followed by its end marker
        begin_image(context)               # the image about to be drawn takes its place
                                           # (called on every branch context after its BOI)
        next_text(context) -> logits [V]   # the language head after the last token
        noise(size, generator) -> x        # initial latents of a (height, width) image
        denoise(contexts, x, t, batched) -> {branch: v}
                                           # velocity of x at time t under every branch, each
                                           # against its own context; same shape as x with
                                           # channels last (what guidance rules expect)
        decode(x, size) -> pixels          # [1, 3, H, W] in about [-1, 1]
        target_size                        # (height, width) of a target that declares none

    Batching across requests (tapestry.infer.batching; a server's concurrent generations):

        append_text_batch(items)           # items: [(context, ids)], several *different*
                                           # generations' append_text at once
        denoise_batch(items, batched) -> [{branch: v}]
                                           # items: [(contexts, x, t)], several generations'
                                           # denoise at once, one answer per item

    Optional, as a pair (a family without them has each finished image join in its own thread):

        encode_image(context, image, role) -> encoded
                                           # the encoders' share of append_image (ViT, VAE
                                           # encode, ...): reads the context, changes nothing
        append_image_batch(items)          # items: [(context, image, role, encoded)], several
                                           # generations' append_image at once, with their
                                           # encode_image results

    Each item must come out as its own call alone would (up to the last-bit rounding of a
    batched matmul): each generation keeps its own contexts. A family batches the items whose
    shapes allow one forward and may run the rest one by one; `OneByOne` below is the
    fallback that runs them all one by one (correct, no speed-up).

    Everything runs under `torch.inference_mode()` (the engine enters it).
    """

    tokenizer: Any
    target_size: tuple[int, int]

    def prefill(self, doc, recompute: bool = False) -> Any: ...

    def append_text(self, context: Any, ids: list[int]) -> None: ...

    def append_image(self, context: Any, image, role: str) -> None: ...

    def begin_image(self, context: Any) -> None: ...

    def next_text(self, context: Any) -> Tensor: ...

    def noise(self, size: tuple[int, int], generator) -> Tensor: ...

    def denoise(self, contexts: dict[str, Any], x: Tensor, t: Tensor, batched: bool = True) -> dict[str, Tensor]: ...

    def decode(self, x: Tensor, size: tuple[int, int]) -> Tensor: ...

    def append_text_batch(self, items: list[tuple[Any, list[int]]]) -> None: ...

    def denoise_batch(self, items: list[tuple[dict[str, Any], Tensor, Tensor]],
                      batched: bool = True) -> list[dict[str, Tensor]]: ...


class OneByOne:
    """The cross-request batch methods of `Runtime` for a family that has no batched path: every
    item runs alone, exactly as the engine would run it (a base class of such runtimes)."""

    def append_text_batch(self, items: list[tuple[Any, list[int]]]) -> None:
        for context, ids in items:
            self.append_text(context, ids)

    def denoise_batch(self, items: list[tuple[dict[str, Any], Tensor, Tensor]],
                      batched: bool = True) -> list[dict[str, Tensor]]:
        return [self.denoise(contexts, x, t, batched) for contexts, x, t in items]


@runtime_checkable
class Family(Protocol):
    """What every model family implements (see the module docstring for each method)."""

    name: str
    recipe: type
    param_groups: tuple[str, ...]

    def model_config(self, recipe: Any, vocab_size: int, latent_channels: int) -> Any: ...

    def load_config(self, folder: str | Path) -> Any: ...

    def build(self, config: Any) -> Any: ...

    def initialize(self, model: Any, recipe: Any) -> None: ...

    def from_pretrained(self, folder: str | Path, device: Any = "cpu") -> Any: ...

    def from_state_dict(self, config: Any, state: dict[str, Tensor], source: str = "<state dict>") -> Any: ...

    def layout_config(self, config: Any, downsample: int, **choices) -> Any: ...

    loss_parts: tuple[str, ...]

    def layout(self, doc, tokenizer, layout, supervise_text: bool = True, *, config: Any) -> Any: ...

    def prepare(self, row, documents, layout, codec, generator=None, timestep_shift: float = 1.0, *,
                config: Any, tokenizer: Any) -> Any: ...

    def codec_pixels(self, row, documents, layout) -> list[Tensor]: ...

    def loss_counts(self, rows, config: Any) -> dict[str, int]: ...

    def loss(self, model, batch) -> dict[str, Tensor]: ...

    def group_of(self, name: str) -> str: ...

    def blocks(self, model) -> list: ...

    def runtime(self, model, tokenizer, codec, layout) -> Runtime: ...


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make `family` findable by `family.name` (a later registration of the name replaces it)."""
    missing = [m for m in ("name", "recipe", "param_groups", "loss_parts", "build", "loss", "runtime")
               if not hasattr(family, m)]
    if missing:
        raise FamilyError(f"{type(family).__name__} is not a model family: it lacks {missing}")
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> list[str]:
    """Every family that can be asked for: built in, or registered."""
    return sorted(set(BUILTIN) | set(_REGISTRY))


def get(name: str) -> Family:
    """The family registered as `name` (a built-in one is imported on first use)."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        raise FamilyError(f"unknown model family {name!r}; known families: {', '.join(names())}")
    return _REGISTRY[name]


def command_line() -> tuple[dict[str, Callable[..., Any]], dict[str, Any]]:
    """(commands, groups) the built-in families add to `tapestry`: name -> command function and
    name -> typer.Typer, from their `BUILTIN_COMMANDS` modules (no model is imported)."""
    commands: dict[str, Callable[..., Any]] = {}
    groups: dict[str, Any] = {}
    for module_name in BUILTIN_COMMANDS.values():
        module = importlib.import_module(module_name)
        commands.update(getattr(module, "COMMANDS", {}))
        groups.update(getattr(module, "GROUPS", {}))
    return commands, groups


def family_name(config: dict[str, Any], where: str = "config") -> str:
    """The family a config.json / pipeline.json dict names: its `family` field, or for files
    written before that field existed, the `tapestry.<family>` of its `format`."""
    name = config.get("family")
    if name is None:
        fmt = config.get("format", "")
        name = fmt.split(".", 1)[1] if isinstance(fmt, str) and fmt.startswith("tapestry.") else None
    if not isinstance(name, str) or not name:
        raise FamilyError(f"{where}: names no model family (no 'family' field)")
    return name


def family_of_config(config: Any) -> Family:
    """The family of a typed model config (its `to_dict()` carries `family`)."""
    return get(family_name(config.to_dict(), type(config).__name__))


def family_of_folder(folder: str | Path) -> Family:
    """The family of a model folder, from its config.json."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FamilyError(f"{folder}: no config.json (not a model folder)") from None
    except json.JSONDecodeError as exc:
        raise FamilyError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FamilyError(f"{path}: not a JSON object")
    return get(family_name(data, str(path)))


__all__ = ["BUILTIN", "BUILTIN_COMMANDS", "DEFAULT_FAMILY", "Family", "FamilyError", "OneByOne", "Runtime",
           "command_line", "family_name", "family_of_config", "family_of_folder",
           "get", "names", "register", "unregister"]
