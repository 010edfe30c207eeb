"""Typed configuration of the `duet` family (DuetGen); saved as `config.json` beside the weights.

A duet model is four parts, each built from its own section:

    mllm       a Qwen2.5-VL model (transformers) that writes text and emits <BOV>
    connector  all (or the last) LLM layers' hidden states, each normalized, concatenated on
               channels -> MLP -> the DiT's text-conditioning width
    dit        a video diffusion transformer (diffusers): Wan or Cosmos, drawing one frame after
               the clean condition frames of the earlier images
    vae        the DiT's autoencoder: AutoencoderKLWan (Wan, Cosmos-Predict2/2.5),
               AutoencoderKLCosmos (Cosmos 1.0), or a tapestry ToyAutoencoder (ToyWorld)

The sections hold sizes (what tiny, ToyWorld-sized and real models differ in); the library
configs (`Qwen2_5_VLConfig`, the diffusers `config.json`) are derived from them, and
`tapestry.models.duet.convert` reads the published configs back into these sections.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tapestry.errors import TapestryError
from tapestry.models.common.config import section_from_dict

FORMAT = "tapestry.duet"
FORMAT_VERSION = 1
FAMILY = "duet"

DIT_KINDS = ("wan", "cosmos")
VAE_KINDS = ("wan", "cosmos", "toy")
CONNECTOR_LAYERS = ("all", "last")


class DuetConfigError(TapestryError):
    """A duet config (file or dict) does not describe a valid model."""


def _from_dict(cls, data: Any, where: str):
    return section_from_dict(cls, data, where, DuetConfigError)


def _positive(section: str, obj, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 1:
            raise DuetConfigError(f"{section}.{name} must be an integer >= 1, got {value!r}")


@dataclass
class MLLMConfig:
    """Qwen2.5-VL sizes (defaults: a tiny test model; Qwen2.5-VL-7B is 28 layers of 3584)."""

    vocab_size: int = 512
    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [2, 3, 3])  # sums to head_dim / 2
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # vision tower (the Qwen2.5-VL ViT with its 2×2 patch merger)
    vision_depth: int = 1
    vision_hidden_size: int = 16
    vision_intermediate_size: int = 32
    vision_num_heads: int = 2
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [0])
    tokens_per_second: int = 2
    # token ids the model must know (taken from the tokenizer when a model is built)
    image_token_id: int = 0
    video_token_id: int = 0
    vision_start_token_id: int = 0
    vision_end_token_id: int = 0
    bov_token_id: int = 0
    # image input: DuetGen caps the long side fed to the MLLM at 480 px (memory); then Qwen's own
    # rule (sides multiples of patch·merge, pixel count within [min_pixels, max_pixels])
    max_side: int = 480
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        _positive("mllm", self, ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                 "num_kv_heads", "vision_depth", "vision_hidden_size", "vision_intermediate_size",
                                 "vision_num_heads", "patch_size", "spatial_merge_size", "temporal_patch_size",
                                 "max_side"))
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise DuetConfigError(f"mllm: hidden_size {self.hidden_size} must split into num_heads {self.num_heads}, "
                                  f"a multiple of num_kv_heads {self.num_kv_heads}")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise DuetConfigError(f"mllm.mrope_section {self.mrope_section} must sum to head_dim / 2 = "
                                  f"{self.head_dim // 2}")
        if self.vision_hidden_size % self.vision_num_heads:
            raise DuetConfigError("mllm.vision_hidden_size must split into vision_num_heads")
        if not (0 < self.min_pixels <= self.max_pixels):
            raise DuetConfigError(f"mllm: need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")

    def hf_config(self):
        """The `transformers.Qwen2_5_VLConfig` of these sizes."""
        from transformers import Qwen2_5_VLConfig

        text = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, rms_norm_eps=self.rms_norm_eps, max_window_layers=self.num_layers,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta,
                             "mrope_section": list(self.mrope_section)},
            bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=self.tie_word_embeddings,
        )
        vision = dict(
            depth=self.vision_depth, hidden_size=self.vision_hidden_size,
            intermediate_size=self.vision_intermediate_size, num_heads=self.vision_num_heads,
            out_hidden_size=self.hidden_size, patch_size=self.patch_size, spatial_merge_size=self.spatial_merge_size,
            temporal_patch_size=self.temporal_patch_size, window_size=self.window_size,
            fullatt_block_indexes=list(self.fullatt_block_indexes), tokens_per_second=self.tokens_per_second,
        )
        config = Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, image_token_id=self.image_token_id,
            video_token_id=self.video_token_id, vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id, tie_word_embeddings=self.tie_word_embeddings,
        )
        # SDPA on CPU and GPU alike; eager attention would materialize the same softmax slower
        config._attn_implementation = "sdpa"
        return config


@dataclass
class ConnectorConfig:
    layers: str = "all"  # "all": every decoder layer's output (DuetGen); "last": the paper's ablation
    kind: str = "mlp"  # "mlp" | "identity" (when the DiT already projects, e.g. Cosmos-2.5's crossattn_proj)
    hidden_size: int = 64  # MLP width
    eps: float = 1e-8  # of the per-layer normalization (x − mean) / (std + eps), as Cosmos-Predict2.5

    def validate(self) -> None:
        if self.layers not in CONNECTOR_LAYERS:
            raise DuetConfigError(f"connector.layers must be one of {CONNECTOR_LAYERS}, got {self.layers!r}")
        if self.kind not in ("mlp", "identity"):
            raise DuetConfigError(f"connector.kind must be mlp or identity, got {self.kind!r}")
        _positive("connector", self, ("hidden_size",))


@dataclass
class DiTConfig:
    """A diffusers video transformer's sizes. Defaults: a tiny Wan."""

    kind: str = "wan"  # "wan" (WanTransformer3DModel) | "cosmos" (CosmosTransformer3DModel)
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 16
    in_channels: int = 4  # latent channels of the VAE
    text_dim: int = 32  # width of the text-conditioning input (Wan text_dim, Cosmos text_embed_dim)
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    # wan
    ffn_dim: int = 64
    freq_dim: int = 32
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    # cosmos
    mlp_ratio: float = 4.0
    adaln_lora_dim: int = 16
    max_size: list[int] = field(default_factory=lambda: [128, 240, 240])
    rope_scale: list[float] = field(default_factory=lambda: [1.0, 3.0, 3.0])
    condition_mask: bool = True  # Cosmos-Predict2/2.5: one input channel marks condition frames
    concat_padding_mask: bool = True
    extra_pos_embed_type: str = ""  # "" (none: 2.5) | "learnable" (1.0 / 2.0)
    use_crossattn_projection: bool = False  # Cosmos-2.5: Linear(all Qwen layers -> 1024) + GELU
    crossattn_proj_in_channels: int = 1024
    # the flow time t in [0, 1] is fed to the time embedding times this (Wan 1000, Cosmos-2.5 1)
    timestep_scale: float = 0.0  # 0: the kind's default

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def context_dim(self) -> int:
        """What the connector must produce."""
        if self.kind == "cosmos" and self.use_crossattn_projection:
            return self.crossattn_proj_in_channels
        return self.text_dim

    @property
    def time_scale(self) -> float:
        return self.timestep_scale or (1000.0 if self.kind == "wan" else 1.0)

    def validate(self) -> None:
        if self.kind not in DIT_KINDS:
            raise DuetConfigError(f"dit.kind must be one of {DIT_KINDS}, got {self.kind!r}")
        _positive("dit", self, ("num_layers", "num_heads", "head_dim", "in_channels", "text_dim"))
        if len(self.patch_size) != 3 or self.patch_size[0] != 1:
            raise DuetConfigError(f"dit.patch_size must be [1, ph, pw] (images are single frames), got {self.patch_size}")
        if self.kind == "wan" and self.head_dim % 6 and (self.head_dim - 4 * (self.head_dim // 6)) % 2:
            raise DuetConfigError(f"dit.head_dim {self.head_dim} does not split into Wan's t/h/w rotary parts")
        if self.extra_pos_embed_type not in ("", "learnable"):
            raise DuetConfigError('dit.extra_pos_embed_type must be "" (none) or "learnable"')

    def diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments of the diffusers model class (what its `config.json` holds)."""
        if self.kind == "wan":
            return dict(
                patch_size=tuple(self.patch_size), num_attention_heads=self.num_heads,
                attention_head_dim=self.head_dim, in_channels=self.in_channels, out_channels=self.in_channels,
                text_dim=self.text_dim, freq_dim=self.freq_dim, ffn_dim=self.ffn_dim, num_layers=self.num_layers,
                cross_attn_norm=self.cross_attn_norm, qk_norm=self.qk_norm, eps=self.eps, image_dim=None,
                added_kv_proj_dim=None, rope_max_seq_len=self.rope_max_seq_len,
            )
        return dict(
            in_channels=self.in_channels + int(self.condition_mask), out_channels=self.in_channels,
            num_attention_heads=self.num_heads, attention_head_dim=self.head_dim, num_layers=self.num_layers,
            mlp_ratio=self.mlp_ratio, text_embed_dim=self.text_dim, adaln_lora_dim=self.adaln_lora_dim,
            max_size=tuple(self.max_size), patch_size=tuple(self.patch_size), rope_scale=tuple(self.rope_scale),
            concat_padding_mask=self.concat_padding_mask, extra_pos_embed_type=self.extra_pos_embed_type or None,
            use_crossattn_projection=self.use_crossattn_projection,
            crossattn_proj_in_channels=self.crossattn_proj_in_channels,
            encoder_hidden_states_channels=self.text_dim,
        )


@dataclass
class VAEConfig:
    """The DiT's autoencoder. `config` holds the library class's keyword arguments (its published
    `config.json`), or for `toy` a ToyAEConfig dict; missing keys take the library defaults."""

    kind: str = "wan"
    config: dict[str, Any] = field(default_factory=lambda: dict(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_spatial=4))
    # a folder with trained weights for a fresh build (a ToyAutoencoder save_pretrained folder, or
    # a diffusers vae/ folder); its config replaces `config`. A saved duet model carries the VAE
    # weights itself, so loading one never reads this path.
    pretrained: str = ""

    def validate(self) -> None:
        if self.kind not in VAE_KINDS:
            raise DuetConfigError(f"vae.kind must be one of {VAE_KINDS}, got {self.kind!r}")
        if not isinstance(self.config, dict):
            raise DuetConfigError("vae.config must be an object")


@dataclass
class TrainingConfig:
    """What the family's loss needs beyond the stage weights of the run."""

    guidance_dropout: float = 0.1  # P(the chosen target's context loses its last text chunk)
    timestep_shift: float = 1.0  # flow-matching shift s of training times


@dataclass
class DuetConfig:
    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    target_size: list[int] = field(default_factory=lambda: [32, 32])  # default size of a drawn image (H, W)

    def validate(self) -> DuetConfig:
        self.mllm.validate()
        self.connector.validate()
        self.dit.validate()
        self.vae.validate()
        if not 0.0 <= self.training.guidance_dropout <= 1.0:
            raise DuetConfigError("training.guidance_dropout must be a probability in [0, 1]")
        if not self.training.timestep_shift > 0:
            raise DuetConfigError("training.timestep_shift must be > 0")
        if len(self.target_size) != 2 or min(self.target_size) < 1:
            raise DuetConfigError(f"target_size must be [height, width], got {self.target_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "family": FAMILY, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> DuetConfig:
        data = dict(data)
        fmt = data.pop("format", FORMAT)
        version = data.pop("format_version", FORMAT_VERSION)
        family = data.pop("family", FAMILY)
        if fmt != FORMAT or family != FAMILY:
            raise DuetConfigError(f"{where}: format {fmt!r} / family {family!r} is not a duet config")
        if version != FORMAT_VERSION:
            raise DuetConfigError(f"{where}: format_version {version} is not supported (this code reads {FORMAT_VERSION})")
        sections = {"mllm": MLLMConfig, "connector": ConnectorConfig, "dit": DiTConfig, "vae": VAEConfig,
                    "training": TrainingConfig}
        unknown = sorted(set(data) - set(sections) - {"target_size"})
        if unknown:
            raise DuetConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(sections) + ['target_size']}")
        built = {name: _from_dict(kind, data.get(name, {}), f"{where}.{name}") for name, kind in sections.items()}
        target_size = data.get("target_size", [32, 32])
        if not (isinstance(target_size, list) and len(target_size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in target_size)):
            raise DuetConfigError(f"{where}.target_size: expected [height, width] (two integers), "
                                  f"found {json.dumps(target_size)[:60]}")
        cfg = cls(**built, target_size=list(target_size))
        try:
            return cfg.validate()
        except DuetConfigError as exc:
            raise DuetConfigError(f"{where}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> DuetConfig:
        from tapestry.models.common.checkpoint import CheckpointError, read_json_file

        path = Path(path)
        try:
            data = read_json_file(path, "a duet model config")
        except CheckpointError as exc:
            raise DuetConfigError(str(exc)) from None
        return cls.from_dict(data, str(path))
