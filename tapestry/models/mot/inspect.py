"""`tapestry inspect` for the `mot` family: its own checkpoints and BAGEL release folders,
from JSON configs and safetensors headers only (tapestry.models.inspection holds the report)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tapestry.errors import TapestryError
from tapestry.models.common.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, compare_keys, expected_shapes, read_header
from tapestry.models.inspection import add_header, add_keys, config_summary, finish, new_report, other_files

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


def summary_lines(cfg: dict[str, Any]) -> list[str]:
    llm = cfg["llm"]
    lines = [f"decoder: {llm['num_layers']} layers × 2 experts, hidden {llm['hidden_size']}, "
             f"heads {llm['num_heads']}/{llm['num_kv_heads']} kv, head dim {llm['head_dim']}, "
             f"MLP {llm['intermediate_size']}, vocab {llm['vocab_size']}"]
    if cfg.get("vit"):
        v = cfg["vit"]
        lines.append(f"vit: {v['num_layers']} layers, hidden {v['hidden_size']}, patch {v['patch_size']}, "
                     f"up to {v['max_patches_per_side']}² patches")
    if cfg.get("latent"):
        lt = cfg["latent"]
        lines.append(f"latents: {lt['channels']} channels, {lt['patch_size']}×{lt['patch_size']} patches, "
                     f"up to {lt['max_side']}² tokens")
    return lines


def _bagel_component(key: str) -> str:
    from tapestry.models.mot.convert import bagel_to_tapestry_key

    ours = bagel_to_tapestry_key(key)
    if ours is None:
        return "fixed_tables" if key.endswith("pos_embed.pos_embed") else "other"
    return component_of(ours)


def _names_mot(path: Path) -> bool:
    import json

    from tapestry.models import family as families

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return isinstance(data, dict) and families.family_name(data, str(path)) == "mot"
    except (OSError, json.JSONDecodeError, families.FamilyError):
        return False


def inspect_folder(folder: str | Path) -> dict[str, Any] | None:
    """A report for a mot checkpoint (config.json + model.safetensors) or a BAGEL release folder
    (llm_config.json + ema.safetensors); None for anything else."""
    folder = Path(folder)
    if (folder / "llm_config.json").is_file() and (folder / "ema.safetensors").is_file():
        layout, weights = "bagel", folder / "ema.safetensors"
    elif _names_mot(folder / CONFIG_NAME):
        layout, weights = "tapestry", folder / WEIGHTS_NAME
    else:
        return None
    report = new_report(folder, layout, "mot")
    report["weights"] = weights.name
    try:
        header = read_header(weights)
    except CheckpointError as exc:
        report["errors"].append(str(exc))
        return report
    add_header(report, header, component_of if layout == "tapestry" else _bagel_component)
    try:
        if layout == "tapestry":
            import torch

            from tapestry.models.mot.config import MoTConfig
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
    report["config"] = config_summary(config)
    report["summary"] = summary_lines(report["config"])
    add_keys(report, keys)
    other_files(report, folder, {weights.name})
    return finish(report)
