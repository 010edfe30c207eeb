"""What is in a checkpoint folder, before loading it: `tapestry inspect`'s core.

Reads only JSON configs and safetensors headers (never a tensor), builds the model it would load
on the meta device, and compares keys: a user learns the layout, the config, the parameter count
per component, the dtypes and every missing / unexpected / misshapen key in well under a second,
even for a 14 B-parameter folder.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from tapestry.errors import TapestryError
from tapestry.models.common.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    TensorInfo,
    compare_keys,
    expected_shapes,
    read_header,
)

# tapestry key prefix -> component (first match wins)
_COMPONENTS = [
    (r"layers\.\d+\.und\.", "und_expert"),
    (r"layers\.\d+\.gen\.", "gen_expert"),
    (r"embed_tokens\.", "embed_tokens"),
    (r"lm_head\.", "lm_head"),
    (r"norm_(und|gen)\.", "final_norms"),
    (r"vit\.", "vit"),
    (r"connector\.", "connector"),
    (r"(latent_in|latent_out|time_embed)\.", "generation_io"),
]


def component_of(tapestry_key: str) -> str:
    for pattern, name in _COMPONENTS:
        if re.match(pattern, tapestry_key):
            return name
    return "other"


def _dtype_counts(header: dict[str, TensorInfo]) -> dict[str, int]:
    return dict(sorted(Counter(info.dtype for info in header.values()).items()))


def _file_summary(path: Path) -> dict[str, Any]:
    header = read_header(path)
    return {
        "tensors": len(header),
        "parameters": sum(i.numel for i in header.values()),
        "dtype": _dtype_counts(header),
        "bytes": path.stat().st_size,
    }


def _config_summary(config) -> dict[str, Any]:
    data = config.to_dict()
    data.pop("format", None)
    data.pop("format_version", None)
    return data


def detect_layout(folder: Path) -> str:
    if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
        return "tapestry"
    if (folder / "llm_config.json").is_file() and (folder / "ema.safetensors").is_file():
        return "bagel"
    return "unknown"


def inspect_checkpoint(folder: str | Path) -> dict[str, Any]:
    """A JSON-ready description of a checkpoint folder.

    Keys: path, layout ("tapestry" | "bagel" | "unknown"), weights (file name), config (summary or
    None), parameters ({"total", "by_component"}), dtype ({name: tensor count}), missing,
    unexpected, shape_mismatch (key names in the checkpoint's own naming), ok, notes, errors,
    other_files ({name: {tensors, parameters, dtype, bytes}} for other .safetensors files).
    """
    from tapestry.models.mot.config import MoTConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    layout = detect_layout(folder)
    report: dict[str, Any] = {
        "path": str(folder), "layout": layout, "weights": None, "config": None,
        "parameters": {"total": 0, "by_component": {}}, "dtype": {},
        "missing": [], "unexpected": [], "shape_mismatch": [],
        "ok": False, "notes": [], "errors": [], "other_files": {},
    }

    if layout == "unknown":
        report["errors"].append(
            f"no known layout: expected {CONFIG_NAME} + {WEIGHTS_NAME} (tapestry) or "
            "llm_config.json + ema.safetensors (BAGEL)"
        )
        for path in sorted(folder.glob("*.safetensors")):
            report["other_files"][path.name] = _safe_summary(path, report)
        return report

    weights = folder / (WEIGHTS_NAME if layout == "tapestry" else "ema.safetensors")
    report["weights"] = weights.name
    try:
        header = read_header(weights)
    except CheckpointError as exc:
        report["errors"].append(str(exc))
        return report
    report["dtype"] = _dtype_counts(header)

    to_ours = (lambda k: k) if layout == "tapestry" else _bagel_name
    by_component: Counter[str] = Counter()
    for key, info in header.items():
        ours = to_ours(key)
        by_component["fixed_tables" if ours is None and key.endswith("pos_embed.pos_embed") else
                     component_of(ours) if ours is not None else "other"] += info.numel
    report["parameters"] = {"total": sum(by_component.values()), "by_component": dict(sorted(by_component.items()))}

    try:
        if layout == "tapestry":
            import torch

            from tapestry.models.mot.model import MoTModel

            config = MoTConfig.load(folder / CONFIG_NAME)
            with torch.device("meta"):
                model = MoTModel(config)
            keys = compare_keys(expected_shapes(model), {k: v.shape for k, v in header.items()})
        else:
            from tapestry.models.mot.convert import bagel_config, bagel_key_report

            config, notes = bagel_config(folder, header)
            report["notes"] += notes
            keys = bagel_key_report(config, header)
    except TapestryError as exc:
        report["errors"].append(str(exc))
        return report
    report["config"] = _config_summary(config)
    report["missing"], report["unexpected"] = keys.missing, keys.unexpected
    report["shape_mismatch"] = keys.shape_mismatch
    report["ok"] = keys.ok and not report["errors"]

    for path in sorted(folder.glob("*.safetensors")):
        if path != weights:
            report["other_files"][path.name] = _safe_summary(path, report)
    return report


def _bagel_name(key: str) -> str | None:
    from tapestry.models.mot.convert import bagel_to_tapestry_key

    return bagel_to_tapestry_key(key)


def _safe_summary(path: Path, report: dict) -> dict[str, Any] | None:
    try:
        return _file_summary(path)
    except CheckpointError as exc:
        report["errors"].append(str(exc))
        return None

