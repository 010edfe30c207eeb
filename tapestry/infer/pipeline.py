"""`Pipeline`: everything generation needs, in one folder a person can read.

    DIR/pipeline.json          format, family, layout config, generation defaults
    DIR/config.json            the model's config        DIR/model.safetensors   its weights
    DIR/tokenizer.json         + tokenizer_specials.json
    DIR/vae/                   the autoencoder (its own config.json + model.safetensors)

`Pipeline.from_pretrained("default")` loads the small checkpoint trained on ToyWorld that
ships inside the package (tapestry/assets/default).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from tapestry.atomic import atomic_write_text
from tapestry.document import Document, from_markup
from tapestry.errors import TapestryError
from tapestry.infer.engine import Engine, GenerationOptions
from tapestry.infer.events import Event
from tapestry.layout import LayoutConfig

FORMAT = "tapestry.pipeline"
PIPELINE_FILE = "pipeline.json"
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
    if not (path / PIPELINE_FILE).is_file():
        raise CheckpointNotFound(f"{path} has no {PIPELINE_FILE}: it is not an exported tapestry "
                                 "pipeline (a training run folder is exported with `tapestry export`)")
    return path


def checkpoint_hash(folder: Path) -> str:
    """sha256 over every weight and config file of the folder, in sorted order (short form)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".json"}):
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def save_pipeline(folder: str | os.PathLike, model, tokenizer, vae, layout: LayoutConfig,
                  defaults: GenerationOptions | None = None) -> Path:
    """Write a pipeline folder (each file atomically)."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save(folder)
    vae.save_pretrained(folder / "vae")
    record = {
        "format": FORMAT,
        "family": "mot",
        "vae": type(vae).__name__,
        "layout": dataclasses.asdict(layout),
        "generation": dataclasses.asdict(defaults or GenerationOptions()),
    }
    atomic_write_text(folder / PIPELINE_FILE, json.dumps(record, indent=1))
    return folder


def _load_vae(folder: Path, kind: str):
    if kind == "ToyAutoencoder":
        from tapestry.models.vae.toy import ToyAutoencoder

        return ToyAutoencoder.from_pretrained(folder)
    raise TapestryError(f"{folder}: unknown autoencoder kind {kind!r} in {PIPELINE_FILE}")


class Pipeline:
    """Model + tokenizer + autoencoder + layout, with generation defaults and provenance."""

    def __init__(self, engine: Engine, defaults: GenerationOptions, checkpoint: str, checkpoint_hash: str):
        self.engine = engine
        self.defaults = defaults
        self.checkpoint = checkpoint
        self.checkpoint_hash = checkpoint_hash

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike = "default", device: str = "cpu") -> "Pipeline":
        from tapestry.models.common.tokenizer import TextTokenizer
        from tapestry.models.mot.model import MoTModel

        folder = resolve_checkpoint(name)
        try:
            record = json.loads((folder / PIPELINE_FILE).read_text())
            if record.get("format") != FORMAT or record.get("family") != "mot":
                raise TapestryError(f"{folder / PIPELINE_FILE}: not a tapestry mot pipeline "
                                    f"(format {record.get('format')!r}, family {record.get('family')!r})")
            layout_fields = dict(record["layout"])
            layout_fields["target_size"] = tuple(layout_fields["target_size"])
            layout = LayoutConfig(**layout_fields)
            generation = dict(record.get("generation", {}))
            if generation.get("image_size") is not None:
                generation["image_size"] = tuple(generation["image_size"])
            defaults = GenerationOptions(**generation)
        except (KeyError, TypeError, ValueError) as e:
            raise TapestryError(f"{folder / PIPELINE_FILE}: invalid pipeline file: {e}") from None
        model = MoTModel.from_pretrained(folder, device=device)
        tokenizer = TextTokenizer.load(folder)
        vae = _load_vae(folder / "vae", record.get("vae", ""))
        engine = Engine(model, tokenizer, vae, layout)
        return cls(engine, defaults, str(name), checkpoint_hash(folder))

    def options(self, **overrides) -> GenerationOptions:
        fields = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self.defaults, **fields).check()

    def document(self, doc_or_markup: Document | str, images=None, doc_id: str = "prompt") -> Document:
        if isinstance(doc_or_markup, Document):
            if images:
                raise TapestryError("images are given inside the Document; pass images only with markup")
            return doc_or_markup
        return from_markup(doc_or_markup, images or [], id=doc_id)

    def stream(self, doc_or_markup: Document | str, images=None, **options) -> Iterator[Event]:
        doc = self.document(doc_or_markup, images)
        opts = self.options(**options)
        for event in self.engine.stream(doc, opts):
            if event.type == "done":
                event.document.meta["generation"].update(checkpoint=self.checkpoint,
                                                         checkpoint_hash=self.checkpoint_hash)
            yield event

    def generate(self, doc_or_markup: Document | str, images=None, **options) -> Document:
        for event in self.stream(doc_or_markup, images, **options):
            if event.type == "done":
                return event.document
        raise TapestryError("generation ended without a result")

    def generate_batch(self, docs: list[Document | str], **options) -> list[Document]:
        """Several Documents, one after another with the same options (seed per document =
        seed + its index, so each is reproducible alone)."""
        seed = options.pop("seed", None)
        base = self.defaults.seed if seed is None else seed
        return [self.generate(doc, seed=base + i, **options) for i, doc in enumerate(docs)]
