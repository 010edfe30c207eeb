"""What is in a checkpoint folder, before loading it: `tapestry inspect`'s core.

Reads only JSON configs and safetensors headers (never a tensor), builds the model it would load
on the meta device, and compares keys: a user learns the layout, the config, the parameter count
per component, the dtypes and every missing / unexpected / misshapen key in well under a second,
even for a 14 B-parameter folder.

Which family reads a folder is the family protocol's business (`Family.inspect`, optional): a
folder whose config.json names a family (a tapestry checkpoint) goes to that family; any other
folder is offered to every family in turn, and the first that recognizes a published layout it
reads (BAGEL for `mot`; Qwen2.5-VL and diffusers Wan / Cosmos for `duet`; CLIP, LLaMA and
Stable Diffusion for `mmi`) answers. This module imports no family; the helpers below are what
families build their reports with.

Report keys (`new_report`): path, family, layout (e.g. "tapestry", "bagel", "qwen2.5-vl",
"diffusers"), weights (file names), summary (lines a person reads), config, parameters
({"total", "by_component"}), dtype ({name: tensor count}), missing, unexpected, shape_mismatch
(key names in the checkpoint's own naming; a folder of several parts prefixes them with the
part, e.g. "transformer/"), ok, notes, errors, other_files.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tapestry.errors import TapestryError
from tapestry.models.common.checkpoint import CheckpointError, KeyReport, TensorInfo, read_header


def new_report(folder: str | Path, layout: str, family: str | None = None) -> dict[str, Any]:
    return {
        "path": str(folder), "family": family, "layout": layout, "weights": None, "summary": [], "config": None,
        "parameters": {"total": 0, "by_component": {}}, "dtype": {},
        "missing": [], "unexpected": [], "shape_mismatch": [],
        "ok": False, "notes": [], "errors": [], "other_files": {},
    }


def dtype_counts(header: dict[str, TensorInfo]) -> dict[str, int]:
    return dict(sorted(Counter(info.dtype for info in header.values()).items()))


def file_summary(path: Path) -> dict[str, Any]:
    header = read_header(path)
    return {
        "tensors": len(header),
        "parameters": sum(i.numel for i in header.values()),
        "dtype": dtype_counts(header),
        "bytes": path.stat().st_size,
    }


def safe_summary(path: Path, report: dict) -> dict[str, Any] | None:
    try:
        return file_summary(path)
    except CheckpointError as exc:
        report["errors"].append(str(exc))
        return None


def config_summary(config) -> dict[str, Any]:
    data = config.to_dict()
    data.pop("format", None)
    data.pop("format_version", None)
    return data


def add_keys(report: dict[str, Any], keys: KeyReport, prefix: str = "") -> None:
    """Adds one part's key comparison to the report (names prefixed by `prefix`)."""
    report["missing"] += [prefix + k for k in keys.missing]
    report["unexpected"] += [prefix + k for k in keys.unexpected]
    report["shape_mismatch"] += [{**m, "key": prefix + m["key"]} for m in keys.shape_mismatch]


def add_header(report: dict[str, Any], header: dict[str, TensorInfo], component_of) -> None:
    """Adds a header's parameter counts (by `component_of(key)`) and dtypes to the report."""
    by_component: Counter[str] = Counter(report["parameters"]["by_component"])
    for key, info in header.items():
        by_component[component_of(key)] += info.numel
    report["parameters"] = {"total": sum(by_component.values()), "by_component": dict(sorted(by_component.items()))}
    dtypes = Counter(report["dtype"])
    dtypes.update(dtype_counts(header))
    report["dtype"] = dict(sorted(dtypes.items()))


def finish(report: dict[str, Any]) -> dict[str, Any]:
    report["ok"] = not (report["missing"] or report["unexpected"] or report["shape_mismatch"] or report["errors"])
    return report


def other_files(report: dict[str, Any], folder: Path, used: set[str]) -> None:
    for path in sorted(folder.glob("*.safetensors")):
        if path.name not in used:
            report["other_files"][path.name] = safe_summary(path, report)


def json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing, unreadable, not JSON or not an object:
    inspection reports what it finds and never stops at a file it cannot read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _named_family(folder: Path) -> str | None:
    """The family a tapestry checkpoint's config.json names, or None (no such file / field)."""
    from tapestry.models import family as families

    path = folder / "config.json"
    data = json_object(path)
    if data is None:
        return None
    try:
        return families.family_name(data, str(path))
    except families.FamilyError:
        return None


def _ask(family, folder: Path) -> dict[str, Any] | None:
    inspect = getattr(family, "inspect", None)
    if inspect is None:
        return None
    try:
        return inspect(folder)
    except TapestryError as exc:  # it recognized the folder but could not read it
        report = new_report(folder, "unknown", family.name)
        report["errors"].append(str(exc))
        return report


def inspect_checkpoint(folder: str | Path) -> dict[str, Any]:
    """A JSON-ready description of a checkpoint folder (keys: see the module docstring)."""
    from tapestry.models import family as families

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    named = _named_family(folder)
    if named is not None:
        try:
            family = families.get(named)
        except families.FamilyError as exc:
            report = new_report(folder, "tapestry", named)
            report["errors"].append(str(exc))
            return report
        report = _ask(family, folder)
        if report is None:
            report = new_report(folder, "tapestry", named)
            report["errors"].append(f"family {named!r} cannot inspect this folder")
        return report
    for name in families.names():
        try:
            family = families.get(name)
        except (families.FamilyError, ImportError):
            continue
        report = _ask(family, folder)
        if report is not None:
            return report
    report = new_report(folder, "unknown")
    report["errors"].append(
        "no known layout: a tapestry checkpoint (config.json naming its family + model.safetensors), a BAGEL "
        "release (llm_config.json + ema.safetensors), a Qwen2.5-VL folder, a diffusers Wan / Cosmos / Stable "
        "Diffusion folder, or a CLIP / LLaMA transformers folder")
    other_files(report, folder, set())
    return report


__all__ = ["add_header", "add_keys", "config_summary", "dtype_counts", "file_summary", "finish", "inspect_checkpoint",
           "new_report", "other_files", "safe_summary"]
