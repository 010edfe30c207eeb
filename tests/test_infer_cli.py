import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tapestry.cli import app
from tapestry.infer.engine import GenerationOptions
from tapestry.infer.pipeline import Pipeline, save_pipeline
from tapestry.models.common.tokenizer import train_bpe
from conftest import tiny_mot_config
from tapestry.models.mot.family import layout_config_for
from tapestry.models.mot.model import MoTModel
from tapestry.models.vae.toy import ToyAEConfig, ToyAutoencoder
from tapestry.storage import load_folder, save_folder
from tapestry.document import Document, ImageSegment, TextSegment

runner = CliRunner()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe")
    tokenizer = train_bpe(["A red circle sits left of a blue star.", "Then it moves."] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = tiny_mot_config(tokenizer.vocab_size, latent_channels=4)
    model = MoTModel(config)
    torch.nn.init.normal_(model.latent_out.weight, std=0.05)
    vae = ToyAutoencoder(ToyAEConfig(latent_channels=4, channels=(8, 8, 8), encoder_blocks=(0, 0, 0),
                                     decoder_blocks=(0, 0, 0), norm_groups=4, resolution=32))
    layout = layout_config_for(config, vae.downsample, target_size=(32, 32))
    save_pipeline(folder, model, tokenizer, vae, layout, GenerationOptions(steps=2, max_new_tokens=4))
    return folder


@pytest.fixture
def images(tmp_path):
    paths = []
    for k, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
        path = tmp_path / f"in{k}.png"
        Image.new("RGB", (32, 32), colour).save(path)
        paths.append(str(path))
    return paths


def test_generate_writes_document_images_and_page(pipeline_dir, images, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "A [img1] sits left of a [img2].", "--image", images[0], "--image", images[1],
            "--out", str(out), "--checkpoint", str(pipeline_dir), "--seed", "3", "--json", "-q",
            "--guidance", "inset", "--s1", "2", "--s2", "1.5", "--max-images", "1", "--temperature", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["seed"] == 3 and summary["checkpoint_hash"].startswith("sha256:")
    doc = load_folder(out)
    generation = doc.meta["generation"]
    assert (generation["guidance"], generation["guidance_scales"]["s1"], generation["steps"]) == ("inset", 2.0, 2)
    assert generation["checkpoint_hash"] == summary["checkpoint_hash"]
    assert (out / "index.html").is_file() and "data:image/png;base64" in (out / "index.html").read_text()
    assert summary["images"] == sum(1 for s in doc.segments[3:] if s.type == "image") <= 1
    # Same inputs, same seed: the same Document, byte for byte.
    again = tmp_path / "again"
    result = runner.invoke(app, args[:7] + [str(again)] + args[8:])
    assert result.exit_code == 0
    assert (again / "doc.json").read_text() == (out / "doc.json").read_text()
    for a, b in zip(sorted((out / "images").iterdir()), sorted((again / "images").iterdir())):
        assert a.read_bytes() == b.read_bytes()


def test_generate_fills_targets_of_a_document(pipeline_dir, tmp_path):
    doc = Document("story", [TextSegment("A red circle."), ImageSegment("target", width=32, height=32),
                             TextSegment("Then it moves."), ImageSegment("target", width=32, height=32)])
    save_folder(doc, tmp_path / "in")
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", str(tmp_path / "in"), "--out", str(out),
                                 "--checkpoint", str(pipeline_dir), "-q", "--json"])
    assert result.exit_code == 0, result.output
    filled = load_folder(out)
    assert [s.type for s in filled.segments] == ["text", "image", "text", "image"]
    assert all(s.image is not None and s.image.size == (32, 32) for s in filled.images())
    assert filled.meta["generation"]["stop_reason"] == "targets_filled"


@pytest.mark.parametrize("extra, message", [
    (["--image", "missing.png"], "missing.png: image file not found"),
    ([], "slot [img1] is out of range: the document has 0 image(s)"),
    (["--image", "IMG0", "--image", "IMG1", "--image", "IMG0"], "image 3 ('img3') is left unbound"),
    (["--image", "IMG0", "--checkpoint", "nowhere"], "checkpoint 'nowhere' not found"),
    (["--image", "IMG0", "--guidance", "inset", "--scale", "3"], "does not take ['scale']"),
    (["--image", "IMG0", "--steps", "0"], "--steps must be at least 1"),
    (["--image", "IMG0", "--guidance", "wild"], "unknown guidance rule 'wild'"),
    (["--image", "CORRUPT"], "corrupt or truncated image"),
    (["--image", "HUGE"], "decompression bomb refused"),
])
def test_bad_input_is_one_clear_line_exit_2_and_nothing_written(pipeline_dir, images, tmp_path, extra, message):
    from conftest import png_header_only

    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "huge.png").write_bytes(png_header_only(20_000, 20_000))
    subs = {"IMG0": images[0], "IMG1": images[1], "CORRUPT": str(tmp_path / "corrupt.png"),
            "HUGE": str(tmp_path / "huge.png"), "missing.png": str(tmp_path / "missing.png")}
    extra = [subs.get(x, x) for x in extra]
    if "--checkpoint" not in extra:
        extra += ["--checkpoint", str(pipeline_dir)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    result = runner.invoke(app, ["generate", "A [img1] sits.", "--out", str(out)] + extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # left as it was


def test_python_api(pipeline_dir):
    pipe = Pipeline.from_pretrained(pipeline_dir)
    red = Image.new("RGB", (32, 32), (200, 0, 0))
    doc = pipe.generate("A [img1] is here.", images=[red], seed=1, max_images=1)
    assert doc.meta["generation"]["checkpoint_hash"] == pipe.checkpoint_hash
    events = [e.type for e in pipe.stream("A [img1] is here.", images=[red], seed=1, max_images=1)]
    assert events[-1] == "done"
    docs = pipe.generate_batch(["A [img1] is here."] * 0 + [Document("a", [TextSegment("hi")]),
                                                           Document("b", [TextSegment("ho")])], seed=5)
    assert [d.meta["generation"]["seed"] for d in docs] == [5, 6]
