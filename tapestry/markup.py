"""Image-slot markup: where an image stands inside a sentence.

Two spellings, one meaning:

- ``[img1]`` binds the first image of the document (ordered, 1-based), the form people type:
  ``A [img1] robot holds a [img2] vase``.
- ``<img:cat/>`` binds the image segment named ``cat``, the canonical stored form.

The scanner never stops at the first mistake: it returns every slot it understood and every
problem with its character offset, so a caller can report them all with line and column.
Text that merely looks like brackets (``[note]``, ``<b>``) is left alone; only the prefixes
``[img`` and ``<img:`` open a slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ORDERED_OPEN = "[img"
NAMED_OPEN = "<img:"
NAMED_CLOSE = "/>"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")
_NAME_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_DIGITS = set("0123456789")
MAX_INDEX_DIGITS = 6


@dataclass(frozen=True)
class Slot:
    """One image slot found in a text: ``text[start:end]`` is its markup."""

    start: int
    end: int
    index: int | None = None  # 1-based, for [imgK]
    name: str | None = None  # for <img:NAME/>

    @property
    def markup(self) -> str:
        return f"[img{self.index}]" if self.index is not None else f"<img:{self.name}/>"


@dataclass(frozen=True)
class MarkupIssue:
    """A markup mistake at a character offset of the scanned text."""

    offset: int
    reason: str


def scan_slots(text: str) -> tuple[list[Slot], list[MarkupIssue]]:
    """Find every slot in `text` and every malformed one (never raises)."""
    slots: list[Slot] = []
    issues: list[MarkupIssue] = []
    i = 0
    n = len(text)
    while i < n:
        if text.startswith(ORDERED_OPEN, i):
            i = _scan_ordered(text, i, slots, issues)
        elif text.startswith(NAMED_OPEN, i):
            i = _scan_named(text, i, slots, issues)
        else:
            i += 1
    return slots, issues


def _scan_ordered(text: str, start: int, slots: list[Slot], issues: list[MarkupIssue]) -> int:
    j = start + len(ORDERED_OPEN)
    digits_end = j
    while digits_end < len(text) and text[digits_end] in _DIGITS:
        digits_end += 1
    digits = text[j:digits_end]
    if not digits:
        found = _describe(text, j)
        issues.append(MarkupIssue(j, f"expected an image number after '[img' (like [img1]), found {found}"))
        return j
    if digits_end >= len(text) or text[digits_end] != "]":
        found = _describe(text, digits_end)
        issues.append(
            MarkupIssue(digits_end, f"unclosed slot '[img{digits}': expected ']', found {found}")
        )
        return digits_end
    if len(digits) > MAX_INDEX_DIGITS:
        issues.append(MarkupIssue(j, f"image number {digits[:12]}… is too long (at most {MAX_INDEX_DIGITS} digits)"))
        return digits_end + 1
    index = int(digits)
    if index == 0:
        issues.append(MarkupIssue(j, "image numbers start at 1: use [img1] for the first image"))
        return digits_end + 1
    slots.append(Slot(start, digits_end + 1, index=index))
    return digits_end + 1


def _scan_named(text: str, start: int, slots: list[Slot], issues: list[MarkupIssue]) -> int:
    j = start + len(NAMED_OPEN)
    name_end = j
    while name_end < len(text) and text[name_end] in _NAME_CHARS:
        name_end += 1
    name = text[j:name_end]
    if not name:
        found = _describe(text, j)
        issues.append(MarkupIssue(j, f"expected an image name after '<img:' (like <img:cat/>), found {found}"))
        return j
    if not text.startswith(NAMED_CLOSE, name_end):
        found = _describe(text, name_end)
        issues.append(
            MarkupIssue(name_end, f"unclosed slot '<img:{name}': expected '/>', found {found}")
        )
        return name_end
    if not NAME_PATTERN.fullmatch(name):
        issues.append(
            MarkupIssue(j, f"invalid image name {name!r}: use letters, digits, '_', '.', '-' "
                           "(not starting with '.' or '-', at most 64 characters)")
        )
        return name_end + len(NAMED_CLOSE)
    slots.append(Slot(start, name_end + len(NAMED_CLOSE), name=name))
    return name_end + len(NAMED_CLOSE)


def _describe(text: str, offset: int) -> str:
    if offset >= len(text):
        return "end of text"
    return repr(text[offset])


def line_and_column(text: str, offset: int) -> tuple[int, int]:
    """1-based (line, column) of a character offset, as an editor shows it."""
    line = text.count("\n", 0, offset) + 1
    last_newline = text.rfind("\n", 0, offset)
    return line, offset - last_newline


def replace_slots(text: str, slots: list[Slot], replacements: list[str]) -> str:
    """`text` with each slot's markup replaced by the matching string."""
    pieces: list[str] = []
    cursor = 0
    for slot, replacement in zip(slots, replacements, strict=True):
        pieces.append(text[cursor : slot.start])
        pieces.append(replacement)
        cursor = slot.end
    pieces.append(text[cursor:])
    return "".join(pieces)


_ORDINAL_WORDS = [
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
    "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
    "eighteenth", "nineteenth", "twentieth",
]


def ordinal_phrase(k: int) -> str:
    """'the first image' for k=1; numerals past twenty ('the 21st image')."""
    if k < 1:
        raise ValueError(f"ordinal of {k}")
    if k <= len(_ORDINAL_WORDS):
        return f"the {_ORDINAL_WORDS[k - 1]} image"
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"the {k}{suffix} image"


# No word boundaries: a slot glued to a word ("<img:a/>s") becomes "the first images", and the
# way back must still find the phrase.
ORDINAL_PATTERN = re.compile(r"the (" + "|".join(_ORDINAL_WORDS) + r"|[0-9]+(?:st|nd|rd|th)) image")


def ordinal_value(word: str) -> int:
    """Inverse of the ordinal part of `ordinal_phrase`: 'second' -> 2, '21st' -> 21."""
    if word in _ORDINAL_WORDS:
        return _ORDINAL_WORDS.index(word) + 1
    return int(word[:-2])
