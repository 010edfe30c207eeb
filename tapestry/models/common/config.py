"""Reading a config section: one typed dataclass per JSON object, every problem named.

The one reader of the JSON objects a checkpoint holds (a family's `config.json` sections, the
`layout` and `generation` of `pipeline.json`, an autoencoder's config): a bad record is one error
naming the file and the field (`pipeline.json: layout.target_size: missing`), never a
`TypeError` from deep inside a constructor. Values are checked field by field against the type
of each field's default (int, float, bool, str, a tuple of ints, a list of ints or numbers, a dict); a
tuple is read from a JSON list.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import fields
from typing import Any, Collection


def section_from_dict(cls, data: Any, where: str, error: type[Exception], required: Collection[str] = (),
                      fix: str = ""):
    """`cls(**data)` for a config section, raising the family's `error` with the field path
    (`where`) on a non-object, unknown field names, a missing `required` field (with `fix`, the
    remedy, appended), a value of the wrong type or arguments the constructor refuses."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise error(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    values = {}
    for name, f in known.items():
        if name not in data:
            if name in required:
                raise error(f"{where}.{name}: missing" + (f"; {fix}" if fix else ""))
            continue
        values[name] = _typed(data[name], _default(f), f"{where}.{name}", error)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise error(f"{where}: {exc}") from None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _typed(value: Any, default: Any, where: str, error: type[Exception]) -> Any:
    def bad(expected: str) -> Exception:
        return error(f"{where}: expected {expected}, found {json.dumps(value, default=repr)[:60]}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if default is None:  # no type to check against; a list of ints is an optional tuple (a size)
        if isinstance(value, list) and value and all(is_int(v) for v in value):
            return tuple(value)
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if not is_int(value):
            raise bad("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or len(value) != len(default) or not all(is_int(v) for v in value):
            raise bad(f"a list of {len(default)} integers")
        return tuple(value)
    if isinstance(default, list):  # items checked against the default's items (ints, numbers)
        if default and all(is_int(v) for v in default):
            if not isinstance(value, list) or not all(is_int(v) for v in value):
                raise bad("a list of integers")
        elif default and all(isinstance(v, float) for v in default):
            if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in value):
                raise bad("a list of numbers")
            return [float(v) for v in value]
        elif not isinstance(value, list):
            raise bad("a list")
        return list(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise bad("a JSON object")
        return dict(value)
    return value
