"""The `mot` family's glue: packed layouts + pixels -> model inputs -> losses.

`layout_document` decides *where* tokens go; this file fills them: text ids through the
embedding, images through the ViT (und tokens) or the VAE + latent projection (gen tokens,
clean at t = 0 or noised for flow matching). Training and inference share `embed_row`, so a
generated image enters the context exactly as a given one does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from tapestry.layout import IGNORE, ImagePlacement, LayoutConfig, SequenceLayout, dense_mask
from tapestry.models.common.flow import interpolate, sample_timesteps, velocity_target
from tapestry.models.mot.config import MoTConfig


class LatentCodec(Protocol):
    """What the generation path needs of an autoencoder (see tapestry.models.common.vae)."""

    downsample: int
    latent_channels: int

    def encode(self, images: Tensor) -> Tensor: ...  # [B, 3, H, W] in [-1, 1] -> [B, C, H/f, W/f]

    def decode(self, latents: Tensor) -> Tensor: ...


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


@torch.no_grad()
def prepare_row(
    row: SequenceLayout,
    documents: Sequence,
    layout: LayoutConfig,
    vae: LatentCodec | None,
    generator: torch.Generator | None = None,
    timestep_shift: float = 1.0,
) -> RowInputs:
    """Pixels for every image placement of `row`; noised latents and targets for noise spans.

    `documents` are the row's Documents in packing order (row.documents[i] is documents[i]).
    Each image is VAE-encoded once even when it appears as noise and as a clean copy.
    """
    inputs = RowInputs(row)
    encoded: dict[tuple[int, int], Tensor] = {}
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
    return inputs


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


@dataclass
class LossParts:
    loss: Tensor
    text_loss: Tensor
    flow_loss: Tensor
    text_tokens: int
    flow_elements: int


def training_loss(model, batch: Sequence[RowInputs], flow_weight: float = 1.0) -> LossParts:
    """CE on supervised next tokens + λ·MSE of velocities on noise spans, over a batch of rows
    of one length. Means are over supervised tokens / latent elements of the whole batch, so a
    row's weight does not depend on how it was packed."""
    # embeds: [B, L, D]; masks: [B, L, L]
    embeds = torch.stack([embed_row(model, inputs) for inputs in batch])
    rows = [inputs.row for inputs in batch]
    expert = torch.stack([r.expert for r in rows]).to(model.device)
    positions = torch.stack([r.position_ids for r in rows]).to(model.device)
    masks = torch.stack([dense_mask(r.spans) for r in rows]).to(model.device)
    hidden = model(embeds, expert, positions, masks)
    labels = torch.stack([r.labels for r in rows]).to(model.device)
    supervised = labels != IGNORE
    zero = hidden.sum() * 0.0  # keeps the graph connected when a batch has no text targets
    if supervised.any():
        text_loss = F.cross_entropy(model.logits(hidden[supervised]).float(), labels[supervised])
    else:
        text_loss = zero
    squared, elements = zero, 0
    for b, inputs in enumerate(batch):
        for n, target in inputs.velocity_targets.items():
            placement: ImagePlacement = inputs.row.images[n]
            rows_, cols = placement.grid
            predicted = model.latent_velocity(hidden[b : b + 1, placement.start : placement.end], rows_, cols)[0]
            squared = squared + (predicted.float() - target.to(predicted.device)).pow(2).sum()
            elements += target.numel()
    flow_loss = squared / elements if elements else zero
    return LossParts(text_loss + flow_weight * flow_loss, text_loss.detach(), flow_loss.detach(),
                     int(supervised.sum()), elements)
