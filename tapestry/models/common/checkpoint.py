"""Checkpoint folders: `config.json` beside `model.safetensors`, strict key checks, header reads.

Loading refuses a checkpoint whose keys do not match the model exactly and says which keys are
missing, unexpected or of the wrong shape — a silently half-loaded model is the worst outcome.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from tapestry.atomic import atomic_file, atomic_write_text
from tapestry.errors import TapestryError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # a real header is far smaller; refuse to read a corrupt length


class CheckpointError(TapestryError):
    """A checkpoint folder or file cannot be read or does not fit the model."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name: "BF16", "F32", ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a .safetensors file, reading only its JSON header."""
    path = Path(path)
    fix = "the file is truncated or corrupt; copy or export the checkpoint again"
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: cannot read: too short to be a safetensors file; {fix}")
            (size,) = struct.unpack("<Q", raw)
            if size > _MAX_HEADER:
                raise CheckpointError(f"{path}: cannot read: header length {size} is implausible; {fix}")
            body = f.read(size)
            if len(body) < size:
                raise CheckpointError(f"{path}: cannot read: the header is cut short ({len(body)} of {size} bytes); {fix}")
            header = json.loads(body)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a safetensors file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read: header is not valid JSON ({exc}); {fix}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; {fix}")
    header.pop("__metadata__", None)
    out = {}
    for key, value in header.items():
        try:
            dtype, shape = value["dtype"], value["shape"]
            if not isinstance(dtype, str) or not all(isinstance(n, int) and n >= 0 for n in shape):
                raise TypeError
            out[key] = TensorInfo(dtype, tuple(shape))
        except (KeyError, TypeError):
            raise CheckpointError(f"{path}: header entry {key!r} has no valid dtype and shape; {fix}") from None
    return out


_DAMAGED = "the file is truncated or corrupt: copy or export the checkpoint again"


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """Every tensor of a .safetensors file. A missing, truncated or corrupt file ends in one
    CheckpointError naming the file and the fix, never in safetensors' own exception."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    read_header(path)  # the clear errors for a missing file or a damaged header
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot read the tensors ({exc}); {_DAMAGED}") from None


def open_safetensors(path: str | Path, device: str = "cpu"):
    """`safetensors.safe_open` (tensors read one at a time) with the errors of `load_safetensors`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    read_header(path)
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot read the tensors ({exc}); {_DAMAGED}") from None


def read_json_file(path: str | Path, what: str = "a JSON file") -> dict:
    """A JSON object from `path` (a config, a pipeline record), or one CheckpointError naming the
    file, what it should be, and where the JSON breaks."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text ({what}); the file is corrupt") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
                              f"it should be {what}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({what}), found {type(data).__name__}")
    return data


@dataclass
class KeyReport:
    """How a checkpoint's keys cover a model's: the three lists `tapestry inspect` prints."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[dict] = field(default_factory=list)  # {key, expected, found}

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def describe(self, limit: int = 20) -> str:
        lines = []
        for title, items in (
            ("missing (the model needs them, the checkpoint lacks them)", self.missing),
            ("unexpected (in the checkpoint, not in the model)", self.unexpected),
            ("shape mismatch", [f"{m['key']}: model {m['expected']}, checkpoint {m['found']}"
                                for m in self.shape_mismatch]),
        ):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines += [f"  {item}" for item in items[:limit]]
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")
        return "\n".join(lines)


def compare_keys(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> KeyReport:
    return KeyReport(
        missing=sorted(set(expected) - set(found)),
        unexpected=sorted(set(found) - set(expected)),
        shape_mismatch=[
            {"key": k, "expected": list(expected[k]), "found": list(found[k])}
            for k in sorted(set(expected) & set(found))
            if tuple(expected[k]) != tuple(found[k])
        ],
    )


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Persistent state of a model, each tensor once (tied weights under their first name)."""
    seen, shapes = set(), {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        ident = id(tensor)
        if ident in seen:
            continue
        seen.add(ident)
        shapes[key] = tuple(tensor.shape)
    return shapes


def tied_names(model: nn.Module) -> dict[str, str]:
    """Later name -> first name of every tensor the model holds under several names (a tied
    output head: `lm_head.weight` -> `...embed_tokens.weight`); `expected_shapes` keeps the first."""
    first: dict[int, str] = {}
    later: dict[str, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            later[key] = first[id(tensor)]
        else:
            first[id(tensor)] = key
    return later


def state_key_report(model: nn.Module, found: dict[str, tuple[int, ...]]) -> KeyReport:
    """How `found` (name -> shape) covers the model's state. A tied tensor is needed under its
    first name only; its later name, when a checkpoint stores it too, is checked for shape rather
    than called unexpected (its values are checked on load: `load_state_copy`)."""
    expected = expected_shapes(model)
    state = model.state_dict(keep_vars=True)
    for later in tied_names(model):
        if later in found:
            expected[later] = tuple(state[later].shape)
    return compare_keys(expected, found)


def load_state_copy(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Copy `state` into a materialized model, refusing any key mismatch. A tied tensor may come
    under its first name alone, or under both names with equal values. Copying keeps the tie;
    `assign=True` would put a new parameter under the first name and leave the second on the old."""
    import torch

    report = state_key_report(model, {k: tuple(v.shape) for k, v in state.items()})
    if not report.ok:
        raise CheckpointError(f"{source} does not fit the model:\n{report.describe()}")
    state = dict(state)
    for later, first in tied_names(model).items():
        if later in state:
            if not torch.equal(state[later], state[first]):
                raise CheckpointError(f"{source}: {later} differs from {first}, which the model ties it to "
                                      "(tie_word_embeddings in its config); two different tensors need an untied config")
            del state[later]  # one copy: the second would overwrite the same tensor
    model.load_state_dict(state, strict=False)


def save_state(path: str | Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Write the model's persistent state (each tied tensor once) atomically."""
    from safetensors.torch import save_file

    keep = set(expected_shapes(model))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in keep}
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def load_state_strict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Assign `state` into `model` (which may live on the meta device), refusing any key mismatch."""
    report = compare_keys(expected_shapes(model), {k: tuple(v.shape) for k, v in state.items()})
    if not report.ok:
        raise CheckpointError(f"{source} does not fit the model:\n{report.describe()}")
    model.load_state_dict(state, strict=False, assign=True)


def write_config(folder: Path, config_json: str) -> None:
    atomic_write_text(folder / CONFIG_NAME, config_json)


def checkpoint_files(folder: str | Path) -> tuple[Path, Path]:
    """(config.json, model.safetensors) of a tapestry checkpoint folder, or a clear error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory (expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config, weights):
        if not path.is_file():
            raise CheckpointError(
                f"{folder}: missing {path.name}; a tapestry checkpoint holds {CONFIG_NAME} and "
                f"{WEIGHTS_NAME} (for a BAGEL-layout folder use tapestry.models.mot.convert.load_bagel)"
            )
    return config, weights

