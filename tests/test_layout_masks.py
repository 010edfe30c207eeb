import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tapestry.layout import Span, block_mask, block_mask_to_dense, check_spans, dense_mask

C, FU, N = "causal", "full", "noise"


@st.composite
def layouts(draw, length=None, max_len=200):
    """Random rows: documents of random spans; an exact length when `length` is given."""
    total = length if length is not None else draw(st.integers(1, max_len))
    n_cuts = draw(st.integers(0, min(10, total - 1)))
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), min_size=n_cuts, max_size=n_cuts))) if total > 1 else []
    bounds = [0, *cuts, total]
    spans, doc = [], 0
    for a, b in zip(bounds, bounds[1:]):
        if spans and draw(st.booleans()) and draw(st.booleans()):
            doc += 1
        spans.append(Span(a, b, draw(st.sampled_from([C, FU, N])), doc))
    return spans


def test_rules_by_hand():
    # doc 0: text(2) image(2, full) noise(2) text(1); doc 1: text(2)
    spans = [Span(0, 2, C, 0), Span(2, 4, FU, 0), Span(4, 6, N, 0), Span(6, 7, C, 0), Span(7, 9, C, 1)]
    expected = torch.tensor(
        [
            # 0  1  2  3  4  5  6  7  8
            [1, 0, 0, 0, 0, 0, 0, 0, 0],  # text: causal
            [1, 1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0],  # full image: bidirectional within
            [1, 1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0, 0],  # noise: sees earlier clean tokens and itself
            [1, 1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 1, 0, 0],  # later text never sees the noise span
            [0, 0, 0, 0, 0, 0, 0, 1, 0],  # doc 1 never sees doc 0
            [0, 0, 0, 0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(dense_mask(spans), expected)
    assert torch.equal(dense_mask(spans, rows=(4, 7)), expected[4:7])
    for bs in (1, 2, 3, 4, 16):
        assert torch.equal(block_mask_to_dense(block_mask(spans, block_size=bs))[0, 0], expected)


def test_invalid_layouts_are_refused():
    with pytest.raises(ValueError, match="span mode must be one of"):
        Span(0, 3, "bidirectional")
    with pytest.raises(ValueError, match="0 <= start < end"):
        Span(3, 3, C)
    with pytest.raises(ValueError, match="expected 2"):
        check_spans([Span(0, 2, C), Span(3, 5, C)])
    with pytest.raises(ValueError, match="document 0 is split"):
        check_spans([Span(0, 2, C, 0), Span(2, 4, C, 1), Span(4, 5, C, 0)])
    with pytest.raises(ValueError, match="at least one span"):
        check_spans([])


def _reference_block_kinds(dense: torch.Tensor, bs: int):
    """Per block pair from the dense mask: (any visible, all visible and the block is whole)."""
    length = dense.shape[0]
    n = -(-length // bs)
    pad = n * bs - length
    tiles = F.pad(dense, (0, pad, 0, pad)).view(n, bs, n, bs)  # padding counts as "not visible"
    return tiles.any(3).any(1), tiles.all(3).all(1)


def _block_flags(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    n = idx.shape[-1]
    flags = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        flags[i, idx[0, 0, i, : num[0, 0, i]].long()] = True
    return flags


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spans=layouts(), bs=st.sampled_from([1, 3, 4, 8, 16, 128]))
def test_block_mask_equals_dense_mask(spans, bs):
    dense = dense_mask(spans)
    bm = block_mask(spans, block_size=bs)
    assert torch.equal(block_mask_to_dense(bm)[0, 0], dense)
    # the block classification is exact: no block that could be skipped is listed, and every
    # whole block that is all visible skips the mask_mod
    anyv, allv = _reference_block_kinds(dense, bs)
    full = _block_flags(bm.full_kv_num_blocks, bm.full_kv_indices)
    partial = _block_flags(bm.kv_num_blocks, bm.kv_indices)
    assert torch.equal(full, allv)
    assert torch.equal(partial, anyv & ~allv)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(60, 90).flatmap(lambda n: st.lists(layouts(length=n), min_size=2, max_size=3)))
def test_batched_block_mask_keeps_rows_apart(rows):
    bm = block_mask(rows, block_size=8)
    dense = block_mask_to_dense(bm)
    assert dense.shape[:2] == (len(rows), 1)
    for b, spans in enumerate(rows):
        assert torch.equal(dense[b, 0], dense_mask(spans))


def test_every_token_sees_itself():
    # softmax over an empty row would be NaN; the rules guarantee the diagonal
    spans = [Span(0, 3, N, 0), Span(3, 4, C, 0), Span(4, 9, FU, 1), Span(9, 12, N, 2)]
    assert dense_mask(spans).diagonal().all()


def test_long_block_mask_needs_no_square_tensor():
    # 64k tokens: the dense mask would be 4 GiB of bools; the block mask keeps [n, n] per row
    spans, pos, doc = [], 0, 0
    while pos < 65536:
        for mode, size in ((C, 300), (FU, 256), (N, 256), (FU, 256), (C, 180)):
            end = min(pos + size, 65536)
            if end > pos:
                spans.append(Span(pos, end, mode, doc))
            pos = end
        doc += 1
    bm = block_mask(spans, block_size=128)
    assert bm.kv_indices.shape == (1, 1, 512, 512)
    assert bm.seq_lengths == (65536, 65536)
    assert 0 < int(bm.kv_num_blocks.sum()) < 512 * 512


def _flex_or_skip():
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)
    try:
        probe = torch.randn(1, 1, 16, 8)
        compiled(probe, probe, probe, block_mask=block_mask([Span(0, 16, C)], block_size=16))
    except Exception as exc:  # noqa: BLE001 — any compile failure means "cannot run here"
        pytest.skip(f"flex_attention does not run compiled on this machine: {type(exc).__name__}: {exc}")
    return compiled


@pytest.mark.slow
def test_flex_attention_matches_sdpa_with_dense_mask():
    # flex_attention runs on CPU only compiled and forward-only (DESIGN §15). One length (not a
    # multiple of the block size, so the edge blocks are exercised) keeps it to one compilation.
    flex = _flex_or_skip()
    length, bs = 100, 16

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(spans=layouts(length=length), seed=st.integers(0, 2**16))
    def check(spans, seed):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, 2, length, 16, generator=g) for _ in range(3))
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(spans))
        got = flex(q, k, v, block_mask=block_mask(spans, block_size=bs))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    check()
    if torch.cuda.is_available():  # the GPU path, when this machine has one
        spans = [Span(0, 40, C, 0), Span(40, 72, N, 0), Span(72, 200, FU, 1), Span(200, 256, C, 1)]
        q, k, v = (torch.randn(1, 2, 256, 64, device="cuda") for _ in range(3))
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(spans, device="cuda"))
        got = flex(q, k, v, block_mask=block_mask(spans, block_size=128, device="cuda"))
        torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
