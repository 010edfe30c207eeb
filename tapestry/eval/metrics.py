"""Embedding metrics with injectable encoders (DESIGN §11).

No weights can be downloaded here, so nothing is built in: the caller gives the encoders.

    ImageEncoder  callable: list of PIL images -> tensor [N, D]   (CLIP image tower, DINO, ...)
    TextEncoder   callable: list of str -> tensor [N, D]          (CLIP text tower)

`load_encoders(folder)` builds them from a local directory: a TorchScript `image_encoder.pt`
(input [N, 3, S, S] floats in 0..1, S from `encoder.json` {"image_size": S}), or a Hugging Face
CLIP folder (config.json + weights + tokenizer; needs `transformers`).

    image_text_similarity   CLIP-style score: cosine of image and text embeddings, per pair
    image_similarity        DINO-style reference consistency: cosine of two images, per pair
    fid_kid                 FID and KID through torchmetrics with the given feature network
                            (an nn.Module mapping uint8 [N, 3, H, W] to [N, D])
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tapestry.errors import TapestryError

ImageEncoder = Callable[[list[Image.Image]], torch.Tensor]
TextEncoder = Callable[[list[str]], torch.Tensor]


class MetricError(TapestryError):
    pass


def _unit(x: torch.Tensor, what: str, n: int) -> torch.Tensor:
    x = torch.as_tensor(x).detach().float()
    if x.ndim != 2 or x.shape[0] != n:
        raise MetricError(f"{what} must return a tensor [N={n}, D], got shape {tuple(x.shape)}")
    return torch.nn.functional.normalize(x, dim=-1)


def image_text_similarity(images: Sequence[Image.Image], texts: Sequence[str], image_encoder: ImageEncoder,
                          text_encoder: TextEncoder) -> list[float]:
    """Cosine similarity of each image with its text (pairs in order)."""
    if len(images) != len(texts):
        raise MetricError(f"{len(images)} images but {len(texts)} texts: give one text per image")
    if not images:
        return []
    a = _unit(image_encoder(list(images)), "the image encoder", len(images))
    b = _unit(text_encoder(list(texts)), "the text encoder", len(texts))
    return [round(float(v), 6) for v in (a * b).sum(-1)]


def image_similarity(generated: Sequence[Image.Image], references: Sequence[Image.Image],
                     encoder: ImageEncoder) -> list[float]:
    """Cosine similarity of each generated image with its reference (pairs in order)."""
    if len(generated) != len(references):
        raise MetricError(f"{len(generated)} generated images but {len(references)} references")
    if not generated:
        return []
    both = _unit(encoder(list(generated) + list(references)), "the image encoder", 2 * len(generated))
    a, b = both[: len(generated)], both[len(generated):]
    return [round(float(v), 6) for v in (a * b).sum(-1)]


def _uint8_batch(images: Sequence[Image.Image], size: int | None) -> torch.Tensor:
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(im))
    if len({a.shape for a in arrays}) > 1:
        raise MetricError("images differ in size: give resize=S to bring them to one size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W] uint8


def fid_kid(real: Sequence[Image.Image], fake: Sequence[Image.Image], feature_net: torch.nn.Module,
            resize: int | None = None, kid_subset: int | None = None) -> dict[str, float]:
    """FID and KID (mean, std) of two image sets under `feature_net` (torchmetrics)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError:  # pragma: no cover - the eval extra is missing
        raise MetricError("FID/KID need torchmetrics: pip install 'tapestry[eval]'") from None
    if len(real) < 2 or len(fake) < 2:
        raise MetricError("FID/KID need at least 2 real and 2 generated images")
    real_batch, fake_batch = _uint8_batch(real, resize), _uint8_batch(fake, resize)
    subset = kid_subset or min(len(real), len(fake), 50)
    fid = FrechetInceptionDistance(feature=feature_net)
    kid = KernelInceptionDistance(feature=feature_net, subset_size=subset)
    for metric in (fid, kid):
        metric.update(real_batch, real=True)
        metric.update(fake_batch, real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "real": len(real), "fake": len(fake)}


def load_encoders(folder: str | Path) -> tuple[ImageEncoder, TextEncoder | None]:
    """(image encoder, text encoder or None) from a local model directory."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MetricError(f"encoder folder {folder} not found")
    scripted = folder / "image_encoder.pt"
    if scripted.is_file():
        info = json.loads((folder / "encoder.json").read_text()) if (folder / "encoder.json").is_file() else {}
        size = int(info.get("image_size", 224))
        module = torch.jit.load(str(scripted), map_location="cpu").eval()

        @torch.no_grad()
        def encode_images(images: list[Image.Image]) -> torch.Tensor:
            batch = _uint8_batch(images, size).float() / 255.0
            return module(batch)

        return encode_images, None
    if (folder / "config.json").is_file():
        try:
            from transformers import AutoProcessor, CLIPModel
        except ImportError:
            raise MetricError(f"{folder} looks like a Hugging Face model: pip install transformers") from None
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)

        @torch.no_grad()
        def encode_hf_images(images: list[Image.Image]) -> torch.Tensor:
            return model.get_image_features(**processor(images=images, return_tensors="pt"))

        @torch.no_grad()
        def encode_hf_texts(texts: list[str]) -> torch.Tensor:
            return model.get_text_features(**processor(text=texts, return_tensors="pt", padding=True, truncation=True))

        return encode_hf_images, encode_hf_texts
    raise MetricError(f"{folder}: no image_encoder.pt (TorchScript) and no config.json (Hugging Face CLIP)")
