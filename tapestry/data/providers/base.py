"""The provider interface: one chat call with text and images in, text out.

Every model a data engine or a judge calls (VLM, LLM) is reached through `Provider.chat`.
Implementations: `OpenAICompatible` (any server speaking the OpenAI chat-completions API: vLLM,
SGLang, Ollama, hosted APIs) and `OfflineProvider` (deterministic answers computed locally, for
tests and dry runs). `Guarded` adds a response cache, a budget and a concurrency limit to any of
them. A failed call raises `ProviderError` with a short code; callers turn it into a rejected
record, never a crashed run.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, Union

import numpy as np
from PIL import Image

from tapestry.errors import TapestryError

ImageLike = Union[Image.Image, np.ndarray]  # ndarray: [H, W, 3] uint8 RGB
Part = Union[str, ImageLike]


class ProviderError(TapestryError):
    """A model call failed. `code` is short and stable (`timeout`, `http-503`, `bad-json`,
    `budget`, ...) so rejection logs can count it; the message says what happened."""

    def __init__(self, code: str, message: str, retryable: bool = False,
                 retry_after: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after  # seconds a server asked us to wait (Retry-After)


class BudgetExhausted(ProviderError):
    """The token or cost budget is spent: the run should stop cleanly (and can be resumed)."""

    def __init__(self, message: str):
        super().__init__("budget", message)


@dataclass
class Message:
    role: str  # "system", "user" or "assistant"
    content: list[Part]

    @classmethod
    def user(cls, *parts: Part) -> "Message":
        return cls("user", list(parts))

    @classmethod
    def system(cls, text: str) -> "Message":
        return cls("system", [text])

    @classmethod
    def assistant(cls, text: str) -> "Message":
        return cls("assistant", [text])

    def text(self) -> str:
        return "\n".join(p for p in self.content if isinstance(p, str))

    def images(self) -> list[ImageLike]:
        return [p for p in self.content if not isinstance(p, str)]


@dataclass
class ChatRequest:
    messages: list[Message]
    json_mode: bool = False  # ask for a JSON object (response_format where the server has it)
    max_tokens: int = 1024
    temperature: float = 0.0
    seed: int | None = None
    # What the call is for ("captions", "verify-change"...). Offline providers answer by task;
    # real servers never see it, but it names the call in logs and errors.
    task: str = "chat"
    prompt_version: str = "1"
    # Facts an offline responder may use (never sent to a server, not part of the cache key).
    hints: dict[str, Any] = field(default_factory=dict)

    def followed_by(self, *messages: Message) -> "ChatRequest":
        return replace(self, messages=[*self.messages, *messages])

    def images(self) -> list[ImageLike]:
        return [image for m in self.messages for image in m.images()]


@dataclass
class ChatResponse:
    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "model": self.model, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens}


class Provider(Protocol):
    name: str  # "openai", "offline"
    model: str

    def chat(self, request: ChatRequest) -> ChatResponse: ...


def png_bytes(image: ImageLike) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def image_digest(image: ImageLike) -> str:
    """A content hash of the pixels (not of an encoding), for cache keys."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    digest = hashlib.sha256(str(array.shape).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def cache_key(model: str, request: ChatRequest) -> str:
    """(model, prompt, image hashes, sampling settings) -> hex key. Image bytes never enter the
    key, only their pixel hashes, so the key is cheap and stable across encoders."""
    parts = []
    for m in request.messages:
        parts.append({"role": m.role, "content": [p if isinstance(p, str) else {"image": image_digest(p)}
                                                  for p in m.content]})
    blob = json.dumps({"model": model, "messages": parts, "json": request.json_mode,
                       "max_tokens": request.max_tokens, "temperature": request.temperature,
                       "seed": request.seed, "prompt_version": request.prompt_version},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def estimate_tokens(request: ChatRequest, image_tokens: int = 256) -> int:
    """A rough prompt size for budgets when a server does not report usage: ~4 characters per
    token plus a fixed cost per image."""
    chars = sum(len(m.text()) for m in request.messages)
    return chars // 4 + image_tokens * len(request.images())
