"""The `duet` family's glue: the protocol of tapestry.models.family over DuetModel.

Training: `layout` lays a Document out as the duet MLLM sequence (a tapestry SequenceLayout, so
the shared packer packs it; one causal span per document); `prepare` splits a packed row back
into its documents, processes their pixels for the MLLM and draws, seeded, the flow-loss
choices (which target image, t, noise seed, guidance dropout); `loss` returns the summed text
CE and the summed per-sequence flow MSE; `loss_counts` their denominators (supervised tokens;
sequences with a target).

Inference (`DuetRuntime`): the MLLM's KV cache is kept across text steps and images; the hidden
states of every layer are kept for the connector; every image of the context is VAE-encoded
once as a condition frame. When an image is drawn the connector output of the tokens before its
<BOV> is computed once and reused at every denoising step. Every guidance branch runs on the
context the engine built for it, all branches with the same frame sizes in one DiT forward
(contexts padded and masked in the cross-attention); DuetGen's negative (the same condition
frames, the last text chunk removed) is the branch that drops the last text chunk and keeps the
images. Because the
MLLM is causal, that context's hidden states are exactly the cond context's with the chunk's
positions removed — the paper's "remove the final text chunk from the hidden-state sequence"
(`_condition(ctx, drop_last_chunk=True)` computes it that way; a test checks both agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tapestry.models.duet.config import (
    ConnectorConfig,
    DiTConfig,
    DuetConfig,
    MLLMConfig,
    TrainingConfig,
    VAEConfig,
)
from tapestry.models.duet.model import CONFIG_NAME, PARAM_GROUPS, DuetModel, tensor_to_image
from tapestry.models.family import OneByOne
from tapestry.models.duet.sequence import (
    IGNORE,
    DuetLayout,
    DuetTokens,
    layout_duet,
    mrope_positions_for,
)

NEGATIVE = "uncond"


@dataclass
class AutoencoderRecipe:
    """The DiT's autoencoder as a training config names it (TOML-friendly fields). A `pretrained`
    folder (ToyAutoencoder or diffusers vae/) gives kind-specific sizes and weights; otherwise
    the AutoencoderKLWan sizes below build a fresh, frozen one (smoke runs)."""

    kind: str = "wan"  # wan | cosmos | toy
    pretrained: str = ""
    base_dim: int = 8
    z_dim: int = 4
    dim_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    temperal_downsample: list[bool] = field(default_factory=lambda: [False])
    scale_factor_spatial: int = 4
    latents_mean: list[float] = field(default_factory=list)  # empty: zeros
    latents_std: list[float] = field(default_factory=list)  # empty: ones

    def to_vae_config(self) -> VAEConfig:
        from tapestry.models.duet.vae import resolve_pretrained

        if self.pretrained:
            return resolve_pretrained(VAEConfig(kind=self.kind, config={}, pretrained=self.pretrained))
        if self.kind != "wan":
            raise ValueError(f"model.autoencoder: kind {self.kind!r} needs a pretrained folder")
        config = dict(base_dim=self.base_dim, z_dim=self.z_dim, dim_mult=list(self.dim_mult),
                      num_res_blocks=self.num_res_blocks, temperal_downsample=list(self.temperal_downsample),
                      scale_factor_spatial=self.scale_factor_spatial,
                      latents_mean=list(self.latents_mean) or [0.0] * self.z_dim,
                      latents_std=list(self.latents_std) or [1.0] * self.z_dim)
        return VAEConfig(kind="wan", config=config)


@dataclass
class DuetRecipe:
    """The [model] keys of a training config for `family = "duet"` (sizes; ids come from the
    tokenizer, vocab_size too)."""

    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    autoencoder: AutoencoderRecipe = field(default_factory=AutoencoderRecipe)  # `vae` is the run's codec key
    training: TrainingConfig = field(default_factory=TrainingConfig)
    target_size: list[int] = field(default_factory=lambda: [32, 32])


@dataclass
class DuetInputs:
    """One document of a packed row, ready for the loss."""

    layout: DuetLayout
    target: int | None  # index into layout.images of the flow target (None: no target image)
    t: float = 0.0
    noise_seed: int = 0
    drop_last_chunk: bool = False


_IMAGE_INPUTS: dict[str, Any] = {}


def _image_input(config: DuetConfig):
    """One image processor per MLLM config (layout() runs once per document drawn)."""
    import json as _json
    from dataclasses import asdict

    from tapestry.models.duet.mllm import ImageInput

    key = _json.dumps(asdict(config.mllm), sort_keys=True)
    if key not in _IMAGE_INPUTS:
        _IMAGE_INPUTS[key] = ImageInput(config.mllm)
    return _IMAGE_INPUTS[key]


class DuetFamily:
    name = "duet"
    recipe = DuetRecipe
    param_groups = PARAM_GROUPS
    loss_parts = ("text", "flow")

    # -- config and weights ---------------------------------------------------------------------
    def model_config(self, recipe: DuetRecipe, vocab_size: int, latent_channels: int = 0) -> DuetConfig:
        from dataclasses import replace

        # latent channels are the model's own VAE's, not the run's codec
        return DuetConfig(mllm=replace(recipe.mllm, vocab_size=vocab_size), connector=recipe.connector,
                          dit=recipe.dit, vae=recipe.autoencoder.to_vae_config(), training=recipe.training,
                          target_size=list(recipe.target_size)).validate()

    def load_config(self, folder: str | Path) -> DuetConfig:
        return DuetConfig.load(Path(folder) / CONFIG_NAME)

    def build(self, config: DuetConfig) -> DuetModel:
        return DuetModel(config, load_pretrained=False)  # may run on the meta device: no file reads

    def initialize(self, model: DuetModel, recipe: DuetRecipe) -> None:
        """The recipe's pretrained autoencoder weights into a fresh model (the MLLM and DiT of a
        real run come from `init_from`, an imported folder)."""
        from tapestry.models.duet.vae import load_vae_weights

        if recipe.autoencoder.pretrained:
            load_vae_weights(model.vae, model.config.vae, recipe.autoencoder.pretrained)

    def from_pretrained(self, folder: str | Path, device: Any = "cpu") -> DuetModel:
        return DuetModel.from_pretrained(folder, device)

    def from_state_dict(self, config: DuetConfig, state: dict[str, Tensor], source: str = "<state dict>") -> DuetModel:
        return DuetModel.from_state_dict(config, state, source)

    def layout_config(self, config: DuetConfig, downsample: int = 0, **choices):
        from dataclasses import fields

        from tapestry.layout import LayoutConfig

        known = {f.name for f in fields(LayoutConfig)}
        kept = {k: v for k, v in choices.items() if k in known}
        kept["target_size"] = tuple(config.target_size)
        kept["latent_patch"] = config.dit.patch_size[1]
        if downsample:
            kept["vae_downsample"] = downsample
        return LayoutConfig(**kept)

    def inspect(self, folder: str | Path):
        """`tapestry inspect` for a duet checkpoint, a Qwen2.5-VL folder or a diffusers Wan /
        Cosmos folder (headers only); None for anything else."""
        from tapestry.models.duet.inspect import inspect_folder

        return inspect_folder(folder)

    # -- training -------------------------------------------------------------------------------
    def layout(self, doc, tokenizer, layout, supervise_text: bool = True, *, config: DuetConfig):
        """Document -> one SequenceLayout (a causal span; images as their image-pad runs)."""
        from tapestry.layout import DocumentPlacement, ImagePlacement, SequenceLayout, Span

        tokens = DuetTokens.from_tokenizer(tokenizer)
        duet = layout_duet(doc, tokenizer, tokens, _image_input(config), pixels=False, supervise_text=supervise_text)
        merge = config.mllm.spatial_merge_size
        images = [ImagePlacement(0, im.segment, "vit", im.start, im.end,
                                 (int(im.grid_thw[1]) // merge, int(im.grid_thw[2]) // merge), im.role,
                                 int(duet.positions[0, im.start]))
                  for im in duet.images]
        return SequenceLayout(duet.ids, torch.zeros_like(duet.ids), duet.positions[0].clone(), duet.labels,
                              [Span(0, duet.length, "causal", 0)], images,
                              [DocumentPlacement(doc.id, 0, duet.length)])

    def prepare(self, row, documents, layout, codec=None, generator=None, timestep_shift: float = 1.0, *,
                config: DuetConfig, tokenizer):
        """A packed row -> one DuetInputs per document (pixels processed, flow choices drawn)."""
        from tapestry.models.common.flow import sample_timesteps

        image_input = _image_input(config)
        tokens = DuetTokens.from_tokenizer(tokenizer)
        generator = generator or torch.Generator().manual_seed(0)
        shift = timestep_shift if timestep_shift != 1.0 else config.training.timestep_shift
        out = []
        for index, placement in enumerate(row.documents):
            doc = documents[index]
            # the layout is a pure function of the Document: laying it out again (now with pixels)
            # gives the row's tokens back, plus the image bookkeeping the row does not carry
            duet = layout_duet(doc, tokenizer, tokens, image_input)
            ids = row.token_ids[placement.start:placement.end]
            if not torch.equal(duet.ids, ids):
                raise ValueError(f"document {doc.id!r}: its packed tokens differ from its duet layout "
                                 "(was the Document changed after layout?)")
            duet.labels = row.labels[placement.start:placement.end].clone()  # keeps supervise_text
            targets = duet.targets
            if not targets:
                out.append(DuetInputs(duet, None))
                continue
            pick = targets[int(torch.randint(len(targets), (1,), generator=generator))]
            t = float(sample_timesteps(1, shift, generator=generator)[0])
            seed = int(torch.randint(2**62, (1,), generator=generator))
            drop = bool(torch.rand((), generator=generator) < config.training.guidance_dropout)
            out.append(DuetInputs(duet, pick, t, seed, drop))
        return out

    def codec_pixels(self, row, documents, layout) -> list[Tensor]:
        return []  # the duet model encodes with its own VAE inside the loss

    def loss_counts(self, rows, config=None) -> dict[str, int]:
        text = sum(int((r.labels != IGNORE).sum()) for r in rows)
        flow = sum(1 for r in rows for d in range(len(r.documents))
                   if any(p.doc == d and p.role == "target" for p in r.images))
        return {"text": text, "flow": flow}

    def loss(self, model: DuetModel, batch) -> dict[str, Tensor]:
        """{"text": CE summed over supervised tokens, "flow": per-sequence MSE summed}."""
        from tapestry.models.common.flow import interpolate, velocity_target
        from tapestry.models.duet.model import FlowSample

        inputs = [item for row in batch for item in (row if isinstance(row, list) else [row])]
        mllm_frozen = model.frozen("mllm")
        want_flow = not (model.frozen("connector") and model.frozen("dit"))
        trainable = next((p for p in model.parameters() if p.requires_grad), None)
        zero = trainable.sum() * 0.0 if trainable is not None else torch.zeros((), device=model.device)
        text, flow = zero, zero
        for item in inputs:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not mllm_frozen):
                out = model.run_mllm(item.layout)
                s, _ = model.text_loss(item.layout, out)
                text = text + s
            if item.target is None or not want_flow:
                continue
            frames = [model.encode_image(item.layout.images[j].image).cpu() for j in range(item.target + 1)]
            x0 = frames[-1]
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(item.noise_seed))
            frames[-1] = interpolate(x0[None], noise[None], item.t)[0]
            sample = FlowSample(item.target, frames, item.t, velocity_target(x0, noise), item.drop_last_chunk)
            flow = flow + model.flow_loss(item.layout, out, sample)
        return {"text": text, "flow": flow}

    def group_of(self, name: str) -> str:
        group = name.split(".", 1)[0]
        if group not in PARAM_GROUPS:
            raise KeyError(f"parameter {name!r} belongs to no duet group {PARAM_GROUPS}")
        return group

    def blocks(self, model: DuetModel) -> list:
        return model.blocks()

    # -- inference ------------------------------------------------------------------------------
    def runtime(self, model: DuetModel, tokenizer, codec=None, layout=None) -> DuetRuntime:
        return DuetRuntime(model, tokenizer)


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


@dataclass
class DuetContext:
    """The cached state of one Document prefix."""

    ids: list[int] = field(default_factory=list)
    layers: list[Tensor] = field(default_factory=list)  # per decoder layer [L, D]: every token so far
    cache: Any = None  # transformers DynamicCache
    next_position: int = 0  # the next M-RoPE id
    logits: Tensor | None = None  # [V] after the last token
    frames: list[Tensor] = field(default_factory=list)  # clean latents of every image so far
    chunk_start: int = 1  # where the current text chunk starts (after the last image)
    drawing: tuple[int, int] | None = None  # (<BOV> position, chunk start) of the image being drawn
    conditions: dict[bool, Tensor] = field(default_factory=dict)  # drop_last_chunk -> connector output


class DuetRuntime(OneByOne):
    """What tapestry.infer.engine drives for a duet model (see tapestry.models.family.Runtime).

    Requests served together run one by one (`OneByOne`): the MLLM's cache is a transformers
    DynamicCache per context and each image's DiT reads its own frames and connector output,
    so there is no batched cross-request path yet (correct, no speed-up).
    """

    def __init__(self, model: DuetModel, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokens = DuetTokens.from_tokenizer(tokenizer)
        self.image_input = _image_input(model.config)
        self.target_size = tuple(model.config.target_size)

    # -- MLLM steps -----------------------------------------------------------------------------
    def _run(self, ctx: DuetContext, ids: list[int], pictures: list | None = None) -> None:
        from transformers import DynamicCache

        ids_t = torch.tensor(ids, dtype=torch.long)
        pixel_values, grids = (self.image_input(pictures) if pictures else (None, torch.zeros(0, 3, dtype=torch.long)))
        positions, ctx.next_position = mrope_positions_for(ids_t, grids, self.tokens, self.image_input,
                                                           ctx.next_position)
        mllm = self.model.mllm
        embeds = mllm.embed(ids_t, self.tokens.image_pad, pixel_values, grids)
        if ctx.cache is None:
            ctx.cache = DynamicCache(config=mllm.hf.config.text_config)
        out = mllm.run(embeds[None], positions[:, None], cache=ctx.cache, use_cache=True)
        new = [h[0] for h in out.layers]
        ctx.layers = new if not ctx.layers else [torch.cat([a, b]) for a, b in zip(ctx.layers, new)]
        ctx.ids.extend(ids)
        ctx.logits = out.logits[0, -1].float()

    def _image_ids(self, image, opening: bool = True) -> tuple[list[int], int]:
        count = self.image_input.tokens(self.image_input.grid(image))
        return (self.tokens.opening() if opening else []) + [self.tokens.image_pad] * count + [self.tokens.vision_end], count

    def prefill(self, doc, recompute: bool = False) -> DuetContext:
        ctx = DuetContext()
        if not doc.segments:
            self._run(ctx, [self.tokens.bos])
            return ctx
        layout = layout_duet(doc, self.tokenizer, self.tokens, self.image_input, close=False)
        pictures = [im.image for im in layout.images]
        ctx.next_position = 0
        self._run(ctx, layout.ids.tolist(), pictures)
        ctx.frames = [self.model.encode_image(im.image) for im in layout.images]
        ctx.chunk_start = layout.images[-1].end + 1 if layout.images else 1
        return ctx

    def append_text(self, context: DuetContext, ids: list[int]) -> None:
        if ids:
            self._run(context, list(ids))

    def begin_image(self, context: DuetContext) -> None:
        # the <BOV> the engine appended is the last token; the DiT reads everything before it
        bov = len(context.ids) - 1 if context.ids and context.ids[-1] == self.tokens.bov else len(context.ids)
        context.drawing = (bov, context.chunk_start)
        context.conditions = {}

    def append_image(self, context: DuetContext, image, role: str) -> None:
        ids, _ = self._image_ids(image)
        self._run(context, ids, [image])
        context.frames.append(self.model.encode_image(image))
        context.chunk_start = len(context.ids)
        context.drawing = None

    def next_text(self, context: DuetContext) -> Tensor:
        return context.logits

    # -- drawing --------------------------------------------------------------------------------
    def _condition(self, ctx: DuetContext, drop_last_chunk: bool) -> Tensor:
        if drop_last_chunk not in ctx.conditions:
            bov, chunk_start = ctx.drawing if ctx.drawing is not None else (len(ctx.ids), ctx.chunk_start)
            keep = torch.ones(bov, dtype=torch.bool)
            if drop_last_chunk:
                keep[chunk_start:bov] = False
            indices = keep.nonzero().flatten()
            ctx.conditions[drop_last_chunk] = self.model.connector([h[indices] for h in ctx.layers])
        return ctx.conditions[drop_last_chunk]

    def latent_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        h, w = self.model.frame_size(*size)
        f = self.model.vae.downsample
        return h // f, w // f

    def noise(self, size: tuple[int, int], generator) -> Tensor:
        """Initial latents, channels last: [1, h, w, C]."""
        h, w = self.latent_grid(size)
        x = torch.randn(1, self.model.vae.latent_channels, h, w, generator=generator)
        return x.permute(0, 2, 3, 1).to(self.model.device)

    def denoise(self, contexts: dict[str, DuetContext], x: Tensor, t: Tensor, batched: bool = True) -> dict[str, Tensor]:
        """Each branch on its own context: its frames and its connector reading. Batched, the
        branches whose frames have the same sizes (DuetGen's negative keeps every frame) run in one
        DiT forward, their contexts padded and masked; a branch with other frames (one that drops
        images) runs in its own. Unbatched, one forward per branch."""
        latents = x[0].permute(2, 0, 1)  # [C, h, w]
        groups: dict[tuple, list[str]] = {}
        for name, ctx in contexts.items():
            key = tuple(tuple(f.shape) for f in ctx.frames) if batched else (name,)
            groups.setdefault(key, []).append(name)
        out = {}
        for names in groups.values():
            frames = [contexts[name].frames + [latents] for name in names]
            conditions = [self._condition(contexts[name], False) for name in names]
            if len(names) == 1:
                velocities = [self.model.velocity(frames[0], float(t), conditions[0])]
            else:
                velocities = self.model.velocities(frames, float(t), conditions)
            for name, v in zip(names, velocities):
                out[name] = v.permute(1, 2, 0)[None]
        return {name: out[name] for name in contexts}

    def decode(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        pixels = self.model.decode_latents(x[0].permute(2, 0, 1))[None]
        if tuple(pixels.shape[-2:]) != tuple(size):
            pixels = torch.nn.functional.interpolate(pixels, size=size, mode="bicubic", align_corners=False)
        return pixels

    def to_image(self, pixels: Tensor):
        return tensor_to_image(pixels[0])


FAMILY = DuetFamily()


def _register() -> None:
    from tapestry.models import family as families

    families.register(FAMILY)


_register()
