"""FLUX autoencoders through `diffusers.AutoencoderKL`: Black Forest Labs' original `ae.safetensors`
key layout, or a diffusers-layout folder.

Facts of the BFL layout that the key rules below encode (checked on the bagel-tiny fixture):
- `{encoder,decoder}.conv_in / conv_out / norm_out`; diffusers calls `norm_out` `conv_norm_out`.
- Encoder level i: `encoder.down.{i}.block.{j}` (resnets) and `encoder.down.{i}.downsample.conv`
  (every level but the last); diffusers `encoder.down_blocks.{i}.resnets.{j}` / `downsamplers.0.conv`.
- Decoder level i is stored at `decoder.up.{i}` with i = 0 the full-resolution level, but diffusers
  runs and numbers its `up_blocks` coarse first: `up.{i}` -> `up_blocks.{n-1-i}`. The decoder has
  num_res_blocks + 1 resnets per level and `upsample.conv` on every level but level 0.
- Resnets: `norm1, conv1, norm2, conv2`, and `nin_shortcut` (1×1) when the width changes
  (diffusers `conv_shortcut`).
- Middle: `mid.block_1`, `mid.attn_1`, `mid.block_2` -> `mid_block.resnets.0`, `attentions.0`,
  `resnets.1`. The attention's q/k/v/proj_out are 1×1 convs `[C, C, 1, 1]`; diffusers has Linear
  `to_q/to_k/to_v/to_out.0` `[C, C]`; `attn_1.norm` is `group_norm`.
- No quant_conv / post_quant_conv (diffusers `use_quant_conv=False`); GroupNorm has 32 groups.
- Latents the flow model sees: `(mean - shift) · scale` with the posterior mean (no sampling).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tapestry.models.common.checkpoint import KeyReport, compare_keys
from tapestry.models.vae.protocol import VAEError

FLUX_WEIGHTS = "ae.safetensors"
FLUX_PARAMS = "ae_params.json"
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
FLUX_GROUPS = 32


@dataclass
class FluxAEParams:
    """The settings of a BFL-layout autoencoder; defaults are those of the FLUX.1 release."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def block_out_channels(self) -> list[int]:
        return [self.ch * m for m in self.ch_mult]

    def validate(self, where: str = "ae params") -> FluxAEParams:
        for name in ("resolution", "in_channels", "ch", "out_ch", "num_res_blocks", "z_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VAEError(f"{where}: {name} must be an integer >= 1, got {value!r}")
        if not self.ch_mult or any(not isinstance(m, int) or m < 1 for m in self.ch_mult):
            raise VAEError(f"{where}: ch_mult must be a non-empty list of integers >= 1, got {list(self.ch_mult)}")
        bad = [c for c in self.block_out_channels if c % FLUX_GROUPS]
        if bad:
            raise VAEError(f"{where}: channel widths {self.block_out_channels} must be multiples of "
                           f"{FLUX_GROUPS} (FLUX's GroupNorm groups)")
        if not self.scale_factor > 0:
            raise VAEError(f"{where}: scale_factor must be > 0, got {self.scale_factor}")
        return self

    @classmethod
    def from_dict(cls, data: Any, where: str) -> FluxAEParams:
        if not isinstance(data, dict):
            raise VAEError(f"{where}: expected an object, got {type(data).__name__}")
        data = dict(data)
        # Not a setting of BFL's AutoEncoderParams, but written by some exporters: check it.
        downsample = data.pop("downsample", None)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise VAEError(f"{where}: unknown field(s) {unknown}; known: {sorted(names | {'downsample'})}")
        try:
            params = cls(**data).validate(where)
        except TypeError as exc:
            raise VAEError(f"{where}: {exc}") from None
        if downsample is not None and downsample != params.downsample:
            raise VAEError(f"{where}: downsample is {downsample} but ch_mult {list(params.ch_mult)} gives "
                           f"×{params.downsample} (2 ** (levels - 1))")
        return params

    @classmethod
    def load(cls, path: str | Path) -> FluxAEParams:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise VAEError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, str(path))

    def diffusers_config(self) -> dict[str, Any]:
        """The `AutoencoderKL(**config)` arguments that build this autoencoder."""
        n = len(self.ch_mult)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_ch,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.num_res_blocks,
            "act_fn": "silu",
            "latent_channels": self.z_channels,
            "norm_num_groups": FLUX_GROUPS,
            "sample_size": self.resolution,
            "scaling_factor": self.scale_factor,
            "shift_factor": self.shift_factor,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "mid_block_add_attention": True,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ch_mult": list(self.ch_mult)}


# ---------------------------------------------------------------- key rules
_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                 "nin_shortcut": "conv_shortcut"}
_ATTN_PARTS = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0", "norm": "group_norm"}
_TOP_PARTS = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
_PARAM = r"(weight|bias)"


def _invert(d: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in d.items()}


def flux_to_diffusers_key(key: str, levels: int) -> str | None:
    """The diffusers AutoencoderKL name of a BFL-layout key, or None when no rule covers it."""
    m = re.fullmatch(rf"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.{_PARAM}", key)
    if m:
        return f"{m[1]}.{_TOP_PARTS[m[2]]}.{m[3]}"
    m = re.fullmatch(rf"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.{_PARAM}", key)
    if m and m[3] in _RESNET_PARTS:
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RESNET_PARTS[m[3]]}.{m[4]}"
    m = re.fullmatch(rf"(encoder|decoder)\.mid\.attn_1\.(\w+)\.{_PARAM}", key)
    if m and m[2] in _ATTN_PARTS:
        return f"{m[1]}.mid_block.attentions.0.{_ATTN_PARTS[m[2]]}.{m[3]}"
    m = re.fullmatch(rf"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.{_PARAM}", key)
    if m and m[3] in _RESNET_PARTS and int(m[1]) < levels:
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_RESNET_PARTS[m[3]]}.{m[4]}"
    m = re.fullmatch(rf"encoder\.down\.(\d+)\.downsample\.conv\.{_PARAM}", key)
    if m and int(m[1]) < levels:
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    m = re.fullmatch(rf"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.{_PARAM}", key)
    if m and m[3] in _RESNET_PARTS and int(m[1]) < levels:
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{_RESNET_PARTS[m[3]]}.{m[4]}"
    m = re.fullmatch(rf"decoder\.up\.(\d+)\.upsample\.conv\.{_PARAM}", key)
    if m and int(m[1]) < levels:
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    return None


def diffusers_to_flux_key(key: str, levels: int) -> str | None:
    """The inverse of `flux_to_diffusers_key` (used to name missing keys the way the file does)."""
    top, resnet, attn = _invert(_TOP_PARTS), _invert(_RESNET_PARTS), _invert(_ATTN_PARTS)
    m = re.fullmatch(rf"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.{_PARAM}", key)
    if m:
        return f"{m[1]}.{top[m[2]]}.{m[3]}"
    m = re.fullmatch(rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.{_PARAM}", key)
    if m and m[3] in resnet:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet[m[3]]}.{m[4]}"
    m = re.fullmatch(rf"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0|group_norm)\.{_PARAM}", key)
    if m:
        return f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
    m = re.fullmatch(rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.{_PARAM}", key)
    if m and m[3] in resnet:
        return f"encoder.down.{m[1]}.block.{m[2]}.{resnet[m[3]]}.{m[4]}"
    m = re.fullmatch(rf"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_PARAM}", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.{_PARAM}", key)
    if m and m[3] in resnet:
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{resnet[m[3]]}.{m[4]}"
    m = re.fullmatch(rf"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_PARAM}", key)
    if m:
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return None


def flux_expected_shapes(params: FluxAEParams) -> dict[str, tuple[int, ...]]:
    """Every key (with shape) of a BFL-layout ae.safetensors for `params`, by arithmetic alone:
    a header can be checked without building the autoencoder (or importing diffusers)."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_out: int, c_in: int, k: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (c_out, c_in, k, k), (c_out,)

    def norm(name: str, c: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def resnet(name: str, c_in: int, c_out: int) -> None:
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_out, c_in, 3)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_out, c_in, 1)

    def middle(prefix: str, c: int) -> None:
        resnet(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{part}", c, c, 1)
        resnet(f"{prefix}.mid.block_2", c, c)

    widths = params.block_out_channels
    levels = len(widths)
    conv("encoder.conv_in", params.ch, params.in_channels, 3)
    c = params.ch
    for i, width in enumerate(widths):
        for j in range(params.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", c, width)
            c = width
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    middle("encoder", c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", 2 * params.z_channels, c, 3)
    c = widths[-1]
    conv("decoder.conv_in", c, params.z_channels, 3)
    middle("decoder", c)
    for i in reversed(range(levels)):
        for j in range(params.num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", c, widths[i])
            c = widths[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", params.out_ch, c, 3)
    return out


def _is_attention_projection(diffusers_key: str) -> bool:
    return re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key) is not None


def convert_flux_state(
    state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], levels: int
) -> tuple[dict[str, Tensor], KeyReport]:
    """Rename a BFL-layout state dict to diffusers names (1×1 attention convs -> Linear weights)
    and compare it with `expected` (diffusers name -> shape). The report names every key as the
    BFL file does, so a user can find it in their file."""
    converted: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unmapped: list[str] = []
    for key, tensor in state.items():
        new = flux_to_diffusers_key(key, levels)
        if new is None:
            unmapped.append(key)
            continue
        if _is_attention_projection(new) and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]  # [C_out, C_in, 1, 1] conv -> [C_out, C_in] linear
        converted[new] = tensor
        origin[new] = key
    raw = compare_keys(expected, {k: tuple(v.shape) for k, v in converted.items()})

    def flux_name(diffusers_key: str) -> str:
        return origin.get(diffusers_key) or diffusers_to_flux_key(diffusers_key, levels) or diffusers_key

    report = KeyReport(
        missing=sorted(flux_name(k) for k in raw.missing),
        unexpected=sorted(unmapped + [origin[k] for k in raw.unexpected]),
        shape_mismatch=[m | {"key": flux_name(m["key"]), "found": list(state[flux_name(m["key"])].shape)}
                        for m in raw.shape_mismatch],
    )
    return converted, report


# ---------------------------------------------------------------- the wrapper
class DiffusersAutoencoder(nn.Module):
    """A `diffusers.AutoencoderKL` behind the autoencoder protocol (tapestry.models.vae.protocol):
    latents are the posterior mean, shifted and scaled; decode undoes both."""

    def __init__(self, vae: nn.Module, scale_factor: float, shift_factor: float):
        super().__init__()
        if getattr(vae.config, "latents_mean", None) is not None or getattr(vae.config, "latents_std", None) is not None:
            raise VAEError("this AutoencoderKL uses per-channel latents_mean/latents_std; only the "
                           "scalar scaling_factor/shift_factor of FLUX-style autoencoders are supported")
        self.vae = vae
        self.scale_factor = float(scale_factor)
        self.shift_factor = float(shift_factor)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)

    def encode(self, images: Tensor) -> Tensor:
        # images: [B, 3, H, W] in [-1, 1] -> latents: [B, z, H/f, W/f]
        f = self.downsample
        if images.ndim != 4 or images.shape[-1] % f or images.shape[-2] % f:
            raise VAEError(f"images must be [B, C, H, W] with sides multiples of {f}, got {list(images.shape)}")
        mean = self.vae.encode(images).latent_dist.mean
        return (mean - self.shift_factor) * self.scale_factor

    def decode(self, latents: Tensor) -> Tensor:
        # latents: [B, z, h, w] -> images: [B, 3, h·f, w·f]
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise VAEError(f"latents must be [B, {self.latent_channels}, h, w], got {list(latents.shape)}")
        return self.vae.decode(latents / self.scale_factor + self.shift_factor).sample

    def save_pretrained(self, folder: str | Path, overwrite: bool = False) -> Path:
        """A diffusers-layout folder (`config.json` + `diffusion_pytorch_model.safetensors`), which
        `load_flux_autoencoder` reads back with the same scale and shift. A folder holding files
        this method did not write is refused unless `overwrite`."""
        from tapestry.atomic import output_dir

        folder = Path(folder)
        self.vae.register_to_config(scaling_factor=self.scale_factor, shift_factor=self.shift_factor)
        with output_dir(folder, "FluxAutoencoder.save_pretrained", overwrite, flag="folder") as tmp:
            self.vae.save_pretrained(str(tmp), safe_serialization=True)
        return folder


def _autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError:  # an edge: say what to install
        raise VAEError("loading a FLUX autoencoder needs diffusers: pip install diffusers") from None
    return AutoencoderKL


def build_flux_vae(params: FluxAEParams, device: str | torch.device = "cpu") -> nn.Module:
    """A randomly initialised AutoencoderKL with the shapes of `params`."""
    return _autoencoder_kl()(**params.diffusers_config()).to(device)


def load_flux_file(path: str | Path, params: FluxAEParams | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> DiffusersAutoencoder:
    """Load a BFL-layout `ae.safetensors`. Settings: `params`, else `ae_params.json` beside the
    file, else the FLUX.1 release defaults. Any missing, unexpected or misshapen key is refused.
    Tensors are cast to `dtype` (float32: a bf16 export then still takes float32 images)."""
    from tapestry.models.common.checkpoint import CheckpointError, load_safetensors

    path = Path(path)
    if not path.is_file():
        raise VAEError(f"{path}: no such file (expected a FLUX-layout {FLUX_WEIGHTS})")
    if params is None:
        side = path.parent / FLUX_PARAMS
        params = FluxAEParams.load(side) if side.is_file() else FluxAEParams()
    params.validate()
    try:
        state = load_safetensors(path, device=str(device))
    except CheckpointError as exc:
        raise VAEError(str(exc)) from None
    AutoencoderKL = _autoencoder_kl()
    with torch.device("meta"):  # shapes only: the weights come from the file, no random init
        vae = AutoencoderKL(**params.diffusers_config())
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    converted, report = convert_flux_state(state, expected, len(params.ch_mult))
    if not report.ok:
        raise VAEError(f"{path} does not fit a FLUX autoencoder with {params.to_dict()}:\n{report.describe()}\n"
                       f"(settings come from {FLUX_PARAMS} beside the file, else the FLUX.1 release defaults)")
    vae.load_state_dict(converted, strict=True, assign=True)
    return DiffusersAutoencoder(vae.eval(), params.scale_factor, params.shift_factor)


def load_diffusers_folder(folder: str | Path, device: str | torch.device = "cpu") -> DiffusersAutoencoder:
    """Load a diffusers-layout AutoencoderKL folder; scale and shift come from its config
    (`scaling_factor`, `shift_factor`; a missing shift is 0)."""
    folder = Path(folder)
    for name in (DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS):
        if not (folder / name).is_file():
            raise VAEError(f"{folder}: missing {name}; a diffusers AutoencoderKL folder holds "
                           f"{DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS}")
    try:
        vae = _autoencoder_kl().from_pretrained(str(folder), local_files_only=True).to(device)
    except VAEError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:  # diffusers' ways to refuse a folder
        raise VAEError(f"{folder}: diffusers could not load it as an AutoencoderKL ({exc})") from None
    shift = vae.config.shift_factor
    return DiffusersAutoencoder(vae.eval(), vae.config.scaling_factor, 0.0 if shift is None else shift)


def load_flux_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> DiffusersAutoencoder:
    """A FLUX-style autoencoder from `ae.safetensors` (or a folder holding it, e.g. a BAGEL
    checkpoint) or from a diffusers-layout folder."""
    path = Path(path)
    if path.is_file():
        return load_flux_file(path, device=device)
    if (path / DIFFUSERS_CONFIG).is_file() and (path / DIFFUSERS_WEIGHTS).is_file():
        return load_diffusers_folder(path, device)
    if (path / FLUX_WEIGHTS).is_file():
        return load_flux_file(path / FLUX_WEIGHTS, device=device)
    raise VAEError(f"{path}: found neither {FLUX_WEIGHTS} (BFL layout) nor {DIFFUSERS_CONFIG} + "
                   f"{DIFFUSERS_WEIGHTS} (diffusers layout)")
