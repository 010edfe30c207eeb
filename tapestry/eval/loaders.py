"""Benchmark files into Documents (EvalSample: prompt, output, golden answer, category).

OpenING (`test_data.jsonl`, one instance a line):
    {"total_uid", "meta_task_name", "subtask_name", ..., "conversations": [
        {"input":  [{"text": "<BEGIN> ... <image>", "image": "./images/.../1-i-1.jpg" | null}, ...]},
        {"output": [{"text": "... <image>", "image": "./images/.../1-o-1.jpg"}, ...]}]}
    `<image>` marks where the item's image stands in its text (the image follows the text when
    there is no marker); `<BEGIN>` is dropped. A model's answers: a folder of `<total_uid>.json`
    files (or one `.jsonl`) in the same shape, images relative to that folder.

ISG-Bench (`ISG-Bench.jsonl`, one entry a line):
    {"id", "Category", "Query": [{"type": "text" | "image", "content": ...}],
     "Golden": [...], "predict": {"structural", "block_qa", "image_qa", ...}}
    A model's answers: JSONL lines {"id", "output": [{"type", "content"}]}.

Image paths are relative to the file's folder and may not leave it. Every problem raises a
DocumentError naming the file and line, the sample id and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from tapestry.document import Document, ImageSegment, TextSegment
from tapestry.errors import DocumentError, Problem
from tapestry.eval.protocols import EvalSample


def _problem(source: str, sample: str | None, field: str, reason: str) -> DocumentError:
    return DocumentError([Problem(source, reason, sample_id=sample, field=field)])


def _lines(path: Path) -> Iterator[tuple[str, dict]]:
    if not path.is_file():
        raise _problem(str(path), None, "file", "not found")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise _problem(where, None, "line", f"not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise _problem(where, None, "line", "expected a JSON object")
            yield where, obj


def _image(root: Path, src: Any, where: str, sample: str, field: str) -> ImageSegment:
    from tapestry.storage import ImageRefused, decode_image, resolve_inside

    if not isinstance(src, str) or not src:
        raise _problem(where, sample, field, f"expected an image path, got {src!r}")
    try:
        path = resolve_inside(root, src.removeprefix("./"))
        if not path.is_file():
            raise ImageRefused(f"image file {src!r} not found under {root}")
        image = decode_image(path.read_bytes())
    except ImageRefused as e:
        raise _problem(where, sample, field, str(e)) from None
    return ImageSegment(image=image, width=image.width, height=image.height)


def _opening_items(items: Any, root: Path, where: str, sample: str, field: str, role: str) -> list:
    if not isinstance(items, list):
        raise _problem(where, sample, field, "expected a list of {\"text\", \"image\"} items")
    segments: list = []
    for k, item in enumerate(items):
        at = f"{field}[{k}]"
        if not isinstance(item, dict) or not isinstance(item.get("text", ""), str):
            raise _problem(where, sample, at, 'expected {"text": str, "image": path | null}')
        text = item.get("text", "").replace("<BEGIN>", "").strip()
        image = item.get("image")
        before, marker, after = text.partition("<image>")
        if marker and image is None:
            raise _problem(where, sample, f"{at}.image", "the text holds <image> but the item has no image")
        for piece, is_image in ((before.strip(), False), (None, image is not None), (after.replace("<image>", "").strip(), False)):
            if is_image:
                segment = _image(root, image, where, sample, f"{at}.image")
                segment.role = role
                segments.append(segment)
            elif piece:
                segments.append(TextSegment(piece, role="target" if role == "target" else "context"))
    return segments


def _conversation(obj: dict, key: str, where: str, sample: str) -> Any:
    conv = obj.get("conversations")
    if not isinstance(conv, list):
        raise _problem(where, sample, "conversations", 'expected [{"input": [...]}, {"output": [...]}]')
    for turn in conv:
        if isinstance(turn, dict) and key in turn:
            return turn[key]
    raise _problem(where, sample, f"conversations.{key}", f"no {key!r} turn")


def load_opening(path: str | Path, predictions: str | Path | None = None) -> list[EvalSample]:
    """OpenING instances (prompt + golden), with a model's answers when `predictions` is given
    (a folder of <total_uid>.json files or a .jsonl; an instance without one has output None)."""
    path = Path(path)
    answers = _opening_predictions(Path(predictions)) if predictions is not None else {}
    samples = []
    for where, obj in _lines(path):
        uid = obj.get("total_uid")
        if not isinstance(uid, (str, int)) or str(uid) == "":
            raise _problem(where, None, "total_uid", "missing or not a string")
        uid = str(uid)
        prompt = Document(uid, _opening_items(_conversation(obj, "input", where, uid), path.parent, where, uid,
                                              "conversations.input", "context"))
        golden = Document(uid, _opening_items(_conversation(obj, "output", where, uid), path.parent, where, uid,
                                              "conversations.output", "target"))
        samples.append(EvalSample(uid, prompt, answers.get(uid), golden, obj.get("meta_task_name"),
                                  {"subtask": obj.get("subtask_name")}))
    return samples


def _opening_predictions(path: Path) -> dict[str, Document]:
    out: dict[str, Document] = {}
    if path.is_dir():
        entries = []
        for file in sorted(path.glob("*.json")):
            try:
                entries.append((str(file), json.loads(file.read_text(encoding="utf-8")), file.stem))
            except ValueError as e:
                raise _problem(str(file), file.stem, "file", f"not valid JSON: {e}") from None
        root = path
    else:
        entries = [(where, obj, None) for where, obj in _lines(path)]
        root = path.parent
    for where, obj, stem in entries:
        uid = str(obj.get("total_uid") or stem or "")
        if not uid:
            raise _problem(where, None, "total_uid", "missing (name the file <total_uid>.json or add the field)")
        out[uid] = Document(uid, _opening_items(_conversation(obj, "output", where, uid), root, where, uid,
                                                "conversations.output", "target"))
    return out


def _isg_blocks(items: Any, root: Path, where: str, sample: str, field: str, role: str) -> list:
    if not isinstance(items, list):
        raise _problem(where, sample, field, 'expected a list of {"type": "text" | "image", "content": ...}')
    segments: list = []
    for k, item in enumerate(items):
        at = f"{field}[{k}]"
        kind = item.get("type") if isinstance(item, dict) else None
        content = item.get("content") if isinstance(item, dict) else None
        if kind == "text" and isinstance(content, str):
            segments.append(TextSegment(content, role="target" if role == "target" else "context"))
        elif kind == "image":
            segment = _image(root, content, where, sample, f"{at}.content")
            segment.role = role
            segments.append(segment)
        else:
            raise _problem(where, sample, at, f'expected {{"type": "text" | "image", "content": ...}}, got {item!r}'[:200])
    return segments


def load_isg(path: str | Path, predictions: str | Path | None = None) -> list[EvalSample]:
    """ISG-Bench entries (Query, Golden, predict graph), with a model's answers from a JSONL of
    {"id", "output": [...]} when `predictions` is given."""
    path = Path(path)
    answers: dict[str, Document] = {}
    if predictions is not None:
        pred_path = Path(predictions)
        for where, obj in _lines(pred_path):
            sid = str(obj.get("id", ""))
            if not sid:
                raise _problem(where, None, "id", "missing")
            answers[sid] = Document(sid, _isg_blocks(obj.get("output"), pred_path.parent, where, sid, "output", "target"))
    samples = []
    for where, obj in _lines(path):
        sid = obj.get("id")
        if not isinstance(sid, (str, int)) or str(sid) == "":
            raise _problem(where, None, "id", "missing or not a string")
        sid = str(sid)
        if not isinstance(obj.get("Category"), str):
            raise _problem(where, sid, "Category", "missing or not a string")
        prompt = Document(sid, _isg_blocks(obj.get("Query"), path.parent, where, sid, "Query", "context"))
        golden = Document(sid, _isg_blocks(obj["Golden"], path.parent, where, sid, "Golden", "target")) \
            if "Golden" in obj else None
        graph = obj.get("predict")
        if graph is not None and not isinstance(graph, dict):
            raise _problem(where, sid, "predict", "expected an object (structural, block_qa, image_qa, ...)")
        samples.append(EvalSample(sid, prompt, answers.get(sid), golden, obj["Category"], {"isg": graph or {}}))
    return samples


def load_documents(path: str | Path) -> list[EvalSample]:
    """tapestry Documents (folders, .json, .jsonl, shards): the target segments are the output,
    the rest the prompt; `meta.questions` (yes/no) and `meta.category` are passed on."""
    from tapestry.storage import scan

    samples = []
    for loaded in scan(path):
        if loaded.document is None:
            raise DocumentError(loaded.problems)
        doc = loaded.document
        prompt = Document(doc.id, [s for s in doc.segments if s.role != "target"], doc.meta)
        output = Document(doc.id, [s for s in doc.segments if s.role == "target"])
        meta = doc.meta if isinstance(doc.meta, dict) else {}
        samples.append(EvalSample(doc.id, prompt, output if output.segments else None, None, meta.get("category"),
                                  {"questions": meta.get("questions")} if meta.get("questions") else {}))
    return samples
