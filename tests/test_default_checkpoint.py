"""The embedded default checkpoint (tapestry/assets/default) that README's first command runs."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tapestry.infer.pipeline import DEFAULT_DIR, Pipeline, checkpoint_hash

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "toyworld"
PROMPT = ("A little [img1] sits on the right, and a small [img2] is in the centre, "
          "on a gradient from fog on the left to dusk on the right.")


def test_default_ships_inside_the_package_and_stays_small():
    files = [p for p in DEFAULT_DIR.rglob("*") if p.is_file()]
    names = {p.relative_to(DEFAULT_DIR).as_posix() for p in files}
    assert {"pipeline.json", "config.json", "model.safetensors", "tokenizer.json", "vae/config.json",
            "vae/model.safetensors", "export.json", "train_config.toml"} <= names
    assert sum(p.stat().st_size for p in files) <= 50 * 2**20
    export = json.loads((DEFAULT_DIR / "export.json").read_text())
    assert export["weights"] == "ema"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("default")


def test_default_generates_the_readme_example_reproducibly(pipe):
    images = [Image.open(EXAMPLE / "red-dotted-heart.png"), Image.open(EXAMPLE / "white-dotted-triangle.png")]
    first = pipe.generate(PROMPT, images=images, seed=0)
    again = pipe.generate(PROMPT, images=images, seed=0)
    other = pipe.generate(PROMPT, images=images, seed=1)
    targets = [s for s in first.images() if s.role == "target"]
    assert len(targets) == 1 and targets[0].image.size == (64, 64)

    def pixels(doc):
        return np.stack([np.asarray(s.image) for s in doc.images() if s.role == "target"])

    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))
    generation = first.meta["generation"]
    assert generation["checkpoint_hash"] == checkpoint_hash(DEFAULT_DIR) and generation["seed"] == 0


def test_default_layout_is_the_one_it_was_trained_with(pipe):
    import tomllib

    trained = tomllib.loads((DEFAULT_DIR / "train_config.toml").read_text())
    layout = pipe.engine.runtime.layout
    assert list(layout.target_size) == trained["layout"]["target_size"]
    assert layout.references_as_vae == trained["layout"]["references_as_vae"]
    assert layout.latent_patch == trained["model"]["latent"]["patch_size"]
    assert layout.vit_patch == trained["model"]["vit"]["patch_size"]


def test_the_default_loads_for_inference_without_autograd(pipe):
    runtime = pipe.engine.runtime
    assert not any(p.requires_grad for p in runtime.model.parameters())
    assert not any(p.requires_grad for p in runtime.codec.parameters())


def test_default_guidance_is_the_one_chosen_on_val_and_another_rule_drops_its_scales():
    pipe = Pipeline.from_pretrained("default")
    assert pipe.options().guidance == "cfg" and pipe.options().guidance_scales == {"scale": 4.5}
    assert pipe.options(guidance="cfg").guidance_scales == {"scale": 4.5}
    # cfg's `scale` means nothing to inset: another rule without scales gets its paper defaults
    inset = pipe.options(guidance="inset")
    assert inset.guidance == "inset" and inset.guidance_scales == {}
    assert pipe.options(guidance="inset", guidance_scales={"s1": 2.0}).guidance_scales == {"s1": 2.0}
    assert pipe.options(guidance="none").guidance_scales == {}
