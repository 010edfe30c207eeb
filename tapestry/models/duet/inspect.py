"""`tapestry inspect` for the `duet` family, from JSON configs and safetensors headers only.

    a duet checkpoint            config.json ("family": "duet") + model.safetensors
    a Qwen2.5-VL folder          config.json (model_type qwen2_5_vl) + model.safetensors or shards
    a diffusers Wan / Cosmos     model_index.json + transformer/ + vae/, or one transformer/ or
                                 vae/ folder alone (config.json with the diffusers _class_name)

Each part is built on the meta device (a 7 B MLLM costs no memory here) and its keys compared
with the headers; key names in the report are the checkpoint's own (published names for a Qwen
folder, `transformer/` / `vae/` before the names of a diffusers folder's parts).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from tapestry.errors import TapestryError
from tapestry.models.common.checkpoint import CheckpointError, KeyReport, compare_keys, read_header, state_key_report
from tapestry.models.inspection import add_header, json_object, add_keys, config_summary, finish, new_report, other_files

_DIT_CLASSES = ("WanTransformer3DModel", "CosmosTransformer3DModel")
_VAE_CLASSES = ("AutoencoderKLWan", "AutoencoderKLCosmos")


def _headers(files: dict[str, Path]):
    """(merged header of every file an index or single file names, file names)."""
    header = {}
    for path in sorted(set(files.values())):
        header.update(read_header(path))
    return header, sorted({p.name for p in files.values()})


def _kind(folder: Path) -> str | None:
    config = json_object(folder / "config.json") if (folder / "config.json").is_file() else None
    if config is not None:
        if config.get("family") == "duet":
            return "duet"
        if config.get("model_type") == "qwen2_5_vl":
            return "qwen"
        if config.get("_class_name") in _DIT_CLASSES:
            return "transformer"
        if config.get("_class_name") in _VAE_CLASSES:
            return "vae"
    index = json_object(folder / "model_index.json") if (folder / "model_index.json").is_file() else None
    if index is not None and (folder / "transformer" / "config.json").is_file():
        transformer = json_object(folder / "transformer" / "config.json") or {}
        if transformer.get("_class_name") in _DIT_CLASSES:
            return "diffusers"
    return None


def inspect_folder(folder: str | Path) -> dict[str, Any] | None:
    folder = Path(folder)
    kind = _kind(folder)
    if kind is None:
        return None
    layout = {"duet": "tapestry", "qwen": "qwen2.5-vl", "transformer": "diffusers-transformer",
              "vae": "diffusers-vae", "diffusers": "diffusers"}[kind]
    report = new_report(folder, layout, "duet")
    try:
        if kind == "duet":
            _duet_checkpoint(folder, report)
        elif kind == "qwen":
            _qwen(folder, report)
        elif kind == "diffusers":
            _diffusers(folder, report)
        else:
            report["weights"] = _diffusers_part(folder, kind, "", report)
    except TapestryError as exc:
        report["errors"].append(str(exc))
        return report
    return finish(report)


# ------------------------------------------------------------------------------------ parts
def _duet_checkpoint(folder: Path, report: dict[str, Any]) -> None:
    import torch

    from tapestry.models.duet.config import DuetConfig
    from tapestry.models.duet.model import CONFIG_NAME, WEIGHTS_NAME, DuetModel

    weights = folder / WEIGHTS_NAME
    report["weights"] = weights.name
    config = DuetConfig.load(folder / CONFIG_NAME)
    header = read_header(weights)
    add_header(report, header, lambda key: key.split(".", 1)[0])  # the parameter groups
    with torch.device("meta"):
        model = DuetModel(config, load_pretrained=False)
    add_keys(report, state_key_report(model, {k: v.shape for k, v in header.items()}))  # a tied head: stored once
    report["config"] = config_summary(config)
    m, c, d = config.mllm, config.connector, config.dit
    report["summary"] = [
        f"mllm: Qwen2.5-VL, {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_heads}/{m.num_kv_heads} kv, "
        f"vocab {m.vocab_size}; vision {m.vision_depth} blocks, patch {m.patch_size}",
        f"connector: {c.kind}, reads {'all layers' if c.layers == 'all' else 'the last layer'} -> {d.context_dim}",
        f"dit: {d.kind}, {d.num_layers} layers, width {d.inner_dim}, {d.in_channels} latent channels",
        f"vae: {config.vae.kind}, {model.vae.latent_channels} latent channels, ×{model.vae.downsample}",
    ]
    other_files(report, folder, {weights.name})


def _qwen(folder: Path, report: dict[str, Any]) -> None:
    import torch

    from tapestry.models.duet.convert import (
        QWEN_INDEX,
        QWEN_SINGLE,
        _weight_files,
        mllm_config_from_qwen,
        qwen_key_report,
        qwen_key_to_published,
        untied_head_missing,
    )
    from tapestry.models.duet.mllm import DuetMLLM

    config = mllm_config_from_qwen(folder)
    header, names = _headers(_weight_files(folder, QWEN_SINGLE, QWEN_INDEX))
    report["weights"] = names

    def component(key: str) -> str:
        return "visual" if key.startswith("visual.") else "lm_head" if key.startswith("lm_head.") else "language_model"

    add_header(report, header, component)
    with torch.device("meta"):
        mllm = DuetMLLM(config)
    keys = qwen_key_report({k: v.shape for k, v in header.items()}, mllm)
    hint = untied_head_missing(folder, mllm, keys)
    if hint:
        report["notes"].append(hint)
    if config.tie_word_embeddings:
        report["notes"].append("lm_head is tied to model.embed_tokens.weight (tie_word_embeddings): " +
                               ("stored too; loading checks the two are equal" if "lm_head.weight" in header
                                else "not stored, as the published tied checkpoints do"))
    published = qwen_key_to_published
    add_keys(report, KeyReport(sorted(map(published, keys.missing)), sorted(map(published, keys.unexpected)),
                               [{**m, "key": published(m["key"])} for m in keys.shape_mismatch]))
    report["config"] = {"mllm": asdict(config)}
    report["summary"] = [
        f"qwen2.5-vl: {config.num_layers} layers, hidden {config.hidden_size}, heads {config.num_heads}/"
        f"{config.num_kv_heads} kv, MLP {config.intermediate_size}, vocab {config.vocab_size}",
        f"vision: {config.vision_depth} blocks, hidden {config.vision_hidden_size}, patch {config.patch_size}, "
        f"merge {config.spatial_merge_size}",
    ]
    report["notes"].append("the duet MLLM half: `python -m tapestry.models.duet.convert QWEN_DIR DIFFUSERS_DIR "
                           "--out DIR` adds <BOV> and builds a duet checkpoint")
    other_files(report, folder, set(names))


def _diffusers(folder: Path, report: dict[str, Any]) -> None:
    index = json_object(folder / "model_index.json") or {}
    names: list[str] = []
    for part in ("transformer", "vae"):
        if not (folder / part / "config.json").is_file():
            report["errors"].append(f"{folder / part}: no config.json (model_index.json names the parts "
                                    f"{sorted(k for k in index if not k.startswith('_'))})")
            continue
        names += _diffusers_part(folder / part, "transformer" if part == "transformer" else "vae", f"{part}/", report)
    report["weights"] = names
    ignored = sorted(k for k, v in index.items() if not k.startswith("_") and k not in ("transformer", "vae")
                     and isinstance(v, list) and v and v[0] is not None)
    if ignored:
        report["notes"].append(f"not read by duet: {', '.join(ignored)} (the MLLM writes DuetGen's text condition)")


def _diffusers_part(folder: Path, kind: str, prefix: str, report: dict[str, Any]) -> list[str]:
    """One transformer/ or vae/ folder into the report; returns its weight file names (prefixed)."""
    import torch

    from tapestry.models.duet.convert import (
        DIFFUSERS_INDEX,
        DIFFUSERS_WEIGHTS,
        _weight_files,
        dit_config_from_diffusers,
        vae_config_from_diffusers,
    )
    from tapestry.models.duet.dit import build_diffusers_dit
    from tapestry.models.duet.vae import build_vae

    header, names = _headers(_weight_files(folder, DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX))
    add_header(report, header, lambda key: prefix.rstrip("/") or kind)
    config = report["config"] = report["config"] or {}
    if kind == "transformer":
        dit = dit_config_from_diffusers(folder)
        with torch.device("meta"):
            module = build_diffusers_dit(dit)
        config["dit"] = asdict(dit)
        report["summary"].append(f"{prefix or 'transformer/'}: {dit.kind}, {dit.num_layers} layers, width "
                                 f"{dit.inner_dim}, {dit.in_channels} latent channels, text context {dit.context_dim}")
    else:
        vae_config = vae_config_from_diffusers(folder)
        with torch.device("meta"):
            vae = build_vae(vae_config, load_pretrained=False)
        module = vae.net
        config["vae"] = {"kind": vae_config.kind, "config": dict(vae_config.config)}
        report["summary"].append(f"{prefix or 'vae/'}: {vae_config.kind}, {vae.latent_channels} latent channels, "
                                 f"×{vae.downsample}")
    add_keys(report, compare_keys({k: tuple(v.shape) for k, v in module.state_dict().items()},
                                  {k: v.shape for k, v in header.items()}), prefix)
    return [prefix + n for n in names]


__all__ = ["inspect_folder"]
