"""Embedding metrics with injected encoders: known cosines, a TorchScript encoder folder, FID/KID
through torchmetrics with a given feature network (zero for identical sets, larger for a shift)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tapestry.eval.metrics import MetricError, fid_kid, image_similarity, image_text_similarity, load_encoders


def mean_colour(images):  # a transparent "encoder": the mean RGB of each image
    return torch.tensor(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32).mean((0, 1)) for im in images]))


def solid(rgb, side=8):
    return Image.new("RGB", (side, side), rgb)


def test_cosines_with_injected_encoders():
    words = {"red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0]}
    text_encoder = lambda texts: torch.tensor([words[t] for t in texts])  # noqa: E731
    scores = image_text_similarity([solid((200, 0, 0)), solid((0, 0, 200))], ["red", "green"], mean_colour, text_encoder)
    assert scores == [1.0, 0.0]
    assert image_similarity([solid((10, 10, 0))], [solid((10, 0, 0))], mean_colour) == [pytest.approx(2 ** -0.5, abs=1e-6)]
    with pytest.raises(MetricError, match="one text per image"):
        image_text_similarity([solid((1, 1, 1))], [], mean_colour, text_encoder)
    with pytest.raises(MetricError, match=r"\[N=2, D\]"):
        image_similarity([solid((1, 1, 1))], [solid((1, 1, 1))], lambda ims: torch.zeros(3))


class ColourFeatures(torch.nn.Module):
    def forward(self, x):  # x: [N, 3, H, W] uint8 -> [N, 6]
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)


def test_torchscript_encoder_folder(tmp_path):
    torch.jit.script(ColourFeatures()).save(str(tmp_path / "image_encoder.pt"))
    (tmp_path / "encoder.json").write_text(json.dumps({"image_size": 16}))
    encode, text = load_encoders(tmp_path)
    assert text is None and tuple(encode([solid((255, 0, 0)), solid((0, 0, 255), 20)]).shape) == (2, 6)
    with pytest.raises(MetricError, match="no image_encoder.pt"):
        load_encoders(tmp_path / "..")


def test_fid_kid_with_a_given_feature_network():
    rng = np.random.default_rng(0)
    noisy = lambda base: Image.fromarray(np.clip(base + rng.normal(0, 25, (8, 8, 3)), 0, 255).astype(np.uint8))  # noqa: E731
    real = [noisy(np.full((8, 8, 3), 120.0)) for _ in range(24)]
    same = fid_kid(real, real, ColourFeatures())
    shifted = fid_kid(real, [noisy(np.full((8, 8, 3), 170.0)) for _ in range(24)], ColourFeatures())
    assert abs(same["fid"]) < 1e-3 and shifted["fid"] > 0.05 and shifted["kid_mean"] > same["kid_mean"]
    with pytest.raises(MetricError, match="at least 2"):
        fid_kid(real[:1], real, ColourFeatures())
