import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tapestry.document import Document, ImageSegment, TextSegment, from_markup
from tapestry.layout import GEN, UND, concat_layouts, dense_mask, layout_document
from tapestry.models.common.tokenizer import train_bpe
from conftest import tiny_mot_config
from tapestry.models.mot.family import MOT, embed_row, layout_config_for, pixels_to_tensor, prepare_row
from tapestry.models.mot.model import MoTModel
from tapestry.train.loss import LossModule


class LossParts:
    """The loss training uses (train/loss.py's LossModule over the mot family), as numbers."""

    def __init__(self, model, batch, flow_weight: float = 1.0):
        counts = MOT.loss_counts([inputs.row for inputs in batch], model.config)
        self.loss, sums = LossModule(model, MOT)(batch, counts, {"text": 1.0, "flow": flow_weight})
        self.text_tokens, self.flow_elements = counts["text"], counts["flow"]
        self.text_loss = sums[0] / max(1, self.text_tokens)
        self.flow_loss = sums[1] / max(1, self.flow_elements)


def training_loss(model, batch, flow_weight: float = 1.0) -> LossParts:
    return LossParts(model, batch, flow_weight)


class AvgPoolCodec:
    """A real (if lossy) deterministic autoencoder: f×f average pooling and nearest upsampling."""

    downsample = 4
    latent_channels = 3

    def encode(self, images):
        return F.avg_pool2d(images, self.downsample)

    def decode(self, latents):
        return F.interpolate(latents, scale_factor=self.downsample, mode="nearest")


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["A red circle sits left of a blue star.", "Then it moves.", "red"] * 20, vocab_size=300)


@pytest.fixture(scope="module")
def setup(tokenizer):
    torch.manual_seed(0)
    config = tiny_mot_config(tokenizer.vocab_size)
    model = MoTModel(config)
    # A fresh model predicts v = 0 (zero output projection); give it a random head so the
    # generation path's gradients and outputs are not trivially zero in these tests.
    torch.nn.init.normal_(model.latent_out.weight, std=0.02)
    layout = layout_config_for(config, AvgPoolCodec.downsample, target_size=(32, 32))
    return model, layout


def picture(colour, size=32):
    return Image.new("RGB", (size, size), colour)


def compose(doc_id="c"):
    doc = from_markup("A [img1] sits left of a [img2].", [picture((200, 0, 0)), picture((0, 0, 200))], id=doc_id)
    doc.segments.append(ImageSegment("target", image=picture((120, 60, 0))))
    return doc


def story(doc_id="s"):
    return Document(doc_id, [TextSegment("A red circle sits left."), ImageSegment("context", image=picture((9, 9, 9))),
                             TextSegment("Then it moves.", "target"), ImageSegment("target", image=picture((50, 50, 50))),
                             TextSegment("red", "target")])


def test_layout_config_comes_from_the_model(setup):
    _, layout = setup
    assert (layout.vit_patch, layout.max_vit_side, layout.latent_patch, layout.max_latent_side,
            layout.vae_downsample) == (8, 8, 2, 8, 4)


def test_prepare_row_noises_targets_and_keeps_clean_latents(setup, tokenizer):
    model, layout = setup
    doc = story()
    row = layout_document(doc, tokenizer, layout)
    inputs = prepare_row(row, [doc], layout, AvgPoolCodec(), torch.Generator().manual_seed(1))
    kinds = [p.kind for p in row.images]
    assert kinds == ["vit", "vae", "noise", "vit", "vae"]
    assert sorted(inputs.vit_pixels) == [0, 3] and inputs.vit_pixels[0].shape == (3, 32, 32)
    x0_context = AvgPoolCodec().encode(pixels_to_tensor(picture((9, 9, 9)), 32, 32)[None])[0]
    assert torch.equal(inputs.latents[1], x0_context) and inputs.timesteps[1] == 0.0
    # Noise span: x_t = (1 − t)·x0 + t·ε with target ε − x0; its clean copy is x0 itself.
    x0 = inputs.latents[4]
    t = inputs.timesteps[2]
    assert 0.0 < t < 1.0
    noise = inputs.velocity_targets[2] + x0
    assert torch.allclose(inputs.latents[2], (1 - t) * x0 + t * noise, atol=1e-6)


def test_loss_reaches_both_experts_and_falls(setup, tokenizer):
    model, layout = setup
    model = MoTModel.from_state_dict(model.config, {k: v.clone() for k, v in model.state_dict().items()})
    docs = [compose(), story()]
    rows = [layout_document(d, tokenizer, layout) for d in docs]
    row = concat_layouts(rows, tokenizer.pad_id, budget=sum(r.length for r in rows) + 5)
    generator = torch.Generator().manual_seed(0)
    inputs = prepare_row(row, docs, layout, AvgPoolCodec(), generator)
    parts = training_loss(model, [inputs])
    parts.loss.backward()
    assert parts.text_tokens > 0 and parts.flow_elements == 2 * 3 * 8 * 8
    layer = model.layers[0]
    for expert in ("und", "gen"):
        for name in ("q_proj.weight", "mlp.down_proj.weight"):
            grad = layer.get_parameter(f"{expert}.{name}").grad
            assert grad is not None and grad.abs().sum() > 0, f"{expert}.{name} got no gradient"
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for step in range(30):
        optimizer.zero_grad()
        inputs = prepare_row(row, docs, layout, AvgPoolCodec(), torch.Generator().manual_seed(step % 3))
        parts = training_loss(model, [inputs])
        parts.loss.backward()
        optimizer.step()
        first = first if first is not None else float(parts.loss.detach())
    assert float(parts.loss.detach()) < 0.5 * first


def test_a_packed_document_computes_as_if_alone(setup, tokenizer):
    model, layout = setup
    a, b = compose("a"), story("b")
    ra, rb = layout_document(a, tokenizer, layout), layout_document(b, tokenizer, layout)
    alone = prepare_row(ra, [a], layout, AvgPoolCodec(), torch.Generator().manual_seed(5))
    packed_row = concat_layouts([ra, rb], tokenizer.pad_id, budget=ra.length + rb.length + 7)
    packed = prepare_row(packed_row, [a, b], layout, AvgPoolCodec(), torch.Generator().manual_seed(5))
    with torch.no_grad():
        def run(inputs):
            row = inputs.row
            embeds = embed_row(model, inputs)[None]
            return model(embeds, row.expert[None], row.position_ids[None], dense_mask(row.spans))[0]

        h_alone = run(alone)
        h_packed = run(packed)
    assert torch.allclose(h_packed[: ra.length], h_alone, atol=1e-5)
    # Routing as laid out: ViT and text on the und expert, latents on the gen expert.
    assert set(packed_row.expert[packed_row.images[0].start : packed_row.images[0].end].tolist()) == {UND}
    noise = next(p for p in packed_row.images if p.kind == "noise")
    assert set(packed_row.expert[noise.start : noise.end].tolist()) == {GEN}


def test_flow_loss_of_a_batch_gathers_each_target_from_its_own_row(setup, tokenizer):
    """loss_sums takes every target's tokens in one gather over the flattened batch: the flow sum
    and its gradients equal the per-target slices of the hidden states of each row."""
    from tapestry.masks import document_masks
    from tapestry.models.mot.family import loss_sums

    model, layout = setup
    a, b = compose("a"), story("b")
    ra, rb = layout_document(a, tokenizer, layout), layout_document(b, tokenizer, layout)
    budget = ra.length + rb.length + 5
    batch = [prepare_row(concat_layouts(pair, tokenizer.pad_id, budget=budget), docs, layout, AvgPoolCodec(),
                         torch.Generator().manual_seed(3))
             for pair, docs in (([ra, rb], [a, b]), ([rb, ra], [b, a]))]
    assert sum(len(inputs.velocity_targets) for inputs in batch) >= 4  # targets in both rows, at other places

    def by_slices():
        rows = [inputs.row for inputs in batch]
        embeds = torch.stack([embed_row(model, inputs) for inputs in batch])
        hidden = model(embeds, torch.stack([r.expert for r in rows]), torch.stack([r.position_ids for r in rows]),
                       document_masks([r.spans for r in rows]))
        total = 0.0
        for i, inputs in enumerate(batch):
            for n, target in inputs.velocity_targets.items():
                p = inputs.row.images[n]
                v = model.latent_velocity(hidden[i : i + 1, p.start : p.end], *p.grid, inputs.latents[n][None],
                                          torch.tensor([inputs.timesteps[n]]))[0]
                total = total + (v - target).pow(2).sum()
        return total

    grads = []
    for compute in (lambda: loss_sums(model, batch)["flow"], by_slices):
        model.zero_grad()
        value = compute()
        value.backward()
        grads.append((value.detach(), model.latent_out.weight.grad.clone(), model.layers[0].gen.v_proj.weight.grad.clone()))
    model.zero_grad()
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _trained_velocity_and_runtime_velocity(model, layout, tokenizer):
    """One compose document's target velocity computed twice: by the training path (a whole
    row, dense mask, the loss's head) and by the inference runtime (prefill of the prompt, BOI,
    one denoising step against the cache) at the same x_t and t."""
    from tapestry.models.common.patches import patchify, unpatchify

    doc = compose("consistency")
    row = layout_document(doc, tokenizer, layout)
    inputs = prepare_row(row, [doc], layout, AvgPoolCodec(), torch.Generator().manual_seed(3))
    n = next(iter(inputs.velocity_targets))
    placement = row.images[n]
    h, w = placement.grid
    x_t, t = inputs.latents[n], torch.tensor([inputs.timesteps[n]])
    with torch.no_grad():
        hidden = model(embed_row(model, inputs)[None], row.expert[None], row.position_ids[None],
                       dense_mask(row.spans)[None])
        trained = model.latent_velocity(hidden[:, placement.start:placement.end], h, w, x_t[None], t)[0]
        runtime = MOT.runtime(model, tokenizer, AvgPoolCodec(), layout)
        ctx = runtime.prefill(Document(doc.id, doc.segments[:-1]))
        runtime.append_text(ctx, [tokenizer.boi_id])
        runtime.begin_image(ctx)
        x = patchify(x_t[None], layout.latent_patch).unflatten(1, (h, w))  # [1, rows, cols, p·p·C]
        v = runtime.denoise({"cond": ctx}, x, t[0])["cond"]
    return trained, unpatchify(v.flatten(1, 2), layout.latent_patch, h, w)[0]


@pytest.mark.parametrize("prediction", ["velocity", "x0"])
def test_inference_sees_the_velocity_training_taught(setup, tokenizer, prediction):
    # A skew between the training row and the runtime's cached steps (positions, masks, experts,
    # the head's reading) would make the sampler follow a field the loss never shaped.
    from dataclasses import replace

    model, layout = setup
    if prediction != model.config.latent.prediction:
        config = replace(model.config, latent=replace(model.config.latent, prediction=prediction))
        other = MoTModel(config)
        other.load_state_dict(model.state_dict())
        model = other.eval()
    trained, inferred = _trained_velocity_and_runtime_velocity(model, layout, tokenizer)
    assert trained.abs().mean() > 1e-3
    assert torch.allclose(trained, inferred, atol=1e-5)


def test_a_checkpoint_trained_with_noise_copies_prefills_each_image_once(setup, tokenizer):
    # layout.noise_copies is saved with the layout it was trained with; a prompt holding an
    # earlier target (a story being continued) must still be laid out as inference sees it.
    from dataclasses import replace

    model, layout = setup
    doc = Document("s", story().segments[:-1])
    with torch.no_grad():
        once = MOT.runtime(model, tokenizer, AvgPoolCodec(), layout).prefill(doc)
        copies = MOT.runtime(model, tokenizer, AvgPoolCodec(), replace(layout, noise_copies=3)).prefill(doc)
    assert copies.next_position == once.next_position
    assert torch.equal(copies.last_hidden, once.last_hidden)


def test_an_x0_head_gives_the_velocity_of_the_line_through_x_t_and_its_estimate(setup):
    from dataclasses import replace

    from tapestry.models.mot.config import ConfigError, MoTConfig

    model, _ = setup
    config = replace(model.config, latent=replace(model.config.latent, prediction="x0"))
    x0_model = MoTModel(config)
    x0_model.load_state_dict(model.state_dict())
    hidden = torch.randn(2, 4, config.llm.hidden_size)
    x_t = torch.randn(2, 4, config.latent.patch_dim)
    t = torch.tensor([0.5, 0.01])
    estimate = model.latent_out(hidden)
    v = x0_model.velocity_tokens(hidden, x_t, t)
    assert torch.allclose(v[0], (x_t[0] - estimate[0]) / 0.5, atol=1e-6)
    assert torch.allclose(v[1], (x_t[1] - estimate[1]) / 0.05, atol=1e-5)  # t clipped: no blow-up near data
    assert torch.equal(model.velocity_tokens(hidden), estimate)  # a velocity head is read as it is
    with pytest.raises(ValueError, match="x_t and t"):
        x0_model.velocity_tokens(hidden)
    data = config.to_dict()
    data["latent"]["prediction"] = "epsilon"
    with pytest.raises(ConfigError, match="latent.prediction"):
        MoTConfig.from_dict(data)


def _scene_story(cell=0, size="small"):
    """The story document with its target naming a ToyWorld scene (one entity in `cell`)."""
    from tapestry.toyworld.spec import Background, Entity, PlacedEntity, Scene

    scene = Scene(Background("plain", ("charcoal",)), (PlacedEntity(Entity("circle", "red", "solid"), cell, size),))
    doc = story()
    doc.segments[3].meta = {"toyworld": {"scene": scene.to_dict()}}
    return doc, scene


def test_focus_weight_puts_the_flow_loss_on_the_entity(setup, tokenizer):
    from tapestry.toyworld.render import entity_mask

    model, layout = setup
    doc, scene = _scene_story(cell=0)  # upper-left
    mask = torch.from_numpy(entity_mask(scene, 8, 8))
    assert mask[0, 0] and not mask[7, 7] and 0 < int(mask.sum()) < 16
    row = layout_document(doc, tokenizer, layout)
    plain = prepare_row(row, [doc], layout, AvgPoolCodec(), torch.Generator().manual_seed(1))
    focused = prepare_row(row, [doc], layout, AvgPoolCodec(), torch.Generator().manual_seed(1), focus_weight=4.0)
    assert plain.flow_weights == {} and sorted(focused.flow_weights) == [2]  # the noise placement only
    weights = focused.flow_weights[2]  # [1, 8, 8]
    assert weights.shape == (1, 8, 8) and abs(float(weights.mean()) - 1.0) < 1e-6
    inside, outside = weights[0][mask], weights[0][~mask]
    assert torch.allclose(inside, inside[0]) and torch.allclose(outside, outside[0])
    assert torch.isclose(inside[0] / outside[0], torch.tensor(5.0))
    # the same draws either way: only the loss changes, and by the weighted error
    assert torch.equal(plain.latents[2], focused.latents[2])
    with torch.no_grad():
        a, b = training_loss(model, [plain]).flow_loss, training_loss(model, [focused]).flow_loss
    assert not torch.isclose(a, b)
    # a target without a scene keeps weight 1 (None), as with focus_weight 0
    other = story()
    kept = prepare_row(layout_document(other, tokenizer, layout), [other], layout, AvgPoolCodec(),
                       torch.Generator().manual_seed(1), focus_weight=4.0)
    assert kept.flow_weights == {}
    # every noisy copy of the target gets the same map
    from dataclasses import replace

    copies = replace(layout, noise_copies=2)
    row = layout_document(doc, tokenizer, copies)
    both = prepare_row(row, [doc], copies, AvgPoolCodec(), torch.Generator().manual_seed(1), focus_weight=4.0)
    noise = [n for n, p in enumerate(row.images) if p.kind == "noise"]
    assert len(noise) == 2 and sorted(both.flow_weights) == noise
    assert all(torch.equal(both.flow_weights[n], weights) for n in noise)
