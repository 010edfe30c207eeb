"""BAGEL-layout checkpoints (the released BAGEL-7B-MoT folder) <-> tapestry's MoT model.

A BAGEL folder holds `llm_config.json` (Qwen2), `vit_config.json` (SigLIP), `ema.safetensors`
(all model weights, bf16) and `ae.safetensors` (the FLUX VAE, loaded elsewhere). Facts a loader
must get right (tested on tests/bagel_fixture.py's checkpoint, cross-checked with ../shared/fixtures/bagel-tiny):

- the generation expert's key is the understanding key with `_moe_gen` appended to the module
  that holds the tensor (`self_attn.q_proj_moe_gen.weight`, `mlp_moe_gen.up_proj.weight`,
  `input_layernorm_moe_gen.weight`, `model.norm_moe_gen.weight`); embeddings and lm_head are
  shared and lm_head is not tied;
- `qk_norm`, untied embeddings and the MoT layer type are not written in `llm_config.json`;
- `vit_config.json` counts one more layer than the checkpoint holds (the last is dropped);
- the SigLIP patch embedding is a Linear [hidden, 3·p·p] in (row, col, channel) order — a Conv2d
  weight maps to it by permute(0, 2, 3, 1) and reshape;
- `max_latent_size`, the ViT position side and the latent patch size are in no file: sides are
  √(rows) of the position tables, the latent patch is 2×2;
- `latent_pos_embed.pos_embed` and `vit_pos_embed.pos_embed` hold fixed 2-D sin-cos values; they
  are recomputed here and the stored ones only checked.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import Tensor

from tapestry.models.common.checkpoint import (
    CheckpointError,
    KeyReport,
    TensorInfo,
    compare_keys,
    read_header,
)
from tapestry.models.common.sincos import sincos_2d
from tapestry.models.mot.config import LatentConfig, LLMConfig, MoTConfig, ViTConfig

LLM_CONFIG = "llm_config.json"
VIT_CONFIG = "vit_config.json"
WEIGHTS = "ema.safetensors"
VAE_WEIGHTS = "ae.safetensors"
FIXED_TABLES = {"latent_pos_embed.pos_embed": "latent", "vit_pos_embed.pos_embed": "vit"}
LATENT_PATCH = 2  # BAGEL's latent_patch_size; not stored in any file of the release
_GEN = "_moe_gen"

# (BAGEL pattern, tapestry pattern) for per-layer decoder tensors; {g} is "" (und) or "_moe_gen"
_LAYER_RULES = [
    (r"input_layernorm{g}\.weight", "attn_norm.weight"),
    (r"post_attention_layernorm{g}\.weight", "mlp_norm.weight"),
    (r"self_attn\.(q|k|v)_proj{g}\.(weight|bias)", r"\1_proj.\2"),
    (r"self_attn\.o_proj{g}\.weight", "o_proj.weight"),
    (r"self_attn\.(q|k)_norm{g}\.weight", r"\1_norm.weight"),
    (r"mlp{g}\.(gate|up|down)_proj\.weight", r"mlp.\1_proj.weight"),
]
_VIT = "vit_model.vision_model."
_VIT_LAYER_RULES = [
    (r"layer_norm(1|2)\.(weight|bias)", r"norm\1.\2"),
    (r"self_attn\.(q|k|v|out)_proj\.(weight|bias)", r"\1_proj.\2"),
    (r"mlp\.(fc1|fc2)\.(weight|bias)", r"\1.\2"),
]
_PLAIN = {
    "language_model.model.embed_tokens.weight": "embed_tokens.weight",
    "language_model.lm_head.weight": "lm_head.weight",
    "language_model.model.norm.weight": "norm_und.weight",
    f"language_model.model.norm{_GEN}.weight": "norm_gen.weight",
    _VIT + "embeddings.patch_embedding.weight": "vit.patch_embed.weight",
    _VIT + "embeddings.patch_embedding.bias": "vit.patch_embed.bias",
    _VIT + "embeddings.position_embedding.weight": "vit.pos_embed.weight",
    _VIT + "post_layernorm.weight": "vit.post_norm.weight",
    _VIT + "post_layernorm.bias": "vit.post_norm.bias",
    "time_embedder.mlp.0.weight": "time_embed.fc1.weight",
    "time_embedder.mlp.0.bias": "time_embed.fc1.bias",
    "time_embedder.mlp.2.weight": "time_embed.fc2.weight",
    "time_embedder.mlp.2.bias": "time_embed.fc2.bias",
    "vae2llm.weight": "latent_in.weight",
    "vae2llm.bias": "latent_in.bias",
    "llm2vae.weight": "latent_out.weight",
    "llm2vae.bias": "latent_out.bias",
    **{f"connector.{fc}.{p}": f"connector.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")},
}
_PLAIN_BACK = {v: k for k, v in _PLAIN.items()}


def bagel_to_tapestry_key(key: str) -> str | None:
    """The tapestry name of a BAGEL key; None for keys with no tapestry tensor (fixed tables)
    or that this model does not know."""
    if key in _PLAIN:
        return _PLAIN[key]
    m = re.fullmatch(r"language_model\.model\.layers\.(\d+)\.(.+)", key)
    if m:
        layer, rest = m.groups()
        for bagel, ours in _LAYER_RULES:
            for g, expert in ((_GEN, "gen"), ("", "und")):
                hit = re.fullmatch(bagel.format(g=g), rest)
                if hit:
                    return f"layers.{layer}.{expert}." + hit.expand(ours)
        return None
    m = re.fullmatch(re.escape(_VIT) + r"encoder\.layers\.(\d+)\.(.+)", key)
    if m:
        layer, rest = m.groups()
        for bagel, ours in _VIT_LAYER_RULES:
            hit = re.fullmatch(bagel, rest)
            if hit:
                return f"vit.layers.{layer}." + hit.expand(ours)
    return None


def tapestry_to_bagel_key(key: str) -> str | None:
    """Inverse of `bagel_to_tapestry_key` (for exports and for naming missing keys)."""
    if key in _PLAIN_BACK:
        return _PLAIN_BACK[key]
    m = re.fullmatch(r"layers\.(\d+)\.(und|gen)\.(.+)", key)
    if m:
        layer, expert, rest = m.groups()
        g = _GEN if expert == "gen" else ""
        table = {
            "attn_norm.weight": f"input_layernorm{g}.weight",
            "mlp_norm.weight": f"post_attention_layernorm{g}.weight",
            "o_proj.weight": f"self_attn.o_proj{g}.weight",
        }
        if rest in table:
            return f"language_model.model.layers.{layer}.{table[rest]}"
        hit = re.fullmatch(r"(q|k|v)_proj\.(weight|bias)", rest)
        if hit:
            return f"language_model.model.layers.{layer}.self_attn.{hit[1]}_proj{g}.{hit[2]}"
        hit = re.fullmatch(r"(q|k)_norm\.weight", rest)
        if hit:
            return f"language_model.model.layers.{layer}.self_attn.{hit[1]}_norm{g}.weight"
        hit = re.fullmatch(r"mlp\.(gate|up|down)_proj\.weight", rest)
        if hit:
            return f"language_model.model.layers.{layer}.mlp{g}.{hit[1]}_proj.weight"
        return None
    m = re.fullmatch(r"vit\.layers\.(\d+)\.(.+)", key)
    if m:
        layer, rest = m.groups()
        for pattern, bagel in (
            (r"norm(1|2)\.(weight|bias)", r"layer_norm\1.\2"),
            (r"(q|k|v|out)_proj\.(weight|bias)", r"self_attn.\1_proj.\2"),
            (r"(fc1|fc2)\.(weight|bias)", r"mlp.\1.\2"),
        ):
            hit = re.fullmatch(pattern, rest)
            if hit:
                return f"{_VIT}encoder.layers.{layer}." + hit.expand(bagel)
    return None


def conv_patch_weight_to_linear(weight: Tensor) -> Tensor:
    """Conv2d patch embedding [D, 3, p, p] -> Linear [D, p·p·3] in (row, col, channel) order."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: missing {path.name}; a BAGEL-layout folder holds "
                              f"{LLM_CONFIG}, {VIT_CONFIG} and {WEIGHTS}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def _side(rows: int, what: str) -> int:
    side = math.isqrt(rows)
    if side * side != rows:
        raise CheckpointError(f"{what} has {rows} rows, not a square number: cannot recover its side")
    return side


def _get(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise CheckpointError(f"{where}: has no {key!r}")
    return cfg[key]


def bagel_config(folder: str | Path, header: dict[str, TensorInfo] | None = None) -> tuple[MoTConfig, list[str]]:
    """The MoTConfig of a BAGEL-layout folder, read from its JSON files and the weight header
    only (no tensors). Returns (config, notes) — notes say what was inferred and why."""
    folder = Path(folder)
    llm_path, vit_path = folder / LLM_CONFIG, folder / VIT_CONFIG
    llm, vit = _read_json(llm_path), _read_json(vit_path)
    header = header if header is not None else read_header(folder / WEIGHTS)
    notes = []

    hidden = _get(llm, "hidden_size", str(llm_path))
    heads = _get(llm, "num_attention_heads", str(llm_path))
    head_dim = llm.get("head_dim") or hidden // heads
    q_norm = header.get("language_model.model.layers.0.self_attn.q_norm.weight")
    if q_norm is not None and q_norm.shape[0] != head_dim:
        raise CheckpointError(f"q_norm has size {q_norm.shape[0]} but the config implies head dim {head_dim}")
    llm_cfg = LLMConfig(
        vocab_size=_get(llm, "vocab_size", str(llm_path)),
        hidden_size=hidden,
        intermediate_size=_get(llm, "intermediate_size", str(llm_path)),
        num_layers=_get(llm, "num_hidden_layers", str(llm_path)),
        num_heads=heads,
        num_kv_heads=llm.get("num_key_value_heads", heads),
        head_dim=head_dim,
        rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
        rope_theta=llm.get("rope_theta", 10000.0),
        # not in the file: BAGEL's MoT layers always use QK-norm and a separate lm_head
        qk_norm=True,
        tie_word_embeddings=False,
    )
    notes.append("qk_norm=True and tie_word_embeddings=False set by the loader (not in llm_config.json)")

    vit_layers_in_file = _get(vit, "num_hidden_layers", str(vit_path))
    held = {int(m[1]) for k in header if (m := re.match(re.escape(_VIT) + r"encoder\.layers\.(\d+)\.", k))}
    vit_layers = vit_layers_in_file - 1
    if held and len(held) != vit_layers:
        raise CheckpointError(
            f"{vit_path} says {vit_layers_in_file} ViT layers, so the checkpoint should hold "
            f"{vit_layers} (BAGEL drops the last); it holds {len(held)}"
        )
    notes.append(f"{VIT_CONFIG} counts {vit_layers_in_file} ViT layers; the model keeps {vit_layers} (the last is dropped)")
    pos_key = _VIT + "embeddings.position_embedding.weight"
    patch = _get(vit, "patch_size", str(vit_path))
    side = _side(header[pos_key].shape[0], pos_key) if pos_key in header else _get(vit, "image_size", str(vit_path)) // patch
    if "vit_pos_embed.pos_embed" in header:
        other = _side(header["vit_pos_embed.pos_embed"].shape[0], "vit_pos_embed.pos_embed")
        if other != side:
            raise CheckpointError(f"ViT position tables disagree: learned side {side}, sin-cos side {other}")
    vit_cfg = ViTConfig(
        hidden_size=_get(vit, "hidden_size", str(vit_path)),
        intermediate_size=_get(vit, "intermediate_size", str(vit_path)),
        num_layers=vit_layers,
        num_heads=_get(vit, "num_attention_heads", str(vit_path)),
        patch_size=patch,
        max_patches_per_side=side,
        layer_norm_eps=vit.get("layer_norm_eps", 1e-6),
    )

    latent_cfg = None
    if "vae2llm.weight" in header:
        patch_dim = header["vae2llm.weight"].shape[1]
        if patch_dim % LATENT_PATCH**2:
            raise CheckpointError(f"vae2llm takes {patch_dim} features, not a multiple of {LATENT_PATCH**2}")
        lat_side = _side(header["latent_pos_embed.pos_embed"].shape[0], "latent_pos_embed.pos_embed")
        latent_cfg = LatentConfig(
            channels=patch_dim // LATENT_PATCH**2,
            patch_size=LATENT_PATCH,
            max_side=lat_side,
            timestep_freq_dim=header["time_embedder.mlp.0.weight"].shape[1],
        )
        notes.append(f"latent patch {LATENT_PATCH}×{LATENT_PATCH} assumed; max latent side {lat_side} = √rows of latent_pos_embed")
    return MoTConfig(llm=llm_cfg, vit=vit_cfg, latent=latent_cfg).validate(), notes


def bagel_expected_keys(config: MoTConfig) -> dict[str, tuple[int, ...]]:
    """Every key (with shape) a BAGEL checkpoint for `config` holds, built on the meta device."""
    from tapestry.models.common.checkpoint import expected_shapes
    from tapestry.models.mot.model import MoTModel

    with torch.device("meta"):
        model = MoTModel(config)
    shapes = {tapestry_to_bagel_key(k): v for k, v in expected_shapes(model).items()}
    if None in shapes:
        raise AssertionError("a model tensor has no BAGEL name; extend the key rules")
    d = config.llm.hidden_size
    if config.latent is not None:
        shapes["latent_pos_embed.pos_embed"] = (config.latent.max_side**2, d)
    if config.vit is not None:
        shapes["vit_pos_embed.pos_embed"] = (config.vit.max_patches_per_side**2, d)
    return shapes


_PATCH_KEY = _VIT + "embeddings.patch_embedding.weight"


def bagel_key_report(config: MoTConfig, header: dict[str, TensorInfo]) -> KeyReport:
    """Key coverage of a BAGEL weight file against the model `config` describes (header only)."""
    found = {k: v.shape for k, v in header.items()}
    # a Conv2d patch embedding is accepted too: compare it by its Linear shape
    if _PATCH_KEY in found and len(found[_PATCH_KEY]) == 4:
        s = found[_PATCH_KEY]
        found[_PATCH_KEY] = (s[0], s[1] * s[2] * s[3])
    return compare_keys(bagel_expected_keys(config), found)


def load_bagel(folder: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
    """Load a BAGEL-layout folder into a MoTModel. Every key of `ema.safetensors` must be used and
    every model tensor found; the fixed sin-cos tables must equal ours (else the conventions
    differ and generation would be silently wrong)."""
    from tapestry.models.common.checkpoint import open_safetensors
    from tapestry.models.mot.model import MoTModel

    folder = Path(folder)
    weights = folder / WEIGHTS
    header = read_header(weights)
    config, _ = bagel_config(folder, header)
    report = bagel_key_report(config, header)
    if not report.ok:
        raise CheckpointError(f"{weights} does not fit a BAGEL-layout MoT model:\n{report.describe()}")

    state = {}
    with open_safetensors(weights, device) as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if key in FIXED_TABLES:
                part = getattr(config, FIXED_TABLES[key])
                side = part.max_side if FIXED_TABLES[key] == "latent" else part.max_patches_per_side
                ours = sincos_2d(config.llm.hidden_size, side).to(tensor.device)
                # stored in bf16: compare at bf16 resolution
                if not torch.allclose(tensor.float(), ours, atol=1e-2, rtol=0):
                    raise CheckpointError(
                        f"{weights}: {key} does not hold the 2-D sin-cos table this code computes "
                        f"(max difference {(tensor.float() - ours).abs().max():.3g}); refusing to load"
                    )
                continue
            if key == _PATCH_KEY and tensor.dim() == 4:
                tensor = conv_patch_weight_to_linear(tensor)
            state[bagel_to_tapestry_key(key)] = tensor
    return MoTModel.from_state_dict(config, state, source=str(weights), dtype=dtype, device=device)


def to_bagel_state_dict(model) -> dict[str, Tensor]:
    """The model's tensors under BAGEL's names, with the fixed sin-cos tables (for exports)."""
    state = {tapestry_to_bagel_key(k): v for k, v in model.state_dict().items()}
    if model.config.latent is not None:
        state["latent_pos_embed.pos_embed"] = model.latent_pos_embed.to(model.dtype)
    if model.config.vit is not None:
        state["vit_pos_embed.pos_embed"] = model.vit_pos_embed.to(model.dtype)
    return state
