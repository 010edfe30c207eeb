"""MMFS (MM-Interleaved Eq. 4): the sampling kernel against a dense reference and gradcheck,
causality across images, and the null slot."""

import torch
import torch.nn.functional as F

from tapestry.models.mmi.mmfs import MMFS, GatedMMFS, deform_sample, dense_reference, pixel_centres


def _values(n, m, h, dh, sizes, dtype=torch.float64, seed=0):
    """Per-level value maps of m images: [n, m, h, hh, ww, dh] (channels last)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, m, h, hh, ww, dh, generator=g, dtype=dtype) for hh, ww in sizes]


def grid_sample_reference(values, locations, weights):
    """The kernel's definition through F.grid_sample (zeros padding, align_corners=False): per
    image, level, head and point a bilinear read, weighted, summed over images, levels, points."""
    n, q, h, m, _, k, _ = locations.shape
    out = 0
    for level, value in enumerate(values):
        hh, ww, dh = value.shape[-3:]
        maps = value.permute(0, 1, 2, 5, 3, 4).reshape(n * m * h, dh, hh, ww)
        grid = (2 * locations[:, :, :, :, level] - 1).permute(0, 3, 2, 1, 4, 5).reshape(n * m * h, q, k, 2)
        sampled = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        w = weights[:, :, :, :, level].permute(0, 3, 2, 1, 4).reshape(n * m * h, 1, q, k)
        term = (sampled * w).sum(-1).view(n, m, h, dh, q).sum(1)  # [N, H, Dh, Q]
        out = out + term.permute(0, 3, 1, 2)
    return out


def test_points_on_every_pixel_equal_dense_attention():
    # K = every pixel of the largest level; smaller levels get their pixels plus zero-weight
    # padding points, so one call covers all pixels of all levels of both images.
    n, q, h, m, dh = 2, 3, 2, 2, 4
    sizes = [(4, 5), (2, 3), (1, 2)]
    pixels = [a * b for a, b in sizes]
    values = _values(n, m, h, dh, sizes)
    k = max(pixels)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(n, q, h, m * sum(pixels), generator=g, dtype=torch.float64)
    dense_w = logits.softmax(-1).view(n, q, h, m, sum(pixels)).split(pixels, -1)  # one softmax over all
    locations = torch.zeros(n, q, h, m, len(sizes), k, 2, dtype=torch.float64)
    weights = torch.zeros(n, q, h, m, len(sizes), k, dtype=torch.float64)
    for level, (a, b) in enumerate(sizes):
        locations[:, :, :, :, level, : a * b] = pixel_centres(a, b)
        weights[:, :, :, :, level, : a * b] = dense_w[level]
    sparse = deform_sample(values, locations, weights)
    dense = dense_reference(values, list(dense_w))
    assert sparse.shape == (n, q, h, dh)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)


def test_kernel_equals_grid_sample_everywhere_including_outside_the_maps():
    n, q, h, m, dh, k = 2, 5, 3, 3, 4, 6
    sizes = [(7, 5), (3, 4), (2, 2)]
    values = _values(n, m, h, dh, sizes, seed=4)
    g = torch.Generator().manual_seed(5)
    # a third of the points land outside [0, 1]: partly or wholly off the map, reading zeros
    locations = -0.4 + 1.8 * torch.rand(n, q, h, m, len(sizes), k, 2, generator=g, dtype=torch.float64)
    weights = torch.rand(n, q, h, m, len(sizes), k, generator=g, dtype=torch.float64)
    ours = deform_sample(values, locations, weights)
    torch.testing.assert_close(ours, grid_sample_reference(values, locations, weights), rtol=1e-12, atol=1e-12)
    far = locations.clone()
    far[..., 0] = 3.0  # every point far right of every map
    assert torch.equal(deform_sample(values, far, weights), torch.zeros_like(ours))


def test_sampling_path_gradcheck_float64():
    n, q, h, m, dh, k = 1, 2, 2, 2, 3, 2
    sizes = [(3, 4), (2, 2)]
    values = [v.requires_grad_() for v in _values(n, m, h, dh, sizes)]
    g = torch.Generator().manual_seed(2)
    # away from pixel-centre lines, where bilinear interpolation is not differentiable
    locations = (0.1 + 0.8 * torch.rand(n, q, h, m, len(sizes), k, 2, generator=g, dtype=torch.float64)).requires_grad_()
    weights = torch.rand(n, q, h, m, len(sizes), k, generator=g, dtype=torch.float64).requires_grad_()

    def f(v0, v1, loc, w):
        return deform_sample([v0, v1], loc, w)

    assert torch.autograd.gradcheck(f, (*values, locations, weights), eps=1e-6, atol=1e-5)


def test_whole_mmfs_module_gradcheck_float64():
    torch.manual_seed(0)
    mod = MMFS(dim=8, feature_dim=6, heads=2, levels=2, points=2, max_images=3).double()
    # non-zero offset / logit weights, so gradients flow through the predicted points too
    with torch.no_grad():
        mod.offsets.weight.normal_(0, 0.3)
        mod.logits.weight.normal_(0, 0.3)
    feats = [torch.randn(2, 6, 3, 3, dtype=torch.float64), torch.randn(2, 6, 2, 2, dtype=torch.float64)]
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    visible = torch.tensor([[[False, False], [True, False], [True, True]]])

    def f(x):
        values = [v[None] for v in mod.values(feats)]
        return mod(x, values, visible)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)


def _setup(seed=0, images=3, tokens=5):
    torch.manual_seed(seed)
    mod = MMFS(dim=16, feature_dim=12, heads=4, levels=3, points=2, max_images=8)
    with torch.no_grad():
        mod.logits.weight.normal_(0, 0.5)
        mod.offsets.weight.normal_(0, 0.5)
    feats = [torch.randn(images, 12, s, s) for s in (8, 4, 2)]
    x = torch.randn(1, tokens, 16)
    # token t sees images < t // 2 (tokens 0-1: none, 2-3: image 0, 4: images 0 and 1)
    visible = torch.zeros(1, tokens, images, dtype=torch.bool)
    for t in range(tokens):
        visible[0, t, : t // 2] = True
    return mod, feats, x, visible


def test_a_later_image_never_changes_earlier_tokens_bitwise():
    mod, feats, x, visible = _setup()
    with torch.no_grad():
        out = mod(x, [v[None] for v in mod.values(feats)], visible)
        changed = [f.clone() for f in feats]
        for f in changed:
            f[1:] = torch.randn_like(f[1:]) * 100  # images 1 and 2
        out2 = mod(x, [v[None] for v in mod.values(changed)], visible)
    assert torch.equal(out[0, :4], out2[0, :4])  # tokens that see image 0 at most
    assert not torch.allclose(out[0, 4], out2[0, 4])  # token 4 reads image 1: it must change


def test_tokens_that_see_no_image_read_exactly_zero_as_with_no_images_at_all():
    mod, feats, x, visible = _setup()
    with torch.no_grad():
        out = mod(x, [v[None] for v in mod.values(feats)], visible)
        none = mod(x, [v[None, :0] for v in mod.values(feats)], visible[:, :, :0])
    assert torch.equal(out[0, :2], torch.zeros(2, 16))
    assert torch.equal(none, torch.zeros_like(x))
    assert out[0, 2].abs().sum() > 0


def test_gate_zero_is_identity_bitwise_and_gate_opens_with_training():
    torch.manual_seed(0)
    layer = GatedMMFS(16, 12, heads=4, levels=3, points=2, max_images=4)
    feats = [torch.randn(2, 12, s, s) for s in (8, 4, 2)]
    x = torch.randn(1, 4, 16, requires_grad=True)
    visible = torch.ones(1, 4, 2, dtype=torch.bool)
    values = [v[None] for v in layer.mmfs.values(feats)]
    y = layer(x, values, visible)
    assert torch.equal(y, x)
    y.square().sum().backward()
    assert layer.gate.grad is not None and layer.gate.grad.abs() > 0  # α learns from step one
