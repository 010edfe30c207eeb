"""The one interface every autoencoder offers to the generation path.

The flow model works in latent space; which autoencoder made that space (the ToyWorld AE, a FLUX
AE through diffusers) must never matter to it. So every autoencoder here:

    encode(images)  # images: [B, 3, H, W] in [-1, 1] -> latents: [B, C, H/f, W/f]
    decode(latents) # latents: [B, C, h, w] -> images: [B, 3, h·f, w·f], about [-1, 1]
    downsample      # f
    latent_channels # C

Latents are already shifted and scaled into the flow model's space ((raw - shift) · scale), and
`decode` undoes that: a caller never sees the raw encoder output.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from tapestry.errors import TapestryError


class VAEError(TapestryError):
    """An autoencoder config, checkpoint or input is invalid; the message says which and why."""


@runtime_checkable
class Autoencoder(Protocol):
    downsample: int
    latent_channels: int

    def encode(self, images: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...


def latent_shape(ae: Autoencoder, height: int, width: int) -> tuple[int, int, int]:
    """(C, h, w) of the latents of an H×W image, or a clear error if the sides do not divide."""
    f = ae.downsample
    if height % f or width % f:
        raise VAEError(f"image size {height}×{width} is not a multiple of the autoencoder's ×{f} downsampling")
    return ae.latent_channels, height // f, width // f
