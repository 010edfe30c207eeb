import io
import struct
import zlib

import pytest
from PIL import Image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: what a decompression bomb looks like to a
    loader that trusts headers (the pixel data would expand to gigabytes)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def photo():
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((64, 64))


def tiny_mot_config(vocab_size: int, *, hidden: int = 32, layers: int = 1, heads: int = 2, kv_heads: int = 1,
                    latent_channels: int = 3, patch_side: int = 8):
    """A MoT config small enough for tests: ViT patches of 8 px, latents in 2×2 patches."""
    from tapestry.models.mot.config import LatentConfig, LLMConfig, MoTConfig, ViTConfig

    return MoTConfig(
        llm=LLMConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads),
        vit=ViTConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, patch_size=8,
                      max_patches_per_side=patch_side),
        latent=LatentConfig(channels=latent_channels, patch_size=2, max_side=patch_side, timestep_freq_dim=32),
    )


@pytest.fixture(scope="session")
def bagel_tiny(tmp_path_factory):
    """A BAGEL-layout tiny checkpoint written by tests/bagel_fixture.py, once per session
    (read-only by convention: tests that change files copy it first)."""
    from bagel_fixture import write_bagel_checkpoint

    return write_bagel_checkpoint(tmp_path_factory.mktemp("bagel") / "BAGEL-tiny")


# ---------------------------------------------------------------- skip log for CI
# With TAPESTRY_SKIP_LOG=FILE every skipped test (or module) appends {"test", "reason"} to FILE;
# .ci/run fails the build on any reason not in .ci/allowed-skips.txt (no GPU, no CUDA).
def _log_skip(nodeid: str, longrepr) -> None:
    import json
    import os

    path = os.environ.get("TAPESTRY_SKIP_LOG")
    if not path:
        return
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"test": nodeid, "reason": reason.removeprefix("Skipped: ")}) + "\n")


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _log_skip(report.nodeid, report.longrepr)


def pytest_collectreport(report):
    if report.skipped:
        _log_skip(report.nodeid, report.longrepr)
