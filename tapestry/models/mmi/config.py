"""Typed configuration of the `mmi` family (MM-Interleaved); saved as `config.json` beside the weights.

Defaults are the paper's where it gives one (Sec. 4.1, Tab. 11): 64 resampled tokens per image,
MMFS every 4 LLM layers with 16 heads × 3 levels × 8 points, feature levels i = 2, 3, 4 of
H/2^(i+1), a one-block decoder resampler to 77 tokens, λ = 10, 10 % condition dropout, CFG 3.5.
Sizes default to a tiny model; `real_layout()` names the published ones (CLIP-ViT-L/14,
Vicuna-13B, SD 2.1) and the converters read them from the checkpoints' own config files.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tapestry.errors import TapestryError
from tapestry.models.common.config import section_from_dict

FORMAT = "tapestry.mmi"
FORMAT_VERSION = 1
FAMILY = "mmi"


class ConfigError(TapestryError):
    """A config file or dict does not describe a valid mmi model."""


def _from_dict(cls, data: Any, where: str):
    return section_from_dict(cls, data, where, ConfigError)


def _positive(obj, prefix: str, names) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ConfigError(f"{prefix}.{name} must be >= 1, got {getattr(obj, name)}")


@dataclass
class VisionConfig:
    """CLIP-ViT (transformers `CLIPVisionModel`) + a ViT-Adapter-style pyramid."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    patch_size: int = 8
    image_size: int = 32  # images are resized to this square before the ViT
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    feature_dim: int = 32  # channels of every pyramid level (what MMFS samples)
    levels: list[int] = field(default_factory=lambda: [2, 3, 4])  # level i has side image_size / 2^(i+1)
    norm_groups: int = 8

    def __post_init__(self) -> None:
        self.levels = list(self.levels)

    def level_sides(self) -> list[int]:
        return [self.image_size // 2 ** (i + 1) for i in self.levels]

    def validate(self) -> None:
        _positive(self, "vision", ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size",
                                   "image_size", "feature_dim", "norm_groups"))
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not self.levels or sorted(self.levels) != list(self.levels) or self.levels[0] < 1:
            raise ConfigError(f"vision.levels must be increasing and >= 1, got {list(self.levels)}")
        if min(self.level_sides()) < 1 or self.image_size % 2 ** (self.levels[-1] + 1):
            raise ConfigError(f"vision.image_size {self.image_size} is too small or not divisible for "
                              f"levels {list(self.levels)} (needs a multiple of {2 ** (self.levels[-1] + 1)})")
        if self.feature_dim % self.norm_groups:
            raise ConfigError(f"vision.feature_dim {self.feature_dim} must divide into {self.norm_groups} groups")


@dataclass
class ResamplerConfig:
    """Perceiver resampler (Flamingo): learned queries cross-attend to [inputs; queries]."""

    queries: int = 64
    blocks: int = 2
    dim: int = 32
    heads: int = 2
    ff_mult: int = 4

    def validate(self, where: str) -> None:
        _positive(self, where, ("queries", "blocks", "dim", "heads", "ff_mult"))
        if self.dim % self.heads:
            raise ConfigError(f"{where}.dim {self.dim} must divide into {self.heads} heads")


@dataclass
class LLMConfig:
    """A LLaMA / Vicuna-layout decoder (transformers `LlamaForCausalLM`)."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        _positive(self, "llm", ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                "num_kv_heads"))
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"llm: hidden_size {self.hidden_size} / num_heads {self.num_heads} / "
                              f"num_kv_heads {self.num_kv_heads} do not divide")


@dataclass
class MMFSConfig:
    every: int = 4  # MMFS after the self-attention of every k-th LLM layer
    heads: int = 16
    points: int = 8
    max_images: int = 32  # rows of the image-index embedding (images per document)

    def validate(self) -> None:
        _positive(self, "mmfs", ("every", "heads", "points", "max_images"))


@dataclass
class DecoderConfig:
    """Stable-Diffusion-2.1-layout `UNet2DConditionModel` + its condition and MMFS paths."""

    latent_channels: int = 4
    sample_size: int = 8  # latent side the UNet is built for (any multiple of 2^(blocks-1) runs)
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention_head_dim: list[int] = field(default_factory=lambda: [2, 4])
    cross_attention_dim: int = 32
    norm_num_groups: int = 8
    tokens: int = 77  # conditional tokens per image (SD's text length)
    resampler_blocks: int = 1
    resampler_heads: int = 2
    mmfs_dim: int = 32
    mmfs_heads: int = 2
    mmfs_points: int = 4
    # diffusion (DDPM, SD 2.1 settings); prediction "epsilon" (Eq. 3) or "v_prediction"
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    def __post_init__(self) -> None:
        self.block_out_channels = list(self.block_out_channels)
        self.attention_head_dim = list(self.attention_head_dim)

    def unet_kwargs(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        return dict(
            sample_size=self.sample_size, in_channels=self.latent_channels, out_channels=self.latent_channels,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
            attention_head_dim=tuple(self.attention_head_dim), cross_attention_dim=self.cross_attention_dim,
            norm_num_groups=self.norm_num_groups, use_linear_projection=True,  # SD 2.x
        )

    def validate(self) -> None:
        _positive(self, "decoder", ("latent_channels", "sample_size", "layers_per_block", "cross_attention_dim",
                                    "tokens", "resampler_blocks", "resampler_heads", "mmfs_dim", "mmfs_heads",
                                    "mmfs_points", "num_train_timesteps"))
        if len(self.block_out_channels) < 2 or len(self.attention_head_dim) != len(self.block_out_channels):
            raise ConfigError("decoder.block_out_channels needs >= 2 entries and attention_head_dim one per block")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"decoder.prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        if self.cross_attention_dim % self.resampler_heads or self.mmfs_dim % self.mmfs_heads:
            raise ConfigError("decoder: cross_attention_dim / mmfs_dim must divide into their heads")


@dataclass
class MMIConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    mmfs: MMFSConfig = field(default_factory=MMFSConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    use_mmfs: bool = True  # the ablation switch: False builds no MMFS anywhere
    skip_first_image: str = "first_image"  # "first_image" (DESIGN) or "leading_image" (paper: image first in sequence)
    image_loss: str = "all"  # NIP on "all" images but the skipped first one, or only "target" images
    # λ = 10 of NTP + λ·NIP, 10 % text dropout and CFG 3.5 live in the training / generation
    # settings (stages.loss_weights.image, dropout.policy = "mmi", --guidance cfg).

    SECTIONS = ("vision", "resampler", "llm", "mmfs", "decoder")

    def mmfs_layers(self) -> list[int]:
        if not self.use_mmfs:
            return []
        return [i for i in range(self.llm.num_layers) if (i + 1) % self.mmfs.every == 0]

    def validate(self) -> MMIConfig:
        self.vision.validate()
        self.resampler.validate("resampler")
        self.llm.validate()
        self.mmfs.validate()
        self.decoder.validate()
        if self.llm.hidden_size % self.mmfs.heads:
            raise ConfigError(f"llm.hidden_size {self.llm.hidden_size} must divide into mmfs.heads {self.mmfs.heads}")
        for name, allowed in (("skip_first_image", ("first_image", "leading_image")),
                              ("image_loss", ("all", "target"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "family": FAMILY, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> MMIConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected an object")
        data = dict(data)
        fmt = data.pop("format", FORMAT)
        version = data.pop("format_version", FORMAT_VERSION)
        family = data.pop("family", FAMILY)
        if fmt != FORMAT or family != FAMILY:
            raise ConfigError(f"{where}: format {fmt!r} / family {family!r}, expected {FORMAT!r} / {FAMILY!r}")
        if version != FORMAT_VERSION:
            raise ConfigError(f"{where}: format_version {version} is not supported (this code reads {FORMAT_VERSION})")
        types = {"vision": VisionConfig, "resampler": ResamplerConfig, "llm": LLMConfig, "mmfs": MMFSConfig,
                 "decoder": DecoderConfig}
        sections = {name: _from_dict(kind, data[name], f"{where}.{name}") for name, kind in types.items() if name in data}
        # the switches beside the sections, typed like every section's fields (unknown names refused)
        switches = _from_dict(cls, {k: v for k, v in data.items() if k not in types}, where)
        try:
            return dataclasses.replace(switches, **sections).validate()
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> MMIConfig:
        from tapestry.models.common.checkpoint import CheckpointError, read_json_file

        path = Path(path)
        try:
            data = read_json_file(path, "an mmi model config")
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
        return cls.from_dict(data, str(path))


def real_layout() -> MMIConfig:
    """The paper's components: CLIP-ViT-L/14 at 224, Vicuna-13B, SD 2.1 (768, v-prediction)."""
    return MMIConfig(
        vision=VisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, patch_size=14,
                            image_size=224, feature_dim=1024, norm_groups=32),  # levels 2, 3, 4: 28², 14², 7²
        resampler=ResamplerConfig(queries=64, blocks=12, dim=1024, heads=16),
        llm=LLMConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                      num_kv_heads=40),
        mmfs=MMFSConfig(),
        decoder=DecoderConfig(sample_size=96, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                              attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, norm_num_groups=32,
                              resampler_heads=16, mmfs_dim=320, mmfs_heads=16, mmfs_points=8,
                              prediction_type="v_prediction"),
    )
