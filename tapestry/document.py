"""Document: the one data format of tapestry (DESIGN §3).

A Document is a list of segments, each text or an image. Text may hold image slots
(``<img:name/>`` or ``[img1]``, see `tapestry.markup`) so an image can stand inside a sentence.
An image segment bound to a slot is read at the slot; an unbound one is read where it stands.

Validation collects *every* problem with its location instead of stopping at the first, because
a person fixing a data file wants the whole list at once. Disk formats live in
`tapestry.storage` (which imports this module, never the other way round); image limits and
safe decoding in `tapestry.images`.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from PIL import Image

from tapestry.errors import DocumentError, MarkupError, Problem, TapestryError
from tapestry.images import DEFAULT_LIMITS, Limits  # noqa: F401  (re-exported: they lived here)
from tapestry.markup import (
    NAME_PATTERN,
    ORDINAL_PATTERN,
    Slot,
    line_and_column,
    ordinal_phrase,
    ordinal_value,
    replace_slots,
    scan_slots,
)

ImageRole = Literal["reference", "context", "target"]
TextRole = Literal["context", "target"]
IMAGE_ROLES: tuple[str, ...] = ("reference", "context", "target")
TEXT_ROLES: tuple[str, ...] = ("context", "target")
MEMORY = "<memory>"
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")





@dataclass
class TextSegment:
    text: str
    role: TextRole = "context"  # "target": text the model should produce (e.g. an answer)

    type: str = field(default="text", init=False, repr=False)


@dataclass
class ImageSegment:
    role: ImageRole = "context"
    name: str | None = None
    src: str | None = None  # path relative to the document's folder (or a shard member)
    image: Image.Image | None = field(default=None, repr=False, compare=False)
    width: int | None = None
    height: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # The file's original bytes when loaded from disk, so saving does not re-encode a JPEG.
    encoded: bytes | None = field(default=None, repr=False, compare=False)

    type: str = field(default="image", init=False, repr=False)

    @property
    def has_pixels(self) -> bool:
        return self.image is not None or self.encoded is not None or self.src is not None


Segment = Union[TextSegment, ImageSegment]


@dataclass
class Binding:
    """A slot in text segment `segment` bound to image segment `image_segment`."""

    segment: int
    slot: Slot
    image_segment: int


@dataclass
class Document:
    id: str
    segments: list[Segment]
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ views
    def images(self) -> list[ImageSegment]:
        return [s for s in self.segments if isinstance(s, ImageSegment)]

    def image_indices(self) -> list[int]:
        return [i for i, s in enumerate(self.segments) if isinstance(s, ImageSegment)]

    def texts(self) -> list[TextSegment]:
        return [s for s in self.segments if isinstance(s, TextSegment)]

    def bindings(self) -> list[Binding]:
        """Every slot bound to its image; raises MarkupError when a slot cannot bind."""
        bindings, problems = _bind(self, MEMORY)
        if problems:
            raise MarkupError(problems)
        return bindings

    def reading_order(self) -> list[str | ImageSegment]:
        """Text pieces and images in the order a person reads them (slots resolved in place)."""
        return [item for item, _ in self.reading_order_with_segments()]

    def reading_order_with_segments(self) -> list[tuple[str | ImageSegment, int]]:
        """`reading_order`, each item paired with the index of the segment it comes from."""
        bindings = self.bindings()
        by_segment: dict[int, list[Binding]] = {}
        for b in bindings:
            by_segment.setdefault(b.segment, []).append(b)
        bound = {b.image_segment for b in bindings}
        items: list[tuple[str | ImageSegment, int]] = []
        for i, segment in enumerate(self.segments):
            if isinstance(segment, ImageSegment):
                if i not in bound:
                    items.append((segment, i))
                continue
            cursor = 0
            for b in by_segment.get(i, []):
                if b.slot.start > cursor:
                    items.append((segment.text[cursor : b.slot.start], i))
                items.append((self.segments[b.image_segment], b.image_segment))  # type: ignore[arg-type]
                cursor = b.slot.end
            if cursor < len(segment.text):
                items.append((segment.text[cursor:], i))
        return items

    def layout(self) -> str:
        """'inline' (slots in text), 'image-first' (references lead, no slots) or 'plain'."""
        if any(scan_slots(t.text)[0] for t in self.texts()):
            return "inline"
        first = self.segments[0] if self.segments else None
        if isinstance(first, ImageSegment) and first.role == "reference":
            return "image-first"
        return "plain"

    # ------------------------------------------------------------ validation
    def validate(self, source: str = MEMORY, limits: Limits = DEFAULT_LIMITS) -> list[Problem]:
        """Every problem of this in-memory Document (pixels are checked by the loaders)."""
        return _validate_structure(self, source, limits)

    def check(self, source: str = MEMORY, limits: Limits = DEFAULT_LIMITS) -> "Document":
        problems = self.validate(source, limits)
        if problems:
            raise DocumentError(problems)
        return self

    # ----------------------------------------------------------- conversion
    def to_dict(self) -> dict[str, Any]:
        segments: list[dict[str, Any]] = []
        for s in self.segments:
            if isinstance(s, TextSegment):
                item: dict[str, Any] = {"type": "text", "text": s.text}
                if s.role != "context":
                    item["role"] = s.role
            else:
                item = {"type": "image", "role": s.role}
                for key in ("name", "src", "width", "height"):
                    value = getattr(s, key)
                    if value is not None:
                        item[key] = value
                if s.meta:
                    item["meta"] = copy.deepcopy(s.meta)
            segments.append(item)
        out: dict[str, Any] = {"id": self.id, "segments": segments}
        if self.meta:
            out["meta"] = copy.deepcopy(self.meta)
        return out

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=indent)

    @classmethod
    def from_dict(
        cls, obj: Any, source: str = MEMORY, limits: Limits = DEFAULT_LIMITS
    ) -> "Document":
        """Build and validate; raises DocumentError listing every problem."""
        doc, problems = parse_document(obj, source, limits)
        if problems or doc is None:
            raise DocumentError(problems)
        return doc

    @classmethod
    def from_json(cls, text: str | bytes, source: str = MEMORY, limits: Limits = DEFAULT_LIMITS) -> "Document":
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise DocumentError([Problem(source, f"not valid JSON: {e}")]) from None
        return cls.from_dict(obj, source, limits)

    def copy(self) -> "Document":
        """A deep copy that shares pixel data (images are treated as immutable)."""
        segments: list[Segment] = []
        for s in self.segments:
            if isinstance(s, TextSegment):
                segments.append(TextSegment(s.text, s.role))
            else:
                segments.append(
                    ImageSegment(
                        role=s.role, name=s.name, src=s.src, image=s.image, width=s.width,
                        height=s.height, meta=copy.deepcopy(s.meta), encoded=s.encoded,
                    )
                )
        return Document(self.id, segments, copy.deepcopy(self.meta))


# ---------------------------------------------------------------- parsing dicts
_DOC_KEYS = {"id", "segments", "meta"}
_TEXT_KEYS = {"type", "text", "role"}
_IMAGE_KEYS = {"type", "name", "src", "role", "width", "height", "meta"}


def parse_document(
    obj: Any, source: str = MEMORY, limits: Limits = DEFAULT_LIMITS
) -> tuple[Document | None, list[Problem]]:
    """JSON-like object -> (Document or None, every problem). Never raises on bad input."""
    doc, problems = parse_document_partially(obj, source, limits)
    return (None if problems else doc), problems


def parse_document_partially(
    obj: Any, source: str = MEMORY, limits: Limits = DEFAULT_LIMITS
) -> tuple[Document | None, list[Problem]]:
    """Like `parse_document`, but also returns the Document when only its structure is wrong
    (slots, names, limits), so loaders can go on checking its image files and report those too."""
    if not isinstance(obj, dict):
        return None, [Problem(source, f"a document must be a JSON object, got {_kind(obj)}")]
    sample_id = obj.get("id")
    shown_id = sample_id if isinstance(sample_id, str) else None
    problems: list[Problem] = []

    def add(reason: str, segment: int | None = None, field_name: str | None = None) -> None:
        problems.append(Problem(source, reason, shown_id, segment, field_name))

    for key in sorted(set(obj) - _DOC_KEYS, key=str):
        add(f"unknown field {key!r} (allowed: id, segments, meta)", field_name=str(key))
    if "id" not in obj:
        add("missing field 'id' (a non-empty string naming the sample)", field_name="id")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        add(f"'meta' must be an object, got {_kind(meta)}", field_name="meta")
        meta = {}
    raw_segments = obj.get("segments")
    if raw_segments is None:
        add("missing field 'segments' (a list of text and image segments)", field_name="segments")
        raw_segments = []
    elif not isinstance(raw_segments, list):
        add(f"'segments' must be a list, got {_kind(raw_segments)}", field_name="segments")
        raw_segments = []
    elif len(raw_segments) > limits.max_segments:
        add(f"{len(raw_segments)} segments exceed the limit of {limits.max_segments}", field_name="segments")
        raw_segments = raw_segments[: limits.max_segments]

    # Bad segments become placeholders so the indices of later segments (and of [imgK] slots)
    # stay right and the structural checks below can still report their own problems.
    segments = [_parse_segment(raw, i, add) for i, raw in enumerate(raw_segments)]
    doc = Document(sample_id if isinstance(sample_id, str) else "", segments, meta)
    reported = {(p.segment, p.field) for p in problems}
    for problem in _validate_structure(doc, source, limits):
        if (problem.segment, problem.field) not in reported:
            problems.append(problem)
    return doc, problems


def _parse_segment(raw: Any, i: int, add) -> Segment:
    """A segment from its JSON object; each bad field is reported and replaced by a neutral value."""
    if not isinstance(raw, dict):
        add(f"a segment must be an object, got {_kind(raw)}", i)
        return TextSegment("")
    kind = raw.get("type")
    if kind == "text":
        for key in sorted(set(raw) - _TEXT_KEYS, key=str):
            add(f"unknown field {key!r} of a text segment (allowed: type, text, role)", i, str(key))
        text = raw.get("text")
        role = raw.get("role", "context")
        if not isinstance(text, str):
            add(f"'text' must be a string, got {_kind(text)}", i, "text")
            text = ""
        if role not in TEXT_ROLES:
            add(f"text role must be one of {', '.join(TEXT_ROLES)}, got {role!r}", i, "role")
            role = "context"
        return TextSegment(text, role)
    if kind == "image":
        for key in sorted(set(raw) - _IMAGE_KEYS, key=str):
            add(
                f"unknown field {key!r} of an image segment "
                "(allowed: type, name, src, role, width, height, meta)", i, str(key),
            )
        values = dict(raw)
        role = raw.get("role", "context")
        if role not in IMAGE_ROLES:
            add(f"image role must be one of {', '.join(IMAGE_ROLES)}, got {role!r}", i, "role")
            # Checking a bad role as a target would hide a missing src; as context it would not.
            role = "context"
        for key in ("name", "src"):
            if key in raw and not isinstance(raw[key], str):
                add(f"{key!r} must be a string, got {_kind(raw[key])}", i, key)
                values[key] = None
        for key in ("width", "height"):
            if key in raw and (not isinstance(raw[key], int) or isinstance(raw[key], bool)):
                add(f"{key!r} must be an integer number of pixels, got {_kind(raw[key])}", i, key)
                values[key] = None
        if "meta" in raw and not isinstance(raw["meta"], dict):
            add(f"'meta' must be an object, got {_kind(raw['meta'])}", i, "meta")
            values["meta"] = {}
        return ImageSegment(
            role=role, name=values.get("name"), src=values.get("src"), width=values.get("width"),
            height=values.get("height"), meta=values.get("meta") or {},
        )
    add(f"segment 'type' must be 'text' or 'image', got {raw.get('type')!r}", i, "type")
    return TextSegment("")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


# ------------------------------------------------------------ structural checks
def _validate_structure(doc: Document, source: str, limits: Limits) -> list[Problem]:
    problems: list[Problem] = []
    sample_id = doc.id if isinstance(doc.id, str) and doc.id else None

    def add(reason: str, segment: int | None = None, field_name: str | None = None,
            line: int | None = None, column: int | None = None) -> None:
        problems.append(Problem(source, reason, sample_id, segment, field_name, column, line))

    if not isinstance(doc.id, str) or not doc.id.strip():
        add("'id' must be a non-empty string", field_name="id")
    elif len(doc.id) > 256 or _CONTROL_CHARS.search(doc.id) or "/" in doc.id or "\\" in doc.id:
        add("'id' must be at most 256 characters without control characters or path separators",
            field_name="id")
    if not doc.segments:
        add("a document needs at least one segment", field_name="segments")
    if not isinstance(doc.meta, dict):
        add("'meta' must be a dict", field_name="meta")
    else:
        _check_json_meta(doc.meta, limits, lambda r: add(r, field_name="meta"))

    text_chars = 0
    names: dict[str, int] = {}
    n_images = 0
    for i, s in enumerate(doc.segments):
        if isinstance(s, TextSegment):
            if not isinstance(s.text, str):
                add("'text' must be a string", i, "text")
                continue
            if s.role not in TEXT_ROLES:
                add(f"text role must be one of {', '.join(TEXT_ROLES)}, got {s.role!r}", i, "role")
            text_chars += len(s.text)
        elif isinstance(s, ImageSegment):
            n_images += 1
            if s.role not in IMAGE_ROLES:
                add(f"image role must be one of {', '.join(IMAGE_ROLES)}, got {s.role!r}", i, "role")
            if s.name is not None:
                if not isinstance(s.name, str) or not NAME_PATTERN.fullmatch(s.name):
                    add(f"invalid image name {s.name!r}: use letters, digits, '_', '.', '-' "
                        "(not starting with '.' or '-', at most 64 characters)", i, "name")
                elif s.name in names:
                    add(f"duplicate image name {s.name!r} (also segments[{names[s.name]}])", i, "name")
                else:
                    names[s.name] = i
            if s.src is not None and (not isinstance(s.src, str) or not s.src):
                add("'src' must be a non-empty relative path", i, "src")
            if s.role != "target" and not s.has_pixels:
                add(f"a {s.role} image needs 'src' (a path relative to the document) "
                    "or in-memory pixels", i, "src")
            for key in ("width", "height"):
                value = getattr(s, key)
                if value is not None and (not isinstance(value, int) or not 1 <= value <= limits.max_side):
                    add(f"{key!r} must be between 1 and {limits.max_side} pixels, got {value!r}", i, key)
            if not isinstance(s.meta, dict):
                add("'meta' must be a dict", i, "meta")
            else:
                _check_json_meta(s.meta, limits, lambda r, i=i: add(r, i, "meta"))
        else:
            add(f"a segment must be a TextSegment or ImageSegment, got {type(s).__name__}", i)
    if n_images > limits.max_images:
        add(f"{n_images} images exceed the limit of {limits.max_images} per document", field_name="segments")
    if text_chars > limits.max_text_chars:
        add(f"{text_chars} characters of text exceed the limit of {limits.max_text_chars}",
            field_name="segments")
    if problems:
        return problems
    _, bind_problems = _bind(doc, source)
    return bind_problems


def _check_json_meta(meta: dict, limits: Limits, add) -> None:
    try:
        encoded = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        add(f"metadata must be JSON-serializable: {e}")
        return
    if len(encoded) > limits.max_meta_bytes:
        add(f"metadata of {len(encoded)} bytes exceeds the limit of {limits.max_meta_bytes}")


def _bind(doc: Document, source: str) -> tuple[list[Binding], list[Problem]]:
    """Bind every slot of every text segment to an image segment; collect every mistake."""
    sample_id = doc.id if isinstance(doc.id, str) and doc.id else None
    image_positions = doc.image_indices()
    by_name = {
        s.name: i for i, s in enumerate(doc.segments) if isinstance(s, ImageSegment) and s.name
    }
    bindings: list[Binding] = []
    problems: list[Problem] = []
    bound_at: dict[int, tuple[int, int, int]] = {}  # image segment -> (text segment, line, column)
    for i, s in enumerate(doc.segments):
        if not isinstance(s, TextSegment):
            continue
        first_of_segment = len(problems)
        slots, issues = scan_slots(s.text)
        for issue in issues:
            line, column = line_and_column(s.text, issue.offset)
            problems.append(Problem(source, issue.reason, sample_id, i, "text", column,
                                    line if "\n" in s.text else None))
        for slot in slots:
            line, column = line_and_column(s.text, slot.start)
            shown_line = line if "\n" in s.text else None
            if slot.index is not None:
                if slot.index > len(image_positions):
                    problems.append(Problem(
                        source,
                        f"slot {slot.markup} is out of range: the document has "
                        f"{len(image_positions)} image(s)",
                        sample_id, i, "text", column, shown_line))
                    continue
                target = image_positions[slot.index - 1]
            else:
                if slot.name not in by_name:
                    known = ", ".join(sorted(by_name)) or "none"
                    problems.append(Problem(
                        source, f"slot {slot.markup} names an unknown image (known names: {known})",
                        sample_id, i, "text", column, shown_line))
                    continue
                target = by_name[slot.name]
            if target in bound_at:
                other_seg, other_line, other_col = bound_at[target]
                where = f"segments[{other_seg}] column {other_col}"
                problems.append(Problem(
                    source,
                    f"slot {slot.markup} binds an image already bound at {where}; "
                    "each image stands in one place",
                    sample_id, i, "text", column, shown_line))
                continue
            bound_at[target] = (i, line, column)
            bindings.append(Binding(i, slot, target))
        # Report a segment's mistakes left to right, as a reader meets them.
        problems[first_of_segment:] = sorted(
            problems[first_of_segment:], key=lambda p: (p.line or 0, p.column or 0))
    return bindings, problems


# --------------------------------------------------------------------- markup
def from_markup(
    text: str,
    images: list[Any] | dict[str, Any] | None = None,
    *,
    id: str = "doc",
    role: ImageRole = "reference",
    meta: dict[str, Any] | None = None,
    source: str = "<markup>",
) -> Document:
    """A Document from ``"A [img1] robot holds a [img2] vase"`` and the images it names.

    `images` is a list (bound in order by ``[imgK]``; named ``img1``, ``img2``, ...) or a dict
    name -> image (bound by ``<img:name/>``, or in insertion order by ``[imgK]``). Each image is a
    PIL image or a path to an image file, loaded and checked now. Every image must be used by a slot.
    """
    if images is None:
        images = []
    if isinstance(images, dict):
        named = list(images.items())
    elif isinstance(images, (list, tuple)):
        named = [(f"img{k}", image) for k, image in enumerate(images, start=1)]
    else:
        raise TapestryError(f"images must be a list or a dict, got {type(images).__name__}")
    segments: list[Segment] = [TextSegment(text)]
    for name, image in named:
        if isinstance(image, Image.Image):
            segments.append(ImageSegment(role=role, name=name, image=image,
                                         width=image.width, height=image.height))
        elif isinstance(image, (str, os.PathLike)):
            from tapestry.images import load_image

            pixels, data = load_image(image)
            segments.append(ImageSegment(role=role, name=name, image=pixels, encoded=data,
                                         width=pixels.width, height=pixels.height))
        else:
            raise TapestryError(f"image {name!r} must be a PIL image or a path, got {type(image).__name__}")
    doc = Document(id, segments, dict(meta or {}))
    problems = doc.validate(source)
    if not problems:
        bound = {b.image_segment for b in doc.bindings()}
        for k, position in enumerate(doc.image_indices(), start=1):
            if position not in bound:
                name = doc.segments[position].name  # type: ignore[union-attr]
                problems.append(Problem(
                    source, f"image {k} ({name!r}) is left unbound: add [img{k}] "
                    "(or <img:" + str(name) + "/>) to the text where it stands, or drop the image",
                    id, position, "name"))
    if problems:
        raise MarkupError(problems)
    return canonical_inline(doc)


def canonical_inline(doc: Document) -> Document:
    """Slots rewritten to ``<img:name/>`` and each bound image placed right after its text.

    Unbound segments keep their relative order. Images without a name get ``img1``, ``img2``…
    (skipping names already taken) so that slots can name them.
    """
    bindings = doc.bindings()
    out = doc.copy()
    _name_unnamed(out, [out.segments[b.image_segment] for b in bindings])  # type: ignore[misc]
    by_segment: dict[int, list[Binding]] = {}
    for b in bindings:
        by_segment.setdefault(b.segment, []).append(b)
    bound = {b.image_segment for b in bindings}
    segments: list[Segment] = []
    for i, s in enumerate(out.segments):
        if i in bound:
            continue
        if isinstance(s, TextSegment) and i in by_segment:
            mine = by_segment[i]
            names = [out.segments[b.image_segment].name for b in mine]  # type: ignore[union-attr]
            s.text = replace_slots(s.text, [b.slot for b in mine], [f"<img:{n}/>" for n in names])
            segments.append(s)
            segments.extend(out.segments[b.image_segment] for b in mine)
        else:
            segments.append(s)
    out.segments = segments
    return out


def _name_unnamed(doc: Document, images: list[ImageSegment]) -> None:
    """Give each unnamed image of `images` the first free name img1, img2, … so slots can name it."""
    taken = {s.name for s in doc.images() if s.name}
    counter = 0
    for image in images:
        if image.name is not None:
            continue
        counter += 1
        while f"img{counter}" in taken:
            counter += 1
        image.name = f"img{counter}"
        taken.add(image.name)


# -------------------------------------------------------------------- layouts
class LayoutError(TapestryError):
    """A Document cannot be converted to the requested layout; the message says why."""


def to_image_first(doc: Document) -> Document:
    """Inline -> image-first: bound references move to the front, slots become 'the first image'.

    Defined when every slot binds a reference image, every reference is bound, and the text does
    not already use ordinal image phrases (they would become ambiguous on the way back).
    """
    doc = canonical_inline(doc)
    bindings = doc.bindings()
    if not bindings:
        raise LayoutError(f"document {doc.id!r} has no image slots: it is not in the inline layout")
    for b in bindings:
        image = doc.segments[b.image_segment]
        if image.role != "reference":  # type: ignore[union-attr]
            raise LayoutError(
                f"document {doc.id!r}: slot {b.slot.markup} in segments[{b.segment}] binds a "
                f"{image.role} image; the image-first layout only moves references")  # type: ignore[union-attr]
    bound = {b.image_segment for b in bindings}
    for i, s in enumerate(doc.segments):
        if isinstance(s, ImageSegment) and s.role == "reference" and i not in bound:
            raise LayoutError(f"document {doc.id!r}: reference segments[{i}] is not bound to a slot")
        if isinstance(s, TextSegment) and ORDINAL_PATTERN.search(s.text):
            phrase = ORDINAL_PATTERN.search(s.text).group(0)  # type: ignore[union-attr]
            raise LayoutError(
                f"document {doc.id!r}: segments[{i}] already says {phrase!r}, which the "
                "image-first layout uses to name images")
    order = {b.image_segment: k for k, b in enumerate(bindings, start=1)}
    by_segment: dict[int, list[Binding]] = {}
    for b in bindings:
        by_segment.setdefault(b.segment, []).append(b)
    leading = [doc.segments[b.image_segment] for b in bindings]
    rest: list[Segment] = []
    for i, s in enumerate(doc.segments):
        if i in bound:
            continue
        if isinstance(s, TextSegment) and i in by_segment:
            mine = by_segment[i]
            phrases = [ordinal_phrase(order[b.image_segment]) for b in mine]
            rest.append(TextSegment(replace_slots(s.text, [b.slot for b in mine], phrases), s.role))
        else:
            rest.append(s)
    out = Document(doc.id, leading + rest, dict(doc.meta))
    # Defined means invertible: surrounding text could, in rare spellings, merge with a phrase.
    try:
        invertible = to_inline(out).to_dict() == doc.to_dict()
    except LayoutError:
        invertible = False
    if not invertible:
        raise LayoutError(f"document {doc.id!r}: the text around its slots would make the ordinal "
                          "phrases ambiguous, so the image-first layout is not defined for it")
    return out


def to_inline(doc: Document) -> Document:
    """Image-first -> inline: each leading reference's ordinal phrase becomes its slot.

    Defined when the document starts with k reference images, has no slots, and each phrase
    'the first image' … (k-th) appears exactly once and no higher ordinal appears.
    """
    if any(scan_slots(t.text)[0] for t in doc.texts()):
        raise LayoutError(f"document {doc.id!r} already has image slots: it is inline")
    k = 0
    while k < len(doc.segments):
        s = doc.segments[k]
        if not (isinstance(s, ImageSegment) and s.role == "reference"):
            break
        k += 1
    if k == 0:
        raise LayoutError(f"document {doc.id!r} does not start with reference images: it is not image-first")
    out = doc.copy()
    leading: list[ImageSegment] = out.segments[:k]  # type: ignore[assignment]
    _name_unnamed(out, leading)
    found: dict[int, int] = {}  # ordinal -> segment index within out.segments
    matches: dict[int, list[tuple[int, int, int]]] = {}  # segment -> (start, end, ordinal)
    for i in range(k, len(out.segments)):
        s = out.segments[i]
        if not isinstance(s, TextSegment):
            continue
        for m in ORDINAL_PATTERN.finditer(s.text):
            value = ordinal_value(m.group(1))
            if ordinal_phrase(value) != m.group(0):
                continue  # a non-canonical spelling ("the 3rd image") is ordinary text
            if value > k:
                raise LayoutError(f"document {doc.id!r}: segments[{i}] says {m.group(0)!r} "
                                  f"but only {k} reference image(s) lead the document")
            if value in found:
                raise LayoutError(f"document {doc.id!r}: {m.group(0)!r} appears more than once")
            found[value] = i
            matches.setdefault(i, []).append((m.start(), m.end(), value))
    missing = [ordinal_phrase(v) for v in range(1, k + 1) if v not in found]
    if missing:
        raise LayoutError(f"document {doc.id!r}: the text never names {', '.join(map(repr, missing))}")
    segments: list[Segment] = []
    for i in range(k, len(out.segments)):
        s = out.segments[i]
        if isinstance(s, TextSegment) and i in matches:
            mine = matches[i]
            slots = [Slot(a, b, name=leading[v - 1].name) for a, b, v in mine]
            text = replace_slots(s.text, slots, [f"<img:{leading[v - 1].name}/>" for _, _, v in mine])
            segments.append(TextSegment(text, s.role))
            segments.extend(leading[v - 1] for _, _, v in mine)
        else:
            segments.append(s)
    out.segments = segments
    return out
