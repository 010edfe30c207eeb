import math

import pytest
import torch

from tapestry.models.common.norm import RMSNorm
from tapestry.models.common.patches import patchify, unpatchify
from tapestry.models.common.rope import RotaryEmbedding, apply_rope
from tapestry.models.common.sincos import grid_position_ids, sincos_1d, sincos_2d
from tapestry.models.common.timestep import TimestepEmbedder, timestep_features


def test_rmsnorm_matches_formula_and_keeps_dtype():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(8.0))
    x = torch.randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.arange(8.0)
    torch.testing.assert_close(norm(x), expected)
    assert norm.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))
    assert not torch.isclose(score(5, 2), score(5, 3))
    # position 0 is the identity; a shared id (a whole image) gives identical rotations
    c0, s0 = rope(torch.zeros(1, 3, dtype=torch.long))
    torch.testing.assert_close(apply_rope(q.expand(1, 3, 1, 16), c0, s0), q.expand(1, 3, 1, 16))


def test_rope_rotates_halves_like_qwen2():
    rope = RotaryEmbedding(4, theta=100.0)
    cos, sin = rope(torch.tensor([[1]]))
    x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]])
    f = torch.tensor([1.0, 1 / 10.0])  # 1 / 100^(2i/4)
    c, s = torch.cos(f), torch.sin(f)
    expected = torch.tensor([1 * c[0] - 3 * s[0], 2 * c[1] - 4 * s[1], 3 * c[0] + 1 * s[0], 4 * c[1] + 2 * s[1]])
    torch.testing.assert_close(apply_rope(x, cos, sin)[0, 0, 0], expected)


def test_sincos_2d_is_column_then_row():
    table = sincos_2d(16, 5)
    assert table.shape == (25, 16)
    r, c = 3, 2
    torch.testing.assert_close(
        table[r * 5 + c].double(),
        torch.cat([sincos_1d(8, torch.tensor([c]))[0], sincos_1d(8, torch.tensor([r]))[0]]),
        rtol=1e-6, atol=1e-6,
    )
    assert torch.equal(grid_position_ids(2, 3, 5), torch.tensor([0, 1, 2, 5, 6, 7]))
    with pytest.raises(ValueError, match="does not fit"):
        grid_position_ids(6, 1, 5)


def test_timestep_features_cos_first():
    f = timestep_features(torch.tensor([0.0, 0.5]), dim=8)
    assert torch.equal(f[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(f[1, :4], torch.cos(0.5 * freqs))
    assert TimestepEmbedder(32, 8)(torch.rand(3)).shape == (3, 32)


def test_patchify_round_trip_and_order():
    x = torch.randn(2, 3, 6, 4)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 6, 12)
    assert torch.equal(unpatchify(tokens, 2, 3, 2), x)
    # features run (patch-row, patch-col, channel): the first patch's second feature is channel 1
    assert tokens[0, 0, 1] == x[0, 1, 0, 0] and tokens[0, 0, 3] == x[0, 0, 0, 1]
    assert tokens[0, 1, 0] == x[0, 0, 0, 2]  # raster order over the grid
    with pytest.raises(ValueError, match="does not divide"):
        patchify(torch.randn(1, 3, 5, 4), 2)
