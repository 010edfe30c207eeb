"""What every operator shares: a rejection with a stable reason code, and per-stage statistics.

An operator is a frozen dataclass: its fields are its configuration, its class attributes
`name` and `version` go into the provenance of every Document it touched, and its methods are
pure functions of their arguments. Bump `version` whenever a change could alter an output.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass(frozen=True)
class Rejection:
    """Why a record (or a whole input) was not turned into a Document.

    `stage` names the operator, `code` a short stable reason (counted in the rejection log), and
    `detail` the numbers behind it for a person reading the log."""

    stage: str
    code: str
    detail: str = ""
    record: str | None = None  # the record id (window, pair); None for the whole input
    failure: bool = False  # True for things that went wrong (bad file, failed call), not filters

    @property
    def reason(self) -> str:
        return f"{self.stage}:{self.code}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stage": self.stage, "code": self.code}
        if self.detail:
            out["detail"] = self.detail
        if self.record is not None:
            out["record"] = self.record
        if self.failure:
            out["failure"] = True
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Rejection":
        return cls(obj["stage"], obj["code"], obj.get("detail", ""), obj.get("record"),
                   bool(obj.get("failure", False)))


class Rejected(Exception):
    """Raised by an operator step to reject the record it was working on."""

    def __init__(self, stage: str, code: str, detail: str = "", failure: bool = False):
        super().__init__(f"{stage}:{code}: {detail}" if detail else f"{stage}:{code}")
        self.rejection = Rejection(stage, code, detail, failure=failure)


@dataclass
class StageStats:
    """Records in, records out and seconds spent, per stage; summed over inputs and workers."""

    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    # model calls of one input may run in threads; their seconds add up (busy time, not wall time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def _add(self, stage: str, key: str, value: float) -> None:
        with self._lock:
            entry = self.stages.setdefault(stage, {"in": 0, "out": 0, "seconds": 0.0})
            entry[key] = entry.get(key, 0) + value

    def count(self, stage: str, seen: int = 0, kept: int = 0) -> None:
        self._add(stage, "in", seen)
        self._add(stage, "out", kept)

    def add_seconds(self, stage: str, seconds: float) -> None:
        self._add(stage, "seconds", seconds)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add_seconds(stage, time.perf_counter() - start)

    def merge(self, other: "StageStats | dict[str, dict[str, float]]") -> None:
        stages = other.stages if isinstance(other, StageStats) else other
        for stage, values in stages.items():
            for key, value in values.items():
                self._add(stage, key, value)

    def to_json(self) -> dict[str, dict[str, float]]:
        return {stage: {k: (round(v, 4) if k == "seconds" else int(v)) for k, v in values.items()}
                for stage, values in self.stages.items()}


def operator_versions(*operators: Any) -> dict[str, str]:
    """{name: version} of the operators that made a record, for its provenance."""
    return {op.name: op.version for op in operators}


def ask_stage(stage: str, provider: Any, request: Any, check: Any, stats: StageStats, count_kept: bool = True) -> Any:
    """One provider step of a pipeline: the JSON answer `check` accepts (with the provider's repair
    retries), timed and counted under `stage`. A failed call rejects the record with the
    provider's reason; a spent budget stops the run (it is not the record's fault)."""
    from tapestry.data.providers.base import BudgetExhausted, ProviderError
    from tapestry.data.providers.jsonmode import ask_json

    with stats.timed(stage):
        stats.count(stage, seen=1)
        try:
            value, _ = ask_json(provider, request, check, provider.repairs)
        except BudgetExhausted:
            raise
        except ProviderError as e:
            raise Rejected(stage, f"provider-{e.code}", e.message, failure=True) from None
        if count_kept:
            stats.count(stage, kept=1)
    return value
