"""A BAGEL-layout folder as a whole: model, tokenizer, FLUX autoencoder, layout and defaults, and
conversion to and from a tapestry pipeline folder.

    load_bagel_parts(DIR)          -> BagelParts(model, tokenizer, vae, layout, defaults)
    bagel_to_pipeline(DIR, OUT)    a pipeline folder (Pipeline.from_pretrained reads it)
    pipeline_to_bagel(OUT, DIR)    back to the released layout, every tensor bitwise equal
    dry_run(DIR)                   key coverage, shapes, dtypes and sizes from headers only

What BAGEL does that a tapestry pipeline must reproduce (BAGEL's inference code, as described in
its paper and repository): the Qwen2 tokenizer with `<|im_start|>`, `<|im_end|>`,
`<|vision_start|>`, `<|vision_end|>` (added when the files lack them); each text turn is
`<|im_start|> text <|im_end|>` (LayoutConfig.text_turns); images sit between
`<|vision_start|>` and `<|vision_end|>`; the FLUX VAE (×8, z 16, scale 0.3611, shift 0.1159) with
2×2 latent patches; sampling with timestep shift 3.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tapestry.models.common.checkpoint import CheckpointError, TensorInfo, read_header
from tapestry.models.mot.config import LatentConfig, LLMConfig, MoTConfig, ViTConfig
from tapestry.models.mot.convert import (
    FIXED_TABLES,
    LLM_CONFIG,
    VAE_WEIGHTS,
    VIT_CONFIG,
    WEIGHTS,
    bagel_config,
    bagel_key_report,
    bagel_to_tapestry_key,
    tapestry_to_bagel_key,
)

BAGEL_SHIFT = 3.0  # BAGEL's timestep shift at its resolutions
BAGEL_STEPS = 50
SOURCE_DIR = "bagel_source"  # in a converted pipeline folder: the release's own JSON / tokenizer files
TABLES_FILE = "bagel_tables.safetensors"  # ... and its stored sin-cos tables, for a bitwise way back
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json", "ae_params.json")
BAGEL_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")

# BAGEL-7B-MoT as released (Qwen2.5-7B decoder, SigLIP so400m with its last layer dropped, FLUX VAE)
BAGEL_7B = MoTConfig(
    llm=LLMConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                  num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6),
    vit=ViTConfig(hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16, patch_size=14,
                  max_patches_per_side=70),
    latent=LatentConfig(channels=16, patch_size=2, max_side=64, timestep_freq_dim=256),
)


def is_bagel_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / LLM_CONFIG).is_file()


# ---------------------------------------------------------------------------------------------
# Loading for inference
# ---------------------------------------------------------------------------------------------


def load_bagel_tokenizer(folder: str | Path, vocab_size: int | None = None):
    """The Qwen2 tokenizer of the folder with BAGEL's specials by role; the four chat/vision
    tokens are added when the files lack them, as BAGEL does, and must fit the model's
    vocabulary."""
    from tokenizers import AddedToken

    from tapestry.models.common.tokenizer import QWEN2_SPECIALS, TextTokenizer, _qwen2_backend

    folder = Path(folder)
    backend = _qwen2_backend(folder)
    missing = [t for t in QWEN2_SPECIALS.all() if backend.token_to_id(t) is None]
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    base = TextTokenizer(backend, QWEN2_SPECIALS)
    if vocab_size is not None and base.vocab_size > vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {base.vocab_size} tokens (with BAGEL's specials) but "
                              f"the model's vocabulary has {vocab_size} rows")
    return base


def bagel_layout(config: MoTConfig, vae_downsample: int, target_side: int | None = None):
    """BAGEL's layout: text turns; given images as ViT and VAE tokens (editing sees both)."""
    from tapestry.models.mot.family import layout_config_for

    lat = config.latent
    cell = vae_downsample * (lat.patch_size if lat else 2)
    side = target_side or min(1024, cell * (lat.max_side if lat else 32))
    return layout_config_for(config, vae_downsample, text_turns=True, references_as_vae=True,
                             context_as_vae=True, target_size=(side, side))


def bagel_defaults() -> dict[str, Any]:
    """Generation defaults (fields of the engine's GenerationOptions) BAGEL samples with."""
    return {"shift": BAGEL_SHIFT, "steps": BAGEL_STEPS}


@dataclass
class BagelParts:
    model: Any
    tokenizer: Any
    vae: Any
    layout: Any
    defaults: Any


def load_bagel_parts(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> BagelParts:
    """Everything generation needs from a BAGEL-layout folder (weights keep their stored dtype,
    bf16 for the release, unless `dtype` is given; the VAE runs in float32)."""
    from tapestry.models.mot.convert import load_bagel
    from tapestry.models.vae.flux import load_flux_file

    folder = Path(folder)
    if not is_bagel_folder(folder):
        raise CheckpointError(f"{folder}: not a BAGEL-layout folder (it needs {WEIGHTS} and {LLM_CONFIG})")
    if not (folder / VAE_WEIGHTS).is_file():
        raise CheckpointError(f"{folder}: missing {VAE_WEIGHTS} (the FLUX autoencoder BAGEL generates with)")
    model = load_bagel(folder, dtype=dtype, device=device)
    tokenizer = load_bagel_tokenizer(folder, model.config.llm.vocab_size)
    vae = load_flux_file(folder / VAE_WEIGHTS, device=device)
    for p in vae.parameters():
        p.requires_grad_(False)
    layout = bagel_layout(model.config, vae.downsample)
    return BagelParts(model, tokenizer, vae, layout, bagel_defaults())


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


CONVERT_WRITER = "tapestry convert"


def _check_out(out: Path, overwrite: bool) -> None:
    """The output-folder rule (tapestry.atomic): refuse a folder holding files convert did not write."""
    from tapestry.atomic import check_output_dir

    check_output_dir(out, CONVERT_WRITER, overwrite, flag="OUT")


def bagel_to_pipeline(folder: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """A tapestry pipeline folder from a BAGEL-layout one. Tensors keep their dtype and bits; the
    release's JSON and tokenizer files and its stored sin-cos tables are kept in the folder so
    `pipeline_to_bagel` gives the release back."""
    from safetensors.torch import save_file

    from tapestry.atomic import output_dir
    from tapestry.models.common.checkpoint import open_safetensors
    from tapestry.models.pipeline_folder import save_pipeline

    folder, out = Path(folder), Path(out)
    _check_out(out, overwrite)
    parts = load_bagel_parts(folder)
    with open_safetensors(folder / WEIGHTS) as f:
        tables = {k: f.get_tensor(k) for k in FIXED_TABLES if k in f.keys()}
    with output_dir(out, CONVERT_WRITER, overwrite, flag="OUT") as tmp:
        save_pipeline(tmp, parts.model, parts.tokenizer, parts.vae, parts.layout, parts.defaults)
        source = tmp / SOURCE_DIR
        source.mkdir()
        for name in (LLM_CONFIG, VIT_CONFIG) + TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, source / name)
        if tables:
            save_file(tables, str(tmp / TABLES_FILE))
    return {"out": str(out), "parameters": parts.model.num_parameters(), "dtype": str(parts.model.dtype)}


def _bagel_llm_config(cfg: MoTConfig, tokenizer) -> dict[str, Any]:
    llm = cfg.llm
    return {"architectures": ["Qwen2ForCausalLM"], "bos_token_id": tokenizer.pad_id, "eos_token_id": tokenizer.eos_id,
            "hidden_act": "silu", "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
            "model_type": "qwen2", "num_attention_heads": llm.num_heads, "num_hidden_layers": llm.num_layers,
            "num_key_value_heads": llm.num_kv_heads, "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta,
            "tie_word_embeddings": llm.tie_word_embeddings, "torch_dtype": "bfloat16", "vocab_size": llm.vocab_size}


def _bagel_vit_config(cfg: MoTConfig) -> dict[str, Any]:
    vit = cfg.vit
    # the release counts one layer more than it holds (BAGEL drops SigLIP's last layer)
    return {"hidden_size": vit.hidden_size, "image_size": vit.patch_size * vit.max_patches_per_side,
            "intermediate_size": vit.intermediate_size, "model_type": "siglip_vision_model",
            "num_attention_heads": vit.num_heads, "num_hidden_layers": vit.num_layers + 1,
            "patch_size": vit.patch_size, "layer_norm_eps": vit.layer_norm_eps}


def pipeline_to_bagel(pipeline: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """The released layout from a tapestry pipeline folder (one `bagel_to_pipeline` wrote, or one
    `tapestry export` wrote for a model with a ViT, a latent path and a FLUX-style VAE)."""
    from safetensors.torch import save_file

    from tapestry.atomic import output_dir
    from tapestry.models.common.checkpoint import WEIGHTS_NAME, load_safetensors, open_safetensors, read_json_file
    from tapestry.models.common.sincos import sincos_2d
    from tapestry.models.common.tokenizer import TextTokenizer
    from tapestry.models.vae.flux import DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS, diffusers_to_flux_key

    pipeline, out = Path(pipeline), Path(out)
    _check_out(out, overwrite)
    cfg = MoTConfig.load(pipeline / "config.json")
    if cfg.vit is None or cfg.latent is None:
        raise CheckpointError(f"{pipeline}: the BAGEL layout needs a ViT and a latent path; this model has "
                              f"vit={'yes' if cfg.vit else 'none'}, latent={'yes' if cfg.latent else 'none'}")
    vae_dir = pipeline / "vae"
    if not (vae_dir / DIFFUSERS_WEIGHTS).is_file():
        raise CheckpointError(f"{vae_dir}: no {DIFFUSERS_WEIGHTS}; only a FLUX-style (diffusers) autoencoder "
                              "has a BAGEL-layout ae.safetensors")
    state = load_safetensors(pipeline / WEIGHTS_NAME)
    ema = {}
    for key, tensor in state.items():
        name = tapestry_to_bagel_key(key)
        if name is None:
            raise CheckpointError(f"{pipeline / WEIGHTS_NAME}: {key} has no BAGEL name")
        ema[name] = tensor
    dtype = state["embed_tokens.weight"].dtype
    stored = {}
    if (pipeline / TABLES_FILE).is_file():
        with open_safetensors(pipeline / TABLES_FILE) as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    sides = {"latent_pos_embed.pos_embed": cfg.latent.max_side, "vit_pos_embed.pos_embed": cfg.vit.max_patches_per_side}
    for key, side in sides.items():
        ema[key] = stored.get(key, sincos_2d(cfg.llm.hidden_size, side).to(dtype))
    vae_config = read_json_file(vae_dir / DIFFUSERS_CONFIG, "a diffusers autoencoder config")
    levels = len(vae_config["block_out_channels"])
    ae = {}
    for key, tensor in load_safetensors(vae_dir / DIFFUSERS_WEIGHTS).items():
        name = diffusers_to_flux_key(key, levels)
        if name is None:
            raise CheckpointError(f"{vae_dir / DIFFUSERS_WEIGHTS}: {key} has no FLUX-layout name")
        if tensor.ndim == 2:  # attention projections: Linear in diffusers, 1×1 conv in BFL's file
            tensor = tensor[:, :, None, None]
        ae[name] = tensor.contiguous()
    source = pipeline / SOURCE_DIR
    with output_dir(out, CONVERT_WRITER, overwrite, flag="OUT") as tmp:
        save_file(ema, str(tmp / WEIGHTS))
        save_file(ae, str(tmp / VAE_WEIGHTS))
        if source.is_dir():
            for item in sorted(source.iterdir()):
                shutil.copyfile(item, tmp / item.name)
        else:
            tokenizer = TextTokenizer.load(pipeline)
            (tmp / LLM_CONFIG).write_text(json.dumps(_bagel_llm_config(cfg, tokenizer), indent=2), encoding="utf-8")
            (tmp / VIT_CONFIG).write_text(json.dumps(_bagel_vit_config(cfg), indent=2), encoding="utf-8")
            shutil.copyfile(pipeline / "tokenizer.json", tmp / "tokenizer.json")
            ae_params = {"ch": vae_config["block_out_channels"][0], "z_channels": vae_config["latent_channels"],
                         "ch_mult": [c // vae_config["block_out_channels"][0] for c in vae_config["block_out_channels"]],
                         "num_res_blocks": vae_config["layers_per_block"],
                         "scale_factor": vae_config["scaling_factor"], "shift_factor": vae_config.get("shift_factor") or 0.0}
            (tmp / "ae_params.json").write_text(json.dumps(ae_params, indent=2), encoding="utf-8")
    return {"out": str(out), "tensors": len(ema), "ae_tensors": len(ae)}


# ---------------------------------------------------------------------------------------------
# Dry run: headers only
# ---------------------------------------------------------------------------------------------

_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}


def _summary(header: dict[str, TensorInfo]) -> dict[str, Any]:
    dtypes: dict[str, int] = {}
    for info in header.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
    params = sum(i.numel for i in header.values())
    size = sum(i.numel * _BYTES.get(i.dtype, 4) for i in header.values())
    return {"tensors": len(header), "parameters": params, "bytes": size, "dtypes": dtypes}


def _ae_report(path: Path) -> dict[str, Any]:
    """Coverage of a FLUX-layout ae.safetensors against the AutoencoderKL its settings build."""
    from tapestry.models.common.checkpoint import compare_keys
    from tapestry.models.vae.flux import FLUX_PARAMS, FluxAEParams, flux_expected_shapes

    header = read_header(path)
    side = path.parent / FLUX_PARAMS
    params = FluxAEParams.load(side) if side.is_file() else FluxAEParams()
    report = compare_keys(flux_expected_shapes(params), {k: v.shape for k, v in header.items()})
    unmapped: list[str] = []
    return {"file": str(path), **_summary(header), "settings": params.to_dict(),
            "settings_from": str(side) if side.is_file() else "FLUX.1 release defaults",
            "missing": report.missing, "unexpected": sorted(unmapped + report.unexpected),
            "shape_mismatch": report.shape_mismatch, "ok": report.ok and not unmapped}


def dry_run(folder: str | Path) -> dict[str, Any]:
    """What converting or loading `folder` would do, from the safetensors headers and JSON files
    only: the model config it implies, key coverage both ways, shapes and dtypes. No tensor is
    read, so a 29 GB release answers in well under a second."""
    folder = Path(folder)
    if is_bagel_folder(folder):
        header = read_header(folder / WEIGHTS)
        config, notes = bagel_config(folder, header)
        report = bagel_key_report(config, header)
        keys = [{"key": k, "tapestry": bagel_to_tapestry_key(k) or ("(recomputed sin-cos)" if k in FIXED_TABLES else None),
                 "dtype": v.dtype, "shape": list(v.shape)} for k, v in sorted(header.items())]
        out: dict[str, Any] = {
            "layout": "bagel", "folder": str(folder), "config": config.to_dict(), "notes": notes,
            "weights": {"file": str(folder / WEIGHTS), **_summary(header), "missing": report.missing,
                        "unexpected": report.unexpected, "shape_mismatch": report.shape_mismatch, "ok": report.ok},
            "keys": keys,
        }
        if (folder / VAE_WEIGHTS).is_file():
            out["ae"] = _ae_report(folder / VAE_WEIGHTS)
        out["ok"] = out["weights"]["ok"] and out.get("ae", {"ok": True})["ok"]
        return out
    from tapestry.models.common.checkpoint import CONFIG_NAME, WEIGHTS_NAME, compare_keys, expected_shapes
    from tapestry.models.mot.model import MoTModel

    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{folder}: neither a BAGEL-layout folder ({WEIGHTS} + {LLM_CONFIG}) nor a tapestry "
                              f"pipeline folder ({CONFIG_NAME} + {WEIGHTS_NAME})")
    config = MoTConfig.load(folder / CONFIG_NAME)
    header = read_header(folder / WEIGHTS_NAME)
    with torch.device("meta"):
        model = MoTModel(config)
    report = compare_keys(expected_shapes(model), {k: v.shape for k, v in header.items()})
    keys = [{"key": k, "bagel": tapestry_to_bagel_key(k), "dtype": v.dtype, "shape": list(v.shape)}
            for k, v in sorted(header.items())]
    return {"layout": "tapestry", "folder": str(folder), "config": config.to_dict(), "notes": [],
            "weights": {"file": str(folder / WEIGHTS_NAME), **_summary(header), "missing": report.missing,
                        "unexpected": report.unexpected, "shape_mismatch": report.shape_mismatch, "ok": report.ok},
            "keys": keys, "ok": report.ok}
