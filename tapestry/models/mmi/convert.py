"""Published components into an mmi model, by their own library layouts.

- CLIP-ViT-L/14 (`openai/clip-vit-large-patch14` layout): a `CLIPModel` folder — `config.json`
  with `vision_config`, weights `vision_model.*` (plus `text_model.*`, `visual_projection`,
  `text_projection`, `logit_scale`, which the image tokenizer does not use), or a bare
  `CLIPVisionModel` folder. Old exports also hold `vision_model.embeddings.position_ids`.
- A LLaMA / Vicuna-layout LLM (`LlamaForCausalLM`): `config.json` + `model.safetensors`, a
  sharded `model.safetensors.index.json`, or `pytorch_model*.bin`; keys `model.*`, `lm_head.weight`
  (old exports also hold `...self_attn.rotary_emb.inv_freq`, recomputed here).
- Stable Diffusion 2.1 (diffusers layout): `unet/` (`config.json` +
  `diffusion_pytorch_model.safetensors`) and `vae/` (an `AutoencoderKL`, read by
  tapestry.models.vae.load_autoencoder).

`build_from_components` makes an MMIConfig from the components' own configs, builds the model and
loads every component key strictly; what MM-Interleaved adds (pyramid, resamplers, MMFS, the
negative embedding) keeps its initialization, and the returned coverage says which is which.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tapestry.errors import TapestryError
from tapestry.models.common.checkpoint import compare_keys
from tapestry.models.mmi.config import LLMConfig, MMIConfig


class ConvertError(TapestryError):
    """A component folder is missing, unreadable or does not fit the layout it claims."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConvertError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: not a JSON object")
    return data


def read_weights(folder: Path, stem: str = "model") -> dict[str, Tensor]:
    """Every tensor of a transformers/diffusers folder: `{stem}.safetensors`, its sharded index,
    or `pytorch_model.bin` (and its index)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    files: list[Path]
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({folder / name for name in _read_json(index).get("weight_map", {}).values()})
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    elif (folder / "pytorch_model.bin.index.json").is_file():
        files = sorted({folder / n for n in _read_json(folder / "pytorch_model.bin.index.json")["weight_map"].values()})
    else:
        raise ConvertError(f"{folder}: no {stem}.safetensors, sharded index or pytorch_model.bin")
    state: dict[str, Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                state.update(load_file(str(path)))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ConvertError(f"{path}: cannot read ({exc})") from None
    return state


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------


def clip_vision_fields(folder: Path) -> dict[str, Any]:
    data = _read_json(folder / "config.json")
    vision = data.get("vision_config", data) if data.get("model_type") == "clip" else data
    try:
        return dict(hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
                    num_layers=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
                    patch_size=vision["patch_size"], image_size=vision["image_size"],
                    hidden_act=vision.get("hidden_act", "quick_gelu"),
                    layer_norm_eps=vision.get("layer_norm_eps", 1e-5))
    except KeyError as exc:
        raise ConvertError(f"{folder / 'config.json'}: no vision field {exc}") from None


def llama_fields(folder: Path) -> dict[str, Any]:
    data = _read_json(folder / "config.json")
    if data.get("model_type") != "llama":
        raise ConvertError(f"{folder / 'config.json'}: model_type {data.get('model_type')!r}, expected 'llama'")
    try:
        return dict(vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
                    intermediate_size=data["intermediate_size"], num_layers=data["num_hidden_layers"],
                    num_heads=data["num_attention_heads"],
                    num_kv_heads=data.get("num_key_value_heads") or data["num_attention_heads"],
                    rms_norm_eps=data.get("rms_norm_eps", 1e-6), rope_theta=data.get("rope_theta", 10000.0),
                    max_position_embeddings=data.get("max_position_embeddings", 2048),
                    tie_word_embeddings=data.get("tie_word_embeddings", False))
    except KeyError as exc:
        raise ConvertError(f"{folder / 'config.json'}: no field {exc}") from None


SD_UNET_FLAGS = {"use_linear_projection": True}  # what the SD 2.x layout fixes and we build with


def sd_unet_fields(folder: Path) -> dict[str, Any]:
    path = folder / "unet" / "config.json"
    data = _read_json(path)
    n = len(data.get("block_out_channels", ()))
    expected_down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
    if list(data.get("down_block_types", ())) != expected_down:
        raise ConvertError(f"{path}: down_block_types {data.get('down_block_types')} is not the SD 2.x layout "
                           f"{expected_down}")
    for flag, value in SD_UNET_FLAGS.items():
        if data.get(flag) != value:
            raise ConvertError(f"{path}: {flag} = {data.get(flag)!r}, the SD 2.x layout has {value!r}")
    head = data.get("attention_head_dim", 8)
    heads = list(head) if isinstance(head, (list, tuple)) else [head] * n
    return dict(latent_channels=data["in_channels"], sample_size=data["sample_size"],
                block_out_channels=list(data["block_out_channels"]), layers_per_block=data["layers_per_block"],
                attention_head_dim=heads, cross_attention_dim=data["cross_attention_dim"],
                norm_num_groups=data.get("norm_num_groups", 32))


def sd_scheduler_fields(folder: Path) -> dict[str, Any]:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return {}
    data = _read_json(path)
    keys = ("prediction_type", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    return {k: data[k] for k in keys if k in data}


# ---------------------------------------------------------------------------------------------
# key layouts
# ---------------------------------------------------------------------------------------------

CLIP_UNUSED = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale$)")
CLIP_STALE = re.compile(r"^vision_model\.embeddings\.position_ids$")
LLAMA_STALE = re.compile(r"rotary_emb\.inv_freq$")


def clip_to_tapestry(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIPModel / CLIPVisionModel keys -> `encoder.clip.*`."""
    out = {}
    for key, value in state.items():
        if CLIP_UNUSED.match(key) or CLIP_STALE.match(key):
            continue
        out["encoder.clip." + key.removeprefix("vision_model.")] = value
    return out


def llama_to_tapestry(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"lm.llm." + k: v for k, v in state.items() if not LLAMA_STALE.search(k)}


def unet_to_tapestry(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"decoder.unet." + k: v for k, v in state.items()}


@dataclass
class Coverage:
    """Which keys of the model each source filled; `initialized` were left as built."""

    sources: dict[str, int] = field(default_factory=dict)  # source -> keys loaded
    initialized: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"{name}: {n} tensors loaded" for name, n in self.sources.items()]
        prefixes = sorted({".".join(k.split(".")[:2]) for k in self.initialized})
        lines.append(f"initialized here: {len(self.initialized)} tensors ({', '.join(prefixes)})")
        return "\n".join(lines)


def _load_part(model, state: dict[str, Tensor], prefix: str, source: str) -> int:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix)}
    report = compare_keys(expected, {k: tuple(v.shape) for k, v in state.items()})
    if not report.ok:
        raise ConvertError(f"{source} does not fit the model's {prefix.rstrip('.')}:\n{report.describe()}")
    dtype_state = {k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}
    model.load_state_dict(dtype_state, strict=False)
    return len(state)


def build_from_components(clip_dir: str | Path | None = None, llm_dir: str | Path | None = None,
                          sd_dir: str | Path | None = None, base: MMIConfig | None = None):
    """An MMIModel whose CLIP / LLM / UNet come from published folders (any subset); the rest of
    the config from `base`. Returns (model, coverage); the SD VAE is `load_autoencoder(sd_dir/vae)`."""
    from tapestry.models.mmi.model import MMIModel

    cfg = base or MMIConfig()
    if clip_dir is not None:
        cfg = replace(cfg, vision=replace(cfg.vision, **clip_vision_fields(Path(clip_dir))))
    if llm_dir is not None:
        cfg = replace(cfg, llm=LLMConfig(**llama_fields(Path(llm_dir))))
    if sd_dir is not None:
        fields_ = {**sd_unet_fields(Path(sd_dir)), **sd_scheduler_fields(Path(sd_dir))}
        cfg = replace(cfg, decoder=replace(cfg.decoder, **fields_))
    cfg = MMIConfig.from_dict(cfg.to_dict(), "component configs")  # validates
    model = MMIModel(cfg)
    coverage = Coverage()
    loaded: set[str] = set()
    parts = []
    if clip_dir is not None:
        parts.append(("encoder.clip.", clip_to_tapestry(read_weights(Path(clip_dir))), f"CLIP {clip_dir}"))
    if llm_dir is not None:
        parts.append(("lm.llm.", llama_to_tapestry(read_weights(Path(llm_dir))), f"LLM {llm_dir}"))
    if sd_dir is not None:
        unet = Path(sd_dir) / "unet"
        parts.append(("decoder.unet.", unet_to_tapestry(read_weights(unet, "diffusion_pytorch_model")),
                      f"SD UNet {unet}"))
    for prefix, state, source in parts:
        coverage.sources[source] = _load_part(model, state, prefix, source)
        loaded |= set(state)
    coverage.initialized = [k for k in model.state_dict() if k not in loaded]
    return model.eval(), coverage

