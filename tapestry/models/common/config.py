"""Reading a family config's sections: one typed dataclass per JSON object, every problem named."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def section_from_dict(cls, data: Any, where: str, error: type[Exception]):
    """`cls(**data)` for a config section, raising the family's `error` with the field path
    (`where`) on a non-object, unknown field names or wrong arguments."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise error(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise error(f"{where}: {exc}") from None
