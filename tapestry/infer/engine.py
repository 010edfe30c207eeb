"""The inference engine for the `mot` family (DESIGN §7).

1. The given part of the Document is prefilled once into a KV cache.
2. Text is sampled token by token against the cache.
3. When the model emits BOI — or the Document has a target image at this point — an image is
   denoised: every step runs only the noisy latent block against the cache (and against each
   guidance branch's own cache, all branches in one batched forward).
4. The finished image joins the context as the clean tokens a given image has, then EOI.
5. Generation stops at EOS, at the image or token budget, or when every target is filled.

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
from tapestry.infer.context import Block, Context, step_mask
from tapestry.infer.events import Done, Event, ImageDone, ImageProgress, ImageStarted, TextDelta
from tapestry.infer.sampling import sample_token
from tapestry.layout import GEN, UND, LayoutConfig, branch_document, clean_token_kinds, layout_document
from tapestry.models.common.flow import euler_step, timestep_schedule
from tapestry.models.common.guidance import apply_guidance, required_branches, validate_scales
from tapestry.models.common.patches import unpatchify
from tapestry.models.mot.family import embed_row, pixels_to_tensor, prepare_row
from tapestry.models.mot.model import KVCache, batched_step_mask

# ILLUME-X's rule is called `illume` on the command line; the function is the two-condition rule.
GUIDANCE_ALIASES = {"illume": "two_condition"}


class GenerationError(TapestryError):
    """Generation options or inputs that cannot work; the message says which and how to fix it."""


@dataclass
class GenerationOptions:
    seed: int = 0
    steps: int = 20
    shift: float = 1.0  # timestep shift of the sampling schedule (1 for tiny models, 3 at scale)
    guidance: str = "none"  # none | cfg | illume (two_condition) | inset | bagel
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
        return GUIDANCE_ALIASES.get(self.guidance, self.guidance)

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
    """Generation with one `mot` model, its tokenizer, autoencoder and layout."""

    def __init__(self, model, tokenizer, vae, layout: LayoutConfig):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vae = vae
        self.layout = layout

    # ------------------------------------------------------------------ blocks
    def _text_block(self, ctx: Context, ids: list[int]) -> Block:
        ids_tensor = torch.tensor(ids, dtype=torch.int64)
        embeds = self.model.embed_text(ids_tensor[None].to(self.model.device))[0]
        return Block(embeds, torch.full((len(ids),), UND), ctx.take_positions(len(ids)), "causal")

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden[-1]).float()

    def _image_block(self, image: Image.Image, role: str, position: int) -> Block:
        """The clean tokens of a finished image: exactly what layout_document puts there."""
        height, width = image.height, image.width
        parts, experts = [], []
        for kind in clean_token_kinds(role, self.layout):
            if kind == "vit":
                rows, cols = self.layout.vit_grid(height, width)
                pixels = pixels_to_tensor(image, rows * self.layout.vit_patch, cols * self.layout.vit_patch)
                tokens = self.model.embed_images([pixels.to(self.model.device)])[0]
                experts.append(torch.full((tokens.shape[0],), UND))
            else:
                rows, cols = self.layout.vae_grid(height, width)
                cell = self.layout.vae_downsample * self.layout.latent_patch
                pixels = pixels_to_tensor(image, rows * cell, cols * cell)
                latents = self.vae.encode(pixels[None].to(self.model.device))
                tokens = self.model.embed_latents(latents, torch.zeros(1, device=self.model.device))[0]
                experts.append(torch.full((tokens.shape[0],), GEN))
            parts.append(tokens)
        embeds = torch.cat(parts)
        return Block(embeds, torch.cat(experts), torch.full((embeds.shape[0],), position), "full")

    @torch.no_grad()
    def _prefill(self, ctx: Context, doc_id: str, segments: list[Segment]) -> torch.Tensor:
        """Prefill given segments (no targets); returns next-token logits."""
        if not segments:
            return self._logits(ctx.append(self._text_block(ctx, [self.tokenizer.bos_id])))
        prompt = Document(doc_id, segments)
        row = layout_document(prompt, self.tokenizer, self.layout)
        inputs = prepare_row(row, [prompt], self.layout, self.vae)
        embeds = embed_row(self.model, inputs)
        length = row.length - 1  # the prompt stays open: no EOS
        blocks = []
        for span in row.spans:
            end = min(span.end, length)
            if span.start < end:
                blocks.append(Block(embeds[span.start:end], row.expert[span.start:end],
                                    row.position_ids[span.start:end], span.mode))
        ctx.next_position = int(row.position_ids[length])
        return self._logits(ctx.prefill(blocks))

    def _append_text(self, ctx: Context, ids: list[int]) -> torch.Tensor:
        return self._logits(ctx.append(self._text_block(ctx, ids)))

    def _append_image(self, ctx: Context, image: Image.Image, role: str) -> torch.Tensor:
        self._append_text(ctx, [self.tokenizer.boi_id])
        ctx.append(self._image_block(image, role, ctx.take_image_position()))
        return self._append_text(ctx, [self.tokenizer.eoi_id])

    # ----------------------------------------------------------------- denoise
    def _branch_contexts(self, doc_id: str, so_far: list[Segment], options: GenerationOptions,
                         cond: Context) -> dict[str, Context]:
        """Each guidance branch's own context, built from the Document so far with its
        conditions dropped (`branch_document`), ending with the BOI of the image to draw."""
        contexts = {"cond": cond}
        scope = "last" if options.rule == "bagel" else "all"
        for branch in required_branches(options.rule):
            if branch == "cond":
                continue
            with_target = Document(doc_id, list(so_far) + [ImageSegment("target")])
            dropped = branch_document(with_target, branch, scope).segments[:-1]
            ctx = Context(self.model, recompute=options.recompute)
            self._prefill(ctx, doc_id, dropped)
            self._append_text(ctx, [self.tokenizer.boi_id])
            contexts[branch] = ctx
        return contexts

    @torch.no_grad()
    def _denoise(self, contexts: dict[str, Context], positions: dict[str, int], size: tuple[int, int],
                 options: GenerationOptions, generator: torch.Generator, index: int,
                 timings: dict) -> Iterator[Event]:
        """Yields progress events; returns the final latents [1, C, h, w]."""
        rows, cols = self.layout.vae_grid(*size)
        patch = self.layout.latent_patch
        x = torch.randn(1, self.vae.latent_channels, rows * patch, cols * patch, generator=generator)
        x = x.to(self.model.device)
        names = list(contexts)
        n = rows * cols
        expert = torch.full((1, n), GEN)
        batched = options.batch_branches and len(names) > 1 and not options.recompute
        if batched:  # one padded cache for all branches, built once per image
            cache, lengths = KVCache.batch([contexts[name].cache for name in names])
            mask = batched_step_mask([step_mask(c, n, "full") for c in lengths], lengths)
            batch_positions = torch.stack([torch.full((n,), positions[name]) for name in names])
        schedule = timestep_schedule(options.steps, options.shift)
        scales = validate_scales(options.rule, **options.guidance_scales)
        for step in range(options.steps):
            started = time.perf_counter()
            t, t_next = schedule[step], schedule[step + 1]
            tokens = self.model.embed_latents(x, t.reshape(1).to(x.device))  # [1, n, D]
            if batched:
                hidden = self.model(tokens.expand(len(names), -1, -1), expert.expand(len(names), -1),
                                    batch_positions, mask, cache=cache)  # [B, n, D]
                velocity = {name: self.model.latent_out(hidden[i : i + 1]) for i, name in enumerate(names)}
            else:
                velocity = {
                    name: self.model.latent_out(
                        contexts[name].probe(tokens[0], expert[0], torch.full((n,), positions[name]))[None])
                    for name in names
                }
            # velocity[name]: [1, n, p·p·C] — guidance rules work channels-last on tokens
            v = unpatchify(apply_guidance(options.rule, velocity, t, **scales), patch, rows, cols)
            x = euler_step(x, v, t.to(x.dtype), t_next.to(x.dtype))
            timings["denoise"] = timings.get("denoise", 0.0) + time.perf_counter() - started
            yield ImageProgress(index, step + 1, options.steps)
        return x

    def _latents_to_image(self, latents: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        pixels = self.vae.decode(latents)[0].clamp(-1, 1)
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
        if self.vae is None:
            raise GenerationError("this pipeline has no autoencoder, so it cannot draw images")
        run = _Run(self, doc, options)
        yield from run.go()

    def generate(self, doc: Document, options: GenerationOptions | None = None) -> Document:
        for event in self.stream(doc, options):
            if isinstance(event, Done):
                return event.document
        raise GenerationError("generation ended without a result")

    def target_size(self, segment: ImageSegment | None, options: GenerationOptions) -> tuple[int, int]:
        if segment is not None and segment.height and segment.width:
            return segment.height, segment.width
        return tuple(options.image_size or self.layout.target_size)


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
        self.ctx = Context(engine.model, recompute=options.recompute)
        self.images = 0
        self.tokens_left = options.max_new_tokens

    def go(self) -> Iterator[Event]:
        engine, tok = self.engine, self.tokenizer
        started = time.perf_counter()
        self.logits = engine._prefill(self.ctx, self.doc.id, self.so_far)
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
                self.logits = engine._append_text(self.ctx, tok.encode(segment.text))
                self.so_far.append(segment)
            elif segment.role == "target":
                self.logits = engine._append_text(self.ctx, [tok.boi_id])
                size = engine.target_size(segment, self.options)
                image = yield from self.draw(size, index)
                target = self.result.segments[index]
                target.image, target.width, target.height = image, size[1], size[0]
            else:
                self.logits = engine._append_image(self.ctx, segment.image, segment.role)
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
            self.logits = engine._append_text(self.ctx, [tok.boi_id])
            size = engine.target_size(None, self.options)
            image = yield from self.draw(size, len(self.result.segments))
            self.result.segments.append(ImageSegment("target", image=image, width=size[1], height=size[0]))

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
            self.logits = engine._append_text(self.ctx, [token])
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
        positions = {name: ctx.take_image_position() for name, ctx in contexts.items()}
        latents = yield from engine._denoise(contexts, positions, size, self.options, self.generator,
                                             self.images, self.timings)
        started = time.perf_counter()
        image = engine._latents_to_image(latents, size)
        self.timings["vae"] = self.timings.get("vae", 0.0) + time.perf_counter() - started
        # The finished image joins the context at the position its noise had, as clean tokens.
        self.ctx.append(engine._image_block(image, "target", positions["cond"]))
        self.logits = engine._append_text(self.ctx, [self.tokenizer.eoi_id])
        self.so_far.append(ImageSegment("context", image=image))
        self.images += 1
        yield ImageDone(self.images - 1, segment_index, image, latents)
        return image
