import math

import pytest
import torch

from tapestry.models.common.guidance import (
    RULES,
    apply_guidance,
    inset_two_stage,
    required_branches,
    two_condition,
    validate_scales,
)


def _t(rows):
    # one sample of packed tokens: [1, N, C]
    return torch.tensor([rows], dtype=torch.float64)


@pytest.mark.parametrize("seed", range(5))
def test_inset_equals_two_condition_with_product_scale(seed):
    g = torch.Generator().manual_seed(seed)
    cond, no_text, uncond = (torch.randn(3, 7, 16, generator=g, dtype=torch.float64) for _ in range(3))
    s1, s2 = (torch.rand(2, generator=g, dtype=torch.float64) * 8).tolist()
    inset = inset_two_stage(cond, no_text, uncond, s1, s2)
    ilx = two_condition(cond, no_text, uncond, gamma_txt=s1 * s2, gamma_img=s2)
    assert torch.allclose(inset, ilx, rtol=1e-12, atol=1e-12)
    # and through the dispatcher with the papers' defaults (s1 = 4, s2 = 1.5  ->  γ_txt = 6, γ_img = 1.5)
    branches = {"cond": cond, "no_text": no_text, "uncond": uncond}
    assert torch.allclose(
        apply_guidance("inset", branches, t=0.5),
        apply_guidance("two_condition", branches, t=0.5, gamma_txt=6.0, gamma_img=1.5),
    )


def test_classic_cfg_and_identity_cases():
    cond, uncond = _t([[1.0, 2.0]]), _t([[0.0, 1.0]])
    out = apply_guidance("cfg", {"cond": cond, "uncond": uncond}, t=0.5, scale=3.0)
    assert torch.equal(out, _t([[3.0, 4.0]]))
    assert torch.equal(apply_guidance("cfg", {"cond": cond, "uncond": uncond}, 0.5, scale=1.0), cond)
    assert torch.equal(apply_guidance("none", {"cond": cond}, 0.5), cond)


def test_bagel_global_renorm_by_hand():
    cond = _t([[3.0, 4.0], [0.0, 1.0]])
    no_text = _t([[0.0, 0.0], [0.0, -1.0]])
    no_image = torch.zeros_like(cond)
    br = {"cond": cond, "no_last_text": no_text, "no_image": no_image}
    # text-guided (scale 2): [[6, 8], [0, 3]]; norm √109 against the conditional's √26
    out = apply_guidance("bagel", br, t=1.0, text_scale=2.0, image_scale=1.0, renorm="global")
    expected = _t([[6.0, 8.0], [0.0, 3.0]]) * math.sqrt(26 / 109)
    assert torch.allclose(out, expected)
    # without renorm the raw guided value comes back
    raw = apply_guidance("bagel", br, t=1.0, text_scale=2.0, image_scale=1.0, renorm="none")
    assert torch.equal(raw, _t([[6.0, 8.0], [0.0, 3.0]]))


def test_bagel_channel_renorm_by_hand():
    cond = _t([[3.0, 4.0], [0.0, 1.0]])
    no_text = _t([[0.0, 0.0], [0.0, -1.0]])
    br = {"cond": cond, "no_last_text": no_text, "no_image": torch.zeros_like(cond)}
    # per token: [6, 8] scaled by 5/10, [0, 3] scaled by 1/3
    out = apply_guidance("bagel", br, t=1.0, text_scale=2.0, image_scale=1.0, renorm="channel")
    assert torch.allclose(out, _t([[3.0, 4.0], [0.0, 1.0]]))
    # renorm_min clamps the shrink factor from below: 0.5 -> 0.8 and 1/3 -> 0.8
    out = apply_guidance(
        "bagel", br, t=1.0, text_scale=2.0, image_scale=1.0, renorm="channel", renorm_min=0.8
    )
    assert torch.allclose(out, _t([[4.8, 6.4], [0.0, 2.4]]))
    # the factor is capped at 1: guidance that shrinks the norm is left alone
    out = apply_guidance("bagel", br, t=1.0, text_scale=0.5, image_scale=1.0, renorm="channel")
    assert torch.allclose(out, _t([[1.5, 2.0], [0.0, 0.0]]))


def test_bagel_text_channel_renorm_by_hand():
    cond = _t([[3.0, 4.0]])
    br = {"cond": cond, "no_last_text": _t([[0.0, 0.0]]), "no_image": _t([[1.0, 0.0]])}
    # text-guided [6, 8] -> renormed per token to [3, 4]; then image guidance (scale 2) against
    # [1, 0] gives [1, 0] + 2·([3, 4] − [1, 0]) = [5, 8], not renormed again
    out = apply_guidance("bagel", br, t=1.0, text_scale=2.0, image_scale=2.0, renorm="text_channel")
    assert torch.allclose(out, _t([[5.0, 8.0]]))
    # "global" renorms after the image term instead: [11, 16] scaled by 5/√377
    out = apply_guidance("bagel", br, t=1.0, text_scale=2.0, image_scale=2.0, renorm="global")
    assert torch.allclose(out, _t([[11.0, 16.0]]) * 5 / math.sqrt(377))


def test_bagel_renorm_is_per_sample():
    cond = torch.tensor([[[3.0, 4.0]], [[30.0, 40.0]]], dtype=torch.float64)
    br = {"cond": cond, "no_last_text": torch.zeros_like(cond), "no_image": torch.zeros_like(cond)}
    out = apply_guidance("bagel", br, t=1.0, text_scale=2.0, image_scale=1.0, renorm="global")
    assert torch.allclose(out, cond)


def test_guidance_interval():
    cond = _t([[1.0, 1.0]])
    br = {"cond": cond, "no_last_text": torch.zeros_like(cond), "no_image": torch.zeros_like(cond)}
    kw = dict(text_scale=3.0, image_scale=1.0, renorm="none")
    assert torch.equal(apply_guidance("bagel", br, t=0.3, **kw), cond)  # default [0.4, 1.0]
    assert torch.equal(apply_guidance("bagel", br, t=0.4, **kw), cond)  # lower end is open
    assert torch.equal(apply_guidance("bagel", br, t=0.41, **kw), 3 * cond)
    assert torch.equal(apply_guidance("bagel", br, t=1.0, **kw), 3 * cond)
    assert torch.equal(apply_guidance("bagel", br, t=0.3, interval=(0.0, 1.0), **kw), 3 * cond)
    # per-sample times switch guidance per sample
    two = {k: v.expand(2, -1, -1) for k, v in br.items()}
    out = apply_guidance("bagel", two, t=torch.tensor([0.2, 0.9]), **kw)
    assert torch.equal(out[0], cond[0]) and torch.equal(out[1], 3 * cond[0])
    # other rules take an interval too
    cfg = apply_guidance("cfg", {"cond": cond, "uncond": 0 * cond}, t=0.9, scale=2.0, interval=(0.0, 0.5))
    assert torch.equal(cfg, cond)


def test_required_branches_cover_every_rule():
    assert required_branches("cfg") == ("cond", "uncond")
    assert required_branches("two_condition") == ("cond", "no_text", "uncond")
    assert required_branches("bagel") == ("cond", "no_last_text", "no_image")
    assert required_branches("duetgen") == ("cond", "no_last_text")
    assert required_branches("illume") == required_branches("two_condition")
    for name, rule in RULES.items():
        x = torch.randn(2, 3, 4)
        out = apply_guidance(name, {b: x for b in rule.branches}, t=0.9)
        assert torch.allclose(out, x)  # all branches equal -> nothing to guide


@pytest.mark.parametrize(
    "rule,kwargs,match",
    [
        ("nope", {}, "unknown guidance rule 'nope'"),
        ("cfg", {"gamma_txt": 2.0}, r"does not take \['gamma_txt'\]"),
        ("cfg", {"scale": -1.0}, "scale must be >= 0"),
        ("cfg", {"scale": float("nan")}, "scale must be a finite number"),
        ("cfg", {"scale": "4"}, "scale must be a finite number"),
        ("inset", {"s1": float("inf")}, "s1 must be a finite number"),
        ("bagel", {"renorm": "layer"}, "renorm must be one of"),
        ("bagel", {"renorm_min": 1.5}, r"renorm_min must lie in \[0, 1\]"),
        ("bagel", {"interval": (0.6, 0.4)}, "0 <= lo < hi <= 1"),
        ("bagel", {"interval": 0.4}, "interval must be a pair"),
    ],
)
def test_invalid_parameters_are_refused(rule, kwargs, match):
    x = torch.zeros(1, 2, 3)
    branches = {b: x for b in ("cond", "uncond", "no_text", "no_last_text", "no_image")}
    with pytest.raises(ValueError, match=match):
        apply_guidance(rule, branches, 0.5, **kwargs)


def test_missing_or_mismatched_branches_are_refused():
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match=r"missing \['no_text'\]"):
        apply_guidance("two_condition", {"cond": x, "uncond": x}, 0.5)
    with pytest.raises(ValueError, match="branch 'uncond' has shape"):
        apply_guidance("cfg", {"cond": x, "uncond": torch.zeros(1, 2, 4)}, 0.5)


def test_duetgen_is_classic_cfg_against_the_negative_without_the_last_text_chunk():
    g = torch.Generator().manual_seed(3)
    cond, negative, uncond = (torch.randn(1, 5, 8, generator=g) for _ in range(3))
    out = apply_guidance("duetgen", {"cond": cond, "no_last_text": negative, "uncond": uncond}, t=0.9, scale=3.0)
    assert torch.allclose(out, negative + 3.0 * (cond - negative))  # uncond is not used
    assert validate_scales("duetgen")["scale"] == 5.0
    assert validate_scales("illume") == validate_scales("two_condition")
