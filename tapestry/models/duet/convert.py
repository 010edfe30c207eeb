"""Real checkpoints in their published local layouts -> duet parts, and back.

    Qwen2.5-VL (e.g. Qwen2.5-VL-7B-Instruct):  config.json (flat text fields + vision_config),
        model-0000K-of-0000N.safetensors + model.safetensors.index.json (or one
        model.safetensors), preprocessor_config.json, tokenizer files. Published key names:
        `model.layers.*`, `model.embed_tokens.*`, `model.norm.*`, `visual.*`, `lm_head.*`
        (transformers 5 keeps them as `model.language_model.*` and `model.visual.*`). The small
        models (Qwen2.5-VL-3B) set `"tie_word_embeddings": true` and store no `lm_head.weight`:
        the head is the input embedding table.
    diffusers (Wan2.x, Cosmos-Predict2.5):  model_index.json, transformer/ and vae/ each with
        config.json + diffusion_pytorch_model.safetensors (or -0000K-of-0000N shards +
        diffusion_pytorch_model.safetensors.index.json).

Loaders read the published config into the duet config sections and the tensors shard by shard
into the duet model's keys, and report key coverage (missing / unexpected / shape mismatch) from
the safetensors headers before any tensor is read. The writers produce exactly these layouts
(tests write tiny random checkpoints with them; they also export a trained duet model's parts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from tapestry.models.common.checkpoint import (
    CheckpointError,
    KeyReport,
    compare_keys,
    expected_shapes,
    load_state_copy,
    read_header,
    state_key_report,
)
from tapestry.models.duet.config import DiTConfig, MLLMConfig, VAEConfig

QWEN_INDEX = "model.safetensors.index.json"
QWEN_SINGLE = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"

# published prefix -> transformers-5 module prefix (inside DuetMLLM.hf)
_QWEN_PREFIXES = (("model.layers.", "model.language_model.layers."),
                  ("model.embed_tokens.", "model.language_model.embed_tokens."),
                  ("model.norm.", "model.language_model.norm."),
                  ("visual.", "model.visual."),
                  ("lm_head.", "lm_head."))


def qwen_key_to_internal(key: str) -> str:
    for published, internal in _QWEN_PREFIXES:
        if key.startswith(published):
            return internal + key[len(published):]
    return key


def qwen_key_to_published(key: str) -> str:
    for published, internal in _QWEN_PREFIXES:
        if key.startswith(internal):
            return published + key[len(internal):]
    return key


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file (not a checkpoint in the published layout)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def _weight_files(folder: Path, single: str, index: str) -> dict[str, Path]:
    """tensor name -> file holding it (an index's weight_map, or every key of one file)."""
    if (folder / index).is_file():
        weight_map = _read_json(folder / index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{folder / index}: no weight_map object")
        files = {name: folder / file for name, file in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise CheckpointError(f"{folder / index}: lists {path.name}, which is missing")
        return files
    if (folder / single).is_file():
        return {name: folder / single for name in read_header(folder / single)}
    raise CheckpointError(f"{folder}: neither {index} nor {single}")


def _headers(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        for name, info in read_header(path).items():
            shapes[name] = info.shape
    return shapes


def _load_tensors(files: dict[str, Path], rename=lambda k: k) -> dict[str, Tensor]:
    from tapestry.models.common.checkpoint import open_safetensors

    out: dict[str, Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in sorted(by_file.items()):
        with open_safetensors(path) as f:  # a truncated file: one CheckpointError naming it
            for name in names:
                out[rename(name)] = f.get_tensor(name)
    return out


# ---------------------------------------------------------------------------------------------
# Qwen2.5-VL
# ---------------------------------------------------------------------------------------------


def mllm_config_from_qwen(folder: str | Path) -> MLLMConfig:
    """The published config.json (and preprocessor_config.json, when present) -> MLLMConfig."""
    folder = Path(folder)
    data = _read_json(folder / "config.json")
    if data.get("model_type") != "qwen2_5_vl":
        raise CheckpointError(f"{folder / 'config.json'}: model_type is {data.get('model_type')!r}, "
                              "expected 'qwen2_5_vl'")
    text = dict(data.get("text_config") or {})
    text = {**{k: v for k, v in data.items() if k not in ("vision_config", "text_config")}, **text}
    vision = data.get("vision_config") or {}
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    try:
        cfg = MLLMConfig(
            vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]), num_layers=int(text["num_hidden_layers"]),
            num_heads=int(text["num_attention_heads"]), num_kv_heads=int(text["num_key_value_heads"]),
            rope_theta=float(text.get("rope_theta", rope.get("rope_theta", 1_000_000.0))),
            mrope_section=list(rope.get("mrope_section", [16, 24, 24])),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            # transformers before 5 saved it inside text_config; either place ties the head
            tie_word_embeddings=bool(data.get("tie_word_embeddings") or text.get("tie_word_embeddings")),
            vision_depth=int(vision["depth"]), vision_hidden_size=int(vision["hidden_size"]),
            vision_intermediate_size=int(vision["intermediate_size"]), vision_num_heads=int(vision["num_heads"]),
            patch_size=int(vision.get("patch_size", vision.get("spatial_patch_size", 14))),
            spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
            temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
            window_size=int(vision.get("window_size", 112)),
            fullatt_block_indexes=list(vision.get("fullatt_block_indexes", [7, 15, 23, 31])),
            tokens_per_second=int(vision.get("tokens_per_second", 2)),
            image_token_id=int(data.get("image_token_id", 151655)),
            video_token_id=int(data.get("video_token_id", 151656)),
            vision_start_token_id=int(data.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(data.get("vision_end_token_id", 151653)),
        )
    except KeyError as exc:
        raise CheckpointError(f"{folder / 'config.json'}: missing field {exc}") from None
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        p = _read_json(pre)
        cfg.min_pixels = int(p.get("min_pixels", cfg.min_pixels))
        cfg.max_pixels = int(p.get("max_pixels", cfg.max_pixels))
        cfg.image_mean = list(p.get("image_mean", cfg.image_mean))
        cfg.image_std = list(p.get("image_std", cfg.image_std))
    cfg.validate()
    return cfg


def qwen_config_json(cfg: MLLMConfig) -> dict[str, Any]:
    """MLLMConfig -> config.json as Qwen2.5-VL-7B-Instruct publishes it (flat text fields)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": 128000,
        "max_window_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers, "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "sliding_window": 32768,
        "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": cfg.vocab_size,
        "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
        "rope_scaling": {"type": "mrope", "mrope_section": list(cfg.mrope_section)},
        "vision_config": {
            "depth": cfg.vision_depth, "hidden_act": "silu", "hidden_size": cfg.vision_hidden_size,
            "intermediate_size": cfg.vision_intermediate_size, "num_heads": cfg.vision_num_heads, "in_chans": 3,
            "out_hidden_size": cfg.hidden_size, "patch_size": cfg.patch_size,
            "spatial_merge_size": cfg.spatial_merge_size, "spatial_patch_size": cfg.patch_size,
            "window_size": cfg.window_size, "fullatt_block_indexes": list(cfg.fullatt_block_indexes),
            "tokens_per_second": cfg.tokens_per_second, "temporal_patch_size": cfg.temporal_patch_size,
        },
    }


def qwen_key_report(shapes: dict[str, tuple[int, ...]], mllm) -> KeyReport:
    """How tensors of a Qwen2.5-VL checkpoint (published or transformers-5 names -> shapes) cover
    a DuetMLLM, in its internal names. A tied head needs no `lm_head.weight`."""
    return state_key_report(mllm.hf, {qwen_key_to_internal(k): tuple(v) for k, v in shapes.items()})


def qwen_coverage(folder: str | Path, mllm) -> KeyReport:
    """How a published Qwen2.5-VL folder's keys (headers only) cover a DuetMLLM."""
    files = _weight_files(Path(folder), QWEN_SINGLE, QWEN_INDEX)
    return qwen_key_report(_headers(files), mllm)


def untied_head_missing(folder: str | Path, mllm, report: KeyReport) -> str | None:
    """The one line that explains a checkpoint whose only gap is `lm_head.weight` under an untied
    config (a 3B-style tied checkpoint whose config.json lost the flag, or a cut-short copy)."""
    if mllm.config.tie_word_embeddings or report.unexpected or report.shape_mismatch or \
            report.missing != ["lm_head.weight"]:
        return None
    return (f"{Path(folder)}: no lm_head.weight in the weights and config.json does not tie the head "
            "(tie_word_embeddings is false or absent); if this model reuses model.embed_tokens.weight as its "
            "head, as Qwen2.5-VL-3B does, set \"tie_word_embeddings\": true, otherwise copy the checkpoint again")


def load_qwen(folder: str | Path, mllm) -> None:
    """Fill a DuetMLLM (built from mllm_config_from_qwen) with a published checkpoint; strict (a
    tied head is filled through the embedding table it shares)."""
    folder = Path(folder)
    report = qwen_coverage(folder, mllm)
    if not report.ok:
        raise CheckpointError(untied_head_missing(folder, mllm, report) or
                              f"{folder}: checkpoint does not fit Qwen2.5-VL of its config.json\n{report.describe()}")
    state = _load_tensors(_weight_files(folder, QWEN_SINGLE, QWEN_INDEX), qwen_key_to_internal)
    load_state_copy(mllm.hf, state, str(folder))


def write_qwen(mllm, folder: str | Path, shards: int = 1) -> Path:
    """A DuetMLLM -> a Qwen2.5-VL folder in the published layout (sharded with an index if shards > 1)."""
    from safetensors.torch import save_file

    from tapestry.atomic import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # each tied tensor once: a tied head is not stored (the published 3B files hold no lm_head.weight)
    keep = set(expected_shapes(mllm.hf))
    state = {qwen_key_to_published(k): v.detach().contiguous().cpu() for k, v in mllm.hf.state_dict().items()
             if k in keep}
    names = sorted(state)
    if shards <= 1:
        save_file(state, str(folder / QWEN_SINGLE), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i in range(shards):
            part = names[i::shards]
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in part}, str(folder / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in part})
            total += sum(state[k].numel() * state[k].element_size() for k in part)
        atomic_write_text(folder / QWEN_INDEX, json.dumps({"metadata": {"total_size": total},
                                                           "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    cfg = mllm.config
    atomic_write_text(folder / "config.json", json.dumps(qwen_config_json(cfg), indent=2))
    atomic_write_text(folder / "preprocessor_config.json", json.dumps({
        "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels, "patch_size": cfg.patch_size,
        "temporal_patch_size": cfg.temporal_patch_size, "merge_size": cfg.spatial_merge_size,
        "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}, indent=2))
    return folder


# ---------------------------------------------------------------------------------------------
# diffusers (Wan, Cosmos)
# ---------------------------------------------------------------------------------------------

_DIT_CLASSES = {"WanTransformer3DModel": "wan", "CosmosTransformer3DModel": "cosmos"}
_VAE_CLASSES = {"AutoencoderKLWan": "wan", "AutoencoderKLCosmos": "cosmos"}


def dit_config_from_diffusers(folder: str | Path) -> DiTConfig:
    """A diffusers transformer/config.json -> DiTConfig."""
    path = Path(folder) / "config.json"
    data = _read_json(path)
    kind = _DIT_CLASSES.get(data.get("_class_name", ""))
    if kind is None:
        raise CheckpointError(f"{path}: _class_name {data.get('_class_name')!r} is not one of {sorted(_DIT_CLASSES)}")
    cfg = DiTConfig(kind=kind)
    g = data.get
    cfg.num_layers, cfg.num_heads, cfg.head_dim = int(g("num_layers")), int(g("num_attention_heads")), int(
        g("attention_head_dim"))
    cfg.patch_size = list(g("patch_size", [1, 2, 2]))
    if kind == "wan":
        cfg.in_channels, cfg.text_dim = int(g("in_channels")), int(g("text_dim"))
        cfg.ffn_dim, cfg.freq_dim = int(g("ffn_dim")), int(g("freq_dim", 256))
        cfg.cross_attn_norm, cfg.qk_norm = bool(g("cross_attn_norm", True)), g("qk_norm", "rms_norm_across_heads")
        cfg.eps, cfg.rope_max_seq_len = float(g("eps", 1e-6)), int(g("rope_max_seq_len", 1024))
        if g("image_dim") or g("added_kv_proj_dim"):
            raise CheckpointError(f"{path}: Wan image-to-video (CLIP image branch) checkpoints are not supported; "
                                  "use a text-to-video or TI2V transformer")
    else:
        cfg.in_channels = int(g("out_channels"))
        cfg.condition_mask = int(g("in_channels")) == cfg.in_channels + 1
        cfg.text_dim = int(g("text_embed_dim"))
        cfg.mlp_ratio, cfg.adaln_lora_dim = float(g("mlp_ratio", 4.0)), int(g("adaln_lora_dim", 256))
        cfg.max_size, cfg.rope_scale = list(g("max_size")), [float(v) for v in g("rope_scale")]
        cfg.concat_padding_mask = bool(g("concat_padding_mask", True))
        cfg.extra_pos_embed_type = g("extra_pos_embed_type") or ""
        cfg.use_crossattn_projection = bool(g("use_crossattn_projection", False))
        cfg.crossattn_proj_in_channels = int(g("crossattn_proj_in_channels", 1024))
        if g("img_context_dim_in") or g("controlnet_block_every_n"):
            raise CheckpointError(f"{path}: Cosmos image-context / ControlNet transformers are not supported")
    cfg.validate()
    return cfg


def vae_config_from_diffusers(folder: str | Path) -> VAEConfig:
    path = Path(folder) / "config.json"
    data = _read_json(path)
    kind = _VAE_CLASSES.get(data.get("_class_name", ""))
    if kind is None:
        raise CheckpointError(f"{path}: _class_name {data.get('_class_name')!r} is not one of {sorted(_VAE_CLASSES)}")
    config = {k: v for k, v in data.items() if not k.startswith("_")}
    return VAEConfig(kind=kind, config=config)


def diffusers_coverage(folder: str | Path, module) -> KeyReport:
    files = _weight_files(Path(folder), DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return compare_keys(expected, _headers(files))


def load_diffusers(folder: str | Path, module) -> None:
    """Fill a diffusers module (the duet DiT's or VAE's `net`) from its published folder; strict."""
    folder = Path(folder)
    report = diffusers_coverage(folder, module)
    if not report.ok:
        raise CheckpointError(f"{folder}: checkpoint does not fit its config.json\n{report.describe()}")
    module.load_state_dict(_load_tensors(_weight_files(folder, DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX)), strict=True)


def write_diffusers(module, folder: str | Path, max_shard_size: str | None = None) -> Path:
    """diffusers' own save_pretrained: the layout the Wan / Cosmos folders were written with."""
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    module.save_pretrained(str(folder), **kwargs)
    return Path(folder)


def write_model_index(folder: str | Path, pipeline: str, transformer_class: str, vae_class: str) -> None:
    from tapestry.atomic import atomic_write_text

    atomic_write_text(Path(folder) / "model_index.json", json.dumps({
        "_class_name": pipeline, "transformer": ["diffusers", transformer_class], "vae": ["diffusers", vae_class]},
        indent=2))


# ---------------------------------------------------------------------------------------------
# A duet model from published parts
# ---------------------------------------------------------------------------------------------


def import_published(qwen_dir: str | Path, diffusers_dir: str | Path, connector=None, training=None,
                     target_size=(480, 480)):
    """A DuetModel whose MLLM, DiT and VAE come from published folders (the connector is fresh:
    DuetGen trains it in stage 2). The MLLM's embedding and head grow by one row for <BOV>
    (initialized to the mean embedding) when its vocabulary has no such token yet."""

    from tapestry.models.duet.config import ConnectorConfig, DuetConfig, TrainingConfig
    from tapestry.models.duet.model import DuetModel

    diffusers_dir = Path(diffusers_dir)
    mllm_cfg = mllm_config_from_qwen(qwen_dir)
    dit_cfg = dit_config_from_diffusers(diffusers_dir / "transformer")
    vae_cfg = vae_config_from_diffusers(diffusers_dir / "vae")
    connector = connector or ConnectorConfig(
        kind="identity" if dit_cfg.context_dim == mllm_cfg.hidden_size * mllm_cfg.num_layers else "mlp",
        hidden_size=max(dit_cfg.context_dim, 64))
    config = DuetConfig(mllm=mllm_cfg, connector=connector, dit=dit_cfg, vae=vae_cfg,
                        training=training or TrainingConfig(), target_size=list(target_size))
    # built on CPU with fresh weights, then overwritten (a 7B model needs its RAM twice over for a
    # moment; building under the meta device would avoid that but must rebuild every rotary table)
    model = DuetModel(config)
    load_qwen(qwen_dir, model.mllm)
    load_diffusers(diffusers_dir / "transformer", model.dit.net)
    load_diffusers(diffusers_dir / "vae", model.vae.net)

    return model


def grow_vocabulary(mllm, vocab_size: int) -> None:
    """Make room for new token ids (<BOV>): new embedding and head rows start at the mean
    embedding, the usual choice that keeps the new token's logit near the others'."""
    import torch

    hf = mllm.hf
    old = hf.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return
    with torch.no_grad():
        mean = hf.get_input_embeddings().weight.mean(0)
        hf.resize_token_embeddings(vocab_size, mean_resizing=False)
        hf.get_input_embeddings().weight[old:] = mean
        if not mllm.config.tie_word_embeddings:
            head = hf.get_output_embeddings().weight
            head[old:] = head[:old].mean(0)
    mllm.config.vocab_size = vocab_size


def import_folder(qwen_dir: str | Path, diffusers_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Published Qwen2.5-VL + diffusers folders -> one duet checkpoint folder (config.json,
    model.safetensors, the Qwen tokenizer with <BOV> added)."""
    from tapestry.models.common.tokenizer import TextTokenizer
    from tapestry.models.duet.sequence import DuetTokens, add_duet_tokens

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: folder is not empty; pass --overwrite to replace what is there")
    tokenizer = add_duet_tokens(TextTokenizer.load(qwen_dir))
    model = import_published(qwen_dir, diffusers_dir)
    tokens = DuetTokens.from_tokenizer(tokenizer)
    grow_vocabulary(model.mllm, max(tokenizer.vocab_size, model.config.mllm.vocab_size))
    model.config.mllm.bov_token_id = tokens.bov
    model.save_pretrained(out)
    tokenizer.save(out)
    return out


def coverage_lines(qwen_dir: str | Path, diffusers_dir: str | Path) -> list[str]:
    """What each published folder holds and how its keys (headers only) cover the duet part it
    fills; the parts are built on the meta device, so a 7B model costs no memory here."""
    import torch

    from tapestry.models.duet.dit import build_diffusers_dit
    from tapestry.models.duet.mllm import DuetMLLM
    from tapestry.models.duet.vae import build_vae

    diffusers_dir = Path(diffusers_dir)
    mllm_cfg = mllm_config_from_qwen(qwen_dir)
    dit_cfg = dit_config_from_diffusers(diffusers_dir / "transformer")
    vae_cfg = vae_config_from_diffusers(diffusers_dir / "vae")
    with torch.device("meta"):
        mllm, dit, vae = DuetMLLM(mllm_cfg), build_diffusers_dit(dit_cfg), build_vae(vae_cfg, load_pretrained=False)
    qwen_report = qwen_coverage(qwen_dir, mllm)
    reports = [
        (f"qwen2.5-vl {qwen_dir}: {mllm_cfg.num_layers} layers, hidden {mllm_cfg.hidden_size}, "
         f"vocab {mllm_cfg.vocab_size}{', lm_head tied to embed_tokens' if mllm_cfg.tie_word_embeddings else ''}",
         qwen_report),
        (f"transformer {diffusers_dir / 'transformer'}: {dit_cfg.kind}, {dit_cfg.num_layers} layers, width "
         f"{dit_cfg.inner_dim}, text context {dit_cfg.context_dim}", diffusers_coverage(diffusers_dir / "transformer", dit)),
        (f"vae {diffusers_dir / 'vae'}: {vae_cfg.kind}, {vae.latent_channels} latent channels, x{vae.downsample}",
         diffusers_coverage(diffusers_dir / "vae", vae.net)),
    ]
    lines = []
    for title, report in reports:
        lines.append(title)
        lines.append(f"  keys: {'complete' if report.ok else 'INCOMPLETE'} ({len(report.missing)} missing, "
                     f"{len(report.unexpected)} unexpected, {len(report.shape_mismatch)} shape mismatch)")
        if not report.ok:
            lines.extend("  " + line for line in report.describe().splitlines())
    hint = untied_head_missing(qwen_dir, mllm, qwen_report)
    if hint:
        lines.insert(2, "  " + hint)
    return lines


def main(argv: list[str] | None = None) -> int:
    """python -m tapestry.models.duet.convert QWEN_DIR DIFFUSERS_DIR --out DIR [--overwrite]"""
    import argparse
    import sys

    from tapestry.errors import TapestryError

    parser = argparse.ArgumentParser(prog="python -m tapestry.models.duet.convert",
                                     description="Build a duet checkpoint from a Qwen2.5-VL folder and a diffusers "
                                                 "Wan / Cosmos folder (published layouts), or report key coverage.")
    parser.add_argument("qwen_dir")
    parser.add_argument("diffusers_dir")
    parser.add_argument("--out", help="write the duet checkpoint here")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if not args.out:
            for line in coverage_lines(args.qwen_dir, args.diffusers_dir):
                print(line)
            return 0
        path = import_folder(args.qwen_dir, args.diffusers_dir, args.out, args.overwrite)
        print(f"wrote {path}")
        return 0
    except TapestryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
