"""Training on the ToyWorld stream: the source, and a tiny run that lowers the loss and raises
the ToyWorld judge score (exact-match answers of the understand task) above an untrained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tapestry.train import evaluate
from tapestry.train.config import SourceConfig, load_config
from tapestry.train.data import DocumentStream, ToyWorldSource
from tapestry.train.loop import Trainer, train
from tapestry.train.parallel import Dist

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_toyworld_source_is_a_seeded_stream_with_a_separate_val_split():
    compose = SourceConfig(name="c", task="compose", layout="image-first", side=32)
    story = SourceConfig(name="s", task="story", side=32)
    stream = DocumentStream([ToyWorldSource(compose, 0), ToyWorldSource(story, 0)], seed=0)
    drawn = [stream.draw({"c": 1.0, "s": 1.0}) for _ in range(6)]
    assert {d.source for d in drawn} == {"c", "s"}
    assert all(d.document.meta["toyworld"]["split"] == "train" for d in drawn)
    again = DocumentStream([ToyWorldSource(compose, 0), ToyWorldSource(story, 0)], seed=0).fetch(drawn[4].ref())
    assert again.document.id == drawn[4].document.id
    other_stream = ToyWorldSource(compose, 1).fetch(0)[0]
    assert other_stream.id != ToyWorldSource(compose, 0).fetch(0)[0].id, "the run seed numbers the train stream"
    val = evaluate.val_documents(load_config(CONFIGS / "test-tiny.toml"), 6)
    assert [d.meta["toyworld"]["split"] for d in val] == ["val"] * 6
    assert len({d.meta["toyworld"]["task"] for d in val}) >= 4, "val documents cover the sources round-robin"


@pytest.mark.slow
def test_a_tiny_run_lowers_the_loss_and_raises_the_judge_score(tmp_path):
    steps = 80
    overrides = ['data.sources=[{name = "understand", task = "understand", side = 32}]', "data.budget=256",
                 "data.rows=4", f"stages.0.steps={steps}", "optim.lr=3e-3", "dropout.policy=none",
                 "model.vocab_size=300", "checkpoint.every=1000", "log.every=1",
                 "eval.every=40", "eval.docs=8", f"eval.judge_every={steps}", "eval.judge_docs=24",
                 "eval.judge_steps=2"]
    config = load_config(CONFIGS / "test-tiny.toml", overrides)
    run = tmp_path / "understand"
    train(config, run, quiet=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert "val_loss" in records[39] and "val_loss" in records[-1]
    assert records[-1]["val_loss"] < records[39]["val_loss"] * 1.05

    untrained_trainer = Trainer(config, run, Dist(), quiet=True)
    untrained = evaluate.judged_samples(untrained_trainer.build(config.stages[0]), untrained_trainer,
                                        evaluate.val_documents(config, 24), steps=2)
    trained = records[-1]["judge_understand"]
    assert trained > untrained["judge_understand"], (trained, untrained)
