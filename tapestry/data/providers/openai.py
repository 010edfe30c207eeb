"""A client for any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, Ollama, hosted
APIs), written on the standard library so it adds no dependency.

Images travel as PNG data URLs in `image_url` content parts. Timeouts, connection errors, 408,
409, 429 and 5xx are retried with exponential back-off and jitter (a `Retry-After` header is
honoured); other 4xx fail at once because asking again would not help. Every failure ends in a
`ProviderError` whose code says what happened (`timeout`, `connection`, `http-429`, `bad-response`).
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from tapestry.data.providers.base import (
    ChatRequest,
    ChatResponse,
    ProviderError,
    png_bytes,
)

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class OpenAICompatible:
    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_s: float = 1.0  # first wait; doubles each retry, with +-25 % jitter
    max_backoff_s: float = 30.0
    send_response_format: bool = True  # some servers reject response_format; turn it off there
    name: str = "openai"

    def _payload(self, request: ChatRequest) -> dict[str, Any]:
        messages = []
        for m in request.messages:
            if all(isinstance(p, str) for p in m.content):
                messages.append({"role": m.role, "content": "\n".join(m.content)})  # type: ignore[arg-type]
                continue
            parts = []
            for p in m.content:
                if isinstance(p, str):
                    parts.append({"type": "text", "text": p})
                else:
                    url = "data:image/png;base64," + base64.b64encode(png_bytes(p)).decode("ascii")
                    parts.append({"type": "image_url", "image_url": {"url": url}})
            messages.append({"role": m.role, "content": parts})
        payload: dict[str, Any] = {"model": self.model, "messages": messages,
                                   "max_tokens": request.max_tokens, "temperature": request.temperature}
        if request.seed is not None:
            payload["seed"] = request.seed
        if request.json_mode and self.send_response_format:
            payload["response_format"] = {"type": "json_object"}
        return payload

    def _post(self, body: bytes) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = _excerpt(e.read() if e.fp else b"")
            hinted = _retry_after(e.headers.get("Retry-After") if e.headers else None)
            raise ProviderError(f"http-{e.code}", f"{url} answered {e.code}: {detail}",
                                retryable=e.code in RETRYABLE_STATUS, retry_after=hinted) from None
        except (socket.timeout, TimeoutError):
            raise ProviderError("timeout", f"{url} did not answer within {self.timeout_s:g} s",
                                retryable=True) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise ProviderError("timeout", f"{url} did not answer within {self.timeout_s:g} s",
                                    retryable=True) from None
            raise ProviderError("connection", f"cannot reach {url}: {reason}", retryable=True) from None
        except (ConnectionError, OSError) as e:
            raise ProviderError("connection", f"cannot reach {url}: {e}", retryable=True) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise ProviderError("bad-response", f"{url} answered with something that is not JSON: "
                                f"{_excerpt(raw)}", retryable=True) from None

    def chat(self, request: ChatRequest) -> ChatResponse:
        body = json.dumps(self._payload(request)).encode("utf-8")
        last: ProviderError | None = None
        for attempt in range(self.max_retries + 1):
            try:
                obj = self._post(body)
                return self._parse(obj)
            except ProviderError as e:
                last = e
                if not e.retryable or attempt == self.max_retries:
                    break
                wait = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.75, 1.25)
                if e.retry_after is not None:
                    wait = min(self.max_backoff_s, max(wait, e.retry_after))
                time.sleep(wait)
        assert last is not None
        if last.retryable and self.max_retries:
            raise ProviderError(last.code, f"{last.message} (after {self.max_retries} retries)")
        raise last

    def _parse(self, obj: Any) -> ChatResponse:
        try:
            choice = obj["choices"][0]
            content = choice["message"]["content"]
            if isinstance(content, list):  # some servers return content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise TypeError("content is not text")
        except (KeyError, IndexError, TypeError) as e:
            raise ProviderError("bad-response", f"no message content in the answer ({e}): "
                                f"{_excerpt(json.dumps(obj).encode())}", retryable=True) from None
        usage = obj.get("usage") or {}
        return ChatResponse(content, str(obj.get("model") or self.model),
                            int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


def _excerpt(raw: bytes, limit: int = 200) -> str:
    text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own back-off
