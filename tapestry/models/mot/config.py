"""Typed configuration of the `mot` family; saved as `config.json` beside the weights.

One MoTConfig is enough to rebuild the model: the language model (both experts share these
shapes), the optional understanding encoder (NaViT-style SigLIP + connector) and the optional
generation path (VAE latents in and out).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tapestry.errors import TapestryError
from tapestry.models.common.config import section_from_dict

FORMAT = "tapestry.mot"
FAMILY = "mot"  # the registry name (tapestry/models/family.py)
FORMAT_VERSION = 1


PREDICTIONS = ("velocity", "x0")  # LatentConfig.prediction
# x0-prediction divides by t; below this the quotient is clipped (JiT's 0.05), which only matters
# for the last sampler steps and the rare training times that close to the data
X0_MIN_T = 0.05


class ConfigError(TapestryError):
    """A config file or dict does not describe a valid model."""


def _from_dict(cls, data: Any, where: str):
    return section_from_dict(cls, data, where, ConfigError)


@dataclass
class LLMConfig:
    """The decoder (Qwen2 shapes); the und and gen experts are identical copies of these."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qk_norm: bool = True
    tie_word_embeddings: bool = False

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"llm.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"llm.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"llm.head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_size % 4:
            raise ConfigError(f"llm.hidden_size must be divisible by 4 (2-D sin-cos), got {self.hidden_size}")


@dataclass
class ViTConfig:
    """NaViT-style SigLIP encoder over variable-size images, plus the MLP connector."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 1
    num_heads: int = 2
    patch_size: int = 14
    max_patches_per_side: int = 10  # side of both position tables (learned and sin-cos)
    layer_norm_eps: float = 1e-6
    # Amplitude of the 2-D sin-cos position added after the connector. BAGEL adds it at 1.0 to
    # SigLIP features of large norm; a small encoder's features start ~25x smaller, so at 1.0 the
    # decoder sees mostly *where* a patch is, not *what* it shows (issue 20: the default's tokens of
    # two different references differed by 13 %).
    pos_scale: float = 1.0

    def validate(self) -> None:
        if not self.pos_scale >= 0:
            raise ConfigError(f"vit.pos_scale must be >= 0, got {self.pos_scale}")
        for f in fields(self):
            if f.name not in ("layer_norm_eps", "pos_scale") and getattr(self, f.name) < 1:
                raise ConfigError(f"vit.{f.name} must be >= 1, got {getattr(self, f.name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vit.hidden_size must divide into {self.num_heads} heads")


@dataclass
class LatentConfig:
    """The generation path: VAE latents -> 2×2 patches -> tokens, and back."""

    channels: int = 16  # VAE z channels
    patch_size: int = 2
    max_side: int = 8  # latent side in patches: rows of the sin-cos table = max_side²
    timestep_freq_dim: int = 256
    # What the head's output means. "velocity": v = ε − x0 directly (BAGEL, Inset). "x0": the
    # clean latents, turned into v = (x_t − x̂0) / t (JiT, "Back to Basics", 2025): a token of
    # p·p·C features is a high-dimensional target next to a small decoder's width, and x0 lies
    # near a low-dimensional data manifold where ε − x0 does not — the loss is still taken on v.
    prediction: str = "velocity"

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size**2

    def validate(self) -> None:
        for f in fields(self):
            if f.name != "prediction" and getattr(self, f.name) < 1:
                raise ConfigError(f"latent.{f.name} must be >= 1, got {getattr(self, f.name)}")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"latent.prediction must be one of {list(PREDICTIONS)}, got {self.prediction!r}")


@dataclass
class MoTConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig | None = field(default_factory=ViTConfig)
    latent: LatentConfig | None = field(default_factory=LatentConfig)

    def validate(self) -> MoTConfig:
        self.llm.validate()
        if self.vit is not None:
            self.vit.validate()
        if self.latent is not None:
            self.latent.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "family": FAMILY, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> MoTConfig:
        data = dict(data)
        fmt = data.pop("format", FORMAT)
        version = data.pop("format_version", FORMAT_VERSION)
        family = data.pop("family", FAMILY)
        if family != FAMILY:
            raise ConfigError(f"{where}: family is {family!r}; this is the {FAMILY!r} family's config reader")
        if fmt != FORMAT:
            raise ConfigError(f"{where}: format is {fmt!r}, expected {FORMAT!r}")
        if version != FORMAT_VERSION:
            raise ConfigError(f"{where}: format_version {version} is not supported (this code reads {FORMAT_VERSION})")
        unknown = sorted(set(data) - {"llm", "vit", "latent"})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; known: ['latent', 'llm', 'vit']")
        cfg = cls(
            llm=_from_dict(LLMConfig, data.get("llm", {}), f"{where}.llm"),
            vit=None if data.get("vit") is None else _from_dict(ViTConfig, data["vit"], f"{where}.vit"),
            latent=None if data.get("latent") is None else _from_dict(LatentConfig, data["latent"], f"{where}.latent"),
        )
        try:
            return cfg.validate()
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "config") -> MoTConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc})") from None
        return cls.from_dict(data, where)

    @classmethod
    def load(cls, path: str | Path) -> MoTConfig:
        from tapestry.models.common.checkpoint import CheckpointError, read_json_file

        path = Path(path)
        try:
            data = read_json_file(path, "a mot model config")
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
        return cls.from_dict(data, str(path))
