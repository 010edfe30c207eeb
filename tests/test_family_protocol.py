"""The family protocol is enough: a second family that lives only in tests (tiny_family.py) is
registered here, trains with `tapestry train`, exports, and generates through Pipeline and the
engine — with no change to tapestry/train or tapestry/infer. And those packages (and eval/)
import no family."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tapestry.models import family as families
from tiny_family import TinyFamily

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """
seed = 0
[model]
family = "tiny"
hidden = 32
layers = 1
vae = "pool:4"
vocab_size = 300
tokenizer_docs = 40
tokenizer_english_chars = 0
[layout]
target_size = [32, 32]
[data]
budget = 320
rows = 2
lookahead = 64
[[data.sources]]
name = "compose"
task = "compose"
side = 32
[dropout]
policy = "illume"
[ema]
decay = 0.5
[[stages]]
steps = 4
lr_scale = {heads = 0.5}
[checkpoint]
every = 4
[log]
every = 1
"""


@pytest.fixture(scope="module")
def tiny():
    family = families.register(TinyFamily())
    yield family
    families.unregister("tiny")


def test_train_infer_and_eval_import_no_family():
    offenders = []
    for package in ("train", "infer", "eval"):
        for path in sorted((ROOT / "tapestry" / package).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"tapestry\.models\.(mot|duet|mmi)\b|from tapestry\.models import (mot|duet|mmi)\b", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_inspection_reaches_families_only_through_the_protocol():
    # `tapestry inspect` asks each family (Family.inspect); its own modules import none
    for path in (ROOT / "tapestry" / "models" / "inspection.py", ROOT / "tapestry" / "models" / "inspect_cli.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"tapestry\.models\.(mot|duet|mmi)\b|from tapestry\.models import (mot|duet|mmi)\b", text), path


def test_every_builtin_family_declares_its_loss_parts_and_inspects():
    for name in ("mot", "duet", "mmi"):
        family = families.get(name)
        assert family.loss_parts[0] == "text" and len(set(family.loss_parts)) == len(family.loss_parts)
        assert callable(family.inspect)
    assert families.get("mmi").loss_parts == ("text", "image")


def test_unknown_families_are_named_with_the_known_ones(tiny):
    with pytest.raises(families.FamilyError, match=r"unknown model family 'nope'; known families: duet, mmi, mot, tiny"):
        families.get("nope")
    assert families.family_name({"format": "tapestry.mot"}) == "mot"  # config.json before the field


@pytest.mark.slow
def test_a_test_only_family_trains_exports_and_generates(tiny, tmp_path):
    from tapestry.cli import app
    from tapestry.infer.engine import Engine, GenerationOptions
    from tapestry.infer.pipeline import Pipeline
    from tapestry.document import Document, TextSegment

    (tmp_path / "tiny.toml").write_text(CONFIG)
    runner = CliRunner()
    trained = runner.invoke(app, ["train", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "run"), "--quiet"])
    assert trained.exit_code == 0, trained.output
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(m["loss"])) and m["text_loss"] > 0 for m in metrics)
    exported = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert exported.exit_code == 0, exported.output
    assert json.loads((tmp_path / "out" / "pipeline.json").read_text())["family"] == "tiny"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["family"] == "tiny"

    pipe = Pipeline.from_pretrained(tmp_path / "out")
    assert type(pipe.engine.runtime).__name__ == "TinyRuntime"
    assert not any(p.requires_grad for p in pipe.engine.runtime.model.parameters())
    refs = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))]
    from tapestry.document import ImageSegment, from_markup

    prompt = from_markup("A [img1] left of a [img2].", refs, id="p")
    prompt.segments.append(ImageSegment("target", width=32, height=32))
    first = pipe.generate(prompt, seed=0, steps=2, guidance="inset")
    again = pipe.generate(prompt, seed=0, steps=2, guidance="inset")
    drawn = [s.image for s in first.images() if s.role == "target"]
    assert drawn and all(image.size == (32, 32) for image in drawn)
    assert [s.image.tobytes() for s in again.images() if s.role == "target"] == [i.tobytes() for i in drawn]
    assert first.meta["generation"]["guidance"] == "inset"

    # the engine directly: a target image in place, every guidance rule's branches on their contexts
    engine = Engine(tiny.runtime(pipe.engine.runtime.model, pipe.engine.tokenizer, pipe.engine.runtime.codec,
                                 pipe.engine.runtime.layout))
    doc = Document("t", [TextSegment("A red square."), ImageSegment("target", width=32, height=32)])
    for rule in ("none", "cfg", "bagel", "duetgen"):
        out = engine.generate(doc, GenerationOptions(seed=1, steps=2, guidance=rule))
        assert out.segments[1].image.size == (32, 32), rule
