"""Documents on disk: a folder (`doc.json` + images), a JSONL manifest, webdataset `.tar` shards.

Reading is defensive because data comes from strangers: image paths cannot leave the
document's folder (no absolute paths, no `..`, no symlink escapes), images are size-checked
from their header before any pixel is decoded (decompression bombs), and every image is fully
decoded so a truncated file is reported here rather than crashing a training run later.
Writing is atomic: a crash leaves the previous file or folder as it was.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from tapestry.atomic import atomic_file, atomic_write_bytes, output_dir
from tapestry.document import (
    DEFAULT_LIMITS,
    Document,
    ImageSegment,
    Limits,
    parse_document_partially,
)
from tapestry.errors import DocumentError, Problem, TapestryError
from tapestry.images import (  # noqa: F401  (re-exported: they lived here)
    EXTENSION_FORMATS,
    FORMAT_EXTENSIONS,
    ImageRefused,
    decode_image,
    load_image,
)

DOC_FILE = "doc.json"
MAX_DOC_JSON_BYTES = 16 * 1024 * 1024


def image_format(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format or "PNG"
    except Exception:  # noqa: BLE001 - only called on bytes that decode_image accepted
        return "PNG"


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_bytes(segment: ImageSegment) -> bytes | None:
    """The bytes to store for an image segment: its original file, or PNG of its pixels."""
    if segment.encoded is not None:
        return segment.encoded
    if segment.image is not None:
        return encode_png(segment.image)
    return None


def resolve_inside(root: Path, src: str) -> Path:
    """The file `src` names relative to `root`; ImageRefused if it would leave `root`."""
    if not src or "\x00" in src:
        raise ImageRefused("empty or invalid path")
    if "://" in src:
        raise ImageRefused(f"remote images are not fetched ({src!r}): download it and use a relative path")
    if src.startswith(("/", "\\")) or os.path.isabs(src) or (len(src) > 1 and src[1] == ":"):
        raise ImageRefused(f"absolute path {src!r} refused: paths are relative to the document's folder")
    parts = src.replace("\\", "/").split("/")
    if ".." in parts:
        raise ImageRefused(f"path {src!r} refused: '..' would leave the document's folder")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, src))
    if os.path.commonpath([real_root, real]) != real_root:
        raise ImageRefused(f"path {src!r} refused: it links outside the document's folder")
    return Path(real)


def _read_inside(root: Path, src: str, limits: Limits) -> bytes:
    path = resolve_inside(root, src)
    if not path.exists():
        raise ImageRefused(f"image file {src!r} not found")
    if not path.is_file():
        raise ImageRefused(f"{src!r} is not a regular file")
    size = path.stat().st_size
    if size > limits.max_image_bytes:
        raise ImageRefused(f"file of {size} bytes exceeds the limit of {limits.max_image_bytes}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageRefused(f"cannot read {src!r}: {e.strerror or e}") from None


def attach_images(
    doc: Document, read: Callable[[str], bytes], source: str, limits: Limits
) -> list[Problem]:
    """Read, check and decode every image with a `src`; problems name the segment and reason."""
    problems: list[Problem] = []
    for i, segment in enumerate(doc.segments):
        if not isinstance(segment, ImageSegment) or segment.src is None:
            continue
        try:
            data = read(segment.src)
            image = decode_image(data, limits)
        except ImageRefused as e:
            problems.append(Problem(source, str(e), doc.id, i, "src"))
            continue
        for key, actual in (("width", image.width), ("height", image.height)):
            declared = getattr(segment, key)
            if declared is not None and declared != actual:
                problems.append(Problem(
                    source, f"declared {key} {declared} but the image is {image.width}x{image.height}",
                    doc.id, i, key))
        segment.image = image
        segment.encoded = data
        segment.width, segment.height = image.width, image.height
    return problems


# ---------------------------------------------------------------------- reading
@dataclass
class Loaded:
    """One sample as read from disk: the Document when valid, else every problem."""

    source: str
    document: Document | None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _load_obj(obj: Any, root_read: Callable[[str], bytes], source: str, limits: Limits) -> Loaded:
    doc, problems = parse_document_partially(obj, source, limits)
    if doc is None:
        return Loaded(source, None, problems)
    problems = problems + attach_images(doc, root_read, source, limits)
    problems.sort(key=lambda p: (p.segment if p.segment is not None else -1))  # stable: keeps column order
    return Loaded(source, None if problems else doc, problems)


def _read_json_file(path: Path) -> tuple[Any, list[Problem]]:
    source = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_DOC_JSON_BYTES:
            return None, [Problem(source, f"file of {size} bytes exceeds the limit of {MAX_DOC_JSON_BYTES}")]
        raw = path.read_bytes()
    except OSError as e:
        return None, [Problem(source, f"cannot read: {e.strerror or e}")]
    try:
        return json.loads(raw), []
    except (ValueError, RecursionError) as e:
        return None, [Problem(source, f"not valid JSON: {e}")]


def scan_json(path: Path, limits: Limits = DEFAULT_LIMITS) -> Loaded:
    """One Document stored as a JSON file; image paths are relative to its folder."""
    obj, problems = _read_json_file(path)
    if problems:
        return Loaded(str(path), None, problems)
    root = path.parent
    return _load_obj(obj, lambda src: _read_inside(root, src, limits), str(path), limits)


def scan_jsonl(path: Path, limits: Limits = DEFAULT_LIMITS) -> Iterator[Loaded]:
    """One Document per line; image paths are relative to the manifest's folder."""
    root = path.parent
    try:
        handle = open(path, "rb")
    except OSError as e:
        yield Loaded(str(path), None, [Problem(str(path), f"cannot read: {e.strerror or e}")])
        return
    with handle:
        for number, raw in enumerate(handle, start=1):
            source = f"{path}:{number}"
            if not raw.strip():
                continue
            if len(raw) > MAX_DOC_JSON_BYTES:
                yield Loaded(source, None, [Problem(source, f"line of {len(raw)} bytes exceeds the limit")])
                continue
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError) as e:
                yield Loaded(source, None, [Problem(source, f"not valid JSON: {e}")])
                continue
            yield _load_obj(obj, lambda src: _read_inside(root, src, limits), source, limits)


def _tar_members(path: Path, limits: Limits) -> Iterator[dict[str, Any]]:
    # Our own member reader (regular files only, size-checked before reading) feeds
    # webdataset's grouping, so a hostile shard cannot make us read a huge member into memory.
    with tarfile.open(path, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            if info.size > max(limits.max_image_bytes, MAX_DOC_JSON_BYTES):
                yield {"fname": info.name, "data": None, "__url__": str(path),
                       "__error__": f"member of {info.size} bytes exceeds the size limit"}
                continue
            handle = tar.extractfile(info)
            yield {"fname": info.name, "data": handle.read() if handle else b"", "__url__": str(path)}


def scan_shard(path: Path, limits: Limits = DEFAULT_LIMITS) -> Iterator[Loaded]:
    """A webdataset shard: one sample = `KEY.json` + its images `KEY.N.png` / `KEY.N.jpg`."""
    from webdataset.tariterators import group_by_keys

    errors: dict[str, str] = {}

    def members() -> Iterator[dict[str, Any]]:
        for member in _tar_members(path, limits):
            if member.get("__error__"):
                errors[member["fname"]] = member["__error__"]
                member = {**member, "data": b""}
            yield {k: v for k, v in member.items() if k != "__error__"}

    try:
        for sample in group_by_keys(members()):
            key = sample.get("__key__", "?")
            source = f"{path}:{key}"
            bad = [f"{name}: {reason}" for name, reason in errors.items() if name.startswith(f"{key}.")]
            if bad:
                yield Loaded(source, None, [Problem(source, "; ".join(bad))])
                continue
            raw = sample.get("json")
            if raw is None:
                members_seen = sorted(k for k in sample if not k.startswith("__"))
                yield Loaded(source, None, [Problem(
                    source, f"sample has no '{key}.json' member (found: {', '.join(members_seen) or 'nothing'})")])
                continue
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError) as e:
                yield Loaded(source, None, [Problem(source, f"'{key}.json' is not valid JSON: {e}")])
                continue

            def read_member(src: str, sample: dict = sample, key: str = key) -> bytes:
                data = sample.get(src.lower())
                if data is None or src.startswith("__") or src == "json":
                    raise ImageRefused(f"shard sample has no member '{key}.{src}'")
                return data

            yield _load_obj(obj, read_member, source, limits)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        yield Loaded(str(path), None, [Problem(str(path), f"not a readable tar shard: {e}")])


SUFFIXES = (".json", ".jsonl", ".tar")


def scan(path: str | os.PathLike, limits: Limits = DEFAULT_LIMITS) -> Iterator[Loaded]:
    """Every sample under `path`: a Document folder, `.json`, `.jsonl`, `.tar`, or a folder tree
    of these (walked in sorted order, symlinked folders not followed)."""
    path = Path(path)
    if not path.exists():
        yield Loaded(str(path), None, [Problem(str(path), "no such file or folder")])
        return
    if path.is_dir():
        if (path / DOC_FILE).is_file():
            yield scan_json(path / DOC_FILE, limits)
            return
        found = False
        for dirpath, dirnames, filenames in os.walk(path):
            # Hidden folders include the temporaries of interrupted atomic writes.
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            here = Path(dirpath)
            if DOC_FILE in filenames:
                dirnames.clear()  # a document folder's subfolders hold its images
                found = True
                yield scan_json(here / DOC_FILE, limits)
                continue
            for name in sorted(filenames):
                if name.startswith(".") or not name.endswith(SUFFIXES):
                    continue
                found = True
                yield from scan(here / name, limits)
        if not found:
            yield Loaded(str(path), None, [Problem(
                str(path), f"no documents found (looked for {DOC_FILE}, *.json, *.jsonl, *.tar)")])
        return
    if path.suffix == ".jsonl":
        yield from scan_jsonl(path, limits)
    elif path.suffix == ".tar":
        yield from scan_shard(path, limits)
    elif path.suffix == ".json":
        yield scan_json(path, limits)
    else:
        yield Loaded(str(path), None, [Problem(
            str(path), f"unknown file type {path.suffix or '(none)'}: expected a folder, .json, .jsonl or .tar")])


def iter_documents(path: str | os.PathLike, limits: Limits = DEFAULT_LIMITS) -> Iterator[Document]:
    """Valid Documents under `path`; raises DocumentError at the first invalid sample."""
    for loaded in scan(path, limits):
        if loaded.problems:
            raise DocumentError(loaded.problems)
        assert loaded.document is not None
        yield loaded.document


def load_folder(path: str | os.PathLike, limits: Limits = DEFAULT_LIMITS) -> Document:
    path = Path(path)
    target = path / DOC_FILE if path.is_dir() else path
    loaded = scan_json(target, limits)
    if loaded.problems:
        raise DocumentError(loaded.problems)
    assert loaded.document is not None
    return loaded.document


# ---------------------------------------------------------------------- writing
def _stored_dict(doc: Document, image_src: Callable[[int, ImageSegment, str], str]) -> tuple[dict, list[tuple[str, bytes]]]:
    """The Document's dict with image `src` rewritten to where its bytes will be stored."""
    problems = doc.validate()
    if problems:
        raise DocumentError(problems)
    record = doc.to_dict()
    files: list[tuple[str, bytes]] = []
    image_number = 0
    for i, segment in enumerate(doc.segments):
        if not isinstance(segment, ImageSegment):
            continue
        data = image_bytes(segment)
        if data is None:
            if segment.src is not None:
                raise TapestryError(
                    f"document {doc.id!r} segments[{i}]: image {segment.src!r} has no pixels loaded; "
                    "load the document from disk (or set .image) before saving it elsewhere")
            image_number += 1
            continue
        extension = FORMAT_EXTENSIONS.get(image_format(data), "png")
        src = image_src(image_number, segment, extension)
        record["segments"][i]["src"] = src
        files.append((src, data))
        image_number += 1
    return record, files


def _folder_image_name(number: int, segment: ImageSegment, extension: str) -> str:
    stem = f"{number}-{segment.name}" if segment.name else f"{number}"
    return f"images/{stem}.{extension}"


def save_folder(doc: Document, path: str | os.PathLike, extra_files: dict[str, bytes] | None = None,
                overwrite: bool = False, writer: str = "tapestry save_folder") -> Path:
    """Write `path/doc.json` and `path/images/*` (plus `extra_files`, name -> bytes, such as a
    viewer page). A folder that `writer` wrote earlier is replaced atomically; one holding any
    other file is refused (OutputFolderError) unless `overwrite`."""
    path = Path(path)
    record, files = _stored_dict(doc, _folder_image_name)
    files = files + sorted((extra_files or {}).items())
    with output_dir(path, writer, overwrite) as tmp:
        for src, data in files:
            target = tmp / src
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (tmp / DOC_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def save_jsonl(docs: Iterable[Document], path: str | os.PathLike) -> Path:
    """A manifest `path` with one Document per line; images go to `<stem>.images/NNNNNN/`."""
    path = Path(path)
    image_root = path.parent / f"{path.stem}.images"
    lines: list[str] = []
    for n, doc in enumerate(docs):
        folder = f"{image_root.name}/{n:06d}"
        record, files = _stored_dict(
            doc, lambda k, seg, ext, folder=folder: f"{folder}/{_folder_image_name(k, seg, ext)[7:]}")
        for src, data in files:
            atomic_write_bytes(path.parent / src, data)
        lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write_bytes(path, ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))
    return path


def shard_key(n: int) -> str:
    # webdataset splits a member name at its first dot, so ids (which may hold dots) are not keys.
    return f"{n:08d}"


def save_shard(docs: Iterable[Document], path: str | os.PathLike, start: int = 0) -> Path:
    """A webdataset shard: sample `KEY` = `KEY.json` + `KEY.N.png|jpg|webp` (N = image number)."""
    import webdataset as wds

    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False, mtime=0.0)
            try:
                for n, doc in enumerate(docs, start=start):
                    record, files = _stored_dict(doc, lambda k, seg, ext: f"{k}.{ext}")
                    sample: dict[str, Any] = {"__key__": shard_key(n),
                                              "json": json.dumps(record, ensure_ascii=False).encode("utf-8")}
                    for src, data in files:
                        sample[src] = data
                    writer.write(sample)
            finally:
                writer.close()
    return path
