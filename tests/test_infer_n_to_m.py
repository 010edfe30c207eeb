"""N-to-M: a model trained to emit BOI decides how many images to draw, and the engine obeys it."""

import pytest
import torch

from test_models_mot_family import AvgPoolCodec, picture
from tapestry.document import Document, ImageSegment, TextSegment
from tapestry.infer.engine import Engine, GenerationOptions
from tapestry.layout import layout_document, pack_layouts
from tapestry.models.common.tokenizer import train_bpe
from conftest import tiny_mot_config
from tapestry.models.mot.family import layout_config_for, prepare_row
from test_models_mot_family import training_loss
from tapestry.models.mot.model import MoTModel

WORDS = {1: "one", 2: "two", 3: "three"}


def howto(n: int, k: int) -> Document:
    """'Draw three stars, one at a time.' then n (image, caption) steps, then the end."""
    segments = [TextSegment(f"Draw {WORDS[n]} stars, one at a time.")]
    for step in range(n):
        segments.append(ImageSegment("target", image=picture((40 * step + 10 * k, 90, 200), size=16)))
        segments.append(TextSegment(f" Step {step + 1}.", role="target"))
    return Document(f"howto-{n}-{k}", segments)


@pytest.mark.slow
def test_trained_model_draws_the_number_of_images_the_prompt_asks_for():
    tokenizer = train_bpe([howto(n, 0).segments[0].text + " Step 1. Step 2. Step 3." for n in WORDS] * 10,
                          vocab_size=280)
    torch.manual_seed(0)
    config = tiny_mot_config(tokenizer.vocab_size, hidden=48, layers=2, heads=4, kv_heads=2, patch_side=4)
    model = MoTModel(config)
    layout = layout_config_for(config, AvgPoolCodec.downsample, target_size=(16, 16))
    codec = AvgPoolCodec()
    docs = [howto(n, k) for n in WORDS for k in range(2)]
    singles = [layout_document(d, tokenizer, layout) for d in docs]
    rows = pack_layouts(singles, 512, tokenizer.pad_id)
    by_id = {d.id: d for d in docs}
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-3, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(0)
    for step in range(90):
        batch = [prepare_row(row, [by_id[p.id] for p in row.documents], layout, codec, generator) for row in rows]
        optimizer.zero_grad()
        parts = training_loss(model, batch, flow_weight=0.1)
        parts.loss.backward()
        optimizer.step()
    assert float(parts.text_loss) < 0.05, f"text loss {float(parts.text_loss):.3f} did not converge"

    engine = Engine.for_model(model, tokenizer, codec, layout)
    for n in WORDS:
        prompt = Document(f"ask-{n}", [TextSegment(f"Draw {WORDS[n]} stars, one at a time.")])
        result = engine.generate(prompt, GenerationOptions(seed=0, steps=2, max_new_tokens=40, max_images=6))
        drawn = [s for s in result.segments if isinstance(s, ImageSegment)]
        assert len(drawn) == n, [s.text if isinstance(s, TextSegment) else "<img>" for s in result.segments]
        assert result.meta["generation"]["stop_reason"] == "eos"
        captions = "".join(s.text for s in result.segments[1:] if isinstance(s, TextSegment))
        assert captions == "".join(f" Step {k + 1}." for k in range(n))
