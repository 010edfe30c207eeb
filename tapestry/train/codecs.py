"""The autoencoder a run trains against, from the `model.vae` setting.

    "pool:F"        F×F average pooling down, nearest upsampling back: a real, deterministic,
                    parameter-free autoencoder for tests and smoke runs (lossy: flat colours only)
    a folder        a ToyAutoencoder written by `save_pretrained` (tapestry.models.vae.toy)

Both follow the protocol in tapestry.models.vae.protocol. The autoencoder is frozen during
training (no recipe here trains it with the flow model; Inset fine-tunes everything but the VAE).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tapestry.train.config import TrainConfigError

POOL_FILE = "pool_codec.json"


class PoolCodec:
    def __init__(self, downsample: int):
        if downsample < 1:
            raise TrainConfigError(f"pool codec: downsample must be >= 1, got {downsample}")
        self.downsample = downsample
        self.latent_channels = 3

    def encode(self, images: Tensor) -> Tensor:
        # images: [B, 3, H, W] in [-1, 1] -> [B, 3, H/f, W/f]
        return F.avg_pool2d(images, self.downsample)

    def decode(self, latents: Tensor) -> Tensor:
        # latents: [B, 3, h, w] -> [B, 3, h·f, w·f]
        return F.interpolate(latents, scale_factor=self.downsample, mode="nearest")

    def save_pretrained(self, folder: str | Path) -> Path:
        from tapestry.atomic import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / POOL_FILE, json.dumps({"kind": "pool", "downsample": self.downsample}) + "\n")
        return folder


def load_codec(spec: str, device: torch.device | str = "cpu"):
    """The autoencoder named by `model.vae` (see the module docstring), frozen and in eval mode."""
    if spec.startswith("pool:"):
        try:
            return PoolCodec(int(spec.split(":", 1)[1]))
        except ValueError:
            raise TrainConfigError(f"model.vae = {spec!r}: expected pool:F with an integer F, e.g. pool:4") from None
    path = Path(spec)
    if (path / POOL_FILE).is_file():
        return PoolCodec(int(json.loads((path / POOL_FILE).read_text())["downsample"]))
    if not path.is_dir():
        raise TrainConfigError(f"model.vae = {spec!r}: not a folder (a ToyAutoencoder save_pretrained folder) "
                               "and not pool:F")
    from tapestry.models.vae.toy import ToyAutoencoder

    model = ToyAutoencoder.from_pretrained(path, device=device)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


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
