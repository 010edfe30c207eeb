"""The autoencoder a run trains against, from the `model.vae` setting.

    "pool:F"        F×F average pooling down, nearest upsampling back: a real, deterministic,
                    parameter-free autoencoder for tests and smoke runs (lossy: flat colours only)
    a folder/file   anything tapestry.models.vae.load_autoencoder reads: a ToyAutoencoder folder,
                    a diffusers AutoencoderKL folder, a FLUX-layout ae.safetensors

All follow the protocol in tapestry.models.vae.protocol. The autoencoder is frozen during
training (no recipe here trains it with the flow model; Inset fine-tunes everything but the VAE).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from tapestry.models.vae import VAEError, load_autoencoder
from tapestry.models.vae.pool import POOL_FILE, PoolCodec  # noqa: F401  (PoolCodec: re-exported)
from tapestry.train.config import TrainConfigError


def load_codec(spec: str, device: torch.device | str = "cpu"):
    """The autoencoder named by `model.vae` (see the module docstring), frozen and in eval mode."""
    if not spec.startswith("pool:") and not Path(spec).exists():
        raise TrainConfigError(f"model.vae = {spec!r}: no such folder or file (an autoencoder folder, "
                               "ae.safetensors, or pool:F)")
    try:
        codec = load_autoencoder(spec, device=device)
    except VAEError as exc:
        raise TrainConfigError(f"model.vae = {spec!r}: {exc}") from None
    if isinstance(codec, torch.nn.Module):
        codec.eval().requires_grad_(False)
    return codec


class BatchEncoded:
    """An autoencoder whose `encode` answers from latents computed beforehand in batches.

    `prepare_row` encodes one image at a time; a conv AE on CPU is several times faster per
    image in a batch. `encode_all` runs the images of a whole step through the AE grouped by
    size, and `encode` then returns each image's latents by the exact bytes of its pixels (a miss
    falls back to encoding alone, so the result never depends on what was precomputed).
    """

    def __init__(self, codec):
        self.codec = codec
        self.downsample, self.latent_channels = codec.downsample, codec.latent_channels
        self._latents: dict[tuple, Tensor] = {}

    @staticmethod
    def _key(pixels: Tensor) -> tuple:
        # pixels: [3, H, W] float32
        return (tuple(pixels.shape), pixels.contiguous().numpy().tobytes())

    @torch.no_grad()
    def encode_all(self, images: list[Tensor], batch_size: int = 64) -> None:
        """images: [3, H, W] each, in [-1, 1]."""
        self._latents.clear()
        by_size: dict[tuple, list[Tensor]] = {}
        for image in images:
            by_size.setdefault(tuple(image.shape), []).append(image)
        for group in by_size.values():
            unique = list({self._key(x): x for x in group}.items())
            for start in range(0, len(unique), batch_size):
                chunk = unique[start : start + batch_size]
                latents = self.codec.encode(torch.stack([x for _, x in chunk]))  # [N, C, h, w]
                for (key, _), z in zip(chunk, latents):
                    self._latents[key] = z

    def encode(self, images: Tensor) -> Tensor:
        # images: [B, 3, H, W] -> [B, C, H/f, W/f]
        found = [self._latents.get(self._key(x)) for x in images]
        if all(z is not None for z in found):
            return torch.stack(found)
        return self.codec.encode(images)

    def decode(self, latents: Tensor) -> Tensor:
        return self.codec.decode(latents)
