"""The DiT's autoencoder behind tapestry's autoencoder protocol (tapestry.models.vae.protocol).

Every image is encoded *alone*, as a one-frame video (T = 1): a causal video VAE encodes a first
frame without looking at any other, so an image's latent never depends on its neighbours and a
generated image re-enters the context exactly as a given one would. Latents are normalized the
way the diffusers Wan / Cosmos pipelines do, ((z − mean) / std per channel), and `decode` undoes it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tapestry.models.duet.config import VAEConfig


class VideoVAE(nn.Module):
    """AutoencoderKLWan or AutoencoderKLCosmos on single frames."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        if config.kind == "wan":
            from diffusers import AutoencoderKLWan

            self.net = AutoencoderKLWan(**config.config)
            cfg = self.net.config
            self.downsample = int(cfg.scale_factor_spatial or 2 ** len(cfg.temperal_downsample))
            channels = int(cfg.z_dim)
        else:
            from diffusers import AutoencoderKLCosmos

            self.net = AutoencoderKLCosmos(**config.config)
            cfg = self.net.config
            self.downsample = int(cfg.spatial_compression_ratio)
            channels = int(cfg.latent_channels)
        self.latent_channels = channels
        mean = cfg.latents_mean if cfg.latents_mean is not None else [0.0] * channels
        std = cfg.latents_std if cfg.latents_std is not None else [1.0] * channels
        # Cosmos keeps one statistic per (channel, latent frame); a single frame uses the first
        self.register_buffer("mean", torch.tensor(mean[:channels], dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std[:channels], dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def encode(self, images: Tensor) -> Tensor:
        """images: [B, 3, H, W] in [-1, 1] -> normalized latents [B, C, H/f, W/f]."""
        dtype = next(self.net.parameters()).dtype
        dist = self.net.encode(images[:, :, None].to(dtype)).latent_dist
        z = dist.mode()[:, :, 0].float()  # the first (only) latent frame
        return (z - self.mean) / self.std

    def decode(self, latents: Tensor) -> Tensor:
        """[B, C, h, w] -> images [B, 3, h·f, w·f], about [-1, 1]."""
        dtype = next(self.net.parameters()).dtype
        z = latents.float() * self.std + self.mean
        return self.net.decode(z[:, :, None].to(dtype)).sample[:, :, 0].float()


class ToyVAE(nn.Module):
    """A tapestry ToyAutoencoder (ToyWorld), built from its config dict; weights load with the model."""

    def __init__(self, config: VAEConfig, load_pretrained: bool = True):
        super().__init__()
        from tapestry.models.vae.toy import ToyAEConfig, ToyAutoencoder

        if config.pretrained and load_pretrained:
            self.net = ToyAutoencoder.from_pretrained(config.pretrained)
        else:
            self.net = ToyAutoencoder(ToyAEConfig.from_dict(dict(config.config), "vae.config"))
        self.downsample = self.net.downsample
        self.latent_channels = self.net.latent_channels

    def encode(self, images: Tensor) -> Tensor:
        return self.net.encode(images)

    def decode(self, latents: Tensor) -> Tensor:
        return self.net.decode(latents)


def resolve_pretrained(config: VAEConfig) -> VAEConfig:
    """The config with `config` read from the `pretrained` folder (so a saved model is self-contained)."""
    import json
    from dataclasses import replace
    from pathlib import Path

    if not config.pretrained:
        return config
    path = Path(config.pretrained) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        from tapestry.models.duet.config import DuetConfigError

        raise DuetConfigError(f"vae.pretrained: cannot read {path} ({exc})") from None
    return replace(config, config={k: v for k, v in data.items() if not k.startswith("_")})


def build_vae(config: VAEConfig, load_pretrained: bool = True) -> nn.Module:
    if config.kind == "toy":
        return ToyVAE(config, load_pretrained)
    vae = VideoVAE(config)
    if config.pretrained and load_pretrained:
        from tapestry.models.duet.convert import load_diffusers

        load_diffusers(config.pretrained, vae.net)
    return vae


def load_vae_weights(vae: nn.Module, config: VAEConfig, folder: str) -> None:
    """Trained weights from `folder` into a built VAE wrapper (strict keys)."""
    if config.kind == "toy":
        from tapestry.models.vae.toy import ToyAutoencoder

        trained = ToyAutoencoder.from_pretrained(folder)
        vae.net.load_state_dict(trained.state_dict(), strict=True)
        return
    from tapestry.models.duet.convert import load_diffusers

    load_diffusers(folder, vae.net)
