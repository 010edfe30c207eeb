"""The ToyWorld autoencoder: a small convolutional AE for flat-coloured procedural scenes.

Why this shape (DESIGN §10): a conv AE at ×8 trained for minutes blurs the entities so much that
the exact judge gives its reconstructions 0.27, and the flow model can never be sharper than its
decoder. ToyWorld images are large flat regions with thin ink patterns, so the AE here keeps a
×4 grid (64 px -> 16×16×8 latents, which 2×2 latent patches make 64 tokens), spends its channels
on the coarse levels where convolutions are cheap, and ends on a full-resolution residual block
that draws the edges. No attention (a 16×16 grid is small enough for convolutions to see a whole
cell) and a deterministic encoder: the latent is the encoder's output, scaled and shifted by two
numbers measured on held-out scenes after training, so the flow model sees roughly unit variance.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tapestry.models.common.checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    checkpoint_files,
    load_state_strict,
    save_state,
    write_config,
)
from tapestry.models.vae.protocol import VAEError

FORMAT = "tapestry.toy_ae"
FORMAT_VERSION = 1


@dataclass
class ToyAEConfig:
    """Everything that rebuilds a ToyAutoencoder; saved as `config.json` beside the weights.

    `channels[i]` is the width at level i (level 0 = full resolution); each level after the first
    halves the side, so the downsampling factor is 2**(len(channels) - 1)."""

    in_channels: int = 3
    latent_channels: int = 8
    channels: tuple[int, ...] = (32, 64, 128)
    encoder_blocks: tuple[int, ...] = (1, 1, 1)  # residual blocks per level, level 0 first
    decoder_blocks: tuple[int, ...] = (1, 1, 2)
    norm_groups: int = 8
    resolution: int = 64  # the side it was trained at; any multiple of `downsample` works
    # Latent space of the flow model: z = (encoder output - shift) * scale.
    scale_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        self.encoder_blocks = tuple(self.encoder_blocks)
        self.decoder_blocks = tuple(self.decoder_blocks)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def validate(self) -> ToyAEConfig:
        n = len(self.channels)
        if n < 1:
            raise VAEError("toy AE config: channels needs at least one level")
        for name in ("in_channels", "latent_channels", "norm_groups", "resolution"):
            if getattr(self, name) < 1:
                raise VAEError(f"toy AE config: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("encoder_blocks", "decoder_blocks"):
            blocks = getattr(self, name)
            if len(blocks) != n or any(b < 0 for b in blocks):
                raise VAEError(f"toy AE config: {name} needs {n} counts >= 0 (one per level), got {list(blocks)}")
        bad = [c for c in self.channels if c < 1 or c % self.norm_groups]
        if bad:
            raise VAEError(f"toy AE config: channels {list(self.channels)} must all be multiples of "
                           f"norm_groups={self.norm_groups}")
        if self.resolution % self.downsample:
            raise VAEError(f"toy AE config: resolution {self.resolution} is not a multiple of {self.downsample}")
        if not self.scale_factor > 0:
            raise VAEError(f"toy AE config: scale_factor must be > 0, got {self.scale_factor}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("channels", "encoder_blocks", "decoder_blocks"):
            d[k] = list(d[k])
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> ToyAEConfig:
        if not isinstance(data, dict):
            raise VAEError(f"{where}: expected an object, got {type(data).__name__}")
        data = dict(data)
        fmt, version = data.pop("format", None), data.pop("format_version", None)
        if fmt != FORMAT:
            raise VAEError(f"{where}: format is {fmt!r}, expected {FORMAT!r} (is this a toy AE checkpoint?)")
        if version != FORMAT_VERSION:
            raise VAEError(f"{where}: format_version {version!r} is not supported (this code reads {FORMAT_VERSION})")
        from tapestry.models.common.config import section_from_dict

        levels = {}
        for name in ("channels", "encoder_blocks", "decoder_blocks"):  # tuples of any length
            if name in data:
                value = data.pop(name)
                if not (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
                    raise VAEError(f"{where}.{name}: expected a list of integers, found {json.dumps(value)[:60]}")
                levels[name] = tuple(value)
        cfg = dataclasses.replace(section_from_dict(cls, data, where, VAEError), **levels)
        try:
            return cfg.validate()
        except VAEError as exc:
            raise VAEError(f"{where}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> ToyAEConfig:
        from tapestry.models.common.checkpoint import CheckpointError, read_json_file

        path = Path(path)
        try:
            data = read_json_file(path, "a toy autoencoder config")
        except CheckpointError as exc:
            raise VAEError(str(exc)) from None
        return cls.from_dict(data, where=str(path))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus the input. The second conv starts at zero so that a
    fresh block is the identity and a deep stack trains from the first step."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, C, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: ToyAEConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList()
        for i, c in enumerate(ch):
            level = nn.Module()
            level.blocks = nn.ModuleList(ResBlock(c, cfg.norm_groups) for _ in range(cfg.encoder_blocks[i]))
            # A strided conv halves the side and widens to the next level in one step.
            level.down = nn.Conv2d(c, ch[i + 1], 3, stride=2, padding=1) if i + 1 < len(ch) else None
            self.levels.append(level)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, 3, H, W] -> [B, C_lat, H/f, W/f]
        h = self.conv_in(x)
        for level in self.levels:
            for block in level.blocks:
                h = block(h)
            if level.down is not None:
                h = level.down(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: ToyAEConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        # Stored coarse level first, in the order they run.
        self.levels = nn.ModuleList()
        for i in reversed(range(len(ch))):
            level = nn.Module()
            level.blocks = nn.ModuleList(ResBlock(ch[i], cfg.norm_groups) for _ in range(cfg.decoder_blocks[i]))
            # Nearest ×2 then a conv (not a transposed conv): no checkerboard on flat regions.
            level.up = nn.Conv2d(ch[i], ch[i - 1], 3, padding=1) if i > 0 else None
            self.levels.append(level)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch[0], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        # z: [B, C_lat, h, w] -> [B, 3, h·f, w·f]
        h = self.conv_in(z)
        for level in self.levels:
            for block in level.blocks:
                h = block(h)
            if level.up is not None:
                h = level.up(_nearest_x2(h))
        return self.conv_out(F.silu(self.norm_out(h)))


def _nearest_x2(h: Tensor) -> Tensor:
    """Nearest ×2 upsampling, [B, C, h, w] -> [B, C, 2h, 2w]: at inference the same values as
    `F.interpolate(h, scale_factor=2, mode="nearest")` (a copy, no arithmetic) in a third of its
    time on CPU, where that kernel took 1.8 of the decoder's 15 ms per 64-pixel image. Training
    keeps `F.interpolate`, whose backward sums each 2×2 gradient in its own order."""
    if h.requires_grad:
        return F.interpolate(h, scale_factor=2.0, mode="nearest")
    b, c, height, width = h.shape
    return h[:, :, :, None, :, None].expand(b, c, height, 2, width, 2).reshape(b, c, 2 * height, 2 * width)


class ToyAutoencoder(nn.Module):
    """Implements the autoencoder protocol (tapestry.models.vae.protocol)."""

    def __init__(self, config: ToyAEConfig):
        super().__init__()
        self.config = config.validate()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def _check_images(self, images: Tensor) -> None:
        f = self.downsample
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise VAEError(f"images must be [B, {self.config.in_channels}, H, W], got {list(images.shape)}")
        if images.shape[-1] % f or images.shape[-2] % f:
            raise VAEError(f"image sides must be multiples of {f}, got {images.shape[-2]}×{images.shape[-1]}")

    def encode_raw(self, images: Tensor) -> Tensor:
        """The encoder's output before scale/shift (what training reconstructs through)."""
        self._check_images(images)
        return self.encoder(images)

    def decode_raw(self, raw: Tensor) -> Tensor:
        return self.decoder(raw)

    def encode(self, images: Tensor) -> Tensor:
        # images: [B, 3, H, W] in [-1, 1] -> latents: [B, C, H/f, W/f] in the flow model's space
        return (self.encode_raw(images) - self.config.shift_factor) * self.config.scale_factor

    def decode(self, latents: Tensor) -> Tensor:
        # latents: [B, C, h, w] -> images: [B, 3, h·f, w·f], roughly [-1, 1] (not clamped)
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise VAEError(f"latents must be [B, {self.latent_channels}, h, w], got {list(latents.shape)}")
        return self.decoder(latents / self.config.scale_factor + self.config.shift_factor)

    def forward(self, images: Tensor) -> Tensor:
        return self.decode_raw(self.encode_raw(images))

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` (each atomically) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_state(folder / WEIGHTS_NAME, self, metadata={"format": FORMAT})
        write_config(folder, self.config.to_json())
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | str = "cpu") -> ToyAutoencoder:
        """Rebuild from a folder written by `save_pretrained`; refuses any key or shape mismatch."""
        from tapestry.models.common.checkpoint import load_safetensors

        config_path, weights_path = checkpoint_files(folder)
        config = ToyAEConfig.load(config_path)
        state = load_safetensors(weights_path, device=str(device))
        with torch.device("meta"):
            model = cls(config)
        load_state_strict(model, state, str(weights_path))
        return model.eval()
