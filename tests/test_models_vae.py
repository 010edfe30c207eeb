"""Autoencoders: the ToyWorld AE (config, checkpoints, shapes, training) and the FLUX-layout loader
(key rules, coverage, clear refusals, an independent hand computation, diffusers round trip)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tapestry.models.common.checkpoint import CheckpointError
from tapestry.models.vae import Autoencoder, VAEError, latent_shape, load_autoencoder
from tapestry.models.vae.toy import ToyAEConfig, ToyAutoencoder



def tiny_toy(**overrides) -> ToyAEConfig:
    # 16 channels, not 8: oneDNN's CPU kernels for 8-channel convolutions are ten times slower.
    base = {"channels": (16, 16, 16), "encoder_blocks": (0, 1, 1), "decoder_blocks": (1, 1, 1),
            "norm_groups": 4, "latent_channels": 4, "resolution": 32}
    return ToyAEConfig(**(base | overrides))


def images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- ToyWorld AE
def test_toy_ae_implements_the_protocol_and_latent_shapes():
    torch.manual_seed(0)
    ae = ToyAutoencoder(ToyAEConfig())
    assert isinstance(ae, Autoencoder)
    assert (ae.downsample, ae.latent_channels) == (4, 8)
    # 64 px -> 16×16×8: 64 tokens of 2×2 latent patches, the point of the ×4 design.
    assert latent_shape(ae, 64, 64) == (8, 16, 16)
    with pytest.raises(VAEError, match="multiple of"):
        latent_shape(ae, 64, 62)


@pytest.mark.parametrize("height,width", [(32, 32), (48, 64), (64, 64), (96, 32)])
def test_toy_ae_shapes_at_several_resolutions(height, width):
    torch.manual_seed(0)
    ae = ToyAutoencoder(tiny_toy()).eval()
    x = torch.rand(2, 3, height, width) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)  # [B, C, H/4, W/4]
        y = ae.decode(z)
    assert z.shape == (2, 4, height // 4, width // 4)
    assert y.shape == x.shape


def test_toy_ae_refuses_bad_inputs_and_configs():
    ae = ToyAutoencoder(tiny_toy())
    with pytest.raises(VAEError, match="multiples of 4"):
        ae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(VAEError, match=r"\[B, 3, H, W\]"):
        ae.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(VAEError, match=r"\[B, 4, h, w\]"):
        ae.decode(torch.zeros(1, 8, 8, 8))
    with pytest.raises(VAEError, match="norm_groups"):
        ToyAutoencoder(tiny_toy(channels=(16, 10, 16)))
    with pytest.raises(VAEError, match="decoder_blocks"):
        ToyAutoencoder(tiny_toy(decoder_blocks=(1, 1)))


def test_toy_ae_save_load_round_trip_is_bitwise(tmp_path):
    torch.manual_seed(0)
    ae = ToyAutoencoder(tiny_toy(scale_factor=1.7, shift_factor=-0.3)).eval()
    # Non-zero residual branches, so the test sees every tensor (zero-init would hide a swap).
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ae.save_pretrained(tmp_path / "ae")
    assert json.loads((tmp_path / "ae" / "config.json").read_text())["format"] == "tapestry.toy_ae"
    back = ToyAutoencoder.from_pretrained(tmp_path / "ae")
    assert back.config == ae.config
    assert isinstance(load_autoencoder(tmp_path / "ae"), ToyAutoencoder)
    a, b = ae.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = images(2, 32)
    with torch.no_grad():
        assert torch.equal(ae.encode(x), back.encode(x))
        assert torch.equal(ae.decode(ae.encode(x)), back.decode(back.encode(x)))


def test_toy_ae_from_pretrained_names_missing_and_foreign_keys(tmp_path):
    torch.manual_seed(0)
    ToyAutoencoder(tiny_toy()).save_pretrained(tmp_path / "ae")
    weights = tmp_path / "ae" / "model.safetensors"
    state = load_file(str(weights))
    state.pop("decoder.conv_out.weight")
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError) as info:
        ToyAutoencoder.from_pretrained(tmp_path / "ae")
    assert "decoder.conv_out.weight" in str(info.value) and "decoder.extra.weight" in str(info.value)


def test_toy_ae_config_file_errors_name_the_field(tmp_path):
    ToyAutoencoder(tiny_toy()).save_pretrained(tmp_path / "ae")
    cfg_path = tmp_path / "ae" / "config.json"
    data = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(data | {"chanels": [8]}))
    with pytest.raises(VAEError, match="chanels"):
        ToyAutoencoder.from_pretrained(tmp_path / "ae")
    cfg_path.write_text(json.dumps(data | {"format": "tapestry.mot"}))
    with pytest.raises(VAEError, match="toy AE checkpoint"):
        ToyAutoencoder.from_pretrained(tmp_path / "ae")


def test_calibration_gives_unit_latents_and_keeps_reconstructions():
    from tapestry.models.vae.train import calibrate_latents, reconstruct

    torch.manual_seed(0)
    ae = ToyAutoencoder(tiny_toy()).eval()
    x = images(6, 32)
    before = reconstruct(ae, x)
    stats = calibrate_latents(ae, x)
    with torch.no_grad():
        z = ae.encode(x)
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1.0) < 1e-3
    assert ae.config.scale_factor == pytest.approx(1.0 / stats["raw_std"])
    torch.testing.assert_close(reconstruct(ae, x), before, atol=1e-5, rtol=1e-5)


def test_psnr_and_uint8_conversion():
    from tapestry.models.vae.train import psnr, to_tensor, to_uint8

    a = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    b = a.copy()
    assert psnr(a, b) == float("inf")
    b[0, 0, 0, 0] = 255  # one pixel of 96 fully wrong: MSE = 255² / 96
    assert psnr(a, b) == pytest.approx(10 * np.log10(96))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(to_uint8(to_tensor(list(pixels))), pixels)


def test_scene_streams_are_seeded_and_apart():
    from tapestry.models.vae.train import TRAIN_STREAM, heldout_scenes, random_scene

    assert heldout_scenes(5) == heldout_scenes(5)
    train = [random_scene(np.random.default_rng([TRAIN_STREAM, 0])) for _ in range(1)]
    assert train[0] not in heldout_scenes(5)


def test_short_training_lowers_reconstruction_loss():
    from tapestry.models.vae.train import (
        TrainSettings,
        heldout_scenes,
        loss_terms,
        render_batch,
        train,
    )

    cfg = tiny_toy()
    settings = TrainSettings(steps=40, batch_size=4, resolution=32, lr=3e-3, warmup=5, threads=1)
    x = render_batch(heldout_scenes(8), 32)
    torch.manual_seed(settings.seed)
    with torch.no_grad():
        before = float(loss_terms(ToyAutoencoder(cfg).eval(), x, settings)["l1"])
    model, history = train(cfg, settings)
    with torch.no_grad():
        after = float(loss_terms(model, x, settings)["l1"])
    assert len(history) == 40
    assert after < 0.7 * before, (before, after)


def test_cli_train_writes_checkpoint_and_report(tmp_path):
    from typer.testing import CliRunner

    from tapestry.models.vae_cli import app

    out = tmp_path / "ae"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--steps", "2", "--resolution", "32",
                                      "--batch-size", "2", "--heldout", "2", "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(result.stdout.strip().splitlines()[-1])
    assert {"psnr", "judge", "judge_clean"} <= set(report["heldout"])
    assert report["latents"]["shape_at_resolution"] == [8, 8, 8]
    assert "--steps 2 --resolution 32" in report["command"]
    ae = ToyAutoencoder.from_pretrained(out)
    assert ae.config.scale_factor == pytest.approx(1.0 / report["latents"]["raw_std"])
    # A folder holding other files is refused, untouched.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "mine"), "--steps", "1", "--quiet"])
    assert result.exit_code == 2 and "notes.txt" in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"



def test_cli_train_init_fine_tunes_the_given_autoencoder(tmp_path):
    """--init starts from the given weights (not fresh ones) with the given config, reports the
    exact rate of reconstructions beside the graded judge, and refuses a folder that is not an AE."""
    from typer.testing import CliRunner

    from tapestry.models.vae_cli import app

    base = tmp_path / "base"
    args = ["--steps", "1", "--batch-size", "2", "--heldout", "2", "--threads", "1", "--quiet"]
    result = CliRunner().invoke(app, ["train", "--out", str(base), "--resolution", "32", "--latent-channels", "4", *args])
    assert result.exit_code == 0, result.output
    tuned = tmp_path / "tuned"
    # lr 1e-9: one step barely moves the weights, so they must still be the base's
    result = CliRunner().invoke(app, ["train", "--out", str(tuned), "--init", str(base), "--lr", "1e-9",
                                      "--seed", "1", *args])
    assert result.exit_code == 0, result.output
    report = json.loads((tuned / "report.json").read_text())
    assert report["init"] == str(base) and f"--init {base}" in report["command"]
    assert {"exact", "exact_clean"} <= set(report["heldout"]) and report["gate"]["exact_required"] == 0.95
    a, b = ToyAutoencoder.from_pretrained(base), ToyAutoencoder.from_pretrained(tuned)
    assert b.config.latent_channels == 4 and b.config.resolution == 32  # the base's config, not the defaults
    fresh = ToyAutoencoder(b.config).state_dict()
    for key, value in b.state_dict().items():
        assert torch.allclose(value, a.state_dict()[key], atol=1e-6), key
    assert any(not torch.allclose(v, fresh[k]) for k, v in b.state_dict().items())
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "x"), "--init", str(tmp_path / "nothing"), *args])
    assert result.exit_code == 2 and "--init" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- FLUX layout
# diffusers is a dev dependency: without it these tests fail to import (loudly), never skip
import diffusers  # noqa: E402
from tapestry.models.vae.flux import (
    DiffusersAutoencoder,
    FluxAEParams,
    diffusers_to_flux_key,
    flux_to_diffusers_key,
    load_flux_autoencoder,
    load_flux_file,
)

TINY_FLUX = FluxAEParams(resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4,
                         scale_factor=0.5, shift_factor=0.1)


def flux_layout_state(vae, levels: int) -> dict[str, torch.Tensor]:
    """A diffusers state dict renamed to BFL's layout (attention Linear -> 1×1 conv)."""
    out = {}
    for key, tensor in vae.state_dict().items():
        name = diffusers_to_flux_key(key, levels)
        assert name is not None, key
        if tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[name] = tensor.contiguous()
    return out


def test_key_rules_are_inverse_and_reverse_the_decoder_levels():
    assert flux_to_diffusers_key("decoder.up.0.block.2.nin_shortcut.weight", 4) == \
        "decoder.up_blocks.3.resnets.2.conv_shortcut.weight"
    assert flux_to_diffusers_key("decoder.up.3.upsample.conv.bias", 4) == "decoder.up_blocks.0.upsamplers.0.conv.bias"
    assert flux_to_diffusers_key("encoder.down.1.downsample.conv.weight", 4) == \
        "encoder.down_blocks.1.downsamplers.0.conv.weight"
    assert flux_to_diffusers_key("encoder.mid.attn_1.proj_out.weight", 4) == \
        "encoder.mid_block.attentions.0.to_out.0.weight"
    assert flux_to_diffusers_key("decoder.norm_out.weight", 4) == "decoder.conv_norm_out.weight"
    assert flux_to_diffusers_key("encoder.quant_conv.weight", 4) is None
    assert flux_to_diffusers_key("decoder.up.4.block.0.conv1.weight", 4) is None  # no level 4
    vae = diffusers.AutoencoderKL(**FluxAEParams(ch=32, ch_mult=(1, 1, 2, 2)).diffusers_config())
    for key in vae.state_dict():
        flux = diffusers_to_flux_key(key, 4)
        assert flux is not None and flux_to_diffusers_key(flux, 4) == key


def test_flux_file_loads_with_equal_outputs_to_its_source(tmp_path):
    torch.manual_seed(0)
    source = diffusers.AutoencoderKL(**TINY_FLUX.diffusers_config()).eval()
    save_file(flux_layout_state(source, 2), str(tmp_path / "ae.safetensors"))
    (tmp_path / "ae_params.json").write_text(json.dumps(TINY_FLUX.to_dict() | {"downsample": 2}))
    ae = load_autoencoder(tmp_path)  # the folder holds ae.safetensors: the FLUX loader takes it
    assert isinstance(ae, DiffusersAutoencoder) and isinstance(ae, Autoencoder)
    assert (ae.downsample, ae.latent_channels) == (2, 4)
    x = images(1, 16)
    with torch.no_grad():
        mean = source.encode(x).latent_dist.mean
        z = ae.encode(x)
        torch.testing.assert_close(z, (mean - 0.1) * 0.5)
        torch.testing.assert_close(ae.decode(z), source.decode(mean).sample, atol=1e-5, rtol=1e-5)


def test_flux_params_defaults_and_errors(tmp_path):
    assert FluxAEParams().diffusers_config()["block_out_channels"] == [128, 256, 512, 512]
    assert FluxAEParams().downsample == 8
    (tmp_path / "p.json").write_text(json.dumps({"ch": 32, "ch_mult": [1, 2], "downsample": 8}))
    with pytest.raises(VAEError, match="downsample is 8"):
        FluxAEParams.load(tmp_path / "p.json")
    (tmp_path / "p.json").write_text(json.dumps({"ch": 48}))
    with pytest.raises(VAEError, match="multiples of 32"):
        FluxAEParams.load(tmp_path / "p.json")
    (tmp_path / "p.json").write_text(json.dumps({"z_chanels": 16}))
    with pytest.raises(VAEError, match="z_chanels"):
        FluxAEParams.load(tmp_path / "p.json")
    with pytest.raises(VAEError, match="found neither"):
        load_flux_autoencoder(tmp_path)
    (tmp_path / "ae.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # truncated
    with pytest.raises(VAEError, match="cannot read"):
        load_flux_file(tmp_path / "ae.safetensors", params=TINY_FLUX)


def test_fixture_every_key_used_and_shapes_x8(bagel_tiny):
    state = load_file(str(bagel_tiny / "ae.safetensors"))
    ae = load_flux_autoencoder(bagel_tiny)
    params = FluxAEParams.load(bagel_tiny / "ae_params.json")
    assert (ae.scale_factor, ae.shift_factor) == (params.scale_factor, params.shift_factor)
    loaded = ae.vae.state_dict()
    assert len(loaded) == len(state) == 176
    # Every file tensor landed, unchanged, under its mapped name (1×1 convs flattened).
    for key, tensor in state.items():
        got = loaded[flux_to_diffusers_key(key, len(params.ch_mult))]
        assert torch.equal(got, tensor.reshape(got.shape)), key
    assert ae.downsample == 8
    x = images(1, 64)
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (1, 16, 8, 8)
        assert ae.decode(z).shape == (1, 3, 64, 64)
        assert ae.encode(images(2, 48)).shape == (2, 16, 6, 6)


def _group_norm(x, state, prefix):
    return F.group_norm(x, 32, state[prefix + ".weight"], state[prefix + ".bias"], eps=1e-6)


def _resnet_by_hand(x, state, prefix):
    # BFL's ResnetBlock written from the file's tensors: x + conv2(silu(norm2(conv1(silu(norm1(x)))))).
    conv = lambda h, name, pad=1: F.conv2d(h, state[f"{prefix}.{name}.weight"], state[f"{prefix}.{name}.bias"], padding=pad)
    h = conv(F.silu(_group_norm(x, state, prefix + ".norm1")), "conv1")
    h = conv(F.silu(_group_norm(h, state, prefix + ".norm2")), "conv2")
    if f"{prefix}.nin_shortcut.weight" in state:
        x = conv(x, "nin_shortcut", pad=0)
    return x + h


def test_fixture_mapping_checked_by_hand_computation(bagel_tiny):
    """Blocks computed from the raw file tensors must equal the diffusers modules they were loaded
    into: a swapped level, a transposed 1×1 conv or a misnamed shortcut would all show here."""
    state = load_file(str(bagel_tiny / "ae.safetensors"))
    ae = load_flux_autoencoder(bagel_tiny)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # Decoder level 2 holds the 64 -> 32 shortcut block; diffusers runs it as up_blocks[1].
        x = torch.randn(1, 64, 8, 8, generator=g)
        torch.testing.assert_close(ae.vae.decoder.up_blocks[1].resnets[0](x, None),
                                   _resnet_by_hand(x, state, "decoder.up.2.block.0"))
        x = torch.randn(1, 32, 8, 8, generator=g)
        torch.testing.assert_close(ae.vae.encoder.down_blocks[3].resnets[0](x, None),
                                   _resnet_by_hand(x, state, "encoder.down.3.block.0"))
        # Downsample: pad right/bottom by one, then a stride-2 conv without padding.
        want = F.conv2d(F.pad(x, (0, 1, 0, 1)), state["encoder.down.0.downsample.conv.weight"],
                        state["encoder.down.0.downsample.conv.bias"], stride=2)
        torch.testing.assert_close(ae.vae.encoder.down_blocks[0].downsamplers[0](x), want)
        # Middle attention: one head over all positions, q/k/v/proj_out as 1×1 convs.
        x = torch.randn(1, 64, 4, 4, generator=g)
        p = "encoder.mid.attn_1"
        h = _group_norm(x, state, p + ".norm")
        q, k, v = (F.conv2d(h, state[f"{p}.{n}.weight"], state[f"{p}.{n}.bias"]).flatten(2) for n in "qkv")
        attn = torch.softmax(q.transpose(1, 2) @ k / 64**0.5, dim=-1)  # [1, HW, HW]
        out = (attn @ v.transpose(1, 2)).transpose(1, 2).reshape(x.shape)
        want = x + F.conv2d(out, state[p + ".proj_out.weight"], state[p + ".proj_out.bias"])
        torch.testing.assert_close(ae.vae.encoder.mid_block.attentions[0](x), want, atol=1e-5, rtol=1e-5)


def test_fixture_diffusers_save_and_our_loader_round_trip(bagel_tiny, tmp_path):
    ae = load_flux_autoencoder(bagel_tiny)
    ae.save_pretrained(tmp_path / "diffusers-ae")
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= {p.name for p in (tmp_path / "diffusers-ae").iterdir()}
    back = load_flux_autoencoder(tmp_path / "diffusers-ae")
    assert (back.scale_factor, back.shift_factor) == (ae.scale_factor, ae.shift_factor)
    x = images(1, 32)
    with torch.no_grad():
        z = ae.encode(x)
        assert torch.equal(back.encode(x), z)
        assert torch.equal(back.decode(z), ae.decode(z))


def test_fixture_corrupted_key_set_is_refused_with_a_list(bagel_tiny, tmp_path):
    state = load_file(str(bagel_tiny / "ae.safetensors"))
    state.pop("decoder.up.3.upsample.conv.weight")
    state["encoder.quant_conv.weight"] = torch.zeros(32, 32, 1, 1)
    state["encoder.mid.attn_1.q.weight"] = torch.zeros(64, 32, 1, 1)
    save_file(state, str(tmp_path / "ae.safetensors"))
    shutil.copy(bagel_tiny / "ae_params.json", tmp_path / "ae_params.json")
    with pytest.raises(VAEError) as info:
        load_flux_file(tmp_path / "ae.safetensors")
    message = str(info.value)
    assert "1 missing" in message and "decoder.up.3.upsample.conv.weight" in message
    assert "1 unexpected" in message and "encoder.quant_conv.weight" in message
    assert "shape mismatch" in message and "encoder.mid.attn_1.q.weight" in message
    # Without ae_params.json the release defaults apply, and nearly every key misfits: say so.
    os.remove(tmp_path / "ae_params.json")
    with pytest.raises(VAEError, match="release defaults"):
        load_flux_file(tmp_path / "ae.safetensors")
