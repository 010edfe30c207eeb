"""Images and latents <-> token rows of flattened patches.

Each patch is flattened in (patch-row, patch-col, channel) order: the order of BAGEL's latent
tokens and of SigLIP's patch embedding stored as a Linear.
"""

from __future__ import annotations

from torch import Tensor


def patchify(x: Tensor, patch: int) -> Tensor:
    # x: [B, C, H, W] -> [B, (H/p)·(W/p), p·p·C], rows of patches in raster order
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"a {h}×{w} input does not divide into {patch}×{patch} patches")
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, h, w, p, p, C]
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: Tensor, patch: int, height: int, width: int) -> Tensor:
    # tokens: [B, h·w, p·p·C] -> [B, C, h·p, w·p]; height, width count patches
    b, n, f = tokens.shape
    if n != height * width or f % (patch * patch):
        raise ValueError(
            f"{n} tokens of {f} features do not form a {height}×{width} grid of {patch}×{patch} patches"
        )
    c = f // (patch * patch)
    x = tokens.reshape(b, height, width, patch, patch, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, height * patch, width * patch)
