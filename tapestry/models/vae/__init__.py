"""Autoencoders between pixels and the flow model's latent space (see protocol.py).

- `toy.ToyAutoencoder`: the small ×4 convolutional AE trained here on ToyWorld scenes.
- `flux.load_flux_autoencoder`: a FLUX AE (BFL `ae.safetensors` or a diffusers folder) through
  `diffusers.AutoencoderKL`.
- `pool.PoolCodec`: parameter-free average pooling (`pool:F`; tests and smoke runs).

`load_autoencoder(path)` tells them apart, so training and inference only ever hold the
protocol; every one of them saves with `save_pretrained(folder)` into a folder that
`load_autoencoder` reads back.
"""

from __future__ import annotations

import json
from pathlib import Path

from tapestry.models.vae.protocol import Autoencoder, VAEError, latent_shape

__all__ = ["Autoencoder", "VAEError", "latent_shape", "load_autoencoder"]


def load_autoencoder(path: str | Path, device: str = "cpu") -> Autoencoder:
    """Any autoencoder this package reads: `pool:F`, a pool-codec folder, a tapestry toy-AE folder
    (`config.json` with format `tapestry.toy_ae`), a diffusers AutoencoderKL folder, or a
    FLUX-layout `ae.safetensors` (the file, or a folder holding it such as a BAGEL checkpoint)."""
    from tapestry.models.vae.pool import POOL_FILE, PoolCodec, parse_pool_spec

    if str(path).startswith("pool:"):
        return parse_pool_spec(str(path))
    path = Path(path)
    if (path / POOL_FILE).is_file():
        return PoolCodec.from_pretrained(path)
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        try:
            fmt = json.loads(config.read_text(encoding="utf-8")).get("format")
        except (json.JSONDecodeError, AttributeError):
            raise VAEError(f"{config}: not a JSON object") from None
        if fmt == "tapestry.toy_ae":
            from tapestry.models.vae.toy import ToyAutoencoder

            return ToyAutoencoder.from_pretrained(path, device=device)
    from tapestry.models.vae.flux import load_flux_autoencoder

    return load_flux_autoencoder(path, device=device)
