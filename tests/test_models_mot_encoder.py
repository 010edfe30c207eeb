"""The understanding encoder: grouped NaViT attention, the position amplitude, ToyWorld
recognition pretraining and loading it into a MoT (issue 20)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tapestry.cli import app
from tapestry.errors import TapestryError
from tapestry.models.mot.config import LatentConfig, LLMConfig, MoTConfig, ViTConfig
from tapestry.models.mot.encoder import EncoderPretrainConfig, load_pretrained_vit, pretrain, render_references
from tapestry.models.mot.model import MoTModel, NaViT, grid_position_ids, patchify

VIT = ViTConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, patch_size=8, max_patches_per_side=4)


def tiny_mot(vit: ViTConfig = VIT) -> MoTModel:
    torch.manual_seed(0)
    return MoTModel(MoTConfig(llm=LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                                            num_heads=2, num_kv_heads=1, head_dim=16),
                              vit=vit, latent=LatentConfig(channels=4, patch_size=2, max_side=4)))


def test_grouped_navit_equals_each_image_alone():
    torch.manual_seed(0)
    vit = NaViT(VIT)
    for p in vit.parameters():
        torch.nn.init.normal_(p, std=0.3)
    shapes = [(2, 3), (4, 4), (2, 3), (1, 1)]  # two lengths shared, one alone
    patches, positions, lengths = [], [], []
    for h, w in shapes:
        img = torch.randn(1, 3, h * 8, w * 8)
        patches.append(patchify(img, 8)[0])
        positions.append(grid_position_ids(h, w, 4))
        lengths.append(h * w)
    packed = vit(torch.cat(patches), torch.cat(positions), lengths)
    alone = []
    for x, pos in zip(patches, positions):  # each image on its own: no mask needed
        h = vit.patch_embed(x) + vit.pos_embed(pos)
        for layer in vit.layers:
            h = layer(h)
        alone.append(vit.post_norm(h))
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)
    # and images really do not see each other: changing one leaves the others' features alone
    patches[1] = patches[1] + 1.0
    changed = vit(torch.cat(patches), torch.cat(positions), lengths).split(lengths)
    torch.testing.assert_close(changed[0], packed.split(lengths)[0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(changed[1], packed.split(lengths)[1])


def test_pos_scale_sets_the_amplitude_of_the_position_table():
    images = [torch.rand(3, 16, 16) * 2 - 1]
    full = tiny_mot()
    none = tiny_mot(ViTConfig(**{**VIT.__dict__, "pos_scale": 0.0}))
    none.load_state_dict(full.state_dict())
    content = none.embed_images(images)[0]
    position = full.vit_pos_embed[grid_position_ids(2, 2, 4)]
    torch.testing.assert_close(full.embed_images(images)[0], content + position)
    with pytest.raises(Exception, match="pos_scale"):
        ViTConfig(**{**VIT.__dict__, "pos_scale": -1.0}).validate()


def test_pretraining_learns_and_loads_into_a_mot(tmp_path):
    pixels, labels = render_references(8, 32, seed=3)
    assert pixels.shape == (8, 3, 32, 32) and -1.0 <= pixels.min() and pixels.max() <= 1.0
    assert set(labels) == {"shape", "colour", "pattern", "size", "cell"}
    threads = torch.get_num_threads()
    report = pretrain(VIT, EncoderPretrainConfig(side=32, train_images=32, val_images=16, steps=80, batch=32, lr=1e-2,
                                                 threads=1, eval_every=40), tmp_path / "vit")
    assert torch.get_num_threads() == threads, "pretraining must leave the caller's thread count alone"
    assert [h["step"] for h in report["history"]] == [40, 80]
    # five cross-entropies start at ln(8·8·4·2·9) = 8.44 (chance); 32 images must be learnt
    assert report["history"][-1]["loss"] < 7.5
    assert all(0.0 <= report["val"][k] <= 1.0 for k in ("shape", "colour", "identity_and_size"))
    model = tiny_mot()
    before = model.vit.patch_embed.weight.clone()
    load_pretrained_vit(model, tmp_path / "vit")
    assert not torch.equal(before, model.vit.patch_embed.weight)
    saved = json.loads((tmp_path / "vit" / "encoder.json").read_text())
    assert saved["vit"]["hidden_size"] == 16
    with pytest.raises(TapestryError, match="encoder was trained as"):
        load_pretrained_vit(tiny_mot(ViTConfig(**{**VIT.__dict__, "num_layers": 1})), tmp_path / "vit")
    with pytest.raises(TapestryError, match="no pretrained encoder"):
        load_pretrained_vit(model, tmp_path / "nothing")


def test_vit_pretrain_cli_writes_and_refuses_foreign_folders(tmp_path):
    runner = CliRunner()
    out = tmp_path / "vit"
    result = runner.invoke(app, ["vit", "pretrain", "configs/test-tiny.toml", "--out", str(out), "--steps", "3",
                                 "--images", "32", "--val", "16", "--threads", "1", "-q"])
    assert result.exit_code == 0, result.output
    assert (out / "vit.safetensors").is_file() and "identity_and_size" in result.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["vit", "pretrain", "configs/test-tiny.toml", "--out", str(tmp_path / "mine"),
                                 "--steps", "3", "--images", "32", "-q"])
    assert result.exit_code == 2 and "did not write" in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
