"""Pluggable image models (aesthetic scorers, embedders) from a spec string, loaded locally.

    torchscript:/path/dir   a folder with `model.pt` (TorchScript, takes [1, 3, S, S] float
                            input, returns [1, D] or [1]) and an optional `config.json`:
                            {"image_size": 224, "mean": [0.485, 0.456, 0.406],
                             "std": [0.229, 0.224, 0.225]}
    python:module:function  any callable taking an [H, W, 3] uint8 RGB array

Nothing is ever downloaded: a model you want (a DINOv2 or MANIQA export, say) is exported to
TorchScript once, elsewhere, and copied into a folder.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from tapestry.errors import TapestryError

ImageModel = Callable[[np.ndarray], np.ndarray]


@functools.lru_cache(maxsize=8)
def load_image_model(spec: str) -> ImageModel:
    kind, _, rest = spec.partition(":")
    if kind == "python":
        module_name, _, attribute = rest.rpartition(":")
        if not module_name or not attribute:
            raise TapestryError(f"plugin {spec!r}: write python:module:function")
        try:
            fn = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as e:
            raise TapestryError(f"plugin {spec!r}: {e}") from None
        return lambda rgb: np.asarray(fn(rgb), dtype=np.float32)
    if kind == "torchscript":
        return _torchscript_model(Path(rest))
    raise TapestryError(f"plugin {spec!r}: expected 'torchscript:/dir' or 'python:module:function'")


def _torchscript_model(folder: Path) -> ImageModel:
    import torch

    weights = folder / "model.pt"
    if not weights.is_file():
        raise TapestryError(f"plugin folder {folder}: model.pt not found")
    config = {"image_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    if (folder / "config.json").is_file():
        try:
            config.update(json.loads((folder / "config.json").read_text()))
        except ValueError as e:
            raise TapestryError(f"plugin folder {folder}: config.json is not valid JSON: {e}") from None
    try:
        model = torch.jit.load(str(weights), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad archive
        raise TapestryError(f"plugin folder {folder}: cannot load model.pt: {e}") from None
    size = int(config["image_size"])
    mean = torch.tensor(config["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(config["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def run(rgb: np.ndarray) -> np.ndarray:
        import cv2

        image = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        # x: [1, 3, S, S]
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
        with torch.inference_mode():
            out = model((x - mean) / std)
        return out.reshape(-1).float().numpy()

    return run
