"""Pinned outputs: the embedded default's images for the README prompts, and a short training
run's loss curve, bit for bit.

These pins were recorded on the code before the family protocol (tapestry/models/family.py)
existed and must not move when code is only restructured. They do move, on purpose, when the
default checkpoint is retrained (tapestry/assets/default): then record the new values with

    PYTHONPATH=. python tests/test_golden.py

and paste them into DEFAULT_GOLDEN (the one place the default's outputs are pinned; the same
command rewrites the PNGs and texts under tests/golden/default that other CPUs are compared
with) — and say in the commit that the checkpoint changed. LOSS_CURVE_GOLDEN depends only on code, never on the
shipped checkpoint.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "toyworld"

# The README's prompts (command 1 and the N-to-M `tapestry generate` example), and command 1
# under two guidance rules so the branch contexts are pinned too.
README_PROMPT = ("A little [img1] sits on the right, and a small [img2] is in the centre, "
                 "on a gradient from fog on the left to dusk on the right.")
README_IMAGES = ("red-dotted-heart.png", "white-dotted-triangle.png")
HOWTO_PROMPT = ("Build a column of three small orange dotted circles down the left side, one at a "
                "time from top to bottom, on a flat charcoal background.")
CASES = {
    "readme": (README_PROMPT, README_IMAGES, {}),
    "howto": (HOWTO_PROMPT, (), {}),
    "readme-inset": (README_PROMPT, README_IMAGES, {"guidance": "inset"}),
    "readme-bagel": (README_PROMPT, README_IMAGES, {"guidance": "bagel"}),
}

# sha256 (first 16 hex digits) over the generated text and the PNG bytes of every generated image
# of each case, seed 0, everything else the pipeline's defaults. THE ONE PLACE the embedded
# default's outputs are pinned: update it (and only it) when tapestry/assets/default changes.
# Re-recorded 2026-12-04 (third session) for the issue-20 default trained in one phase: the
# recipe with data.focus_weight = 4 from the first step, 9 000 steps (checkpoint changed;
# generation defaults still cfg 4.5 with shift 3).
DEFAULT_GOLDEN = {
    "readme": "ea74202df3b312f9",
    "howto": "f22cdddee5f87e8d",
    "readme-inset": "db8fb637a615ec71",
    "readme-bagel": "1f1eec06c1bde0f2",
}

# float.hex of the logged `loss` of every step of `loss_curve()` (code only, no checkpoint).
LOSS_CURVE_GOLDEN: list[str] = [
    "0x1.a7f1d70000000p+2", "0x1.8cf0cb5555555p+2", "0x1.8568240000000p+2", "0x1.2350638e38e39p+0",
]


def generated_digest(doc) -> str:
    digest = hashlib.sha256()
    for segment in doc.segments:
        if segment.role != "target":
            continue
        if getattr(segment, "image", None) is not None:
            buffer = io.BytesIO()
            segment.image.save(buffer, format="PNG")
            digest.update(b"image:" + buffer.getvalue())
        else:
            digest.update(b"text:" + segment.text.encode())
    return digest.hexdigest()[:16]


def default_digests() -> dict[str, str]:
    return {name: generated_digest(doc) for name, doc in default_documents().items()}


def loss_curve(run_dir: Path) -> list[str]:
    """Four steps of a tiny `mot` model on ToyWorld (compose, edit, understand: one target image
    each) with BAGEL dropout, the pool autoencoder, EMA and a cosine schedule."""
    import json

    from tapestry.train.config import config_from_data
    from tapestry.train.loop import train

    sources = [{"name": f"{task}-{layout}", "task": task, "layout": layout, "side": 32}
               for task, layout in (("compose", "inline"), ("edit", "image-first"), ("understand", "inline"))]
    raw = {
        "seed": 3,
        "model": {"vocab_size": 300, "tokenizer_docs": 60, "tokenizer_english_chars": 0, "vae": "pool:4",
                  "llm": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
                          "num_kv_heads": 1, "head_dim": 16},
                  "vit": {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2,
                          "patch_size": 8, "max_patches_per_side": 4},
                  "latent": {"patch_size": 2, "max_side": 4, "timestep_freq_dim": 32}},
        "layout": {"target_size": [32, 32]},
        "data": {"budget": 256, "rows": 2, "lookahead": 96, "sources": sources},
        "dropout": {"policy": "bagel", "text": 0.3},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup": 1},
        "ema": {"decay": 0.9},
        "stages": [{"name": "main", "steps": 4}],
        "checkpoint": {"every": 4, "keep": 1},
        "log": {"every": 1},
    }
    train(config_from_data(raw), run_dir, quiet=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [float(json.loads(line)["loss"]).hex() for line in lines]


GOLDEN_DIR = Path(__file__).resolve().parent / "golden" / "default"


def default_documents() -> dict:
    from tapestry.infer.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("default")
    return {name: pipe.generate(prompt, images=[Image.open(EXAMPLE / f) for f in images], seed=0, **options)
            for name, (prompt, images, options) in CASES.items()}


def target_outputs(doc) -> tuple[list[str], list]:
    import numpy as np

    texts = [s.text for s in doc.segments if s.role == "target" and getattr(s, "image", None) is None]
    images = [np.asarray(s.image.convert("RGB"), dtype=np.int16) for s in doc.segments
              if s.role == "target" and getattr(s, "image", None) is not None]
    return texts, images


def record_golden_outputs() -> None:
    """Write the default's outputs of every case under tests/golden/default (PNG + text)."""
    import json

    for name, doc in default_documents().items():
        folder = GOLDEN_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        texts, images = target_outputs(doc)
        (folder / "text.json").write_text(json.dumps(texts) + "\n", encoding="utf-8")
        for old in folder.glob("*.png"):
            old.unlink()
        for i, seg in enumerate(s for s in doc.segments if s.role == "target" and getattr(s, "image", None) is not None):
            seg.image.save(folder / f"{i}.png")


@pytest.mark.slow
def test_default_outputs_for_the_readme_prompts_are_pinned():
    """Bit for bit where the CPU computes as the recording machine did (DEFAULT_GOLDEN);
    otherwise the same text and images within float-rounding distance of the recorded PNGs.

    Why two levels: oneDNN/MKL pick kernels by CPU (AVX2 vs AVX-512, AMD vs Intel), and their
    last-bit rounding differs; 20 guided denoising steps turn that into a grey level here and
    there (measured 2026-12-02: the same commit gave other digests for two of the four cases on
    an AMD EPYC host than on the host that recorded them). A retrained default or a changed
    sampler moves images by far more (a new seed: mean |Δ| ≈ 9 levels)."""
    import json

    import numpy as np

    docs = default_documents()
    if {name: generated_digest(doc) for name, doc in docs.items()} == DEFAULT_GOLDEN:
        return
    for name, doc in docs.items():
        folder = GOLDEN_DIR / name
        texts, images = target_outputs(doc)
        assert texts == json.loads((folder / "text.json").read_text(encoding="utf-8")), name
        expected = sorted(folder.glob("*.png"), key=lambda p: int(p.stem))
        assert len(images) == len(expected), name
        for got, path in zip(images, expected):
            want = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
            diff = np.abs(got - want)
            assert diff.mean() < 0.5 and (diff > 8).mean() < 0.01, (name, path.name, float(diff.mean()))


@pytest.mark.slow
def test_a_short_training_run_gives_the_pinned_loss_curve(tmp_path):
    assert loss_curve(tmp_path / "run") == LOSS_CURVE_GOLDEN


if __name__ == "__main__":
    import tempfile

    print("DEFAULT_GOLDEN =", default_digests())
    record_golden_outputs()
    with tempfile.TemporaryDirectory() as tmp:
        print("LOSS_CURVE_GOLDEN =", loss_curve(Path(tmp) / "run"))
