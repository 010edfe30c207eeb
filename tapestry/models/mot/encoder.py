"""Pretraining the understanding encoder on ToyWorld recognition (issue 20).

Real MoT models read references through SigLIP, an encoder pretrained on billions of images; our
ToyWorld default trained its ViT from nothing inside the generation run, where the only signal
that reaches it is the flow loss of a few per-cent of target pixels and a little understanding
CE. Measured on the 2500-step default: the ViT tokens of a red dotted heart and a white dotted
triangle differed by 13 % of their norm, and swapping a reference changed the generated image
30× less than changing the seed. So the encoder learns what SigLIP knows for ToyWorld first:
given one rendered reference (random background, cell, size, rotation), name its shape, colour,
pattern, size and cell. The result is a `vit.*` state dict that `tapestry train` loads through
`model.init_vit` (then frozen or fine-tuned by the stage's freeze set).

Recognition is read from *every* patch token (mean of per-token logits) as well as from their
mean, so identity is spread over the tokens the decoder attends to rather than held in one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from tapestry.models.common.checkpoint import load_safetensors, read_json_file
from tapestry.models.mot.config import ViTConfig
from tapestry.models.mot.model import NaViT, grid_position_ids, patchify

ATTRIBUTES = ("shape", "colour", "pattern", "size", "cell")


def _label_space() -> dict[str, tuple[str, ...] | range]:
    from tapestry.toyworld.spec import COLOURS, PATTERNS, SHAPES, SIZES

    return {"shape": SHAPES, "colour": COLOURS, "pattern": PATTERNS, "size": SIZES, "cell": range(9)}


def render_references(n: int, side: int, seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    """n reference images [n, 3, side, side] in [-1, 1] and their labels, as the compose task
    draws them (one entity, random background, cell, size and rotation)."""
    from tapestry.toyworld.render import render_scene_array
    from tapestry.toyworld.sampling import random_entity, reference_scene

    space = _label_space()
    rng = np.random.default_rng(seed)
    images = np.empty((n, side, side, 3), dtype=np.uint8)
    labels = {k: np.empty(n, dtype=np.int64) for k in ATTRIBUTES}
    for i in range(n):
        scene = reference_scene(random_entity(rng), rng)
        images[i] = render_scene_array(scene, side)
        placed = scene.entities[0]
        labels["shape"][i] = space["shape"].index(placed.entity.shape)
        labels["colour"][i] = space["colour"].index(placed.entity.colour)
        labels["pattern"][i] = space["pattern"].index(placed.entity.pattern)
        labels["size"][i] = space["size"].index(placed.size)
        labels["cell"][i] = placed.cell
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, {k: torch.from_numpy(v) for k, v in labels.items()}


class RecognitionHead(nn.Module):
    """One linear classifier per attribute over the ViT's token features."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in _label_space().items()})

    def forward(self, tokens: Tensor) -> dict[str, Tensor]:
        # tokens: [B, T, H] -> per attribute logits [B, classes] (mean over tokens of token logits)
        return {k: head(tokens).mean(dim=1) for k, head in self.heads.items()}


def encode(vit: NaViT, pixels: Tensor) -> Tensor:
    """pixels: [B, 3, S, S] -> ViT token features [B, T, H] (one image per row, as in the MoT)."""
    p = vit.cfg.patch_size
    side = pixels.shape[-1] // p
    patches = patchify(pixels, p)  # [B, T, 3·p·p]
    b, t, _ = patches.shape
    positions = grid_position_ids(side, side, vit.cfg.max_patches_per_side).to(pixels.device).repeat(b)
    return vit(patches.reshape(b * t, -1), positions, [t] * b).view(b, t, -1)


@dataclass
class EncoderPretrainConfig:
    side: int = 64
    train_images: int = 12000
    val_images: int = 1000
    steps: int = 1500
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2
    eval_every: int = 250


def accuracy(vit: NaViT, head: RecognitionHead, pixels: Tensor, labels: dict[str, Tensor]) -> dict[str, float]:
    vit.eval()
    correct = {k: 0 for k in ATTRIBUTES}
    all_right = 0
    with torch.inference_mode():
        for start in range(0, len(pixels), 256):
            logits = head(encode(vit, pixels[start : start + 256]))
            right = torch.ones(min(256, len(pixels) - start), dtype=torch.bool)
            for k in ATTRIBUTES:
                hit = logits[k].argmax(-1) == labels[k][start : start + 256]
                correct[k] += int(hit.sum())
                if k != "cell":  # identity + size: what a compose target needs from a reference
                    right &= hit
            all_right += int(right.sum())
    vit.train()
    out = {k: correct[k] / len(pixels) for k in ATTRIBUTES}
    out["identity_and_size"] = all_right / len(pixels)
    return out


def pretrain(vit_config: ViTConfig, config: EncoderPretrainConfig, out: Path, progress=None) -> dict:
    """Train a NaViT of `vit_config` on ToyWorld recognition; write `vit.safetensors` (keys as in
    the MoT: `vit.*`), `encoder.json` (configs, accuracy per attribute, seconds) into `out`."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _pretrain(vit_config, config, out, progress)
    finally:  # a library call must not change the caller's thread count (later runs would differ bitwise)
        torch.set_num_threads(previous_threads)


def _pretrain(vit_config: ViTConfig, config: EncoderPretrainConfig, out: Path, progress) -> dict:
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    train_x, train_y = render_references(config.train_images, config.side, config.seed)
    val_x, val_y = render_references(config.val_images, config.side, config.seed + 1_000_003)
    vit, head = NaViT(vit_config), RecognitionHead(vit_config.hidden_size)
    for module in vit.modules():  # the MoT's own init, so a frozen encoder matches a trained one
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    params = list(vit.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    for step in range(config.steps):
        lr = config.lr * min(1.0, (step + 1) / 50) * (0.55 + 0.45 * math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(train_x), (config.batch,), generator=generator)
        x = train_x[index]
        logits = head(encode(vit, x))
        loss = sum(F.cross_entropy(logits[k], train_y[k][index]) for k in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if progress is not None:
            progress(step + 1, loss.item())
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            history.append({"step": step + 1, "loss": round(loss.item(), 4), **accuracy(vit, head, val_x, val_y)})
    report = {"vit": asdict(vit_config), "pretrain": asdict(config), "val": history[-1], "history": history,
              "seconds": round(time.perf_counter() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "vit.safetensors.partial"
    save_file({f"vit.{k}": v.detach().contiguous() for k, v in vit.state_dict().items()}, str(partial))
    partial.replace(out / "vit.safetensors")
    (out / "encoder.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def load_pretrained_vit(model: nn.Module, folder: str | Path) -> None:
    """Copy a pretrained encoder (`vit.safetensors` in `folder`) into `model.vit`; the ViT
    configs must agree (a mismatch names both)."""
    from tapestry.errors import TapestryError

    folder = Path(folder)
    file = folder / "vit.safetensors"
    if not file.is_file():
        raise TapestryError(f"{file}: no pretrained encoder here; make one with `tapestry vit pretrain --out {folder}`")
    report = read_json_file(folder / "encoder.json", "the record `tapestry vit pretrain` writes beside vit.safetensors")
    # pos_scale acts after the connector, outside the encoder's weights
    trained = {k: v for k, v in report["vit"].items() if k != "pos_scale"}
    wanted = {k: v for k, v in asdict(model.config.vit).items() if k != "pos_scale"}
    if trained != wanted:
        raise TapestryError(f"{folder}/encoder.json: encoder was trained as vit={trained}, the model has vit={wanted}")
    state = {k.removeprefix("vit."): v for k, v in load_safetensors(file).items()}
    with torch.no_grad():
        model.vit.load_state_dict(state, strict=True)
