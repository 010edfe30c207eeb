"""`Pipeline`: a pipeline folder (tapestry.models.pipeline_folder) ready to generate.

`Pipeline.from_pretrained("default")` loads the small checkpoint trained on ToyWorld that
ships inside the package (tapestry/assets/default); any folder `tapestry export` wrote loads the
same way, whatever its model family.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

from tapestry.document import Document, from_markup
from tapestry.errors import TapestryError
from tapestry.infer.engine import Engine, GenerationOptions
from tapestry.infer.events import Event
from tapestry.models.common.config import section_from_dict
from tapestry.models.pipeline_folder import (  # noqa: F401  (re-exported for callers of infer.pipeline)
    DEFAULT_DIR,
    FORMAT,
    PIPELINE_FILE,
    CheckpointNotFound,
    checkpoint_hash,
    load_pipeline,
    read_pipeline_record,
    resolve_checkpoint,
    save_pipeline,
)


class Pipeline:
    """Model + tokenizer + autoencoder + layout, with generation defaults and provenance."""

    def __init__(self, engine: Engine, defaults: GenerationOptions, checkpoint: str, checkpoint_hash: str):
        self.engine = engine
        self.defaults = defaults
        self.checkpoint = checkpoint
        self.checkpoint_hash = checkpoint_hash

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike = "default", device: str = "cpu") -> "Pipeline":
        folder = resolve_checkpoint(name)
        parts = load_pipeline(folder, device=device)
        where = f"{folder / PIPELINE_FILE}: generation"
        defaults = section_from_dict(GenerationOptions, parts.generation, where, TapestryError)
        try:
            defaults.check()
        except TapestryError as e:
            raise TapestryError(f"{where}: {e}") from None
        engine = Engine(parts.family.runtime(parts.model, parts.tokenizer, parts.codec, parts.layout))
        return cls(engine, defaults, str(name), checkpoint_hash(folder))

    def options(self, **overrides) -> GenerationOptions:
        fields = {k: v for k, v in overrides.items() if v is not None}
        if "guidance" in fields and "guidance_scales" not in fields and fields["guidance"] != self.defaults.guidance:
            # the checkpoint's scales belong to its own rule (cfg's `scale` means nothing to inset):
            # another rule without scales takes that rule's paper defaults
            fields["guidance_scales"] = {}
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

    def decode_latents(self, latents, size: tuple[int, int]):
        """Latents from an `image_progress` / `image_done` event -> a PIL image of (height,
        width) `size`, the size its `image_started` announced (previews)."""
        return self.engine.decode_latents(latents, size)

    def generate_batch(self, docs: list[Document | str], **options) -> list[Document]:
        """Several Documents, one after another with the same options (seed per document =
        seed + its index, so each is reproducible alone)."""
        seed = options.pop("seed", None)
        base = self.defaults.seed if seed is None else seed
        return [self.generate(doc, seed=base + i, **options) for i, doc in enumerate(docs)]
