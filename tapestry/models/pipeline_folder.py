"""The pipeline folder: everything generation needs, in one folder a person can read.

    DIR/pipeline.json          format, family, autoencoder kind, layout config, generation defaults
    DIR/config.json            the model's config (with its "family")   DIR/model.safetensors
    DIR/tokenizer.json         + tokenizer_specials.json
    DIR/vae/                   the autoencoder, in a folder tapestry.models.vae.load_autoencoder reads

`tapestry export` (train/) writes it and `Pipeline` (infer/) reads it; the format lives here,
below both, and goes through the family registry (tapestry/models/family.py) for the model.

An adapter folder (what `tapestry export` writes for a LoRA run) holds the adapters alone and
names the model they adapt; it loads as that model with its adapters (unmerged):

    DIR/adapter.json           format, family, base (the init_from folder), layout, generation defaults
    DIR/...                    the family's adapter files (mot: adapter_model.safetensors +
                               adapter_config.json, peft LoRA)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tapestry.atomic import atomic_write_text
from tapestry.errors import TapestryError
from tapestry.layout import LayoutConfig

FORMAT = "tapestry.pipeline"
PIPELINE_FILE = "pipeline.json"
ADAPTER_FORMAT = "tapestry.adapters"
ADAPTER_FILE = "adapter.json"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "default"


class CheckpointNotFound(TapestryError):
    pass


def resolve_checkpoint(name: str | os.PathLike) -> Path:
    if str(name) == "default":
        if not (DEFAULT_DIR / PIPELINE_FILE).is_file():
            raise CheckpointNotFound(
                f"the embedded default checkpoint is missing from {DEFAULT_DIR}; reinstall tapestry "
                "or pass --checkpoint DIR (a folder written by `tapestry export`)")
        return DEFAULT_DIR
    path = Path(name)
    if not path.is_dir():
        raise CheckpointNotFound(f"checkpoint {str(name)!r} not found: give 'default' or a folder "
                                 f"holding {PIPELINE_FILE}")
    if not (path / PIPELINE_FILE).is_file() and not (path / ADAPTER_FILE).is_file() and _upstream_family(path) is None:
        raise CheckpointNotFound(f"{path} has no {PIPELINE_FILE}: it is not an exported tapestry "
                                 "pipeline (a training run folder is exported with `tapestry export`)")
    return path


def _upstream_family(folder: Path):
    """The family that reads `folder` in an upstream layout (e.g. BAGEL's release), or None."""
    from tapestry.models import family as families

    for name in families.names():
        family = families.get(name)
        detect = getattr(family, "is_upstream", None)
        if detect is not None and detect(folder):
            return family
    return None


def checkpoint_hash(folder: Path) -> str:
    """sha256 over every weight and config file of the folder, in sorted order (short form); an
    adapter folder's hash covers its base model's too."""
    from tapestry.atomic import OUTPUT_MARKER

    digest = hashlib.sha256()
    if (Path(folder) / ADAPTER_FILE).is_file():
        digest.update(checkpoint_hash(_adapter_base(Path(folder))).encode())
    # the output marker says who wrote the folder (and with which tapestry version), not what it holds
    for path in sorted(p for p in Path(folder).rglob("*")
                       if p.is_file() and p.suffix in {".safetensors", ".json"} and p.name != OUTPUT_MARKER):
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def save_pipeline(folder: str | os.PathLike, model, tokenizer, vae, layout: LayoutConfig, defaults: Any = None) -> Path:
    """Write a pipeline folder (each file atomically). `defaults`: generation defaults, a
    dataclass (GenerationOptions) or a dict of its fields; omitted fields take the engine's."""
    from tapestry.models import family as families

    folder = Path(folder)
    model.save_pretrained(folder)
    family = families.family_of_folder(folder)  # what config.json says, as loading will read it
    tokenizer.save(folder)
    vae.save_pretrained(folder / "vae")
    generation = dataclasses.asdict(defaults) if dataclasses.is_dataclass(defaults) else dict(defaults or {})
    record = {
        "format": FORMAT,
        "family": family.name,
        "vae": type(vae).__name__,
        "layout": dataclasses.asdict(layout),
        "generation": generation,
    }
    atomic_write_text(folder / PIPELINE_FILE, json.dumps(record, indent=1))
    return folder


def save_adapter_folder(folder: str | os.PathLike, family, model, recipe, base: str | os.PathLike,
                        layout: LayoutConfig, defaults: Any = None) -> Path:
    """Write an adapter folder: the family's adapter files for `model` (its `save_adapters`) and
    adapter.json naming `base`, the folder of the model they adapt (stored as an absolute path)."""
    folder, base = Path(folder), Path(base).resolve()
    family.save_adapters(model, recipe, folder, str(base))
    generation = dataclasses.asdict(defaults) if dataclasses.is_dataclass(defaults) else dict(defaults or {})
    record = {"format": ADAPTER_FORMAT, "family": family.name, "base": str(base),
              "layout": dataclasses.asdict(layout), "generation": generation}
    atomic_write_text(folder / ADAPTER_FILE, json.dumps(record, indent=1))
    return folder


def _read_record(where: Path, fmt: str) -> dict[str, Any]:
    from tapestry.models.common.checkpoint import CheckpointError, read_json_file

    record = read_json_file(where, f"a {fmt} record (tapestry export writes it)")
    if record.get("format") != fmt:
        raise CheckpointError(f"{where}: not a tapestry {fmt.split('.')[-1]} file (format "
                              f"{record.get('format')!r}, expected {fmt!r})")
    return record


# Every layout field must be in the record (a missing one would silently take a default the
# model was not trained with), except those added after pipelines were first written: a record
# without them was written before they existed and means their defaults.
LAYOUT_ADDED_LATER = ("text_turns", "noise_copies")


def _layout_of(record: dict[str, Any], where: Path) -> LayoutConfig:
    """The `layout` of a pipeline.json / adapter.json, field by field (CheckpointError naming it)."""
    from tapestry.models.common.checkpoint import CheckpointError
    from tapestry.models.common.config import section_from_dict

    required = [f.name for f in dataclasses.fields(LayoutConfig) if f.name not in LAYOUT_ADDED_LATER]
    layout = section_from_dict(LayoutConfig, record.get("layout"), f"{where}: layout", CheckpointError,
                               required=required, fix="write the checkpoint again (tapestry export)")
    for name, value in dataclasses.asdict(layout).items():
        numbers = value if isinstance(value, (tuple, list)) else [value]
        if any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in numbers):
            raise CheckpointError(f"{where}: layout.{name}: must be at least 1, got {value}")
    if layout.text_loss not in ("targets", "all"):
        raise CheckpointError(f"{where}: layout.text_loss: expected 'targets' or 'all', got {layout.text_loss!r}")
    return layout


def _generation_of(record: dict[str, Any], where: Path) -> dict[str, Any]:
    from tapestry.models.common.checkpoint import CheckpointError

    generation = record.get("generation", {})
    if not isinstance(generation, dict):
        raise CheckpointError(f"{where}: generation: expected an object, got {type(generation).__name__}")
    return dict(generation)


def _adapter_base(folder: Path) -> Path:
    where = folder / ADAPTER_FILE
    base = _read_record(where, ADAPTER_FORMAT).get("base")
    if not isinstance(base, str) or not Path(base).is_dir():
        raise TapestryError(f"{where}: base {base!r} is not a folder here; the adapters need the model they were "
                            "trained on (edit \"base\" to where it lives now)")
    return Path(base)


@dataclass
class PipelineParts:
    family: Any  # tapestry.models.family.Family
    model: Any
    tokenizer: Any
    codec: Any
    layout: LayoutConfig
    generation: dict[str, Any]  # the generation defaults as stored
    folder: Path


def read_pipeline_record(folder: str | os.PathLike) -> tuple[dict[str, Any], str, LayoutConfig, dict[str, Any]]:
    """`pipeline.json` of a pipeline folder, checked field by field before any weights are read:
    (record, family name, layout, generation defaults as stored). A bad record is one
    CheckpointError naming the file and the field (`pipeline.json: layout.target_size: missing`)."""
    from tapestry.models import family as families
    from tapestry.models.common.checkpoint import CheckpointError

    where = Path(folder) / PIPELINE_FILE
    record = _read_record(where, FORMAT)
    try:
        family = families.family_name(record, str(where))
    except families.FamilyError as e:
        raise CheckpointError(str(e)) from None
    return record, family, _layout_of(record, where), _generation_of(record, where)


def load_pipeline(folder: str | os.PathLike, device: str = "cpu") -> PipelineParts:
    """Read a pipeline folder for inference: weights frozen (`requires_grad_(False)`), eval mode."""
    from tapestry.models import family as families
    from tapestry.models.common.tokenizer import TextTokenizer
    from tapestry.models.vae import VAEError, load_autoencoder

    folder = Path(folder)
    where = folder / PIPELINE_FILE
    if not where.is_file() and (folder / ADAPTER_FILE).is_file():
        return _load_adapter_folder(folder, device)
    upstream = _upstream_family(folder) if not where.is_file() else None
    if upstream is not None:  # read in place: no conversion, weights frozen as below
        model, tokenizer, codec, layout, generation = upstream.read_upstream(folder, device=device)
        model.eval().requires_grad_(False)
        return PipelineParts(upstream, model, tokenizer, codec, layout, generation, folder)
    _, name, layout, generation = read_pipeline_record(folder)
    try:
        family = families.get(name)
    except families.FamilyError as e:
        raise TapestryError(f"{where}: {e}") from None
    model = family.from_pretrained(folder, device=device)
    model.eval().requires_grad_(False)
    tokenizer = TextTokenizer.load(folder)
    try:
        codec = load_autoencoder(folder / "vae", device=device)
    except VAEError as e:
        raise TapestryError(f"{folder / 'vae'}: {e}") from None
    if hasattr(codec, "requires_grad_"):
        codec.eval().requires_grad_(False)
    return PipelineParts(family, model, tokenizer, codec, layout, generation, folder)


def _load_adapter_folder(folder: Path, device: str) -> PipelineParts:
    """The base model of an adapter folder with the adapters added (not merged: the model the
    run trained, to the bit), and the layout and generation defaults the run trained with."""
    from tapestry.models import family as families

    where = folder / ADAPTER_FILE
    record = _read_record(where, ADAPTER_FORMAT)
    base = load_pipeline(_adapter_base(folder), device=device)
    try:
        family = families.get(families.family_name(record, str(where)))
    except families.FamilyError as e:
        raise TapestryError(f"{where}: {e}") from None
    if family.name != base.family.name:
        raise TapestryError(f"{where}: adapters of family {family.name!r} on a {base.family.name!r} base model")
    family.load_adapters(base.model, folder)
    base.model.eval().requires_grad_(False)
    generation = {**base.generation, **_generation_of(record, where)}
    return PipelineParts(family, base.model, base.tokenizer, base.codec, _layout_of(record, where), generation, folder)
