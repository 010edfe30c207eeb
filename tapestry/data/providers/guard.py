"""What every provider gets around it: a response cache on disk, a token/cost budget shared by
all worker processes, and a limit on calls in flight.

- Cache: one JSON file per key (`cache_key`: model, prompt, image pixel hashes, sampling
  settings), written atomically, so parallel workers and reruns share it safely. Only answers
  are cached, never failures.
- Budget: a small ledger file updated under an exclusive `flock`, so two processes (or a killed
  and resumed run) add to the same totals. The check happens before a call, so a run may
  overshoot by the calls already in flight; once spent, every call raises `BudgetExhausted`.
- Concurrency: a semaphore per process (`max_concurrency` calls at once in one worker).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tapestry.atomic import atomic_write_text
from tapestry.data.providers.base import (
    BudgetExhausted,
    ChatRequest,
    ChatResponse,
    Provider,
    ProviderError,
    cache_key,
    estimate_tokens,
)


class ResponseCache:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> ChatResponse | None:
        path = self._path(key)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            return ChatResponse(obj["text"], obj["model"], int(obj.get("prompt_tokens", 0)),
                                int(obj.get("completion_tokens", 0)), cached=True)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing or damaged: ask again

    def put(self, key: str, response: ChatResponse) -> None:
        atomic_write_text(self._path(key), json.dumps(response.to_json(), ensure_ascii=False))


@dataclass
class Budget:
    """Limits on tokens and money over a whole job. `ledger` is the shared file (None: this
    process only). Prices are per million tokens."""

    max_tokens: int | None = None
    max_cost: float | None = None
    price_in: float = 0.0
    price_out: float = 0.0
    ledger: Path | None = None
    _local: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0, "calls": 0})
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def limited(self) -> bool:
        return self.max_tokens is not None or self.max_cost is not None

    @contextlib.contextmanager
    def _totals(self) -> Iterator[dict]:
        with self._lock:
            if self.ledger is None:
                yield self._local
                return
            self.ledger.parent.mkdir(parents=True, exist_ok=True)
            with open(self.ledger, "a+", encoding="utf-8") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    handle.seek(0)
                    raw = handle.read()
                    try:
                        totals = json.loads(raw) if raw.strip() else dict(self._local)
                    except ValueError:
                        totals = dict(self._local)  # a torn write: start the ledger again
                    before = dict(totals)
                    yield totals
                    if totals != before:
                        handle.seek(0)
                        handle.truncate()
                        handle.write(json.dumps(totals))
                        handle.flush()
                        os.fsync(handle.fileno())
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def spent(self) -> dict:
        with self._totals() as totals:
            return dict(totals)

    def check(self) -> None:
        if not self.limited:
            return
        with self._totals() as totals:
            tokens = totals["prompt_tokens"] + totals["completion_tokens"]
            if self.max_tokens is not None and tokens >= self.max_tokens:
                raise BudgetExhausted(f"{tokens} tokens spent of a budget of {self.max_tokens}")
            if self.max_cost is not None and totals["cost"] >= self.max_cost:
                raise BudgetExhausted(f"${totals['cost']:.4f} spent of a budget of ${self.max_cost:.4f}")

    def charge(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._totals() as totals:
            totals["prompt_tokens"] += prompt_tokens
            totals["completion_tokens"] += completion_tokens
            totals["cost"] = round(totals["cost"] + (prompt_tokens * self.price_in
                                                     + completion_tokens * self.price_out) / 1e6, 8)
            totals["calls"] += 1


class Guarded:
    """`provider` with a cache, a budget and a concurrency limit; counts its own usage."""

    def __init__(self, provider: Provider, cache: ResponseCache | None = None,
                 budget: Budget | None = None, max_concurrency: int = 4, repairs: int = 1):
        self.inner = provider
        self.max_concurrency = max(1, max_concurrency)
        self.repairs = repairs  # how many repair requests `ask_json` callers should allow
        self.name = provider.name
        self.model = provider.model
        self.cache = cache
        self.budget = budget or Budget()
        self._slots = threading.BoundedSemaphore(max(1, max_concurrency))
        self._usage_lock = threading.Lock()
        self.usage = self._empty_usage()

    @staticmethod
    def _empty_usage() -> dict[str, float]:
        return {"calls": 0, "cache_hits": 0, "failures": 0, "prompt_tokens": 0,
                "completion_tokens": 0, "seconds": 0.0}

    def take_usage(self) -> dict[str, float]:
        """The usage since the last call (and reset it): one input's share, for its stats."""
        with self._usage_lock:
            usage, self.usage = self.usage, self._empty_usage()
        return usage

    def _count(self, **values: float) -> None:
        with self._usage_lock:
            for key, value in values.items():
                self.usage[key] += value

    def chat(self, request: ChatRequest) -> ChatResponse:
        key = cache_key(self.model, request) if self.cache is not None else ""
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self._count(cache_hits=1)
                return hit
        self.budget.check()
        start = time.perf_counter()
        try:
            with self._slots:
                response = self.inner.chat(request)
        except ProviderError:
            self._count(failures=1, seconds=time.perf_counter() - start)
            raise
        response.seconds = time.perf_counter() - start
        prompt = response.prompt_tokens or estimate_tokens(request)
        completion = response.completion_tokens or max(1, len(response.text) // 4)
        self.budget.charge(prompt, completion)
        self._count(calls=1, prompt_tokens=prompt, completion_tokens=completion, seconds=response.seconds)
        if self.cache is not None:
            self.cache.put(key, response)
        return response
