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
    digest = hashlib.sha256()
    if (Path(folder) / ADAPTER_FILE).is_file():
        digest.update(checkpoint_hash(_adapter_base(Path(folder))).encode())
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in {".safetensors", ".json"}):
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
    try:
        record = json.loads(where.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TapestryError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != fmt:
        raise TapestryError(f"{where}: not a tapestry {fmt.split('.')[-1]} file (format "
                            f"{record.get('format') if isinstance(record, dict) else None!r}, expected {fmt!r})")
    return record


def _layout_of(record: dict[str, Any], where: Path) -> LayoutConfig:
    try:
        fields = dict(record["layout"])
        fields["target_size"] = tuple(fields["target_size"])
        return LayoutConfig(**fields)
    except (KeyError, TypeError, ValueError) as e:
        raise TapestryError(f"{where}: invalid layout: {e}") from None


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
    record = _read_record(where, FORMAT)
    try:
        family = families.get(families.family_name(record, str(where)))
        generation = dict(record.get("generation", {}))
    except families.FamilyError as e:
        raise TapestryError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise TapestryError(f"{where}: invalid pipeline file: {e}") from None
    layout = _layout_of(record, where)
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
    generation = {**base.generation, **dict(record.get("generation", {}))}
    return PipelineParts(family, base.model, base.tokenizer, base.codec, _layout_of(record, where), generation, folder)
