"""F×F average pooling down, nearest upsampling back: a real, deterministic, parameter-free
autoencoder (lossy: flat colours only) for tests and smoke runs, behind the protocol.

Named `pool:F` in a training config's `model.vae`; saved as a folder holding `pool_codec.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor

from tapestry.models.vae.protocol import VAEError

POOL_FILE = "pool_codec.json"


class PoolCodec:
    def __init__(self, downsample: int):
        if downsample < 1:
            raise VAEError(f"pool codec: downsample must be >= 1, got {downsample}")
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

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "PoolCodec":
        path = Path(folder) / POOL_FILE
        try:
            return cls(int(json.loads(path.read_text(encoding="utf-8"))["downsample"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VAEError(f"{path}: not a pool codec file ({exc})") from None


def parse_pool_spec(spec: str) -> PoolCodec:
    """`pool:F` -> PoolCodec(F)."""
    try:
        return PoolCodec(int(spec.split(":", 1)[1]))
    except (ValueError, IndexError):
        raise VAEError(f"{spec!r}: expected pool:F with an integer F, e.g. pool:4") from None
