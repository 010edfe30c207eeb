"""Model providers for data engines and judges (see `base` for the interface).

    from tapestry.data.providers import ProviderConfig, make_provider
    provider = make_provider(ProviderConfig.from_env("openai"), cache_dir="out/.cache")
    answer, responses = ask_json(provider, request, check)

`ProviderConfig` is a plain picklable description, so worker processes (local or Ray) each
build their own client from it. Environment variables, read by `from_env(kind, prefix)`:
`{PREFIX}_BASE_URL`, `{PREFIX}_MODEL`, `{PREFIX}_API_KEY` (prefix `TAPESTRY_VLM` by default;
`OPENAI_BASE_URL` and `OPENAI_API_KEY` are used when those are unset).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tapestry.data.providers.base import (
    BudgetExhausted,
    ChatRequest,
    ChatResponse,
    Message,
    Provider,
    ProviderError,
)
from tapestry.data.providers.guard import Budget, Guarded, ResponseCache
from tapestry.data.providers.jsonmode import ask_json, parse_json_answer
from tapestry.data.providers.offline import OfflineProvider, offline_responder
from tapestry.data.providers.openai import OpenAICompatible
from tapestry.errors import TapestryError

__all__ = [
    "BudgetExhausted", "ChatRequest", "ChatResponse", "Message", "Provider", "ProviderError",
    "Budget", "Guarded", "ResponseCache", "ask_json", "parse_json_answer", "OfflineProvider",
    "offline_responder", "OpenAICompatible", "ProviderConfig", "make_provider",
]


@dataclass(frozen=True)
class ProviderConfig:
    kind: str = "offline"  # "offline" or "openai"
    model: str = "offline-v1"
    base_url: str | None = None
    api_key: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_s: float = 1.0
    max_concurrency: int = 4  # calls in flight per worker process
    repairs: int = 1  # repair requests after an unusable JSON answer
    send_response_format: bool = True
    max_tokens_budget: int | None = None
    max_cost_budget: float | None = None
    price_in: float = 0.0  # per million prompt tokens
    price_out: float = 0.0  # per million completion tokens
    use_cache: bool = True
    seed: int = 0

    @classmethod
    def from_env(cls, kind: str = "offline", prefix: str = "TAPESTRY_VLM", **overrides: Any) -> "ProviderConfig":
        if kind == "offline":
            return cls(kind="offline", **overrides)
        if kind != "openai":
            raise TapestryError(f"unknown provider {kind!r}: use 'offline' or 'openai'")
        env = os.environ
        base_url = overrides.pop("base_url", None) or env.get(f"{prefix}_BASE_URL") or env.get("OPENAI_BASE_URL")
        model = overrides.pop("model", None) or env.get(f"{prefix}_MODEL")
        api_key = overrides.pop("api_key", None) or env.get(f"{prefix}_API_KEY") or env.get("OPENAI_API_KEY")
        if not base_url:
            raise TapestryError(f"provider 'openai' needs a server: set {prefix}_BASE_URL (for example "
                                "http://localhost:8000/v1 for vLLM) or OPENAI_BASE_URL")
        if not model:
            raise TapestryError(f"provider 'openai' needs a model name: set {prefix}_MODEL")
        return cls(kind="openai", model=model, base_url=base_url, api_key=api_key, **overrides)

    def public(self) -> dict[str, Any]:
        """The settings worth recording in provenance (never the key)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("api_key",)}
        return out


def make_provider(config: ProviderConfig, cache_dir: str | os.PathLike | None = None,
                  budget_ledger: str | os.PathLike | None = None) -> Guarded:
    """The provider `config` describes, with cache (openai only), budget and concurrency limit."""
    inner: Provider
    if config.kind == "offline":
        inner = OfflineProvider(config.model, seed=config.seed)
    elif config.kind == "openai":
        if not config.base_url:
            raise TapestryError("provider 'openai' needs base_url")
        inner = OpenAICompatible(config.base_url, config.model, config.api_key, config.timeout_s,
                                 config.max_retries, config.backoff_s,
                                 send_response_format=config.send_response_format)
    else:
        raise TapestryError(f"unknown provider {config.kind!r}: use 'offline' or 'openai'")
    # Offline answers are cheaper to recompute than to read back.
    cached = cache_dir is not None and config.use_cache and config.kind != "offline"
    cache = ResponseCache(cache_dir) if cached else None  # type: ignore[arg-type]
    budget = Budget(config.max_tokens_budget, config.max_cost_budget, config.price_in, config.price_out,
                    Path(budget_ledger) if budget_ledger is not None else None)
    # Offline answers are computed, not awaited: threads would only compete for the cores.
    concurrency = 1 if config.kind == "offline" else config.max_concurrency
    return Guarded(inner, cache, budget, concurrency, config.repairs)
