"""Training and measuring the ToyWorld autoencoder: scenes rendered on the fly, L1 + edge loss.

Data: every step renders fresh random ToyWorld scenes (about 1 ms each at 64 px), so the AE never
sees the same image twice and cannot overfit. The held-out set is drawn from its own seed stream,
which no training seed can produce (different `SeedSequence` entropy words).

Loss: L1 on pixels (sharp flat regions, no blur-favouring mean like MSE) plus L1 on horizontal
and vertical pixel differences, which weights the edges and the thin ink patterns the judge reads
(shape IoU, pattern statistics) — exactly what a pixel loss averages away on mostly flat images.
A tiny penalty on the raw latents keeps their scale bounded for the flow model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tapestry.models.vae.toy import ToyAEConfig, ToyAutoencoder

# Entropy words that keep training and held-out scene streams apart whatever `seed` is.
TRAIN_STREAM = 0x7A1
HELDOUT_STREAM = 0xE7A1


def random_scene(rng: np.random.Generator):
    """A random ToyWorld scene, 1–4 entities: half of them upright (what targets look like), half
    rotated (what reference images look like), so one AE serves both paths."""
    from tapestry.toyworld.sampling import random_scene as sample_scene

    return sample_scene(rng, rotate=bool(rng.integers(2)))


def heldout_scenes(n: int) -> list:
    """The fixed held-out set: the same `n` scenes on every machine and run."""
    rng = np.random.default_rng([HELDOUT_STREAM, n])
    return [random_scene(rng) for _ in range(n)]


def to_tensor(arrays: list[np.ndarray]) -> Tensor:
    # arrays: N × [S, S, 3] uint8 -> [N, 3, S, S] float in [-1, 1]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(images: Tensor) -> np.ndarray:
    # images: [N, 3, S, S] about [-1, 1] -> [N, S, S, 3] uint8, rounded as a saved PNG would be
    x = ((images.detach().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def render_batch(scenes: list, side: int) -> Tensor:
    from tapestry.toyworld.render import render_scene_array

    return to_tensor([render_scene_array(s, side) for s in scenes])


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB over uint8 images (all pixels of all images pooled)."""
    mse = float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def edge_l1(pred: Tensor, target: Tensor) -> Tensor:
    # pred, target: [B, 3, H, W]; mean L1 of horizontal and vertical neighbour differences
    dx = (pred[..., :, 1:] - pred[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (pred[..., 1:, :] - pred[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


@dataclass
class TrainSettings:
    steps: int = 4000
    batch_size: int = 8
    resolution: int = 64
    seed: int = 0
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decay ends at lr · this
    warmup: int = 100
    edge_weight: float = 1.0
    latent_weight: float = 1e-4
    grad_clip: float = 1.0
    threads: int | None = None  # torch threads (None: leave torch's default)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def loss_terms(model: ToyAutoencoder, images: Tensor, settings: TrainSettings) -> dict[str, Tensor]:
    # images: [B, 3, S, S] in [-1, 1]
    raw = model.encode_raw(images)  # [B, C, S/f, S/f]
    recon = model.decode_raw(raw)
    terms = {"l1": (recon - images).abs().mean(), "edge": edge_l1(recon, images),
             "latent": raw.pow(2).mean()}
    terms["loss"] = terms["l1"] + settings.edge_weight * terms["edge"] + settings.latent_weight * terms["latent"]
    return terms


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` torch CPU threads (None or 0: leave as is), then restore the old count.

    On a shared CPU, fewer threads than cores can be several times faster: a preempted OpenMP
    thread stalls the others at every barrier (measured here: 2 threads on 2 busy cores ran 5-20×
    slower per step than 1)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    config: ToyAEConfig,
    settings: TrainSettings,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    init: dict[str, Tensor] | None = None,
) -> tuple[ToyAutoencoder, list[dict[str, float]]]:
    """Train a ToyAutoencoder, fresh or from the weights `init` (a state dict of the same config:
    a fine-tune that continues an earlier run on new scenes of the stream); returns it (eval mode,
    latents not yet calibrated) and the per-step history. Same config, settings, init and torch
    version -> same weights on CPU."""
    with torch_threads(settings.threads):
        return _train(config, settings, on_step, init)


def _train(config, settings, on_step, init=None):
    torch.manual_seed(settings.seed)
    model = ToyAutoencoder(config)
    if init is not None:
        model.load_state_dict(init, strict=True)
    # channels_last: oneDNN's CPU convolutions run about 20 % faster on it (measured here).
    model = model.train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng([TRAIN_STREAM, settings.seed])
    history = []
    for step in range(settings.steps):
        for group in opt.param_groups:
            group["lr"] = settings.lr_at(step)
        images = render_batch([random_scene(rng) for _ in range(settings.batch_size)], settings.resolution)
        images = images.contiguous(memory_format=torch.channels_last)  # [B, 3, S, S]
        terms = loss_terms(model, images, settings)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        record = {k: float(v.detach()) for k, v in terms.items()} | {"step": step + 1, "lr": settings.lr_at(step)}
        history.append(record)
        if on_step is not None:
            on_step(step + 1, record)
    return model.eval().to(memory_format=torch.contiguous_format), history


@torch.no_grad()
def reconstruct(model: ToyAutoencoder, images: Tensor, batch_size: int = 32) -> Tensor:
    # images: [N, 3, S, S] -> reconstructions [N, 3, S, S] through encode/decode (scaled space)
    return torch.cat([model.decode(model.encode(images[i:i + batch_size]))
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def calibrate_latents(model: ToyAutoencoder, images: Tensor, batch_size: int = 32) -> dict[str, float]:
    """Set shift = mean and scale = 1/std of the raw latents over `images` (all channels pooled),
    so the flow model's noise and data have the same scale; reconstructions do not change."""
    raw = torch.cat([model.encode_raw(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    mean, std = float(raw.mean()), float(raw.std())
    model.config.shift_factor = mean
    model.config.scale_factor = 1.0 / max(std, 1e-6)
    return {"raw_mean": mean, "raw_std": std}


def evaluate(model: ToyAutoencoder, scenes: list, resolution: int, judge: bool = True) -> dict[str, Any]:
    """Reconstruction PSNR on `scenes` and, with `judge`, the ToyWorld judge on the
    reconstructions next to the judge on the clean renders (the ceiling the AE is held to)."""
    from tapestry.toyworld.render import render_scene_array

    clean = np.stack([render_scene_array(s, resolution) for s in scenes])
    recon = to_uint8(reconstruct(model, to_tensor(list(clean))))
    per_image = [psnr(a, b) for a, b in zip(clean, recon)]
    out: dict[str, Any] = {"images": len(scenes), "resolution": resolution, "psnr": round(psnr(clean, recon), 3),
                           "psnr_min_image": round(min(per_image), 3)}
    if judge:
        from tapestry.toyworld.judge import judge_image

        rec = [judge_image(s, img) for s, img in zip(scenes, recon)]
        cln = [judge_image(s, img) for s, img in zip(scenes, clean)]
        rec_scores, clean_scores = [r["total"] for r in rec], [r["total"] for r in cln]
        out |= {"judge": round(float(np.mean(rec_scores)), 4), "judge_min": round(float(min(rec_scores)), 4),
                "exact": round(float(np.mean([bool(r["exact"]) for r in rec])), 4),
                "exact_clean": round(float(np.mean([bool(r["exact"]) for r in cln])), 4),
                "judge_clean": round(float(np.mean(clean_scores)), 4),
                "judge_clean_min": round(float(min(clean_scores)), 4),
                "judge_drops": int(sum(r < c - 0.05 for r, c in zip(rec_scores, clean_scores)))}
    return out


def settings_dict(settings: TrainSettings) -> dict[str, Any]:
    return asdict(settings)
