"""Pipeline configurations: nested frozen dataclasses (one per operator), to and from JSON, with
`section.field=value` overrides from the command line and a fingerprint for the resume manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any, TypeVar

from tapestry.errors import TapestryError

C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def fingerprint(config: Any) -> str:
    blob = json.dumps(to_dict(config), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def from_dict(cls: type[C], values: dict[str, Any], where: str = "") -> C:
    """Build `cls` from a (possibly partial) dict; unknown keys are errors that name the allowed ones."""
    if not isinstance(values, dict):
        raise TapestryError(f"config {where or cls.__name__}: expected an object, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise TapestryError(f"config {where or cls.__name__}: unknown key(s) {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        kind = hints.get(name)
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = from_dict(kind, value, path)  # type: ignore[arg-type]
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise TapestryError(f"config {where or cls.__name__}: {e}") from None


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`["motion.min_mean=0.8", "windows.scales=2x1,5x3"]` applied to a nested dict (a copy).
    Values are JSON when they parse as JSON, plain strings otherwise."""
    out = json.loads(json.dumps(values))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TapestryError(f"--set {item!r}: write SECTION.FIELD=VALUE, e.g. motion.min_mean=0.8")
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise TapestryError(f"--set {item!r}: no config section {part!r} "
                                    f"(sections: {', '.join(k for k, v in node.items() if isinstance(v, dict))})")
            node = node[part]
        if parts[-1] not in node:
            raise TapestryError(f"--set {item!r}: no field {parts[-1]!r} in {'.'.join(parts[:-1]) or 'the config'} "
                                f"(fields: {', '.join(sorted(node))})")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        node[parts[-1]] = value
    return out
