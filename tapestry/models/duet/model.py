"""DuetModel: the MLLM that writes, the connector, the DiT that draws, and its autoencoder.

Losses (DuetGen §4.2):
    text  next-token CE on target text, <BOV> and EOS (stage 1 trains only this, the MLLM only)
    flow  flow-matching MSE on ONE random target image per sequence, conditioned on the clean
          condition frames of every earlier image and on the connector's reading of the MLLM
          hidden states before that image's <BOV> (stage 2: MLLM frozen, connector + DiT train)

With probability `training.guidance_dropout` the chosen target's context loses its last text
chunk: the same context DuetGen's guidance negative uses at inference, so the negative branch
is trained, not extrapolated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from tapestry.models.common.flow import interpolate, sample_timesteps, velocity_target
from tapestry.models.duet.config import DuetConfig
from tapestry.models.duet.connector import Connector
from tapestry.models.duet.dit import PackedDiT
from tapestry.models.duet.mllm import DuetMLLM, MLLMOutput
from tapestry.models.duet.sequence import IGNORE, DuetLayout, context_indices
from tapestry.models.duet.vae import build_vae

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PARAM_GROUPS = ("mllm", "connector", "dit", "vae")


def pixels_to_tensor(image: Image.Image, height: int, width: int) -> Tensor:
    """PIL -> [3, height, width] in [-1, 1] (bicubic when the size differs)."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return array.view(height, width, 3).permute(2, 0, 1).float() / 127.5 - 1.0


def tensor_to_image(pixels: Tensor) -> Image.Image:
    """[3, H, W] about [-1, 1] -> PIL."""
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


@dataclass
class FlowSample:
    """What one sequence contributes to the flow loss."""

    target: int  # index into layout.images
    frames: list[Tensor]  # clean condition latents, then the noisy target [C, h, w]
    t: float
    velocity: Tensor  # ε − x0 of the target
    drop_last_chunk: bool


class DuetModel(nn.Module):
    def __init__(self, config: DuetConfig, load_pretrained: bool = True):
        super().__init__()
        self.config = config.validate()
        self.mllm = DuetMLLM(config.mllm)
        self.connector = Connector(config.connector, config.mllm.hidden_size, config.mllm.num_layers,
                                   config.dit.context_dim)
        self.dit = PackedDiT(config.dit)
        self.vae = build_vae(config.vae, load_pretrained)
        if self.vae.latent_channels != config.dit.in_channels:
            raise ValueError(f"the VAE makes {self.vae.latent_channels} latent channels but dit.in_channels is "
                             f"{config.dit.in_channels}")
        self.vae.requires_grad_(False)  # DuetGen never trains the autoencoder

    @property
    def device(self) -> torch.device:
        return self.mllm.device

    # --------------------------------------------------------------- groups
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {name: list(getattr(self, name).parameters()) for name in PARAM_GROUPS}

    def blocks(self) -> list[nn.Module]:
        """Units for sharding / activation checkpointing: decoder layers, ViT blocks, DiT blocks."""
        net = self.dit.net
        dit_blocks = net.blocks if self.config.dit.kind == "wan" else net.transformer_blocks
        return [*self.mllm.hf.model.language_model.layers, *self.mllm.hf.model.visual.blocks, *dit_blocks]

    def frozen(self, group: str) -> bool:
        return not any(p.requires_grad for p in getattr(self, group).parameters())

    # ---------------------------------------------------------------- image side
    @property
    def cell(self) -> int:
        """Pixels per DiT token side: VAE downsampling × patch."""
        return self.vae.downsample * self.config.dit.patch_size[1]

    def frame_size(self, height: int, width: int) -> tuple[int, int]:
        """The DiT-side pixel size of an image: each side rounded to a whole number of cells."""
        c = self.cell
        return max(c, round(height / c) * c), max(c, round(width / c) * c)

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> Tensor:
        """One image alone (T = 1) -> normalized latents [C, h, w]."""
        h, w = self.frame_size(image.height, image.width)
        pixels = pixels_to_tensor(image, h, w)[None].to(self.device)
        return self.vae.encode(pixels)[0]

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents[None].to(self.device))[0]

    # ---------------------------------------------------------------- MLLM side
    def run_mllm(self, layout: DuetLayout) -> MLLMOutput:
        """The whole sequence through the MLLM (no cache): logits and every layer's states."""
        embeds = self.mllm.embed(layout.ids, layout.image_token_id, layout.pixel_values, layout.grid_thw)
        return self.mllm.run(embeds[None], layout.positions[:, None])

    def text_loss(self, layout: DuetLayout, out: MLLMOutput) -> tuple[Tensor, int]:
        """(CE summed over supervised next tokens, their count)."""
        labels = layout.labels.to(self.device)
        mask = labels != IGNORE
        if not mask.any():
            return out.logits.sum() * 0.0, 0
        ce = F.cross_entropy(out.logits[0][mask].float(), labels[mask], reduction="sum")
        return ce, int(mask.sum())

    def context(self, layers: list[Tensor], indices: Tensor) -> Tensor:
        """Connector output for the chosen token positions: [S, D_ctx]. layers: [1, L, D] each."""
        chosen = [h[0, indices.to(h.device)] for h in layers]
        return self.connector(chosen)

    # ---------------------------------------------------------------- flow
    def flow_sample(self, layout: DuetLayout, generator: torch.Generator) -> FlowSample | None:
        """Pick one target image at random; encode it and every earlier image; noise the target."""
        targets = layout.targets
        if not targets:
            return None
        pick = targets[int(torch.randint(len(targets), (1,), generator=generator))]
        frames = [self.encode_image(layout.images[j].image).cpu() for j in range(pick + 1)]
        x0 = frames[-1]
        t = float(sample_timesteps(1, self.config.training.timestep_shift, generator=generator)[0])
        noise = torch.randn(x0.shape, generator=generator)
        frames[-1] = interpolate(x0[None], noise[None], t)[0]
        drop = bool(torch.rand((), generator=generator) < self.config.training.guidance_dropout)
        return FlowSample(pick, frames, t, velocity_target(x0, noise), drop)

    def velocity(self, frames: list[Tensor], t: Tensor | float, context: Tensor) -> Tensor:
        """Velocity of the last frame given the clean frames before it: [C, h, w]."""
        times = torch.zeros(len(frames))
        times[-1] = float(t)
        out = self.dit([f.to(self.device) for f in frames], times.to(self.device), context)
        return out[-1]

    def velocities(self, frames: list[list[Tensor]], t: Tensor | float, contexts: list[Tensor]) -> list[Tensor]:
        """`velocity` of several (frames, context) pairs — guidance branches — in one DiT forward;
        every pair has the same frame sizes, contexts may differ in length. [C, h, w] each."""
        times = torch.zeros(len(frames), len(frames[0]))
        times[:, -1] = float(t)
        out = self.dit.forward_batch([[f.to(self.device) for f in seq] for seq in frames], times.to(self.device),
                                     contexts)
        return [v[-1] for v in out]

    def flow_loss(self, layout: DuetLayout, out: MLLMOutput, sample: FlowSample) -> Tensor:
        """MSE of the target's velocity (a mean per sequence: one target image each, as the paper)."""
        indices = context_indices(layout, sample.target, sample.drop_last_chunk)
        ctx = self.context(out.layers, indices)
        predicted = self.velocity(sample.frames, sample.t, ctx)
        return (predicted.float() - sample.velocity.to(predicted.device)).pow(2).mean()

    def loss_sums(self, layouts: list[DuetLayout], generator: torch.Generator,
                  parts: tuple[str, ...] = ("text", "flow")) -> dict[str, tuple[Tensor, int]]:
        """(sum, count) per loss part over a batch of sequences: text CE summed over supervised
        tokens; flow MSE means summed over sequences with a target. A frozen MLLM runs without
        grad (stage 2); the flow part is skipped where connector and DiT are frozen (stage 1)."""
        mllm_frozen = self.frozen("mllm")
        want_flow = "flow" in parts and not (self.frozen("connector") and self.frozen("dit"))
        trainable = next((p for p in self.parameters() if p.requires_grad), None)
        # a graph-connected zero, so a batch with nothing to learn still backpropagates
        zero = trainable.sum() * 0.0 if trainable is not None else torch.zeros((), device=self.device)
        text_sum, text_n, flow_sum, flow_n = zero, 0, zero, 0
        for layout in layouts:
            sample = self.flow_sample(layout, generator) if want_flow else None
            with torch.set_grad_enabled(torch.is_grad_enabled() and not mllm_frozen):
                out = self.run_mllm(layout)
                if "text" in parts:
                    s, n = self.text_loss(layout, out)
                    text_sum, text_n = text_sum + s, text_n + n
            if sample is not None:
                flow_sum, flow_n = flow_sum + self.flow_loss(layout, out, sample), flow_n + 1
        return {"text": (text_sum, text_n), "flow": (flow_sum, flow_n)}

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, folder: str | Path) -> Path:
        from tapestry.atomic import atomic_write_text
        from tapestry.models.common.checkpoint import save_state

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # each tied tensor once (a tied lm_head is the embedding table): safetensors refuses shared
        # storage, and one copy is what from_pretrained re-ties
        save_state(folder / WEIGHTS_NAME, self, metadata={"format": "pt", "family": "duet"})
        atomic_write_text(folder / CONFIG_NAME, self.config.to_json())
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | str = "cpu") -> DuetModel:
        from tapestry.models.common.checkpoint import load_safetensors
        from tapestry.models.duet.config import DuetConfigError

        folder = Path(folder)
        config = DuetConfig.load(folder / CONFIG_NAME)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise DuetConfigError(f"{folder}: no {WEIGHTS_NAME} beside config.json")
        return cls.from_state_dict(config, load_safetensors(weights), str(weights)).to(device)

    @classmethod
    def from_state_dict(cls, config: DuetConfig, state: dict[str, Tensor], source: str = "<state dict>") -> DuetModel:
        """Built with fresh weights, then `state` copied in (every weight, the VAE's too); strict,
        and a tied head is filled through the embedding table it shares."""
        from tapestry.models.common.checkpoint import load_state_copy

        model = cls(config, load_pretrained=False)
        load_state_copy(model, state, source)
        return model


def config_summary(model: DuetModel) -> str:
    counts = {name: sum(p.numel() for p in params) for name, params in model.param_groups().items()}
    return json.dumps(counts)
