"""`tapestry inspect` for the `mmi` family, from JSON configs and weight-file headers only.

    an mmi checkpoint        config.json ("family": "mmi") + model.safetensors
    a CLIP-ViT folder        config.json (model_type clip or clip_vision_model): the image tokenizer's ViT
    a LLaMA / Vicuna folder  config.json (model_type llama): the LLM
    a Stable Diffusion 2.x   unet/ (UNet2DConditionModel, SD 2.x block layout) + vae/ (AutoencoderKL)
    diffusers folder         (+ scheduler/, whose settings the decoder takes)

Each component is the library's own module built on the meta device from the folder's config,
its keys compared with the headers in the published naming (what convert.build_from_components
loads, and skips: CLIP's text tower and projections, stale `position_ids` / `inv_freq`).
Sharded safetensors are read through their index; `pytorch_model*.bin` through `torch.load(mmap=True)`
(shapes only; the data stays on disk).
"""

from __future__ import annotations

import types
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tapestry.errors import TapestryError
from tapestry.models.common.checkpoint import TensorInfo, compare_keys, expected_shapes, read_header
from tapestry.models.inspection import add_header, json_object, add_keys, config_summary, finish, new_report, other_files


def _kind(folder: Path) -> str | None:
    config = json_object(folder / "config.json") if (folder / "config.json").is_file() else None
    if config is not None:
        if config.get("family") == "mmi" or config.get("format") == "tapestry.mmi":
            return "mmi"
        if config.get("model_type") in ("clip", "clip_vision_model"):
            return "clip"
        if config.get("model_type") == "llama":
            return "llama"
    unet = json_object(folder / "unet" / "config.json") if (folder / "unet" / "config.json").is_file() else None
    if unet is not None and unet.get("_class_name") == "UNet2DConditionModel":
        return "sd"
    return None


def weight_header(folder: Path, stem: str, report: dict[str, Any]) -> tuple[dict[str, TensorInfo], list[str]]:
    """Every tensor's dtype and shape in a transformers / diffusers folder: `{stem}.safetensors`,
    its sharded index, or `pytorch_model.bin` (and its index); and the file names."""
    from tapestry.models.mmi.convert import ConvertError

    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    bins = folder / "pytorch_model.bin.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file() or bins.is_file():
        data = json_object(index if index.is_file() else bins) or {}
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConvertError(f"{index if index.is_file() else bins}: no weight_map object")
        files = sorted({folder / name for name in weight_map.values()})
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    else:
        raise ConvertError(f"{folder}: no {stem}.safetensors, sharded index or pytorch_model.bin")
    header: dict[str, TensorInfo] = {}
    for path in files:
        if not path.is_file():
            raise ConvertError(f"{folder}: the index lists {path.name}, which is missing")
        if path.suffix == ".safetensors":
            header.update(read_header(path))
            continue
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (OSError, RuntimeError) as exc:
            raise ConvertError(f"{path}: cannot read ({exc})") from None
        header.update({k: TensorInfo(str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in state.items()})
        report["notes"].append(f"{path.name}: shapes read through torch.load(mmap=True)")
    return header, [p.name for p in files]


def inspect_folder(folder: str | Path) -> dict[str, Any] | None:
    folder = Path(folder)
    kind = _kind(folder)
    if kind is None:
        return None
    layout = {"mmi": "tapestry", "clip": "clip", "llama": "llama", "sd": "stable-diffusion"}[kind]
    report = new_report(folder, layout, "mmi")
    try:
        {"mmi": _checkpoint, "clip": _clip, "llama": _llama, "sd": _stable_diffusion}[kind](folder, report)
    except TapestryError as exc:
        report["errors"].append(str(exc))
        return report
    return finish(report)


def _checkpoint(folder: Path, report: dict[str, Any]) -> None:
    import torch

    from tapestry.models.mmi.config import MMIConfig
    from tapestry.models.mmi.family import group_of
    from tapestry.models.mmi.model import WEIGHTS_NAME, MMIModel

    config = MMIConfig.load(folder / "config.json")
    header = read_header(folder / WEIGHTS_NAME)
    report["weights"] = WEIGHTS_NAME

    def component(key: str) -> str:
        try:
            return group_of(key)
        except ValueError:
            return "other"

    add_header(report, header, component)
    with torch.device("meta"):
        model = MMIModel(config)
    add_keys(report, compare_keys(expected_shapes(model), {k: v.shape for k, v in header.items()}))
    report["config"] = config_summary(config)
    v, r, m, d = config.vision, config.resampler, config.llm, config.decoder
    report["summary"] = [
        f"vision: CLIP-ViT {v.num_layers} layers, hidden {v.hidden_size}, {v.image_size} px / patch {v.patch_size}; "
        f"pyramid levels {v.level_sides()} × {v.feature_dim}; {r.queries} resampled tokens per image",
        f"llm: LLaMA {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_heads}/{m.num_kv_heads} kv, "
        f"vocab {m.vocab_size}; MMFS after layers {[i + 1 for i in config.mmfs_layers()] or 'none'}",
        f"decoder: SD-layout UNet {d.block_out_channels}, {d.latent_channels} latent channels at {d.sample_size}², "
        f"{d.tokens} condition tokens, {d.prediction_type}",
    ]
    other_files(report, folder, {WEIGHTS_NAME})


def _clip(folder: Path, report: dict[str, Any]) -> None:
    import torch
    from transformers import CLIPVisionModel

    from tapestry.models.mmi.config import VisionConfig
    from tapestry.models.mmi.convert import CLIP_STALE, CLIP_UNUSED, clip_vision_fields
    from tapestry.models.mmi.model import clip_vision_config

    fields = clip_vision_fields(folder)
    header, names = weight_header(folder, "model", report)
    report["weights"] = names
    add_header(report, header, lambda key: "unused" if CLIP_UNUSED.match(key) or CLIP_STALE.match(key) else "vision_model")
    unused = [k for k in header if CLIP_UNUSED.match(k)]
    stale = [k for k in header if CLIP_STALE.match(k)]
    # compared as build_from_components loads them (without the vision_model. prefix), named as published
    found = {k.removeprefix("vision_model."): v.shape for k, v in header.items() if k not in set(unused) | set(stale)}
    with torch.device("meta"):
        vision = CLIPVisionModel(clip_vision_config(VisionConfig(**fields)))
    keys = compare_keys(expected_shapes(vision), found)
    keys.missing, keys.unexpected = (["vision_model." + k for k in names_] for names_ in (keys.missing, keys.unexpected))
    keys.shape_mismatch = [{**m, "key": "vision_model." + m["key"]} for m in keys.shape_mismatch]
    add_keys(report, keys)
    report["config"] = {"vision": fields}
    report["summary"] = [f"clip vision tower: {fields['num_layers']} layers, hidden {fields['hidden_size']}, "
                         f"{fields['image_size']} px / patch {fields['patch_size']} (the mmi image tokenizer's ViT)"]
    if unused or stale:
        report["notes"].append(f"not used by mmi: {len(unused)} text-tower / projection tensors, {len(stale)} stale "
                               "position_ids")
    other_files(report, folder, set(names))


def _llama(folder: Path, report: dict[str, Any]) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from tapestry.models.mmi.config import LLMConfig
    from tapestry.models.mmi.convert import LLAMA_STALE, llama_fields
    from tapestry.models.mmi.model import llama_config

    llm = LLMConfig(**llama_fields(folder))
    header, names = weight_header(folder, "model", report)
    report["weights"] = names
    add_header(report, header, lambda key: "lm_head" if key.startswith("lm_head.") else "model")
    found = {k: v.shape for k, v in header.items() if not LLAMA_STALE.search(k)}
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(types.SimpleNamespace(llm=llm)))
    add_keys(report, compare_keys(expected_shapes(model), found))
    report["config"] = {"llm": asdict(llm)}
    report["summary"] = [f"llama: {llm.num_layers} layers, hidden {llm.hidden_size}, heads {llm.num_heads}/"
                         f"{llm.num_kv_heads} kv, MLP {llm.intermediate_size}, vocab {llm.vocab_size} (the mmi LLM)"]
    if len(found) < len(header):
        report["notes"].append(f"{len(header) - len(found)} stale rotary_emb.inv_freq tensors (recomputed)")
    other_files(report, folder, set(names))


def _stable_diffusion(folder: Path, report: dict[str, Any]) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from tapestry.models.mmi.config import DecoderConfig
    from tapestry.models.mmi.convert import sd_scheduler_fields, sd_unet_fields

    fields = sd_unet_fields(folder)
    decoder = DecoderConfig(**{**fields, **sd_scheduler_fields(folder)})
    header, names = weight_header(folder / "unet", "diffusion_pytorch_model", report)
    weights = ["unet/" + n for n in names]
    add_header(report, header, lambda key: "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**decoder.unet_kwargs())
    add_keys(report, compare_keys(expected_shapes(unet), {k: v.shape for k, v in header.items()}), "unet/")
    report["summary"] = [f"unet/: SD 2.x layout {decoder.block_out_channels}, {decoder.latent_channels} latent "
                         f"channels at {decoder.sample_size}², cross-attention {decoder.cross_attention_dim}, "
                         f"{decoder.prediction_type}"]
    report["config"] = {"decoder": asdict(decoder)}
    vae_config = json_object(folder / "vae" / "config.json") if (folder / "vae" / "config.json").is_file() else None
    if vae_config is None:
        report["notes"].append("no vae/: the autoencoder comes from the training config's model.vae")
    else:
        vae_header, vae_names = weight_header(folder / "vae", "diffusion_pytorch_model", report)
        weights += ["vae/" + n for n in vae_names]
        add_header(report, vae_header, lambda key: "vae")
        kwargs = {k: v for k, v in vae_config.items() if not k.startswith("_")}
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(kwargs)
        add_keys(report, compare_keys(expected_shapes(vae), {k: v.shape for k, v in vae_header.items()}), "vae/")
        report["summary"].append(f"vae/: AutoencoderKL, {vae.config.latent_channels} latent channels, scale "
                                 f"{vae.config.scaling_factor} (read by tapestry.models.vae.load_autoencoder)")
    report["weights"] = weights
    present = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in ("unet", "vae", "scheduler"))
    if present:
        report["notes"].append(f"not read by mmi: {', '.join(present)} (the LLM's states condition the UNet)")


__all__ = ["inspect_folder", "weight_header"]
