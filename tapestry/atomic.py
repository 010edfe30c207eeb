"""Writes that never leave a half-written file: write to a temporary name beside the target,
flush to disk, then rename over it (a rename within one folder is atomic on POSIX)."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from tapestry.errors import TapestryError


def temp_path_beside(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces `path`, on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder to fill; on success it takes the place of `path` (replacing an
    old folder), on error it is removed and any old folder at `path` is left as it was.
    Low level: it replaces whatever is at `path`; commands use `output_dir`, which refuses a
    folder holding files they did not write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- output folders
# A folder a command writes carries OUTPUT_MARKER: who wrote it and (for a folder written whole)
# every file it holds. A command may replace a folder only when the marker says it wrote every
# file there itself; anything else (a person's notes, another command's output) is refused unless
# the caller passes overwrite=True (`--overwrite`). Never destroy a user's files.

OUTPUT_MARKER = ".tapestry-output.json"


class OutputFolderError(TapestryError):
    """An output folder holds files this command did not write (or is not a folder at all)."""


def _files_under(path: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        rel = Path(dirpath).relative_to(path)
        for name in sorted(filenames) + sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))):
            found.append((rel / name).as_posix())
    return [f for f in found if f != OUTPUT_MARKER]


def read_output_marker(path: str | os.PathLike) -> dict | None:
    """The marker of an output folder, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(path) / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("writer"), str) else None


def _is_legacy(path: Path, files: list[str], legacy: tuple[str, ...]) -> bool:
    """An unmarked folder that `legacy` describes: the names (globs) of the top-level entries a
    command wrote before folders carried a marker, the first of them present (its signature:
    `checkpoints` for a training run), and every entry among them."""
    if not legacy or not (path / legacy[0]).exists():
        return False
    return all(any(fnmatch.fnmatchcase(f.split("/", 1)[0], name) for name in legacy) for f in files)


def foreign_files(path: str | os.PathLike, writer: str, legacy: tuple[str, ...] = ()) -> list[str]:
    """Files under `path` that `writer` did not write (relative, sorted); [] for a missing or
    empty folder. A resumable folder of `writer` owns whatever it holds: its writer adds and
    replaces only its own files and never deletes anything else. `legacy`: see `_is_legacy`."""
    path = Path(path)
    if not path.is_dir():
        return []
    files = _files_under(path)
    marker = read_output_marker(path)
    if marker is None and _is_legacy(path, files, legacy):
        return []
    if marker is None or marker.get("writer") != writer:
        return files
    if marker.get("resumable"):
        return []
    listed = set(marker.get("files") or [])
    return [f for f in files if f not in listed]


def check_output_dir(path: str | os.PathLike, writer: str, overwrite: bool = False, flag: str = "--out",
                     legacy: tuple[str, ...] = (), resumable: bool = False) -> None:
    """Raise OutputFolderError (before any work) when `writer` may not write the folder `path`.
    `resumable`: the writer adds to the folder over time (`claim_output_dir`), so --overwrite
    writes beside the files there instead of replacing them (the message says which)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"{flag} {path} is a file; give a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputFolderError(f"{flag} {path}: {parent} is a file, so no folder can be made inside it")
            break
    if overwrite:
        return
    foreign = foreign_files(path, writer, legacy)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        remedy = ("pass --overwrite to write into it anyway (nothing there is deleted)" if resumable else
                  "pass --overwrite to replace the folder and everything in it")
        raise OutputFolderError(f"{flag} {path} holds {len(foreign)} file(s) that {writer} did not write ({shown}); "
                                f"nothing was changed. Give a new or empty folder, or {remedy}")


def write_output_marker(path: str | os.PathLike, writer: str, resumable: bool = False) -> None:
    path = Path(path)
    record: dict = {"writer": writer, "tapestry": _version()}
    if resumable:
        record["resumable"] = True
    else:
        record["files"] = _files_under(path)
    atomic_write_text(path / OUTPUT_MARKER, json.dumps(record, indent=1) + "\n")


def _version() -> str:
    import tapestry

    return tapestry.__version__


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, writer: str, overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """A folder written whole: checks `path` first (OutputFolderError), yields a temporary folder
    to fill, then marks it as `writer`'s and swaps it in atomically. The check runs again just
    before the swap, so a file a person drops into the old folder meanwhile is not lost."""
    path = Path(path)
    check_output_dir(path, writer, overwrite, flag)
    with atomic_dir(path) as tmp:
        yield tmp
        write_output_marker(tmp, writer)
        check_output_dir(path, writer, overwrite, flag)


def claim_output_dir(path: str | os.PathLike, writer: str, overwrite: bool = False, flag: str = "--out",
                     legacy: tuple[str, ...] = ()) -> Path:
    """A folder written over time and resumed (training runs, data engines, evaluations): check
    it, create it and mark it as `writer`'s, so the same command may later continue in it. With
    `legacy` (see `_is_legacy`), a run folder written before markers existed resumes too."""
    path = Path(path)
    check_output_dir(path, writer, overwrite, flag, legacy, resumable=True)
    path.mkdir(parents=True, exist_ok=True)
    marker = read_output_marker(path)
    if marker is None or marker.get("writer") != writer or not marker.get("resumable"):
        write_output_marker(path, writer, resumable=True)
    return path
