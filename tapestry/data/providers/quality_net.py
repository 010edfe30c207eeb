"""A small learned image-quality scorer behind the same interface as the heuristic one
(`aesthetic.scorer=local:/path/quality.safetensors`): a four-stage convolutional network over
the image at `image_size` whose pooled features (mean and standard deviation of each channel,
the statistics MANIQA-style scorers pool too) go through a two-layer head to a score in [0, 1].

One file holds it: `model.safetensors`-style tensors plus the config in the safetensors metadata
(`{"format": "tapestry-quality", "config": "<json>"}`), so it is copied and checked as one thing.
`fit` trains it on (image, score) pairs a team has (human ratings, a big model's scores);
`save`/`load_scorer` write and read the file. The heuristic (`quality.heuristic_aesthetic`)
stays the offline default: this network is only as good as the scores it was fitted to.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from tapestry.errors import TapestryError

FORMAT = "tapestry-quality"


@dataclass(frozen=True)
class QualityNetConfig:
    image_size: int = 128
    channels: tuple[int, ...] = (16, 32, 64, 96)
    hidden: int = 64
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "QualityNetConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj.items()})


class QualityNet(nn.Module):
    def __init__(self, config: QualityNetConfig | None = None):
        super().__init__()
        config = config or QualityNetConfig()
        self.config = config
        layers: list[nn.Module] = []
        previous = 3
        for width in config.channels:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.GroupNorm(1, width), nn.GELU()]
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(2 * previous, config.hidden), nn.GELU(), nn.Linear(config.hidden, 1))
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 3, S, S] in [0, 1] -> [B] in [0, 1]
        f = self.features((x - self.mean) / self.std)  # f: [B, C, s, s]
        pooled = torch.cat([f.mean(dim=(2, 3)), f.std(dim=(2, 3))], dim=1)  # [B, 2C]
        return torch.sigmoid(self.head(pooled)).squeeze(1)

    def prepare(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """[H, W, 3] uint8 images -> [B, 3, S, S] float in [0, 1] (area resize to a square)."""
        import cv2

        s = self.config.image_size
        batch = np.stack([cv2.resize(np.ascontiguousarray(img), (s, s), interpolation=cv2.INTER_AREA)
                          for img in images])
        return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0


def save(net: QualityNet, path: str | Path) -> Path:
    from safetensors.torch import save as save_bytes

    from tapestry.atomic import atomic_write_bytes

    path = Path(path)
    meta = {"format": FORMAT, "config": json.dumps(asdict(net.config))}
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(path, save_bytes(tensors, metadata=meta))
    return path


def _metadata(path: Path, stage: str) -> tuple[QualityNetConfig, dict[str, tuple[int, ...]]]:
    from safetensors import safe_open

    from tapestry.data.providers.local import CheckpointError

    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(path, stage, "no such file (the learned quality scorer is one .safetensors file)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(path, stage, f"not a readable safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(path, stage, f"metadata format is {meta.get('format')!r}, not {FORMAT!r} "
                              "(write it with tapestry.data.providers.quality_net.save)")
    try:
        config = QualityNetConfig.from_json(json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(path, stage, f"metadata config is unusable: {e}") from None
    return config, shapes


def check_file(path: Path, stage: str) -> dict[str, Any]:
    from tapestry.data.providers.local import CheckpointError

    config, shapes = _metadata(path, stage)
    expected = {k: tuple(v.shape) for k, v in QualityNet(config).state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise CheckpointError(path, stage, f"{len(missing)} weight(s) missing, e.g. {', '.join(missing[:3])}")
    wrong = [k for k in expected if shapes[k] != expected[k]]
    if wrong:
        raise CheckpointError(path, stage, f"{wrong[0]} has shape {list(shapes[wrong[0]])}, the config needs "
                              f"{list(expected[wrong[0]])}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise CheckpointError(path, stage, f"weight(s) the network does not have: {', '.join(extra[:3])}")
    return {"path": str(path), "model_type": FORMAT, "tensors": len(shapes)}


@functools.lru_cache(maxsize=4)
def _load(path: str, stage: str, device: str) -> QualityNet:
    from safetensors.torch import load_file

    config, _ = _metadata(Path(path), stage)
    check_file(Path(path), stage)
    file = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
    net = QualityNet(config)
    net.load_state_dict(load_file(str(file)))
    return net.eval().to(device)


class LearnedQuality:
    """The scorer a stage uses: `score(images)` -> [N] floats in [0, 1], batched."""

    def __init__(self, spec: str, stage: str = "aesthetic", device: str = "auto"):
        from tapestry.data.providers.local import device_name, spec_path

        path = spec_path(spec).resolve()
        self.device = device_name(device)
        self.net = _load(str(path), stage, self.device)
        self.model = f"{FORMAT}:{path.name}"

    def score(self, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        out = []
        for i in range(0, len(images), max(1, batch_size)):
            x = self.net.prepare(images[i:i + batch_size]).to(self.device)
            with torch.inference_mode():
                out.append(self.net(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def __call__(self, rgb: np.ndarray) -> float:
        return float(self.score([rgb])[0])


def fit(images: Sequence[np.ndarray], scores: Sequence[float], config: QualityNetConfig | None = None,
        steps: int = 200, batch_size: int = 16, lr: float = 2e-3, seed: int = 0) -> tuple[QualityNet, list[float]]:
    """Train a scorer to reproduce `scores` (in [0, 1]) of `images`; returns it and the loss
    per step (mean squared error)."""
    if len(images) != len(scores) or not images:
        raise TapestryError(f"fit needs one score per image: {len(images)} image(s), {len(scores)} score(s)")
    torch.manual_seed(seed)
    net = QualityNet(config or QualityNetConfig())
    x_all = net.prepare(images)
    y_all = torch.tensor(np.asarray(scores, np.float32))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    net.train()
    for _ in range(steps):
        pick = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=generator)
        loss = torch.nn.functional.mse_loss(net(x_all[pick]), y_all[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return net.eval(), losses
