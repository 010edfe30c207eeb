"""The LLM-judge client for the papers' protocols, over tapestry.data.providers.

Any OpenAI-compatible chat endpoint that accepts images (vLLM, SGLang, Ollama, hosted APIs) is
configured from the environment: `TAPESTRY_JUDGE_BASE_URL`, `TAPESTRY_JUDGE_MODEL`,
`TAPESTRY_JUDGE_API_KEY` (falling back to `OPENAI_BASE_URL` / `OPENAI_API_KEY`). The provider layer
brings timeouts, retries with back-off (timeouts, connection errors, 429, 5xx, unreadable bodies),
a concurrency limit, a response cache keyed by (model, prompt, image pixel hashes) and a token/cost
budget; `ask_json` brings strict parsing with a repair retry.

What this module adds is the rule of every protocol here: a judgement that failed (retries spent,
answer still malformed after the repair, server refusing) is a `Judgement` with `missing` set to
the reason, and the protocol leaves that criterion out of its averages. It is never a 0. A spent
budget is different: it raises `JudgeBudgetSpent`, the run stops cleanly and can be resumed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tapestry.data.providers import (
    BudgetExhausted,
    ChatRequest,
    Message,
    ProviderConfig,
    ProviderError,
    ask_json,
    make_provider,
)
from tapestry.data.providers.base import Part
from tapestry.errors import TapestryError

ENV_PREFIX = "TAPESTRY_JUDGE"


class JudgeBudgetSpent(TapestryError):
    """The judge's token or cost budget is spent: stop, keep what was judged, resume later."""


@dataclass
class Judgement:
    value: Any = None
    missing: str | None = None  # why there is no value ("http-503: ...", "bad-json: ...")

    @property
    def ok(self) -> bool:
        return self.missing is None


@dataclass(frozen=True)
class JudgeConfig:
    provider: ProviderConfig = field(default_factory=ProviderConfig)
    cache_dir: str | None = None  # response cache folder (None: no cache)
    budget_ledger: str | None = None  # shared budget file, so a resumed run adds to the same totals

    @classmethod
    def from_env(cls, cache_dir: str | os.PathLike | None = None, budget_ledger: str | os.PathLike | None = None,
                 **provider_overrides: Any) -> "JudgeConfig":
        provider = ProviderConfig.from_env("openai", prefix=ENV_PREFIX, **provider_overrides)
        return cls(provider, None if cache_dir is None else str(cache_dir),
                   None if budget_ledger is None else str(budget_ledger))


class Judge:
    """Asks one question, returns a checked value or the reason there is none."""

    def __init__(self, provider, repairs: int = 1, temperature: float = 0.0):
        self.provider = provider
        self.model = provider.model
        self.repairs = repairs
        self.temperature = temperature

    @classmethod
    def from_config(cls, config: JudgeConfig) -> "Judge":
        provider = make_provider(config.provider, cache_dir=config.cache_dir,
                                 budget_ledger=Path(config.budget_ledger) if config.budget_ledger else None)
        return cls(provider, repairs=config.provider.repairs)

    def usage(self) -> dict[str, float]:
        return dict(getattr(self.provider, "usage", {}))

    def ask(self, task: str, system: str, content: list[Part], check: Callable[[Any], Any],
            prompt_version: str = "1", max_tokens: int = 1024) -> Judgement:
        request = ChatRequest([Message.system(system), Message.user(*content)], json_mode=True,
                              max_tokens=max_tokens, temperature=self.temperature, task=task,
                              prompt_version=prompt_version)
        try:
            value, _ = ask_json(self.provider, request, check, self.repairs)
        except BudgetExhausted as e:
            raise JudgeBudgetSpent(f"judge budget spent: {e.message}") from None
        except ProviderError as e:
            return Judgement(missing=f"{e.code}: {e.message}")
        return Judgement(value=value)


# ------------------------------------------------------------ answer checks
def _number(value: Any, where: str, lo: float, hi: float, integer: bool) -> float:
    if isinstance(value, dict):  # {"Score": 7, "Justification": ...} (OpenING's answer shape)
        value = value.get("score", value.get("Score"))
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{where} must be a number from {lo:g} to {hi:g}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number from {lo:g} to {hi:g}, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{where} must be from {lo:g} to {hi:g}, got {value}")
    if integer and float(value) != int(value):
        raise ValueError(f"{where} must be a whole number from {lo:g} to {hi:g}, got {value}")
    return float(value)


def scores_check(keys: list[str], lo: float, hi: float, integer: bool = True,
                 container: str | None = None) -> Callable[[Any], dict[str, float]]:
    """Checks a JSON object holding a number in [lo, hi] for every key (inside `container` when
    given); the error message names what is wrong so the repair request can fix it."""

    def check(answer: Any) -> dict[str, float]:
        obj = answer.get(container) if (container and isinstance(answer, dict)) else answer
        if not isinstance(obj, dict):
            where = f'an object under "{container}"' if container else "a JSON object"
            raise ValueError(f"expected {where} with keys {keys}")
        absent = [k for k in keys if k not in obj]
        if absent:
            raise ValueError(f"keys missing: {absent}; give a score for each of {keys}")
        return {k: _number(obj[k], k, lo, hi, integer) for k in keys}

    return check


def yes_no_check(count: int) -> Callable[[Any], list[bool]]:
    """{"answers": ["yes" | "no", ...]} with exactly `count` answers."""

    def check(answer: Any) -> list[bool]:
        items = answer.get("answers") if isinstance(answer, dict) else None
        if not isinstance(items, list) or len(items) != count:
            raise ValueError(f'expected {{"answers": [...]}} with exactly {count} "yes"/"no" items')
        out = []
        for k, item in enumerate(items):
            word = str(item).strip().lower().rstrip(".")
            if word not in ("yes", "no"):
                raise ValueError(f'answers[{k}] must be "yes" or "no", got {item!r}')
            out.append(word == "yes")
        return out

    return check
