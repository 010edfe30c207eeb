"""The project's own error types: everything a user can cause ends in one of these."""

from __future__ import annotations

from dataclasses import asdict, dataclass


class TapestryError(Exception):
    """Base of every error tapestry raises on purpose; its message says what and how to fix it."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input, located as precisely as we can."""

    source: str  # file (and member) the sample came from, or "<memory>"
    reason: str
    sample_id: str | None = None
    segment: int | None = None  # index into Document.segments
    field: str | None = None  # e.g. "text", "src", "role"
    column: int | None = None  # 1-based column inside a text field, for markup errors
    line: int | None = None  # 1-based line inside a text field, when it has several

    def location(self) -> str:
        parts = [self.source]
        if self.sample_id is not None:
            parts.append(f"sample {self.sample_id!r}")
        where = ""
        if self.segment is not None:
            where = f"segments[{self.segment}]"
        if self.field is not None:
            where = f"{where}.{self.field}" if where else self.field
        if where:
            parts.append(where)
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.column is not None:
            parts.append(f"column {self.column}")
        return ": ".join(parts)

    def __str__(self) -> str:
        return f"{self.location()}: {self.reason}"

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


class DocumentError(TapestryError):
    """A Document (or a file holding Documents) is invalid; `problems` lists every reason."""

    def __init__(self, problems: list[Problem]):
        if not problems:
            raise ValueError("DocumentError needs at least one problem")
        self.problems = list(problems)
        head = str(self.problems[0])
        more = f" (and {len(self.problems) - 1} more problem(s))" if len(self.problems) > 1 else ""
        super().__init__(head + more)


class MarkupError(DocumentError):
    """Image-slot markup could not be parsed or bound."""
