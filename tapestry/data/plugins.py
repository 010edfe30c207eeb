"""Pluggable image models (aesthetic scorers, embedders) from a spec string, loaded locally.

    torch:/path/dir         a folder with `model.pt2` (a `torch.export` program) or `model.pt`
                            (TorchScript), taking [1, 3, S, S] float input and returning
                            [1, D] or [1], and an optional `config.json`:
                            {"image_size": 224, "mean": [0.485, 0.456, 0.406],
                             "std": [0.229, 0.224, 0.225]}
    python:module:function  any callable taking an [H, W, 3] uint8 RGB array

Nothing is ever downloaded: a model you want (a DINOv2 or MANIQA, say) is exported once,
elsewhere, with `torch.export.save(torch.export.export(model, (example,)), "model.pt2")`, and
its folder copied here.
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
    if kind == "torch":
        return _torch_model(Path(rest))
    raise TapestryError(f"plugin {spec!r}: expected 'torch:/dir' or 'python:module:function'")


def _torch_model(folder: Path) -> ImageModel:
    import torch

    exported, scripted = folder / "model.pt2", folder / "model.pt"
    if not exported.is_file() and not scripted.is_file():
        raise TapestryError(f"plugin folder {folder}: neither model.pt2 (torch.export) nor model.pt "
                            "(TorchScript) found")
    config = {"image_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    if (folder / "config.json").is_file():
        try:
            config.update(json.loads((folder / "config.json").read_text()))
        except ValueError as e:
            raise TapestryError(f"plugin folder {folder}: config.json is not valid JSON: {e}") from None
    try:
        if exported.is_file():
            model = torch.export.load(str(exported)).module()
        else:
            model = torch.jit.load(str(scripted), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad archive
        raise TapestryError(f"plugin folder {folder}: cannot load the model: {e}") from None
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
