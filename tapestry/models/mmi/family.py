"""The `mmi` family (MM-Interleaved) behind the family protocol (tapestry/models/family.py).

Sequence of one document: BOS, then the reading order — text as causal tokens, each image as
`<boi>`, Q resampled image tokens (one `full` span), `<eoi>` — then EOS. Positions are 1-D and
sequential (a LLaMA-layout LLM, as the paper). An image becomes readable through MMFS from its
`<eoi>` on, so its own tokens and its `<boi>` see only earlier images of the same document.

Image generation for image j conditions the decoder on the LLM states of its document up to and
including image j's `<boi>` (causal, so nothing of image j leaks), resampled to 77 tokens, plus
MMFS over the document's images before j. The guidance negative is a learned embedding in place
of those 77 tokens: a sample whose text the shared `mmi` dropout policy removed (10 %, no text
loss on it) trains its images against the negative, earlier images still read through MMFS, and
at inference every non-`cond` branch is that negative with the same images (classic CFG, 3.5).

LayoutConfig fields, as mmi reads them (set by `layout_config` from the model config, saved in
pipeline.json with the layout, and checked against the model by `layout` and the runtime):
    max_vit_side     Q, resampled tokens per image (grid (1, Q))
    vae_downsample   the autoencoder's factor; targets are drawn at decoder.sample_size² latents
    target_size      (height, width) of generated images that declare none
    text_loss        "targets" or "all" (the paper trains on all text)

Loss parts (`loss_parts`): "text" (CE summed over supervised tokens) and "image" — the squared
error of the UNet's ε / v prediction (the paper's NIP, Eq. 3) summed over the latent elements of
every NIP image. The paper's λ = 10 is the stage's `loss_weights = {image = 10.0}`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from tapestry.layout import IGNORE, LayoutConfig, SequenceLayout, _Builder, _finish
from tapestry.masks import document_masks
from tapestry.models import family as families
from tapestry.models.mmi.config import (
    DecoderConfig,
    LLMConfig,
    MMFSConfig,
    MMIConfig,
    ResamplerConfig,
    VisionConfig,
)
from tapestry.models.mmi.model import ImageMemory, KVCache, MMIModel

# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def layout_config_for(config: MMIConfig, downsample: int, **choices) -> LayoutConfig:
    keep = {k: v for k, v in choices.items() if k in ("text_loss", "target_size")}
    return LayoutConfig(vit_patch=config.vision.image_size, max_vit_side=config.resampler.queries,
                        vae_downsample=downsample, latent_patch=1, max_latent_side=config.decoder.sample_size,
                        references_as_vae=False, context_as_vae=False, clean_copy=False, **keep)


def layout_document(doc, tokenizer, layout: LayoutConfig, supervise_text: bool = True, doc_index: int = 0,
                    max_images: int | None = None) -> SequenceLayout:
    from tapestry.document import ImageSegment, TextSegment

    queries = layout.max_vit_side
    has_targets = any(getattr(s, "role", None) == "target" for s in doc.segments)
    build = _Builder(doc_index)
    build.text([tokenizer.bos_id], loss=False)
    images = 0
    for item, segment_index in doc.reading_order_with_segments():
        segment = doc.segments[segment_index]
        if isinstance(item, str):
            assert isinstance(segment, TextSegment)
            build.text(tokenizer.encode(item), loss=layout.text_loss == "all" or segment.role == "target")
            continue
        assert isinstance(item, ImageSegment)
        images += 1
        if max_images is not None and images > max_images:
            raise ValueError(f"document {doc.id!r} has more than {max_images} images (mmfs.max_images)")
        build.text([tokenizer.boi_id], loss=item.role == "target" or layout.text_loss == "all")
        start = len(build.ids)
        build.image([("vit", (1, queries))], "full", segment_index, item.role, tokenizer.image_id,
                    build.next_position)
        build.positions[start:] = range(build.next_position, build.next_position + queries)  # sequential
        build.next_position += queries
        build.text([tokenizer.eoi_id], loss=False)
    build.text([tokenizer.eos_id], loss=has_targets or layout.text_loss == "all")
    if not supervise_text:
        build.loss = [False] * len(build.loss)
    return _finish([build], [doc.id], tokenizer.pad_id, None)


def pixels_to_tensor(image: Image.Image, height: int | None = None, width: int | None = None) -> Tensor:
    """PIL -> [3, H, W] in [-1, 1] (bicubic resize when a size is given and differs)."""
    if height is not None and image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    w, h = image.size
    array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return array.view(h, w, 3).permute(2, 0, 1).float() / 127.5 - 1.0


@dataclass
class ImageInfo:
    """One image placement of a row, with what the loss needs to know about it."""

    placement: int  # index into row.images
    index: int  # place among its document's images (0 = first)
    leading: bool  # the document's first element after BOS (the paper's "first in the sequence")
    dropped: bool  # its document lost its text to condition dropout: train against the negative


def row_images(row: SequenceLayout, documents: Sequence) -> list[ImageInfo]:
    """Per image placement: index in its document, whether it leads, whether its doc was dropped.
    A dropped document is one with a target image and no next-token label at all (a kept one
    always supervises the <boi> of its target)."""
    infos, per_doc = [], {}
    for n, p in enumerate(row.images):
        doc = row.documents[p.doc]
        index = per_doc.get(p.doc, 0)
        per_doc[p.doc] = index + 1
        has_target = any(getattr(s, "role", None) == "target" and getattr(s, "type", None) == "image"
                         for s in documents[p.doc].segments)
        dropped = has_target and not bool((row.labels[doc.start : doc.end] != IGNORE).any())
        infos.append(ImageInfo(n, index, p.start == doc.start + 2, dropped))
    return infos


def image_loss_targets(row: SequenceLayout, infos: list[ImageInfo], config: MMIConfig) -> list[ImageInfo]:
    out = []
    for info in infos:
        first = info.index == 0 if config.skip_first_image == "first_image" else info.leading
        if first or (config.image_loss == "target" and row.images[info.placement].role != "target"):
            continue
        out.append(info)
    return out


def visibility(row: SequenceLayout, images: int) -> Tensor:
    """[L, M]: token p may read image m iff both belong to one document and p >= its <eoi>."""
    visible = torch.zeros(row.length, images, dtype=torch.bool)
    for m, p in enumerate(row.images[:images]):
        doc = row.documents[p.doc]
        visible[p.end : doc.end, m] = True
    return visible


@dataclass
class RowInputs:
    row: SequenceLayout
    images: list[ImageInfo]
    pixels: list[Tensor]  # per placement [3, H, W] (the encoder resizes)
    latents: list[Tensor]  # per placement [C, s, s] clean latents at the decoder's size
    noise: list[Tensor]  # per placement [C, s, s]
    timesteps: list[int]  # per placement, DDPM step


def _target_side(layout: LayoutConfig) -> int:
    return layout.max_latent_side * layout.vae_downsample


def codec_pixels(row: SequenceLayout, documents: Sequence, layout: LayoutConfig) -> list[Tensor]:
    side = _target_side(layout)
    return [pixels_to_tensor(_image_of(row, documents, p), side, side) for p in row.images]


def _image_of(row, documents, placement) -> Image.Image:
    segment = documents[placement.doc].segments[placement.segment]
    if segment.image is None:
        raise ValueError(f"document {row.documents[placement.doc].id!r} segments[{placement.segment}] has no pixels")
    return segment.image


@torch.no_grad()
def prepare_row(row: SequenceLayout, documents: Sequence, layout: LayoutConfig, codec,
                generator: torch.Generator | None = None, num_train_timesteps: int = 1000) -> RowInputs:
    """Pixels of every image, its latents at the decoder's size, seeded noise and DDPM steps
    (drawn for every image in order, so the draws do not depend on which get a loss)."""
    side = _target_side(layout)
    inputs = RowInputs(row, row_images(row, documents), [], [], [], [])
    for p in row.images:
        image = _image_of(row, documents, p)
        inputs.pixels.append(pixels_to_tensor(image))
        z = codec.encode(pixels_to_tensor(image, side, side)[None])[0]
        inputs.latents.append(z)
        inputs.noise.append(torch.randn(z.shape, generator=generator, dtype=z.dtype))
        inputs.timesteps.append(int(torch.randint(0, num_train_timesteps, (1,), generator=generator)))
    return inputs


def noise_scheduler(config: MMIConfig):
    from diffusers import DDPMScheduler

    d = config.decoder
    return DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                         beta_schedule=d.beta_schedule, prediction_type=d.prediction_type)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def _encode(model: MMIModel, pixels: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    side = model.config.vision.image_size
    batch = torch.stack([F.interpolate(x[None], size=(side, side), mode="bicubic", align_corners=False,
                                       antialias=True)[0] if x.shape[-2:] != (side, side) else x for x in pixels])
    return model.encoder(batch.to(model.device))


def check_layout(model: MMIModel, layout: LayoutConfig) -> None:
    if layout.max_vit_side != model.config.resampler.queries:
        raise ValueError(f"layout has {layout.max_vit_side} tokens per image but the model resamples to "
                         f"{model.config.resampler.queries}; build the layout with layout_config(model.config)")


def lm_forward(model: MMIModel, batch: Sequence[RowInputs]) -> tuple[Tensor, ImageMemory]:
    """Final LLM hidden states [B, L, D] of rows of one length, and the rows' image memory."""
    device, cfg = model.device, model.config
    rows = [inputs.row for inputs in batch]
    embeds = model.lm.embed(torch.stack([r.token_ids for r in rows]).to(device))  # [B, L, D]
    all_pixels = [x for inputs in batch for x in inputs.pixels]
    per_row: list[list[list[Tensor]]] = [[] for _ in rows]
    if all_pixels:
        tokens, maps = _encode(model, all_pixels)
        embeds = embeds.clone()
        n = 0
        for r, row in enumerate(rows):
            for p in row.images:
                if p.end - p.start != tokens.shape[1]:
                    raise ValueError(f"row has {p.end - p.start} tokens for an image; the model gives {tokens.shape[1]}")
                embeds[r, p.start : p.end] = tokens[n].to(embeds.dtype)
                if maps:
                    per_row[r].append([m[n] for m in maps])
                n += 1
    levels = len(cfg.vision.levels)
    memory, _ = ImageMemory.stack(per_row, levels, cfg.vision.feature_dim, cfg.vision.level_sides(), device,
                                  embeds.dtype)
    # the image-index embedding row: each image's place in its own document
    index = torch.zeros_like(memory.index)
    for r, inputs in enumerate(batch):
        for m, info in enumerate(inputs.images[: memory.count]):
            index[r, m] = min(info.index, cfg.mmfs.max_images - 1)
    memory.index = index
    visible = torch.stack([visibility(r, memory.count) for r in rows]).to(device)  # [B, L, M]
    masks = document_masks([r.spans for r in rows], device)  # packed documents never see each other
    positions = torch.stack([r.position_ids for r in rows]).to(device)
    return model.lm(embeds, positions, masks, memory, visible), memory  # [B, L, D]


def loss_sums(model: MMIModel, batch: Sequence[RowInputs]) -> dict[str, Tensor]:
    """{"text": CE summed over supervised tokens, "image": NIP squared error summed over the latent
    elements of every NIP image}; train/loss.py divides by `loss_counts` and weighs them."""
    device, cfg = model.device, model.config
    rows = [inputs.row for inputs in batch]
    hidden, memory = lm_forward(model, batch)
    labels = torch.stack([r.labels for r in rows]).to(device)
    supervised = labels != IGNORE
    zero = hidden.sum() * 0.0
    text = zero
    if supervised.any():
        text = F.cross_entropy(model.lm.logits(hidden[supervised]).float(), labels[supervised], reduction="sum")
    targets = [(r, info) for r, inputs in enumerate(batch) for info in image_loss_targets(inputs.row, inputs.images, cfg)]
    image = zero
    if targets:
        k = len(targets)
        boi = [rows[r].images[info.placement].start - 1 for r, info in targets]
        starts = [rows[r].documents[rows[r].images[info.placement].doc].start for r, info in targets]
        longest = max(e - s + 1 for e, s in zip(boi, starts))
        context = hidden.new_zeros(k, longest, hidden.shape[-1])
        key_mask = torch.zeros(k, longest, dtype=torch.bool, device=device)
        for n, ((r, _), e, s) in enumerate(zip(targets, boi, starts)):
            context[n, : e - s + 1] = hidden[r, s : e + 1]
            key_mask[n, : e - s + 1] = True
        cond = model.decoder.condition(context, key_mask)
        dropped = torch.tensor([info.dropped for _, info in targets], device=device)[:, None, None]
        cond = torch.where(dropped, model.decoder.negative_condition(k).to(cond.dtype), cond)
        rows_of = torch.tensor([r for r, _ in targets], device=device)
        dec_memory = ImageMemory(memory.features, memory.index, rows=rows_of)  # each row's images projected once
        dec_visible = torch.zeros(k, memory.count, dtype=torch.bool, device=device)
        for n, (r, info) in enumerate(targets):
            doc = rows[r].images[info.placement].doc
            for m, other in enumerate(batch[r].images[: memory.count]):
                dec_visible[n, m] = rows[r].images[other.placement].doc == doc and other.index < info.index
        x0 = torch.stack([batch[r].latents[info.placement] for r, info in targets]).to(device)
        noise = torch.stack([batch[r].noise[info.placement] for r, info in targets]).to(device)
        t = torch.tensor([batch[r].timesteps[info.placement] for r, info in targets], device=device)
        scheduler = noise_scheduler(cfg)
        x_t = scheduler.add_noise(x0, noise, t)
        target = noise if cfg.decoder.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        prediction = model.decoder(x_t, t, cond, dec_memory, dec_visible)
        image = (prediction.float() - target.float()).pow(2).sum()
    return {"text": text, "image": image}


def loss_counts(rows: Sequence[SequenceLayout], config: MMIConfig) -> dict[str, int]:
    d = config.decoder
    text = sum(int((r.labels != IGNORE).sum()) for r in rows)
    images = 0
    for r in rows:
        per_doc: dict[int, int] = {}
        for p in r.images:
            index = per_doc.get(p.doc, 0)
            per_doc[p.doc] = index + 1
            leading = p.start == r.documents[p.doc].start + 2
            first = index == 0 if config.skip_first_image == "first_image" else leading
            if not first and (config.image_loss == "all" or p.role == "target"):
                images += 1
    return {"text": text, "image": images * d.latent_channels * d.sample_size**2}


# ---------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------

PARAM_GROUPS = ("vision", "pyramid", "resampler", "llm", "mmfs", "decoder_resampler", "unet", "decoder_mmfs")
_GROUP_RULES = (
    (r"^encoder\.clip\.", "vision"),
    (r"^encoder\.pyramid\.", "pyramid"),
    (r"^encoder\.resampler\.", "resampler"),
    (r"^lm\.llm\.", "llm"),
    (r"^lm\.mmfs\.", "mmfs"),
    (r"^decoder\.(resampler\.|negative$)", "decoder_resampler"),
    (r"^decoder\.unet\.", "unet"),
    (r"^decoder\.(mmfs|zero_convs|mid_zero|query_\w+)", "decoder_mmfs"),
)


def group_of(name: str) -> str:
    """vision (CLIP-ViT), pyramid, resampler (image tokenizer's), llm (LlamaForCausalLM), mmfs
    (the LLM's), decoder_resampler (+ the learned negative), unet, decoder_mmfs (+ zero convs)."""
    for pattern, group in _GROUP_RULES:
        if re.search(pattern, name):
            return group
    raise ValueError(f"parameter {name!r} belongs to no group; groups: {PARAM_GROUPS}")


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


@dataclass
class MMIContext:
    """One Document prefix: KV cache, final hidden states of every token (the decoder's
    condition reads them), multi-scale maps and <eoi> positions of its images."""

    cache: KVCache = field(default_factory=KVCache)
    hidden: list[Tensor] = field(default_factory=list)  # [n, D] chunks
    length: int = 0
    maps: list[list[Tensor]] = field(default_factory=list)  # per image, per level [C_f, h, w]
    ends: list[int] = field(default_factory=list)
    pending: int | None = None  # token index of the <boi> of the image being drawn
    recompute: bool = False
    blocks: list[tuple[Tensor, str]] = field(default_factory=list)  # (embeds, mode), recompute mode only

    def all_hidden(self) -> Tensor:
        return torch.cat(self.hidden)


def _block_mask(n: int, mode: str) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril() if mode == "causal" else torch.ones(n, n, dtype=torch.bool)


class MMIRuntime(families.OneByOne):
    """The `Runtime` protocol for an MMIModel. Latents are [1, h, w, C] (channels last); the
    engine's flow-matching Euler steps drive the DDPM-trained UNet through the exact change of
    variables between x_flow = (1 − t)·x0 + t·ε and x_vp = α·x0 + σ·ε (t = σ / (α + σ)).

    Requests served together run one by one (`OneByOne`): each context carries its own MMFS
    image maps and visibility, so there is no batched cross-request path yet (correct, no
    speed-up)."""

    def __init__(self, model: MMIModel, tokenizer, codec, layout: LayoutConfig):
        check_layout(model, layout)
        self.model, self.tokenizer, self.codec, self.layout = model.eval(), tokenizer, codec, layout
        self.target_size = tuple(layout.target_size)
        cfg = model.config
        alphas = noise_scheduler(cfg).alphas_cumprod.double()
        self._ratio = ((1 - alphas) / alphas).sqrt()  # σ/α per DDPM step, increasing

    # -- context ------------------------------------------------------------------------------
    def _memory(self, ctx: MMIContext) -> tuple[ImageMemory | None, int]:
        if not ctx.maps or not self.model.config.use_mmfs:
            return None, 0
        features = [torch.stack([maps[level] for maps in ctx.maps])[None] for level in range(len(ctx.maps[0]))]
        count = len(ctx.maps)
        index = torch.arange(count, device=self.model.device).clamp(max=self.model.config.mmfs.max_images - 1)
        return ImageMemory(features, index[None]), count

    def _run(self, ctx: MMIContext, embeds: Tensor, mode: str) -> None:
        # embeds: [n, D] joining the context; block mode "causal" (text) or "full" (an image)
        n = embeds.shape[0]
        memory, count = self._memory(ctx)
        device = self.model.device
        if ctx.recompute:
            ctx.blocks.append((embeds, mode))
            everything = torch.cat([e for e, _ in ctx.blocks])
            total = everything.shape[0]
            mask = torch.zeros(total, total, dtype=torch.bool)
            start = 0
            for e, m in ctx.blocks:
                k = e.shape[0]
                mask[start : start + k, :start] = True
                mask[start : start + k, start : start + k] = _block_mask(k, m)
                start += k
            visible = self._visible(ctx, 0, total, count)
            hidden = self.model.lm(everything[None], torch.arange(total, device=device)[None], mask[None].to(device),
                                   memory, visible)[0]
            ctx.hidden = [hidden]
        else:
            mask = torch.cat([torch.ones(n, ctx.length, dtype=torch.bool), _block_mask(n, mode)], 1)
            visible = self._visible(ctx, ctx.length, n, count)
            positions = torch.arange(ctx.length, ctx.length + n, device=device)[None]
            hidden = self.model.lm(embeds[None], positions, mask[None].to(device), memory, visible,
                                   cache=ctx.cache, update_cache=True)[0]
            ctx.hidden.append(hidden)
        ctx.length += n

    def _visible(self, ctx: MMIContext, start: int, n: int, count: int) -> Tensor | None:
        if not count:
            return None
        pos = torch.arange(start, start + n)[:, None]
        return (pos >= torch.tensor(ctx.ends[:count])[None, :])[None].to(self.model.device)  # [1, n, M]

    def _text(self, ctx: MMIContext, ids: list[int]) -> None:
        if ids:
            self._run(ctx, self.model.lm.embed(torch.tensor(ids, device=self.model.device)), "causal")

    def _image(self, ctx: MMIContext, image: Image.Image) -> None:
        tokens, maps = _encode(self.model, [pixels_to_tensor(image)])
        self._run(ctx, tokens[0], "full")
        if maps:
            ctx.maps.append([m[0] for m in maps])
            ctx.ends.append(ctx.length)  # the <eoi> about to join is the first token that reads it

    def prefill(self, doc, recompute: bool = False) -> MMIContext:
        from tapestry.document import ImageSegment

        ctx = MMIContext(recompute=recompute)
        self._text(ctx, [self.tokenizer.bos_id])
        for item, _ in doc.reading_order_with_segments():
            if isinstance(item, str):
                self._text(ctx, self.tokenizer.encode(item))
            else:
                assert isinstance(item, ImageSegment)
                if item.image is None:
                    raise ValueError(f"document {doc.id!r}: a given image has no pixels")
                self.append_image(ctx, item.image, item.role)
        return ctx

    def append_text(self, ctx: MMIContext, ids: list[int]) -> None:
        self._text(ctx, list(ids))

    def begin_image(self, ctx: MMIContext) -> None:
        ctx.pending = ctx.length - 1  # the <boi> the engine just appended

    def append_image(self, ctx: MMIContext, image: Image.Image, role: str) -> None:
        if ctx.pending is None:
            self._text(ctx, [self.tokenizer.boi_id])
        self._image(ctx, image)
        self._text(ctx, [self.tokenizer.eoi_id])
        ctx.pending = None

    def next_text(self, ctx: MMIContext) -> Tensor:
        return self.model.lm.logits(ctx.hidden[-1][-1]).float()

    # -- images -------------------------------------------------------------------------------
    def _latent_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        return self.layout.vae_grid(*size)

    def noise(self, size: tuple[int, int], generator: torch.Generator) -> Tensor:
        h, w = self._latent_grid(size)
        x = torch.randn(1, self.model.config.decoder.latent_channels, h, w, generator=generator)
        return x.permute(0, 2, 3, 1).to(self.model.device)  # [1, h, w, C]

    def _vp(self, t: float) -> tuple[float, float, float]:
        """(DDPM step τ, α, σ) for flow time t, clamped to the schedule's range."""
        ratio = self._ratio
        t = float(t)
        r = t / (1 - t) if t < 1 else float("inf")
        r = min(max(r, float(ratio[0])), float(ratio[-1]))
        tau = float(torch.searchsorted(ratio, torch.tensor([r], dtype=ratio.dtype)).clamp(1, len(ratio) - 1))
        lo, hi = float(ratio[int(tau) - 1]), float(ratio[int(tau)])
        tau = int(tau) - 1 + (r - lo) / (hi - lo) if hi > lo else tau
        alpha = 1.0 / (1.0 + r * r) ** 0.5
        return tau, alpha, r * alpha

    def denoise(self, contexts: dict[str, MMIContext], x: Tensor, t: Tensor, batched: bool = True) -> dict[str, Tensor]:
        # x: [1, h, w, C] flow latents -> {branch: velocity [1, h, w, C]}
        model, cond_ctx = self.model, contexts["cond"]
        if cond_ctx.pending is None:
            raise ValueError("denoise before begin_image: no <boi> to condition on")
        names = list(contexts)
        cond = model.decoder.condition(cond_ctx.all_hidden()[: cond_ctx.pending + 1][None])  # [1, 77, X]
        conds = torch.cat([cond if name == "cond" else model.decoder.negative_condition(1).to(cond.dtype)
                           for name in names])
        tau, alpha, sigma = self._vp(float(t))
        latents = x.permute(0, 3, 1, 2) * (alpha + sigma)  # x_vp: [1, C, h, w]
        b = len(names)
        memory, count = self._memory(cond_ctx)  # every branch reads the images before the target
        visible = None
        if memory is not None:
            memory.rows = torch.zeros(b, dtype=torch.long, device=x.device)  # every branch reads the one set
            visible = torch.ones(b, count, dtype=torch.bool, device=x.device)
        steps = torch.full((b,), tau, device=x.device, dtype=torch.float32)
        if batched:
            pred = model.decoder(latents.expand(b, -1, -1, -1), steps, conds, memory, visible)
        else:
            pred = torch.cat([model.decoder(latents, steps[i : i + 1], conds[i : i + 1],
                                            None if memory is None else ImageMemory(memory.features, memory.index),
                                            None if visible is None else visible[i : i + 1])
                              for i in range(b)])
        xs = latents.expand(b, -1, -1, -1)
        if model.config.decoder.prediction_type == "epsilon":
            eps = pred
            x0 = (xs - sigma * eps) / alpha
        else:
            eps = sigma * xs + alpha * pred
            x0 = alpha * xs - sigma * pred
        v = (eps - x0).permute(0, 2, 3, 1)  # flow velocity ε − x0, channels last
        return {name: v[i : i + 1].to(x.dtype) for i, name in enumerate(names)}

    def decode(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.codec.decode(x.permute(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------


@dataclass
class MMIRecipe:
    """The [model] keys of a training config for `mmi` (vocab_size and latent channels come
    from the tokenizer and the autoencoder)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    mmfs: MMFSConfig = field(default_factory=MMFSConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    use_mmfs: bool = True
    skip_first_image: str = "first_image"
    image_loss: str = "all"


class MMIFamily:
    name = "mmi"
    recipe = MMIRecipe
    param_groups = PARAM_GROUPS
    loss_parts = ("text", "image")

    def model_config(self, recipe: MMIRecipe, vocab_size: int, latent_channels: int) -> MMIConfig:
        return MMIConfig(vision=recipe.vision, resampler=recipe.resampler,
                         llm=replace(recipe.llm, vocab_size=vocab_size), mmfs=recipe.mmfs,
                         decoder=replace(recipe.decoder, latent_channels=latent_channels), use_mmfs=recipe.use_mmfs,
                         skip_first_image=recipe.skip_first_image, image_loss=recipe.image_loss).validate()

    def load_config(self, folder: str | Path) -> MMIConfig:
        return MMIConfig.load(Path(folder) / "config.json")

    def build(self, config: MMIConfig) -> MMIModel:
        return MMIModel(config)

    def initialize(self, model: MMIModel, recipe: MMIRecipe) -> None:
        """No recipe key names pretrained parts yet (convert.build_from_components loads them)."""
        return None

    def from_pretrained(self, folder: str | Path, device="cpu") -> MMIModel:
        return MMIModel.from_pretrained(folder, device=device)

    def from_state_dict(self, config: MMIConfig, state: dict[str, Tensor], source: str = "<state dict>") -> MMIModel:
        return MMIModel.from_state_dict(config, state, source)

    def layout_config(self, config: MMIConfig, downsample: int, **choices) -> LayoutConfig:
        return layout_config_for(config, downsample, **choices)

    def inspect(self, folder: str | Path):
        """`tapestry inspect` for an mmi checkpoint or a published CLIP / LLaMA / SD 2.x folder."""
        from tapestry.models.mmi.inspect import inspect_folder

        return inspect_folder(folder)

    def layout(self, doc, tokenizer, layout: LayoutConfig, supervise_text: bool = True, *,
               config: MMIConfig) -> SequenceLayout:
        if layout.max_vit_side != config.resampler.queries:
            raise ValueError(f"layout has {layout.max_vit_side} tokens per image but the model resamples to "
                             f"{config.resampler.queries}; build the layout with layout_config(model config)")
        return layout_document(doc, tokenizer, layout, supervise_text)

    def prepare(self, row, documents, layout, codec, generator=None, timestep_shift: float = 1.0, *,
                config: MMIConfig, tokenizer=None) -> RowInputs:
        # DDPM steps: no flow shift
        return prepare_row(row, documents, layout, codec, generator, config.decoder.num_train_timesteps)

    def codec_pixels(self, row, documents, layout) -> list[Tensor]:
        return codec_pixels(row, documents, layout)

    def loss_counts(self, rows, config: MMIConfig) -> dict[str, int]:
        return loss_counts(rows, config)

    def loss(self, model: MMIModel, batch: Sequence[RowInputs]) -> dict[str, Tensor]:
        return loss_sums(model, batch)

    def group_of(self, name: str) -> str:
        return group_of(name)

    def blocks(self, model: MMIModel) -> list:
        return list(model.lm.llm.model.layers)

    def runtime(self, model: MMIModel, tokenizer, codec, layout: LayoutConfig) -> MMIRuntime:
        return MMIRuntime(model, tokenizer, codec, layout)

    # -- measured alone (benchmarks/mmfs.py: MMFS against dense cross-attention), handed over
    # here so the benchmark imports no folder
    def benchmark_parts(self) -> SimpleNamespace:
        from tapestry.models.mmi.mmfs import MMFS

        return SimpleNamespace(MMFS=MMFS)


MMI = families.register(MMIFamily())
