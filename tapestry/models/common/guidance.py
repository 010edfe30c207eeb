"""Guidance rules as plain functions over branch predictions (DESIGN §6).

Every rule is a linear combination of velocity predictions made under different conditions.
Branch names say what their context drops, and are shared by all rules so the engine can batch
whatever a rule asks for (`BRANCHES`):

    cond          the full context (text and images)
    uncond        nothing (every text and every given image dropped)
    no_text       images kept, all text dropped (ILLUME-X v(img); Inset v(∅_t, c_v))
    no_last_text  images kept, the last text chunk dropped: the text since the previous image in
                  reading order, whoever wrote it (BAGEL's text branch, DuetGen's negative)
    no_image      text kept, images dropped (BAGEL's image branch)

Rules (`RULES`): `none`; `cfg` (classic CFG against `uncond`: text and images dropped);
`two_condition` (ILLUME-X, alias `illume`); `inset`; `bagel`; `duetgen` (classic CFG against
`no_last_text`: every condition image kept). Everything rule-specific — aliases, default
scales, the interval where guidance is on — lives here, not in the engine.

Predictions are [B, ..., C] with channels last (packed latent tokens [B, N, C]); the BAGEL
renormalizations take norms per sample ("global") or per token over C ("channel").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

RENORM_MODES = ("none", "global", "channel", "text_channel")


def _lerp(base: Tensor, target: Tensor, scale: float) -> Tensor:
    """base + scale·(target − base): one guidance term."""
    return base + scale * (target - base)


def classic_cfg(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """v = v(∅) + s·(v(c) − v(∅))."""
    return _lerp(uncond, cond, scale)


def two_condition(
    cond: Tensor, no_text: Tensor, uncond: Tensor, gamma_txt: float, gamma_img: float
) -> Tensor:
    """ILLUME-X interleaved CFG: v = v(∅) + γ_img·(v(img) − v(∅)) + γ_txt·(v(txt, img) − v(img))."""
    return uncond + gamma_img * (no_text - uncond) + gamma_txt * (cond - no_text)


def inset_two_stage(cond: Tensor, no_text: Tensor, uncond: Tensor, s1: float, s2: float) -> Tensor:
    """Inset: v_bal = v(∅_t, c_v) + s1·(v(c_t, c_v) − v(∅_t, c_v));  v = v(∅) + s2·(v_bal − v(∅)).

    Algebraically the two-condition rule with γ_txt = s1·s2, γ_img = s2 (tested).
    """
    balanced = _lerp(no_text, cond, s1)
    return _lerp(uncond, balanced, s2)


def _norm(v: Tensor, per_channel: bool) -> Tensor:
    # per_channel: one norm per token over C; otherwise one norm per sample over everything.
    if per_channel:
        return torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return torch.linalg.vector_norm(v.flatten(1), dim=1).view(-1, *([1] * (v.dim() - 1)))


def _renorm(guided: Tensor, reference: Tensor, per_channel: bool, renorm_min: float) -> Tensor:
    # Guidance inflates the velocity's magnitude; BAGEL scales it back to at most the conditional
    # prediction's norm (clamped to [renorm_min, 1] so it only ever shrinks).
    scale = (_norm(reference, per_channel) / (_norm(guided, per_channel) + 1e-8)).clamp(
        min=renorm_min, max=1.0
    )
    return guided * scale


def bagel_guidance(
    cond: Tensor,
    no_text: Tensor,
    no_image: Tensor,
    text_scale: float,
    image_scale: float,
    renorm: str = "global",
    renorm_min: float = 0.0,
) -> Tensor:
    """BAGEL: text guidance against the context without its last text, then image guidance against
    the context without images, with an optional renormalization of the result's norm:

    - "global": one scale per sample after both terms;
    - "channel": one scale per token after both terms;
    - "text_channel": per-token renorm of the text-guided velocity only, then image guidance.
    """
    text_guided = _lerp(no_text, cond, text_scale)
    if renorm == "text_channel":
        text_guided = _renorm(text_guided, cond, per_channel=True, renorm_min=renorm_min)
    # scale 1 is the identity; skipping it keeps the result bitwise equal to the text-guided one
    guided = _lerp(no_image, text_guided, image_scale) if image_scale != 1.0 else text_guided
    if renorm in ("global", "channel"):
        guided = _renorm(guided, cond, per_channel=renorm == "channel", renorm_min=renorm_min)
    return guided


# branch -> (which text it drops: None | "all" | "last", whether it drops the given images)
BRANCHES: dict[str, tuple[str | None, bool]] = {
    "cond": (None, False),
    "no_text": ("all", False),
    "no_last_text": ("last", False),
    "no_image": (None, True),
    "uncond": ("all", True),
}

# names people type for a rule -> the rule
ALIASES: dict[str, str] = {"illume": "two_condition"}


def canonical_rule(name: str) -> str:
    """The rule a name (or alias) stands for; unknown names pass through for `_rule` to refuse."""
    return ALIASES.get(name, name)


@dataclass(frozen=True)
class GuidanceRule:
    """What a rule needs: its branches, its scales with defaults (from the papers)."""

    name: str
    branches: tuple[str, ...]
    defaults: Mapping[str, object]
    paper: str


RULES: dict[str, GuidanceRule] = {
    r.name: r
    for r in (
        GuidanceRule("none", ("cond",), {}, "no guidance"),
        GuidanceRule("cfg", ("cond", "uncond"), {"scale": 3.5},
                     "classic CFG against the context without text and images (MM-Interleaved 3.5)"),
        GuidanceRule(
            "two_condition",
            ("cond", "no_text", "uncond"),
            {"gamma_txt": 8.0, "gamma_img": 1.0},
            "ILLUME-X interleaved CFG (best reported γ_txt = 8, γ_img = 1)",
        ),
        GuidanceRule(
            "inset", ("cond", "no_text", "uncond"), {"s1": 4.0, "s2": 1.5}, "Inset two-stage guidance"
        ),
        GuidanceRule(
            "bagel",
            ("cond", "no_last_text", "no_image"),
            {"text_scale": 4.0, "image_scale": 1.5, "renorm": "global", "renorm_min": 0.0},
            "BAGEL text/image CFG with renormalization",
        ),
        # DuetGen: "we keep the visual conditions fixed but remove the final text chunk"; the
        # paper gives no scale, 5.0 here is a choice, not a reported number
        GuidanceRule("duetgen", ("cond", "no_last_text"), {"scale": 5.0},
                     "DuetGen CFG: negative keeps every condition image, drops the last text chunk"),
    )
}

# Guidance is on only while interval[0] < t <= interval[1] (t = 1 is noise); BAGEL uses [0.4, 1].
DEFAULT_INTERVALS: dict[str, tuple[float, float]] = {"bagel": (0.4, 1.0)}


def required_branches(rule: str) -> tuple[str, ...]:
    """The branch predictions `apply_guidance(rule, ...)` needs, in a stable order."""
    return _rule(rule).branches


def _rule(rule: str) -> GuidanceRule:
    rule = canonical_rule(rule)
    if rule not in RULES:
        raise ValueError(f"unknown guidance rule {rule!r}; choose one of {sorted(RULES) + sorted(ALIASES)}")
    return RULES[rule]


def validate_scales(rule: str, **scales) -> dict[str, object]:
    """Fill defaults and check every parameter; returns the complete parameter dict.

    `interval` (lo, hi) is accepted by every rule; it defaults to always-on except for BAGEL.
    """
    spec = _rule(rule)
    rule = spec.name
    allowed = set(spec.defaults) | {"interval"}
    unknown = sorted(set(scales) - allowed)
    if unknown:
        raise ValueError(
            f"guidance rule {rule!r} does not take {unknown}; it takes {sorted(allowed)}"
        )
    params = {**spec.defaults, "interval": DEFAULT_INTERVALS.get(rule, (0.0, 1.0)), **scales}
    for key, value in params.items():
        if key == "renorm":
            if value not in RENORM_MODES:
                raise ValueError(f"renorm must be one of {RENORM_MODES}, got {value!r}")
        elif key == "interval":
            try:
                lo, hi = (float(x) for x in value)
            except (TypeError, ValueError):
                raise ValueError(f"interval must be a pair (lo, hi), got {value!r}") from None
            if not (0.0 <= lo < hi <= 1.0):
                raise ValueError(f"interval must satisfy 0 <= lo < hi <= 1, got ({lo}, {hi})")
            params[key] = (lo, hi)
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{rule} guidance: {key} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"{rule} guidance: {key} must be >= 0, got {value}")
            if key == "renorm_min" and value > 1:
                raise ValueError(f"renorm_min must lie in [0, 1] (a scale clamp), got {value}")
            params[key] = float(value)
    return params


def apply_guidance(
    rule: str, branches: Mapping[str, Tensor], t: float | Tensor, **scales
) -> Tensor:
    """Combine branch predictions into one guided velocity.

    branches: name -> v [B, ..., C] (all the same shape); t: the current time, scalar or [B].
    Outside the guidance interval the conditional prediction is returned unchanged.
    """
    spec = _rule(rule)
    rule = spec.name
    missing = [b for b in spec.branches if b not in branches]
    if missing:
        raise ValueError(
            f"guidance rule {rule!r} needs branches {list(spec.branches)}; missing {missing} "
            f"(given {sorted(branches)})"
        )
    p = validate_scales(rule, **scales)
    v = {name: branches[name] for name in spec.branches}
    shape = v["cond"].shape
    for name, tensor in v.items():
        if tensor.shape != shape:
            raise ValueError(f"branch {name!r} has shape {list(tensor.shape)}, cond has {list(shape)}")

    if rule == "none":
        return v["cond"]
    if rule == "cfg":
        guided = classic_cfg(v["cond"], v["uncond"], p["scale"])
    elif rule == "duetgen":
        guided = classic_cfg(v["cond"], v["no_last_text"], p["scale"])
    elif rule == "two_condition":
        guided = two_condition(v["cond"], v["no_text"], v["uncond"], p["gamma_txt"], p["gamma_img"])
    elif rule == "inset":
        guided = inset_two_stage(v["cond"], v["no_text"], v["uncond"], p["s1"], p["s2"])
    else:  # bagel
        guided = bagel_guidance(
            v["cond"], v["no_last_text"], v["no_image"], p["text_scale"], p["image_scale"],
            p["renorm"], p["renorm_min"],
        )

    lo, hi = p["interval"]
    if (lo, hi) == (0.0, 1.0):
        return guided
    t = torch.as_tensor(t, dtype=torch.float64)
    on = (t > lo) & (t <= hi)
    if on.dim() == 0:
        return guided if bool(on) else v["cond"]
    if on.shape != (shape[0],):
        raise ValueError(f"t must be a scalar or have shape [B] = [{shape[0]}], got {list(on.shape)}")
    on = on.to(guided.device).view(-1, *([1] * (guided.dim() - 1)))
    return torch.where(on, guided, v["cond"])
