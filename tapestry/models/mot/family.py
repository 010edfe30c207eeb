"""The `mot` family's glue: the `Family` protocol (tapestry/models/family.py) for `MoTModel`.

`layout_document` decides *where* tokens go; this file fills them: text ids through the
embedding, images through the ViT (und tokens) or the autoencoder + latent projection (gen
tokens, clean at t = 0 or noised for flow matching). Training and inference share `embed_row`,
so a generated image enters the context exactly as a given one does.

    MOT = MoTFamily()     registered as "mot"; what train/, infer/ and eval/ call
    MoTRuntime            the inference side: KV-cache contexts (context.py), batched branches
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from tapestry.layout import (
    GEN,
    IGNORE,
    UND,
    LayoutConfig,
    SequenceLayout,
    clean_token_kinds,
    layout_document,
)
from tapestry.masks import document_masks
from tapestry.models import family as families
from tapestry.models.common.flow import interpolate, sample_timesteps, velocity_target
from tapestry.models.common.patches import patchify, unpatchify
from tapestry.models.mot.config import LatentConfig, LLMConfig, MoTConfig, ViTConfig
from tapestry.models.mot.context import Block, Context, step_mask
from tapestry.models.mot.lora import LoraSpec
from tapestry.models.mot.model import KVCache, MoTModel, batched_step_mask
from tapestry.models.vae.protocol import Autoencoder


def layout_config_for(config: MoTConfig, vae_downsample: int, **choices) -> LayoutConfig:
    """The LayoutConfig whose token grids this model can read (sizes come from the model)."""
    sizes: dict = {"vae_downsample": vae_downsample}
    if config.vit is not None:
        sizes.update(vit_patch=config.vit.patch_size, max_vit_side=config.vit.max_patches_per_side)
    if config.latent is not None:
        sizes.update(latent_patch=config.latent.patch_size, max_latent_side=config.latent.max_side)
    return LayoutConfig(**{**choices, **sizes})


def pixels_to_tensor(image: Image.Image, height: int, width: int) -> Tensor:
    """PIL -> [3, height, width] in [-1, 1], resized (bicubic) when the grid asks for another size."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return array.view(height, width, 3).permute(2, 0, 1).float() / 127.5 - 1.0


@dataclass
class RowInputs:
    """Everything but text a packed row needs, aligned with `row.images`."""

    row: SequenceLayout
    vit_pixels: dict[int, Tensor] = field(default_factory=dict)  # placement index -> [3, H, W]
    latents: dict[int, Tensor] = field(default_factory=dict)  # placement -> model input [C, h, w]
    timesteps: dict[int, float] = field(default_factory=dict)  # placement -> t (0 for clean)
    velocity_targets: dict[int, Tensor] = field(default_factory=dict)  # noise placements -> ε − x0
    flow_weights: dict[int, Tensor] = field(default_factory=dict)  # noise placements -> [1, h, w], mean 1


@torch.no_grad()
def prepare_row(
    row: SequenceLayout,
    documents: Sequence,
    layout: LayoutConfig,
    vae: Autoencoder | None,
    generator: torch.Generator | None = None,
    timestep_shift: float = 1.0,
    focus_weight: float = 0.0,
) -> RowInputs:
    """Pixels for every image placement of `row`; noised latents and targets for noise spans.

    `documents` are the row's Documents in packing order (row.documents[i] is documents[i]).
    Each image is VAE-encoded once even when it appears as noise and as a clean copy. With
    `focus_weight` > 0 a target that names its ToyWorld scene gets flow-loss weights (`focus_map`).
    """
    inputs = RowInputs(row)
    encoded: dict[tuple[int, int], Tensor] = {}
    focused: dict[tuple[int, int], Tensor | None] = {}  # one weight map per target, shared by its noise copies
    for n, placement in enumerate(row.images):
        segment = documents[placement.doc].segments[placement.segment]
        if segment.image is None:
            raise ValueError(f"document {row.documents[placement.doc].id!r} segments[{placement.segment}] "
                             f"has no pixels; {placement.kind} tokens need them")
        rows, cols = placement.grid
        if placement.kind == "vit":
            inputs.vit_pixels[n] = pixels_to_tensor(segment.image, rows * layout.vit_patch, cols * layout.vit_patch)
            continue
        if vae is None:
            raise ValueError("this row has VAE tokens but no autoencoder was given")
        key = (placement.doc, placement.segment)
        if key not in encoded:
            cell = layout.vae_downsample * layout.latent_patch
            pixels = pixels_to_tensor(segment.image, rows * cell, cols * cell)
            encoded[key] = vae.encode(pixels[None])[0]
        x0 = encoded[key]
        if placement.kind == "vae":
            inputs.latents[n], inputs.timesteps[n] = x0, 0.0
            continue
        t = sample_timesteps(1, timestep_shift, generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        inputs.latents[n] = interpolate(x0[None], noise[None], t)[0]
        inputs.timesteps[n] = float(t)
        inputs.velocity_targets[n] = velocity_target(x0, noise)
        if focus_weight:
            if key not in focused:
                focused[key] = focus_map(segment, x0.shape[-2], x0.shape[-1], focus_weight)
            if focused[key] is not None:
                inputs.flow_weights[n] = focused[key]
    return inputs


def focus_map(segment, height: int, width: int, focus_weight: float) -> Tensor | None:
    """[1, height, width] flow-loss weights of a target image whose meta names its ToyWorld scene:
    1 + focus_weight on latents over an entity, 1 elsewhere, scaled to mean 1 (so the loss keeps
    its scale and moves towards the entities). None for an image without a scene."""
    scene = ((segment.meta or {}).get("toyworld") or {}).get("scene")
    if scene is None:
        return None
    from tapestry.toyworld.render import entity_mask
    from tapestry.toyworld.spec import Scene

    mask = torch.from_numpy(entity_mask(Scene.from_dict(scene), height, width))
    weights = 1.0 + focus_weight * mask.float()
    return (weights / weights.mean())[None]


def embed_row(model, inputs: RowInputs) -> Tensor:
    """Token embeddings [L, D] of one row: text ids, ViT features, latent tokens."""
    row = inputs.row
    embeds = model.embed_text(row.token_ids.to(model.device)[None])[0].clone()
    vit_order = sorted(inputs.vit_pixels)
    if vit_order:
        features = model.embed_images([inputs.vit_pixels[n].to(model.device) for n in vit_order])
        for n, tokens in zip(vit_order, features):
            placement = row.images[n]
            embeds[placement.start : placement.end] = tokens.to(embeds.dtype)
    for n, latents in inputs.latents.items():
        placement = row.images[n]
        t = torch.tensor([inputs.timesteps[n]], device=model.device)
        tokens = model.embed_latents(latents[None].to(model.device), t)[0]
        embeds[placement.start : placement.end] = tokens.to(embeds.dtype)
    return embeds


def loss_sums(model, batch: Sequence[RowInputs]) -> dict[str, Tensor]:
    """The two loss parts of a batch of rows of one length, summed (not averaged): "text", CE
    over supervised next tokens, and "flow", squared error of velocities over noise spans.
    train/loss.py divides them by the global batch's counts (`loss_counts`)."""
    device = model.device
    rows = [inputs.row for inputs in batch]
    # embeds: [B, L, D]; expert, positions: [B, L]; masks: [B, L, L]
    embeds = torch.stack([embed_row(model, inputs) for inputs in batch])
    expert = torch.stack([r.expert for r in rows]).to(device)
    positions = torch.stack([r.position_ids for r in rows]).to(device)
    # per-document blocks of the dense mask: packed documents never see each other
    masks = document_masks([r.spans for r in rows], device)
    hidden = model(embeds, expert, positions, masks)  # [B, L, D]

    labels = torch.stack([r.labels for r in rows]).to(device)  # [B, L]
    supervised = labels != IGNORE
    zero = hidden.sum() * 0.0  # keeps the graph whole when a part has nothing to sum
    text_sum = zero
    if supervised.any():
        logits = model.logits(hidden[supervised]).float()  # [N_text, V]
        text_sum = F.cross_entropy(logits, labels[supervised], reduction="sum")
    flow_sum = zero
    targets = [(b, n, target) for b, inputs in enumerate(batch) for n, target in inputs.velocity_targets.items()]
    spans = [batch[b].row.images[n] for b, n, _ in targets]
    pieces: Sequence[Tensor] = []
    if targets:
        # Every target's tokens in one gather, then split: slicing hidden once per target (about
        # 120 per step in the default recipe) made each slice's backward zero-fill a whole
        # [B, L, D] gradient, a large share of the step (profiled); a gather's backward fills one.
        index = torch.cat([torch.arange(b * hidden.shape[1] + p.start, b * hidden.shape[1] + p.end)
                           for (b, _, _), p in zip(targets, spans)]).to(device)
        pieces = hidden.flatten(0, 1).index_select(0, index).split([p.end - p.start for p in spans])
    for (b, n, target), placement, tokens in zip(targets, spans, pieces, strict=True):
        inputs = batch[b]
        h, w = placement.grid
        # predicted: [C, h·p, w·p] velocity of this image's latents
        x_t = inputs.latents[n][None].to(device)
        t = torch.tensor([inputs.timesteps[n]], device=device)
        predicted = model.latent_velocity(tokens[None], h, w, x_t, t)[0]
        error = (predicted.float() - target.to(device)).pow(2)  # [C, h·p, w·p]
        if n in inputs.flow_weights:
            error = error * inputs.flow_weights[n].to(device)
        flow_sum = flow_sum + error.sum()
    return {"text": text_sum, "flow": flow_sum}


def loss_counts(rows: Sequence[SequenceLayout], config: MoTConfig) -> dict[str, int]:
    """Denominators of `loss_sums` over rows: supervised tokens, latent elements of noise spans."""
    latent = config.latent
    channels, patch = (latent.channels, latent.patch_size) if latent else (0, 1)
    text = sum(int((r.labels != IGNORE).sum()) for r in rows)
    flow = sum(p.grid[0] * p.grid[1] * channels * patch**2 for r in rows for p in r.images if p.kind == "noise")
    return {"text": text, "flow": flow}


def codec_pixels(row: SequenceLayout, documents: Sequence, layout: LayoutConfig) -> list[Tensor]:
    """The pixels `prepare_row` will encode with the autoencoder (same sizes, same resampling)."""
    cell = layout.vae_downsample * layout.latent_patch
    out = []
    for placement in row.images:
        if placement.kind in ("vae", "noise"):
            image = documents[placement.doc].segments[placement.segment].image
            if image is not None:
                out.append(pixels_to_tensor(image, placement.grid[0] * cell, placement.grid[1] * cell))
    return out


# ---------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------

PARAM_GROUPS = ("embeddings", "und", "gen", "vit", "connector", "latent_io", "lm_head")
_GROUP_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)embed_tokens\.", "embeddings"),
    (r"(^|\.)layers\.\d+\.und\.|(^|\.)norm_und\.", "und"),
    (r"(^|\.)layers\.\d+\.gen\.|(^|\.)norm_gen\.", "gen"),
    (r"(^|\.)vit\.", "vit"),
    (r"(^|\.)connector\.", "connector"),
    (r"(^|\.)(latent_in|latent_out|time_embed)\.", "latent_io"),
    (r"(^|\.)lm_head\.", "lm_head"),
)


def group_of(name: str) -> str:
    """The parameter group of a MoTModel parameter name:

        embeddings  embed_tokens (and a tied lm_head)
        und         the understanding expert of every layer + its final norm
        gen         the generation expert of every layer + its final norm
        vit         the NaViT encoder
        connector   ViT features -> decoder width
        latent_io   latent_in, latent_out, time_embed (the generation path around the decoder)
        lm_head     the language head
    """
    import re

    for pattern, group in _GROUP_RULES:
        if re.search(pattern, name):
            return group
    raise ValueError(f"parameter {name!r} belongs to no group; groups: {PARAM_GROUPS}")


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


class MoTRuntime:
    """The `Runtime` protocol for a MoTModel: one KV-cache `Context` per Document prefix.

    Noisy latents are held as patches on their grid, [1, rows, cols, p·p·C] (channels last, what
    guidance rules expect); the model's latent path patchifies [1, C, H, W], so `denoise`
    unpatchifies on the way in — a permutation, exact both ways.
    """

    def __init__(self, model: MoTModel, tokenizer, codec: Autoencoder | None, layout: LayoutConfig):
        # noise_copies is a training device (K noisy copies of one target per row); a prompt laid
        # out for inference holds each image once, whatever the checkpoint was trained with.
        layout = replace(layout, noise_copies=1)
        self.model, self.tokenizer, self.codec, self.layout = model.eval(), tokenizer, codec, layout
        self.target_size = tuple(layout.target_size)
        self._batched: tuple | None = None  # (contexts and lengths it was built for, cache, mask, positions)
        self._batched_rows: tuple = ()  # the same for denoise_batch's rows of several requests (two lanes)

    # -- blocks ------------------------------------------------------------------------------
    def _text_block(self, ctx: Context, ids: list[int]) -> Block:
        ids_tensor = torch.tensor(ids, dtype=torch.int64)
        embeds = self.model.embed_text(ids_tensor[None].to(self.model.device))[0]
        return Block(embeds, torch.full((len(ids),), UND), ctx.take_positions(len(ids)), "causal")

    def encode_image(self, ctx: Context | None, image: Image.Image, role: str) -> tuple[Tensor, Tensor]:
        """The clean tokens of a finished image, exactly what layout_document puts there:
        embeddings [n, D] and experts [n]. The encoders' share of `append_image` (ViT, VAE
        encode); the context is only read, so this may run apart from the forward that joins."""
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
                latents = self.codec.encode(pixels[None].to(self.model.device))
                tokens = self.model.embed_latents(latents, torch.zeros(1, device=self.model.device))[0]
                experts.append(torch.full((tokens.shape[0],), GEN))
            parts.append(tokens)
        return torch.cat(parts), torch.cat(experts)

    def _image_block(self, image: Image.Image, role: str, position: int,
                     encoded: tuple[Tensor, Tensor] | None = None) -> Block:
        embeds, experts = encoded if encoded is not None else self.encode_image(None, image, role)
        return Block(embeds, experts, torch.full((embeds.shape[0],), position), "full")

    # -- the protocol ------------------------------------------------------------------------
    def prefill(self, doc, recompute: bool = False) -> Context:
        ctx = Context(self.model, recompute=recompute)
        if not doc.segments:
            ctx.last_hidden = ctx.append(self._text_block(ctx, [self.tokenizer.bos_id]))
            return ctx
        row = layout_document(doc, self.tokenizer, self.layout)
        inputs = prepare_row(row, [doc], self.layout, self.codec)
        embeds = embed_row(self.model, inputs)
        length = row.length - 1  # the prompt stays open: no EOS
        blocks = []
        for span in row.spans:
            end = min(span.end, length)
            if span.start < end:
                blocks.append(Block(embeds[span.start:end], row.expert[span.start:end],
                                    row.position_ids[span.start:end], span.mode))
        ctx.next_position = int(row.position_ids[length])
        ctx.last_hidden = ctx.prefill(blocks)
        return ctx

    def append_text(self, ctx: Context, ids: list[int]) -> None:
        ctx.last_hidden = ctx.append(self._text_block(ctx, ids))

    def begin_image(self, ctx: Context) -> None:
        # every token of an image shares one position id: its noise steps and its clean copy
        ctx.image_position = ctx.take_image_position()

    def append_image(self, ctx: Context, image: Image.Image, role: str,
                     encoded: tuple[Tensor, Tensor] | None = None) -> None:
        if ctx.image_position is None:  # a given image, whole
            self.append_text(ctx, [self.tokenizer.boi_id])
            ctx.append(self._image_block(image, role, ctx.take_image_position(), encoded))
        else:  # the image just drawn, at the position its noise had
            ctx.append(self._image_block(image, role, ctx.image_position, encoded))
            ctx.image_position = None
        self.append_text(ctx, [self.tokenizer.eoi_id])

    def next_text(self, ctx: Context) -> Tensor:
        return self.model.logits(ctx.last_hidden[-1]).float()

    def noise(self, size: tuple[int, int], generator: torch.Generator) -> Tensor:
        rows, cols = self.layout.vae_grid(*size)
        patch = self.layout.latent_patch
        x = torch.randn(1, self.codec.latent_channels, rows * patch, cols * patch, generator=generator)
        return patchify(x.to(self.model.device), patch).unflatten(1, (rows, cols))  # [1, rows, cols, p·p·C]

    def denoise(self, contexts: dict[str, Context], x: Tensor, t: Tensor, batched: bool = True) -> dict[str, Tensor]:
        # x: [1, rows, cols, p·p·C] noisy latents -> {branch: velocity of the same shape}
        _, rows, cols, _ = x.shape
        n = rows * cols
        latents = unpatchify(x.flatten(1, 2), self.layout.latent_patch, rows, cols)  # [1, C, H, W]
        t_row = t.reshape(1).to(x.device)
        tokens = self.model.embed_latents(latents, t_row)  # [1, n, D]
        x_tokens = x.flatten(1, 2)  # [1, n, p·p·C]: what an x0-predicting head needs besides t
        names = list(contexts)
        expert = torch.full((1, n), GEN)
        if batched and len(names) > 1 and not any(c.recompute for c in contexts.values()):
            cache, mask, positions = self._batch(contexts, n)
            hidden = self.model(tokens.expand(len(names), -1, -1), expert.expand(len(names), -1),
                                positions, mask, cache=cache)  # [B, n, D]
            out = {name: self.model.velocity_tokens(hidden[i : i + 1], x_tokens, t_row) for i, name in enumerate(names)}
        else:
            out = {name: self.model.velocity_tokens(
                       ctx.probe(tokens[0], expert[0], torch.full((n,), ctx.image_position))[None], x_tokens, t_row)
                   for name, ctx in contexts.items()}
        return {name: v.unflatten(1, (rows, cols)) for name, v in out.items()}

    def _batch(self, contexts: dict[str, Context], n: int):
        """One padded cache for all branches, built once per image (reused by every step)."""
        key = tuple((name, id(c), c.cache.length, c.image_position) for name, c in contexts.items()) + (n,)
        memo = self._batched  # read once: another thread (a second batching lane) may replace it
        if memo is None or memo[0] != key:
            self._batched = memo = (key, *_padded_rows(list(contexts.values()), n))
        return memo[1:]

    # -- batching across requests (tapestry.infer.batching) -----------------------------------
    def append_text_batch(self, items: list[tuple[Context, list[int]]]) -> None:
        """Several generations' text steps: those adding the same number of tokens to a cache run
        as one forward (`_append_blocks`)."""
        joining = []
        for ctx, ids in items:
            if ctx.recompute or not ctx.cache.keys or not ids:
                self.append_text(ctx, ids)
            else:
                joining.append((ctx, self._text_block(ctx, ids)))
        for (ctx, _), hidden in zip(joining, self._append_blocks(joining), strict=True):
            ctx.last_hidden = hidden

    def append_image_batch(self, items: list[tuple[Context, Image.Image, str, tuple[Tensor, Tensor] | None]]) -> None:
        """Several generations' finished images joining their contexts, each with its tokens from
        `encode_image` (run beforehand, apart: the encoders' convolutions gain nothing from a
        batch). Images just drawn join in one forward per token count, then their end markers in
        one text step; a given image (no `begin_image`) joins as `append_image` would alone."""
        joining = []
        for ctx, image, role, encoded in items:
            if ctx.recompute or not ctx.cache.keys or ctx.image_position is None:
                self.append_image(ctx, image, role, encoded)
            else:
                joining.append((ctx, self._image_block(image, role, ctx.image_position, encoded)))
                ctx.image_position = None
        self._append_blocks(joining)
        self.append_text_batch([(ctx, [self.tokenizer.eoi_id]) for ctx, _ in joining])

    def _append_blocks(self, items: list[tuple[Context, Block]]) -> list[Tensor]:
        """Clean blocks joining several caches: blocks of one length and mode run as one forward
        over their caches right-padded into one batch (`KVCache.batch`, padding hidden by
        `batched_step_mask`); each cache is then cut back to its own tokens. A block with no
        partner runs as `Context.append` alone. Returns each block's final states [n, D]."""
        out: list[Tensor | None] = [None] * len(items)
        groups: dict[tuple[int, str], list[int]] = {}
        for i, (_, block) in enumerate(items):
            groups.setdefault((block.embeds.shape[0], block.mode), []).append(i)
        for (n, mode), members in groups.items():
            if len(members) == 1:
                ctx, block = items[members[0]]
                out[members[0]] = ctx.append(block)
                continue
            group = [items[i] for i in members]
            embeds = torch.stack([block.embeds for _, block in group])  # [B, n, D]
            expert = torch.stack([block.expert for _, block in group])  # [B, n]
            positions = torch.stack([block.positions for _, block in group])  # [B, n]
            cache, lengths = KVCache.batch([ctx.cache for ctx, _ in group])
            mask = batched_step_mask([step_mask(c, n, mode) for c in lengths], lengths)  # [B, n, C_max + n]
            hidden = self.model(embeds, expert, positions, mask, cache=cache, update_cache=True)  # [B, n, D]
            longest = max(lengths)
            for row, (i, (ctx, block)) in enumerate(zip(members, group)):
                keep = torch.cat([torch.arange(lengths[row]), torch.arange(longest, longest + n)])
                for layer, (keys, values) in enumerate(zip(cache.keys, cache.values)):  # [B, H_kv, C_max + n, hd]
                    ctx.cache.store(layer, keys[row:row + 1, :, keep], values[row:row + 1, :, keep])
                ctx.blocks.append(block)
                out[i] = hidden[row]
        return out

    def denoise_batch(self, items: list[tuple[dict[str, Context], Tensor, Tensor]],
                      batched: bool = True) -> list[dict[str, Tensor]]:
        """Several generations' denoising steps: images of the same token count run as one forward
        in which every (image, branch) pair is a row against that branch's own cache."""
        out: list[dict[str, Tensor] | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (contexts, x, _) in enumerate(items):
            if not batched or any(c.recompute for c in contexts.values()):
                out[i] = self.denoise(contexts, x, items[i][2], batched)
            else:
                groups.setdefault(x.shape[1] * x.shape[2], []).append(i)
        for n, members in groups.items():
            if len(members) == 1:
                i = members[0]
                out[i] = self.denoise(*items[i], batched)
                continue
            # x: [1, rows, cols, p·p·C] each -> latents [M, C, H, W] for the M images
            shapes = [items[i][1].shape for i in members]
            latents = torch.cat([unpatchify(items[i][1].flatten(1, 2), self.layout.latent_patch, s[1], s[2])
                                 for i, s in zip(members, shapes)])
            t = torch.cat([items[i][2].reshape(1) for i in members]).to(latents.device)
            tokens = self.model.embed_latents(latents, t)  # [M, n, D]
            rows = [(k, name, ctx) for k, i in enumerate(members) for name, ctx in items[i][0].items()]
            cache, mask, positions = self._batch_rows([ctx for _, _, ctx in rows], n)
            which = torch.tensor([k for k, _, _ in rows])
            hidden = self.model(tokens[which], torch.full((len(rows), n), GEN), positions, mask, cache=cache)  # [R, n, D]
            x_rows = torch.cat([items[i][1].flatten(1, 2) for i in members])[which]  # [R, n, p·p·C]
            v = self.model.velocity_tokens(hidden, x_rows, t[which])  # [R, n, p·p·C]
            for r, (k, name, _) in enumerate(rows):
                i = members[k]
                if out[i] is None:
                    out[i] = {}
                out[i][name] = v[r : r + 1].unflatten(1, (shapes[k][1], shapes[k][2]))
        return out

    def _batch_rows(self, contexts: list[Context], n: int):
        """One padded cache for these rows, kept while the same contexts keep denoising (the
        same images' steps); rebuilt when a generation joins or leaves. Two are kept: the
        request batcher may run two batches at once, one per core, each with its own rows."""
        # weak references: a finished or cancelled generation's context is not kept alive here
        key = [(weakref.ref(c), c.cache.length, c.image_position) for c in contexts]

        def fits(memo) -> bool:
            return memo[1] == n and len(memo[0]) == len(key) and all(
                a[0]() is c and a[1:] == b[1:] for a, b, c in zip(memo[0], key, contexts))

        memos = self._batched_rows  # read once: the other lane may replace it meanwhile
        for memo in memos:
            if fits(memo):
                return memo[2:]
        memo = (key, n, *_padded_rows(contexts, n))
        self._batched_rows = (memo,) + memos[:1]
        return memo[2:]

    def decode(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        # x: [1, rows, cols, p·p·C] -> pixels [1, 3, rows·cell, cols·cell]
        _, rows, cols, _ = x.shape
        return self.codec.decode(unpatchify(x.flatten(1, 2), self.layout.latent_patch, rows, cols))


def _padded_rows(contexts: list[Context], n: int) -> tuple[KVCache, Tensor, Tensor]:
    """The caches of contexts denoising an image of n tokens, right-padded into one batch:
    (cache, mask [R, n, C_max + n] hiding the padding, positions [R, n] at each image's place)."""
    cache, lengths = KVCache.batch([c.cache for c in contexts])
    mask = batched_step_mask([step_mask(c, n, "full") for c in lengths], lengths)
    positions = torch.stack([torch.full((n,), c.image_position) for c in contexts])
    return cache, mask, positions


# ---------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------


@dataclass
class MoTRecipe:
    """The [model] keys of a training config for `mot` (vocab and latent channels come from the
    tokenizer and the autoencoder)."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    use_vit: bool = True  # false: no understanding encoder (given images enter as VAE tokens only)
    use_latent: bool = True  # false: a text-only model (DuetGen stage 1 keeps its gen path frozen)
    init_vit: str = ""  # an encoder folder from `tapestry vit pretrain` (the role SigLIP plays)
    # [model.lora]: peft LoRA adapters on the decoder (rank 0: none, every parameter trains);
    # experts und / gen and modules q/k/v/o_proj, gate/up/down_proj are chosen separately
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(rank=0))

    def validate(self) -> "MoTRecipe":
        self.lora.validate()  # layer indices are checked against the model (init_from may set its depth)
        return self


class MoTFamily:
    name = "mot"
    recipe = MoTRecipe
    param_groups = PARAM_GROUPS
    loss_parts = ("text", "flow")

    # -- config and weights
    def model_config(self, recipe: MoTRecipe, vocab_size: int, latent_channels: int) -> MoTConfig:
        return MoTConfig(
            llm=replace(recipe.llm, vocab_size=vocab_size),
            vit=recipe.vit if recipe.use_vit else None,
            latent=replace(recipe.latent, channels=latent_channels) if recipe.use_latent else None,
        ).validate()

    def load_config(self, folder: str | Path) -> MoTConfig:
        from tapestry.models.mot.bagel import is_bagel_folder

        if is_bagel_folder(folder):  # init_from a BAGEL release: its JSON files and weight header
            from tapestry.models.mot.convert import bagel_config

            return bagel_config(folder)[0]
        return MoTConfig.load(Path(folder) / "config.json")

    def build(self, config: MoTConfig) -> MoTModel:
        return MoTModel(config)

    def initialize(self, model: MoTModel, recipe: MoTRecipe) -> None:
        if recipe.init_vit:
            from tapestry.models.mot.encoder import load_pretrained_vit

            load_pretrained_vit(model, recipe.init_vit)

    # -- adapters (LoRA through peft; tapestry/models/mot/lora.py)
    def add_adapters(self, model: MoTModel, recipe: MoTRecipe) -> list[str]:
        """Inject the LoRA adapters `recipe.lora` names (none at rank 0); their parameter names."""
        if not recipe.lora.rank:
            return []
        from tapestry.models.mot.lora import add_lora, lora_parameters

        add_lora(model, recipe.lora)
        return list(lora_parameters(model))

    def save_adapters(self, model: MoTModel, recipe: MoTRecipe, folder: str | Path, base: str = "") -> Path:
        from tapestry.models.mot.lora import save_adapter

        return save_adapter(model, recipe.lora, folder, base)

    def load_adapters(self, model: MoTModel, folder: str | Path) -> None:
        from tapestry.models.mot.lora import load_adapter

        load_adapter(model, folder)

    def merge_adapters(self, model: MoTModel) -> MoTModel:
        from tapestry.models.mot.lora import merge_lora

        return merge_lora(model)

    def from_pretrained(self, folder: str | Path, device="cpu") -> MoTModel:
        from tapestry.models.mot.bagel import is_bagel_folder

        if is_bagel_folder(folder):
            from tapestry.models.mot.convert import load_bagel

            return load_bagel(folder, device=device)
        return MoTModel.from_pretrained(folder, device=device)

    def inspect(self, folder: str | Path):
        """`tapestry inspect` for a mot checkpoint or a BAGEL release folder; None otherwise."""
        from tapestry.models.mot.inspect import inspect_folder

        return inspect_folder(folder)

    def is_upstream(self, folder: str | Path) -> bool:
        from tapestry.models.mot.bagel import is_bagel_folder

        return is_bagel_folder(folder)

    def read_upstream(self, folder: str | Path, device="cpu"):
        """A folder in an upstream layout this family reads as a whole (BAGEL's release):
        (model, tokenizer, codec, layout, generation defaults), or None when it is not one."""
        from tapestry.models.mot.bagel import is_bagel_folder, load_bagel_parts

        if not is_bagel_folder(folder):
            return None
        parts = load_bagel_parts(folder, device=device)
        return parts.model, parts.tokenizer, parts.vae, parts.layout, dict(parts.defaults)

    def from_state_dict(self, config: MoTConfig, state: dict[str, Tensor], source: str = "<state dict>") -> MoTModel:
        return MoTModel.from_state_dict(config, state, source=source)

    def layout_config(self, config: MoTConfig, downsample: int, **choices) -> LayoutConfig:
        return layout_config_for(config, downsample, **choices)

    # -- training
    def layout(self, doc, tokenizer, layout: LayoutConfig, supervise_text: bool = True, *,
               config: MoTConfig | None = None) -> SequenceLayout:
        return layout_document(doc, tokenizer, layout, supervise_text=supervise_text)  # sizes are in `layout`

    supports_focus_weight = True

    def prepare(self, row, documents, layout, codec, generator=None, timestep_shift: float = 1.0, *,
                config: MoTConfig | None = None, tokenizer=None, focus_weight: float = 0.0) -> RowInputs:
        return prepare_row(row, documents, layout, codec, generator, timestep_shift, focus_weight)

    def codec_pixels(self, row, documents, layout) -> list[Tensor]:
        return codec_pixels(row, documents, layout)

    def loss_counts(self, rows, config: MoTConfig) -> dict[str, int]:
        return loss_counts(rows, config)

    def loss(self, model: MoTModel, batch: Sequence[RowInputs]) -> dict[str, Tensor]:
        return loss_sums(model, batch)

    def group_of(self, name: str) -> str:
        return group_of(name)

    def blocks(self, model: MoTModel) -> list:
        return list(model.layers)

    # -- inference
    def runtime(self, model: MoTModel, tokenizer, codec, layout: LayoutConfig) -> MoTRuntime:
        return MoTRuntime(model, tokenizer, codec, layout)

    # -- measured alone (benchmarks/cached_forward, cached_denoise, guidance_batching, memory,
    # gpu_checks): what they time beneath the runtime, handed over here so they import no folder
    def benchmark_parts(self) -> SimpleNamespace:
        from tapestry.models.mot import memory
        from tapestry.models.mot.bagel import BAGEL_7B

        return SimpleNamespace(KVCache=KVCache, Context=Context, Block=Block, memory=memory, BAGEL_7B=BAGEL_7B)


MOT = families.register(MoTFamily())
