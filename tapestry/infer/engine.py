"""The inference engine, the same for every model family (DESIGN §7).

The engine drives a family's `Runtime` (tapestry/models/family.py) and knows nothing else of the
model: contexts are opaque, velocities come back channels last.

1. The given part of the Document is prefilled once into a context (a KV cache for `mot`).
2. Text is sampled token by token against the context.
3. When the model emits BOI — or the Document has a target image at this point — an image is
   denoised with Euler steps: every step asks the runtime for the velocity under each guidance
   branch, each against its own context (built from the Document so far with that branch's
   conditions dropped, `branch_document`), and combines them by the guidance rule.
4. The finished image joins the context as a given image would, then its end marker.
5. Generation stops at EOS, at the image or token budget, or when every target is filled.

Everything runs under `torch.inference_mode()`: no autograd graph is kept anywhere.

The model decides how many images and where (N-to-M) when the Document has no targets; when it
has targets, they are filled in order and nothing else is added.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from PIL import Image

import tapestry
from tapestry.document import Document, ImageSegment, Segment, TextSegment
from tapestry.errors import DocumentError, TapestryError
from tapestry.infer.events import Done, Event, ImageDone, ImageProgress, ImageStarted, TextDelta
from tapestry.infer.sampling import sample_token
from tapestry.layout import branch_document
from tapestry.models import family as families
from tapestry.models.common.flow import euler_step, timestep_schedule
from tapestry.models.common.guidance import apply_guidance, canonical_rule, required_branches, validate_scales


class GenerationError(TapestryError):
    """Generation options or inputs that cannot work; the message says which and how to fix it."""


@dataclass
class GenerationOptions:
    seed: int = 0
    steps: int = 20
    shift: float = 1.0  # timestep shift of the sampling schedule (1 for tiny models, 3 at scale)
    guidance: str = "none"  # none | cfg | illume (two_condition) | inset | bagel | duetgen
    guidance_scales: dict = field(default_factory=dict)  # e.g. {"s1": 4, "s2": 1.5}
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_images: int = 8
    image_size: tuple[int, int] | None = None  # (height, width); default: the layout's target size
    batch_branches: bool = True  # all guidance branches in one forward per step
    recompute: bool = False  # no KV cache: rerun the whole context every step (reference path)

    @property
    def rule(self) -> str:
        return canonical_rule(self.guidance)

    def check(self) -> "GenerationOptions":
        if self.steps < 1:
            raise GenerationError(f"--steps must be at least 1, got {self.steps}")
        if self.shift <= 0:
            raise GenerationError(f"the timestep shift must be > 0, got {self.shift}")
        if self.max_new_tokens < 0 or self.max_images < 0:
            raise GenerationError("--max-new-tokens and --max-images must be >= 0")
        if self.image_size is not None and (min(self.image_size) < 1 or max(self.image_size) > 4096):
            raise GenerationError(f"image size must be between 1 and 4096 pixels per side, got {self.image_size}")
        try:
            validate_scales(self.rule, **self.guidance_scales)
            sample_token(torch.zeros(2), self.temperature, self.top_p)
        except ValueError as e:
            raise GenerationError(str(e)) from None
        return self

    def provenance(self) -> dict:
        out = asdict(self)
        out["guidance_scales"] = validate_scales(self.rule, **self.guidance_scales)
        out["sampler"] = "euler"
        out.pop("batch_branches")
        out.pop("recompute")
        return out


def flatten(doc: Document) -> list[tuple[Segment, int]]:
    """The Document as reading-order segments (slots resolved), each with its source index.

    A Document and its flattening lay out to the same tokens, so a prompt can be cut anywhere
    in reading order — even at a target slot inside a sentence.
    """
    items = []
    for item, index in doc.reading_order_with_segments():
        source = doc.segments[index]
        items.append((TextSegment(item, source.role) if isinstance(item, str) else item, index))
    return items


class Engine:
    """Generation with one model family's `Runtime` (model, tokenizer, autoencoder, layout)."""

    def __init__(self, runtime: families.Runtime):
        self.runtime = runtime
        self.tokenizer = runtime.tokenizer

    @classmethod
    def for_model(cls, model, tokenizer, codec, layout, family: str | None = None) -> "Engine":
        """An engine for `model`, through the family its config names (or `family`)."""
        fam = families.get(family) if family else families.family_of_config(model.config)
        return cls(fam.runtime(model, tokenizer, codec, layout))

    @property
    def layout(self):
        return getattr(self.runtime, "layout", None)

    # ----------------------------------------------------------------- denoise
    def _branch_contexts(self, doc_id: str, so_far: list[Segment], options: GenerationOptions,
                         cond) -> dict[str, object]:
        """Each guidance branch's own context, built from the Document so far with its
        conditions dropped (`branch_document`), ending with the BOI of the image to draw."""
        contexts = {"cond": cond}
        for branch in required_branches(options.rule):
            if branch == "cond":
                continue
            with_target = Document(doc_id, list(so_far) + [ImageSegment("target")])
            dropped = branch_document(with_target, branch).segments[:-1]
            ctx = self.runtime.prefill(Document(doc_id, dropped), recompute=options.recompute)
            self.runtime.append_text(ctx, [self.tokenizer.boi_id])
            contexts[branch] = ctx
        return contexts

    def _denoise(self, contexts: dict[str, object], size: tuple[int, int], options: GenerationOptions,
                 generator: torch.Generator, index: int, timings: dict) -> Iterator[Event]:
        """Yields progress events; returns the final latents (the runtime's shape)."""
        runtime = self.runtime
        x = runtime.noise(size, generator)
        batched = options.batch_branches and not options.recompute
        schedule = timestep_schedule(options.steps, options.shift)
        scales = validate_scales(options.rule, **options.guidance_scales)
        for step in range(options.steps):
            started = time.perf_counter()
            t, t_next = schedule[step], schedule[step + 1]
            velocity = runtime.denoise(contexts, x, t, batched=batched)  # branch -> [1, ..., C]
            v = apply_guidance(options.rule, velocity, t, **scales)
            predicted = x - t.to(x.dtype) * v  # x0 = x_t - t·v: what a preview shows
            x = euler_step(x, v, t.to(x.dtype), t_next.to(x.dtype))
            timings["denoise"] = timings.get("denoise", 0.0) + time.perf_counter() - started
            yield ImageProgress(index, step + 1, options.steps, predicted)
        return x

    def _latents_to_image(self, latents: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        pixels = self.runtime.decode(latents, size)[0].clamp(-1, 1)
        array = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        image = Image.fromarray(array, "RGB")
        if image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        return image

    # ------------------------------------------------------------------ public
    def stream(self, doc: Document, options: GenerationOptions | None = None) -> Iterator[Event]:
        """Generate, yielding events; the last one is `Done` with the finished Document."""
        options = (options or GenerationOptions()).check()
        problems = doc.validate()
        if problems:
            raise DocumentError(problems)
        if getattr(self.runtime, "codec", True) is None:
            raise GenerationError("this pipeline has no autoencoder, so it cannot draw images")
        yield from _inference_mode_generator(_Run(self, doc, options).go())

    def generate(self, doc: Document, options: GenerationOptions | None = None) -> Document:
        for event in self.stream(doc, options):
            if isinstance(event, Done):
                return event.document
        raise GenerationError("generation ended without a result")

    def decode_latents(self, latents: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        """Latents of an `image_progress` / `image_done` event (the runtime's shape) -> the
        (height, width) image they decode to: a preview of the image being drawn."""
        with torch.inference_mode():
            return self._latents_to_image(latents, size)

    def target_size(self, segment: ImageSegment | None, options: GenerationOptions) -> tuple[int, int]:
        if segment is not None and segment.height and segment.width:
            return segment.height, segment.width
        return tuple(options.image_size or self.runtime.target_size)


def _inference_mode_generator(gen: Iterator[Event]) -> Iterator[Event]:
    """Run every step of `gen` under inference_mode, also when the consumer resumes it from
    outside the `with` block (a generator's body runs in its caller's grad mode)."""
    while True:
        with torch.inference_mode():
            try:
                event = next(gen)
            except StopIteration:
                return
        yield event


class _Run:
    """One generation: the main context, what has been written so far, the seeded generator."""

    def __init__(self, engine: Engine, doc: Document, options: GenerationOptions):
        self.engine, self.doc, self.options = engine, doc, options
        self.tokenizer = engine.tokenizer
        self.generator = torch.Generator().manual_seed(options.seed)
        self.timings: dict[str, float] = {}
        self.flat = flatten(doc)
        self.first_target = next((k for k, (s, _) in enumerate(self.flat) if s.role == "target"), len(self.flat))
        self.result = doc.copy()
        self.so_far: list[Segment] = [segment for segment, _ in self.flat[: self.first_target]]
        self.runtime = engine.runtime
        self.ctx = None
        self.images = 0
        self.tokens_left = options.max_new_tokens

    def go(self) -> Iterator[Event]:
        engine, tok = self.engine, self.tokenizer
        started = time.perf_counter()
        self.ctx = self.runtime.prefill(Document(self.doc.id, list(self.so_far)), recompute=self.options.recompute)
        self.logits = self.runtime.next_text(self.ctx)
        self.timings["prefill"] = time.perf_counter() - started
        if self.first_target < len(self.flat):
            stop_reason = yield from self.fill_targets()
        else:
            stop_reason = yield from self.free_run()
        self.result.meta = dict(self.result.meta)
        self.result.meta["generation"] = {
            **self.options.provenance(), "tapestry": tapestry.__version__, "stop_reason": stop_reason,
            "new_tokens": self.options.max_new_tokens - self.tokens_left, "new_images": self.images,
        }
        yield Done(self.result, stop_reason, self.timings)

    def fill_targets(self) -> Iterator[Event]:
        """Given segments join the context; targets are generated in place, nothing is added."""
        engine, tok = self.engine, self.tokenizer
        for segment, index in self.flat[self.first_target :]:
            if isinstance(segment, TextSegment) and segment.role == "target":
                text, _ = yield from self.write_text(index, banned=[tok.boi_id])
                self.result.segments[index].text = text
                self.so_far.append(TextSegment(text, "target"))
            elif isinstance(segment, TextSegment):
                self.append_text(tok.encode(segment.text))
                self.so_far.append(segment)
            elif segment.role == "target":
                self.append_text([tok.boi_id])
                size = engine.target_size(segment, self.options)
                image = yield from self.draw(size, index)
                target = self.result.segments[index]
                target.image, target.width, target.height = image, size[1], size[0]
            else:
                self.runtime.append_image(self.ctx, segment.image, segment.role)
                self.logits = self.runtime.next_text(self.ctx)
                self.so_far.append(segment)
        return "targets_filled"

    def free_run(self) -> Iterator[Event]:
        """The model decides: text until it emits BOI (an image follows) or EOS (the end)."""
        engine, tok = self.engine, self.tokenizer
        while True:
            banned = [tok.boi_id] if self.images >= self.options.max_images else []
            text, stop = yield from self.write_text(len(self.result.segments), banned)
            if text:
                self.result.segments.append(TextSegment(text, "target"))
                self.so_far.append(TextSegment(text, "target"))
            if stop != tok.boi_id:
                return "eos" if stop == tok.eos_id else "max_tokens"
            self.append_text([tok.boi_id])
            size = engine.target_size(None, self.options)
            image = yield from self.draw(size, len(self.result.segments))
            self.result.segments.append(ImageSegment("target", image=image, width=size[1], height=size[0]))

    def append_text(self, ids: list[int]) -> None:
        self.runtime.append_text(self.ctx, ids)
        self.logits = self.runtime.next_text(self.ctx)

    def write_text(self, segment_index: int, banned: list[int]) -> Iterator[Event]:
        """Sample until EOS or BOI (returned as the stop token, not added) or the token budget."""
        engine, tok = self.engine, self.tokenizer
        started = time.perf_counter()
        ids: list[int] = []
        shown = ""
        stop = None
        while self.tokens_left > 0:
            token = sample_token(self.logits, self.options.temperature, self.options.top_p, self.generator, banned)
            if token in (tok.eos_id, tok.boi_id):
                stop = token
                break
            ids.append(token)
            self.tokens_left -= 1
            self.append_text([token])
            text = tok.decode(ids)
            if len(text) > len(shown) and not text.endswith("\ufffd"):  # whole characters only
                yield TextDelta(text[len(shown):], segment_index)
                shown = text
        self.timings["text"] = self.timings.get("text", 0.0) + time.perf_counter() - started
        return tok.decode(ids), stop

    def draw(self, size: tuple[int, int], segment_index: int) -> Iterator[Event]:
        """Denoise one image after the BOI already in the context; it then joins the context."""
        engine = self.engine
        yield ImageStarted(self.images, segment_index, size[0], size[1], self.options.steps)
        started = time.perf_counter()
        contexts = engine._branch_contexts(self.doc.id, self.so_far, self.options, self.ctx)
        self.timings["prefill"] += time.perf_counter() - started
        for ctx in contexts.values():
            self.runtime.begin_image(ctx)
        latents = yield from engine._denoise(contexts, size, self.options, self.generator, self.images,
                                             self.timings)
        started = time.perf_counter()
        image = engine._latents_to_image(latents, size)
        self.timings["vae"] = self.timings.get("vae", 0.0) + time.perf_counter() - started
        # The finished image joins the context where its noise was, as a given image would.
        self.runtime.append_image(self.ctx, image, "target")
        self.logits = self.runtime.next_text(self.ctx)
        self.so_far.append(ImageSegment("context", image=image))
        self.images += 1
        yield ImageDone(self.images - 1, segment_index, image, latents)
        return image
