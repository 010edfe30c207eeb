"""configs/mmi-tiny.toml through the unchanged training system, export and Pipeline: the mmi
family reached only through the registry (`model.family = "mmi"`)."""

from pathlib import Path

import pytest
import torch

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mmi-tiny.toml"


@pytest.mark.slow
def test_mmi_tiny_trains_exports_and_generates(tmp_path):
    from PIL import Image

    from tapestry.document import Document, ImageSegment, TextSegment
    from tapestry.infer.pipeline import Pipeline
    from tapestry.train.config import load_config
    from tapestry.train.export import export_checkpoint
    from tapestry.train.loop import train

    config = load_config(CONFIG, ["stages.0.steps=2", "checkpoint.every=2"])
    assert config.model.family == "mmi" and config.dropout.policy == "mmi"
    assert config.stages[0].loss_weights == {"image": 10.0}  # λ
    summary = train(config, tmp_path / "run", quiet=True)
    assert summary["step"] == 2
    assert summary["last"]["image_loss"] > 0 and torch.isfinite(torch.tensor(summary["last"]["loss"]))
    export_checkpoint(tmp_path / "run", tmp_path / "export")
    pipe = Pipeline.from_pretrained(tmp_path / "export")
    assert type(pipe.engine.runtime).__name__ == "MMIRuntime"
    given = Image.new("RGB", (32, 32), (200, 30, 30))
    doc = Document("d", [TextSegment("a red circle"), ImageSegment(role="context", image=given),
                         TextSegment("then"), ImageSegment(role="target")])
    out = pipe.generate(doc, steps=2, guidance="cfg")
    assert out.segments[3].image is not None and out.segments[3].image.size == (32, 32)
    assert out.meta["generation"]["checkpoint_hash"].startswith("sha256:")
