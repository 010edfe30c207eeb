"""Data sources, the mixed stream, packing and the data state (tapestry.train.data / packing).

Also holds the small document factory the other test_train* files share (`make_docs`,
`write_shards`, `tiny_config`): compose / draw / answer documents with flat-colour images, the
three shapes of sample (references -> target, prompt -> target, image -> answer) training sees.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

from tapestry.document import Document, ImageSegment, TextSegment, from_markup
from tapestry.errors import DocumentError, TapestryError
from tapestry.layout import LayoutConfig
from tapestry.models.common.tokenizer import train_bpe
from tapestry.storage import save_shard
from tapestry.train.config import DropoutConfig, SourceConfig, config_from_data
from tapestry.train.data import DocumentStream, ShardSource
from tapestry.train.packing import MAX_WAIT, Packer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40),
           "purple": (140, 40, 180), "cyan": (40, 200, 210)}


def picture(colour: str, side: int = 32, cell: int | None = None) -> Image.Image:
    """A flat background with a coloured square in one of four quadrants (or filling the image)."""
    image = Image.new("RGB", (side, side), (90, 90, 90) if cell is not None else COLOURS[colour])
    if cell is not None:
        half = side // 2
        x, y = (cell % 2) * half, (cell // 2) * half
        image.paste(COLOURS[colour], (x, y, x + half, y + half))
    return image


def make_doc(i: int, side: int = 32) -> Document:
    rng = np.random.default_rng(i)
    a, b = (str(c) for c in rng.choice(list(COLOURS), 2, replace=False))
    cell = int(rng.integers(4))
    where = ("top left", "top right", "bottom left", "bottom right")[cell]
    kind = i % 3
    if kind == 0:
        doc = from_markup(f"A [img1] square goes {where}, next to nothing like the [img2].",
                          [picture(a, side), picture(b, side)], id=f"doc-{i}")
        doc.segments.append(ImageSegment("target", image=picture(a, side, cell)))
        return doc
    if kind == 1:
        return Document(f"doc-{i}", [TextSegment(f"Draw a {a} square {where}."),
                                     ImageSegment("target", image=picture(a, side, cell))])
    return Document(f"doc-{i}", [ImageSegment("context", image=picture(b, side, cell)),
                                 TextSegment("Which colour is the square?"), TextSegment(b, "target")])


def make_docs(n: int, start: int = 0, side: int = 32) -> list[Document]:
    return [make_doc(start + i, side) for i in range(n)]


def write_shards(folder, n_shards: int = 2, per_shard: int = 40, side: int = 32) -> str:
    for s in range(n_shards):
        save_shard(make_docs(per_shard, s * per_shard, side), folder / f"shard-{s:02d}.tar")
    return str(folder)


def tiny_config(shards: str, **overrides) -> dict:
    """A raw config dict of a tiny model on `shards`; `overrides` are dotted keys."""
    data = {
        "seed": 0,
        "model": {"vocab_size": 300, "tokenizer_docs": 60, "tokenizer_english_chars": 0, "vae": "pool:4",
                  "llm": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
                          "num_kv_heads": 1, "head_dim": 16},
                  "vit": {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2,
                          "patch_size": 8, "max_patches_per_side": 8},
                  "latent": {"patch_size": 2, "max_side": 8, "timestep_freq_dim": 32}},
        "layout": {"target_size": [32, 32]},
        "data": {"budget": 192, "rows": 2, "lookahead": 96, "sources": [{"name": "docs", "kind": "shards", "path": shards}]},
        "dropout": {"policy": "bagel"},
        "optim": {"lr": 3e-3},
        "ema": {"decay": 0.9},
        "stages": [{"name": "main", "steps": 6}],
        "checkpoint": {"every": 3, "keep": 5},
        "log": {"every": 1},
    }
    from tapestry.train.config import apply_override

    for key, value in overrides.items():
        apply_override(data, f"{key}={value!r}" if isinstance(value, str) else f"{key}={_toml(value)}")
    return data


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) if not isinstance(v, str) else repr(v) for v in value) + "]"
    return repr(value)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def tokenizer():
    texts = [t for d in make_docs(30) for t in d.reading_order() if isinstance(t, str)]
    return train_bpe(texts, vocab_size=300)


LAYOUT = LayoutConfig(vit_patch=8, vae_downsample=4, latent_patch=2, max_vit_side=8, max_latent_side=8,
                      target_size=(32, 32))


def shard_stream(path: str, seed: int = 0, names=("a",)) -> DocumentStream:
    return DocumentStream([ShardSource(SourceConfig(name=n, kind="shards", path=path), seed) for n in names], seed)


# ---------------------------------------------------------------------------------------------


def test_stream_is_seeded_and_its_state_continues_exactly(shards):
    weights = {"a": 0.3, "b": 0.7}
    one = shard_stream(shards, names=("a", "b"))
    ids = [(d.source, d.document.id) for d in (one.draw(weights) for _ in range(30))]
    two = shard_stream(shards, names=("a", "b"))
    first = [(d.source, d.document.id) for d in (two.draw(weights) for _ in range(12))]
    state = copy.deepcopy(two.state())
    three = shard_stream(shards, names=("a", "b"))
    three.load_state(state)
    rest = [(d.source, d.document.id) for d in (three.draw(weights) for _ in range(18))]
    assert first + rest == ids
    # the mixture follows its weights (30 draws: loose bounds, fixed seed)
    counts = {n: sum(1 for s, _ in ids if s == n) for n in "ab"}
    assert counts["b"] > counts["a"]


def test_shard_source_reads_every_document_once_per_epoch_then_reshuffles_files(shards):
    stream = shard_stream(shards)
    ids = [stream.draw({"a": 1.0}).document.id for _ in range(160)]
    epoch0, epoch1 = ids[:80], ids[80:]
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"doc-{i}" for i in range(80))
    assert len(set(epoch0)) == 80
    # a fetch by reference (what a resume does for waiting documents) returns the same document
    drawn = shard_stream(shards)
    items = [drawn.draw({"a": 1.0}) for _ in range(45)]
    again = shard_stream(shards).fetch(items[41].ref())
    assert again.document.id == items[41].document.id and again.index == 41


def test_a_bad_sample_stops_the_stream_with_its_reason(tmp_path):
    import io
    import json
    import tarfile

    save_shard(make_docs(2), tmp_path / "ok.tar")
    with tarfile.open(tmp_path / "zbad.tar", "w") as tar:
        payload = json.dumps({"id": "broken", "segments": [{"type": "image", "src": "0.png"}]}).encode()
        info = tarfile.TarInfo("00000000.json")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    stream = DocumentStream([ShardSource(SourceConfig(name="a", kind="shards", path=str(tmp_path)), seed=3)], 3)
    with pytest.raises(DocumentError, match="broken"):
        for _ in range(3):
            stream.draw({"a": 1.0})


def packer_for(shards, tokenizer, budget=192, rows=2, lookahead=96, seed=0, policy="none"):
    return Packer(shard_stream(shards, seed), tokenizer, LAYOUT, DropoutConfig(policy=policy), seed, budget, rows, lookahead)


def consumed(batch) -> list[str]:
    return [item.drawn.document.id for row in batch.items for item in row]


def test_packing_fills_rows_and_resume_sees_every_document_once(shards, tokenizer):
    whole = packer_for(shards, tokenizer)
    seen = [consumed(whole.next_batch({"a": 1.0})) for _ in range(10)]
    for batch_ids in seen:
        assert batch_ids
    flat = [i for ids in seen for i in ids]
    assert len(flat) == len(set(flat)), "a document was packed twice within one epoch"

    first = packer_for(shards, tokenizer)
    head = [consumed(first.next_batch({"a": 1.0})) for _ in range(4)]
    state = copy.deepcopy(first.state())
    assert state["waiting"], "the test wants documents waiting across the step boundary"
    resumed = packer_for(shards, tokenizer)
    resumed.load_state(state)
    tail = [consumed(resumed.next_batch({"a": 1.0})) for _ in range(6)]
    assert head + tail == seen


def test_rows_are_exactly_the_budget_and_efficiency_is_high(shards, tokenizer):
    packer = packer_for(shards, tokenizer, budget=1024, rows=2, lookahead=512)
    batches = [packer.next_batch({"a": 1.0}) for _ in range(12)]
    assert all(r.length == 1024 for b in batches for r in b.rows)
    mean = sum(b.efficiency for b in batches) / len(batches)
    assert mean >= 0.98, mean
    # no spare candidates: rows keep the gaps the last documents leave
    tight = packer_for(shards, tokenizer, budget=1024, rows=2, lookahead=0)
    greedy = sum(tight.next_batch({"a": 1.0}).efficiency for _ in range(12)) / 12
    assert greedy <= mean
    # what waits stays bounded (about the spare candidates plus a row) and nobody waits forever
    assert sum(i.length for i in packer.waiting) <= 512 + 2 * 1024
    assert max(i.waited for i in packer.waiting) <= MAX_WAIT


def test_a_document_longer_than_the_budget_is_an_error_naming_it(shards, tokenizer):
    packer = packer_for(shards, tokenizer, budget=40)
    with pytest.raises(TapestryError, match=r"doc-0.*data.budget = 40"):
        packer.next_batch({"a": 1.0})


def test_config_requires_sources_and_unique_names(shards):
    raw = tiny_config(shards)
    raw["data"]["sources"].append(dict(raw["data"]["sources"][0]))
    with pytest.raises(TapestryError, match="unique name"):
        config_from_data(raw)
