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
        unseen = mod(x, [v[None] for v in mod.values(feats)], torch.zeros_like(visible))  # images, none visible
    assert torch.equal(out[0, :2], torch.zeros(2, 16))
    assert torch.equal(none, torch.zeros_like(x)) and torch.equal(unseen, torch.zeros_like(x))
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


def eq4_over_every_image(mod, x, values, visible, reference, image_index):
    """MMFS by the paper's formula taken literally: every token against every image of the row,
    the images it may not read masked out of the softmax, sampled by `deform_sample` (the
    module computes only the visible pairs; the two must agree)."""
    b, t, _ = x.shape
    m = values[0].shape[1]
    h, lv, k = mod.heads, mod.levels, mod.points
    q = mod.query(x)[:, :, None] + mod.image_embed(image_index)[:, None]  # q(m): [B, T, M, D]
    offsets = mod.offsets(q).view(b, t, m, h, lv, k, 2).transpose(2, 3)  # [B, T, H, M, L, K, 2] in pixels
    logits = mod.logits(q).view(b, t, m, h, lv * k).masked_fill(~visible[..., None, None], float("-inf"))
    flat = torch.cat([logits.transpose(2, 3).reshape(b, t, h, m * lv * k), mod.null_logit(x).view(b, t, h, 1)], -1)
    weights = flat.softmax(-1)[..., :-1].view(b, t, h, m, lv, k)
    sizes = torch.tensor([[v.shape[-2], v.shape[-3]] for v in values], dtype=x.dtype)  # [L, (w, h)]
    locations = reference[:, :, None, None, None, None, :] + offsets / sizes[:, None, :]
    return mod.out(deform_sample(values, locations, weights).reshape(b, t, -1))


def test_visible_pairs_only_equal_every_image_masked_value_and_gradients():
    # two rows packed with two documents each, as in training: a token sees only the earlier
    # images of its own document, some tokens none; image indices restart per document
    torch.manual_seed(3)
    mod = MMFS(dim=16, feature_dim=12, heads=4, levels=3, points=2, max_images=4).double()
    with torch.no_grad():
        mod.logits.weight.normal_(0, 0.5)
        mod.offsets.weight.normal_(0, 0.5)
    feats = [torch.randn(2 * 5, 12, s, s, dtype=torch.float64) for s in (8, 4, 2)]
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    reference = torch.rand(2, 9, 2, dtype=torch.float64)
    image_index = torch.tensor([[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]])
    visible = torch.zeros(2, 9, 5, dtype=torch.bool)
    visible[0, 2:5, :1], visible[0, 5, :3], visible[0, 7:, 3:5] = True, True, True
    visible[1, 1:3, :1], visible[1, 4:, 1:4] = True, True

    def both():
        values = [v.view(2, 5, *v.shape[1:]) for v in mod.values(feats)]
        return (mod(x, values, visible, reference, image_index),
                eq4_over_every_image(mod, x, values, visible, reference, image_index))

    ours, want = both()
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(ours[0, :2], torch.zeros(2, 16)) and ours[1, 3].abs().sum() == 0  # see no image
    grads = [torch.autograd.grad(out.square().sum(), [x, *mod.parameters()], allow_unused=True, retain_graph=True)
             for out in (ours, want)]
    for a, b in zip(*grads):
        if a is None or b is None:
            assert a is None and b is None or (a if b is None else b).abs().sum() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
