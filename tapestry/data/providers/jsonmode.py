"""JSON answers from chat models: lenient extraction, strict checking, a repair retry.

Models wrap JSON in prose or code fences, or return something almost right. `ask_json` pulls the
first JSON value out of the answer, runs the caller's `check` on it (which raises ValueError
with a message a model can act on), and on failure sends the error back once or twice asking
for a corrected answer. What still fails raises `ProviderError('bad-json', ...)`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, TypeVar

from tapestry.data.providers.base import (
    ChatRequest,
    ChatResponse,
    Message,
    Provider,
    ProviderError,
)

T = TypeVar("T")
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def parse_json_answer(text: str) -> Any:
    """The JSON value in a model's answer; ValueError saying why there is none."""
    text = text.strip()
    candidates = [text] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            pass
    # The first balanced {...} or [...] inside prose.
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char in "{[":
            try:
                value, _ = decoder.raw_decode(text, start)
                return value
            except ValueError:
                continue
    shown = text if len(text) <= 120 else text[:117] + "..."
    raise ValueError(f"the answer holds no JSON value: {shown!r}")


def ask_json(provider: Provider, request: ChatRequest, check: Callable[[Any], T],
             repairs: int = 1) -> tuple[T, list[ChatResponse]]:
    """Call, parse, check; on a bad answer, say what was wrong and ask again (`repairs` times).

    Returns the checked value and every response (for usage and provenance)."""
    responses: list[ChatResponse] = []
    current = request
    problem = ""
    for attempt in range(repairs + 1):
        response = provider.chat(current)
        responses.append(response)
        try:
            return check(parse_json_answer(response.text)), responses
        except (ValueError, KeyError, TypeError, IndexError) as e:
            problem = str(e) or type(e).__name__
        if attempt < repairs:
            current = current.followed_by(
                Message.assistant(response.text),
                Message.user(f"Your answer could not be used: {problem}. Reply again with only the "
                             "corrected JSON, no prose and no code fences."))
    raise ProviderError("bad-json", f"{request.task}: still unusable after {repairs} repair "
                        f"request(s): {problem}")
