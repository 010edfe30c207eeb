"""A deterministic offline provider: answers computed locally from the request's images and hints.

Each task registers a responder beside its prompt (`@offline_responder("captions")`), so the
offline model of a task lives next to the prompt it stands in for. The answers are plain
measurements put into words (colours, brightness, where things moved), returned as the same JSON
text a real model would send, so the whole parsing and checking path runs in tests and dry runs.
Same request, same answer: randomness is seeded from the request itself.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable

from tapestry.data.providers.base import (
    ChatRequest,
    ChatResponse,
    ProviderError,
    cache_key,
    estimate_tokens,
)

Responder = Callable[[ChatRequest, random.Random], str]
RESPONDERS: dict[str, Responder] = {}


def offline_responder(task: str) -> Callable[[Responder], Responder]:
    def register(fn: Responder) -> Responder:
        RESPONDERS[task] = fn
        return fn

    return register


class OfflineProvider:
    name = "offline"

    def __init__(self, model: str = "offline-v1", seed: int = 0,
                 responders: dict[str, Responder] | None = None):
        self.model = model
        self.seed = seed
        self.responders = responders

    def chat(self, request: ChatRequest) -> ChatResponse:
        table = self.responders if self.responders is not None else RESPONDERS
        responder = table.get(request.task)
        if responder is None:
            known = ", ".join(sorted(table)) or "none"
            raise ProviderError("unsupported-task", f"the offline provider has no answer for task "
                                f"{request.task!r} (known: {known})")
        key = cache_key(self.model, request) + str(self.seed)
        rng = random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))
        text = responder(request, rng)
        return ChatResponse(text, self.model, estimate_tokens(request), max(1, len(text) // 4))
