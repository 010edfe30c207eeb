"""`tiny`: a second model family that lives only in tests — the proof that the protocol in
tapestry/models/family.py is enough. A plain pre-norm transformer with one expert for every
token (text, ViT patches, latents), no KV cache (each call reruns its context), flow matching on
latent patches. Nothing in tapestry/train or tapestry/infer knows it exists: a test registers it.
The worked example of docs/models.md ("Writing a family").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tapestry.layout import IGNORE, LayoutConfig, Span, clean_token_kinds, dense_mask, layout_document
from tapestry.models.common.checkpoint import WEIGHTS_NAME, load_state_strict, save_state, write_config
from tapestry.models.common.flow import interpolate, sample_timesteps, velocity_target
from tapestry.models.common.patches import patchify, unpatchify


@dataclass
class TinyRecipe:  # the [model] keys a training config gives this family
    hidden: int = 32
    layers: int = 1


@dataclass
class TinyConfig:
    vocab_size: int
    channels: int
    hidden: int = 32
    layers: int = 1
    patch: int = 2  # latent cells per token side
    vit_patch: int = 8

    def to_dict(self):
        return {"family": "tiny", **asdict(self)}

    def to_json(self):
        return json.dumps(self.to_dict(), indent=1)


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm1, self.qkv, self.out = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, mask):  # x: [B, L, D]; mask: [B, L, L] (True = attend)
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)  # [B, 2, L, D/2]
        x = x + self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]).transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


class TinyModel(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config, d, pd = config, config.hidden, config.channels * config.patch**2
        self.embed, self.head = nn.Embedding(config.vocab_size, d), nn.Linear(d, config.vocab_size)
        self.pos, self.time = nn.Embedding(1024, d), nn.Linear(1, d)
        self.vit_in, self.latent_in, self.latent_out = nn.Linear(3 * config.vit_patch**2, d), nn.Linear(pd, d), nn.Linear(d, pd)
        self.blocks = nn.ModuleList(Block(d) for _ in range(config.layers))

    def forward(self, embeds, positions, mask):  # [B, L, D], [B, L], [B, L, L] -> [B, L, D]
        x = embeds + self.pos(positions)
        for block in self.blocks:
            x = block(x, mask)
        return x

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_state(Path(folder) / WEIGHTS_NAME, self)
        write_config(Path(folder), self.config.to_json())


def pixels(image, height, width):  # PIL -> [3, H, W] in [-1, 1]
    array = torch.frombuffer(bytearray(image.convert("RGB").resize((width, height)).tobytes()), dtype=torch.uint8)
    return array.view(height, width, 3).permute(2, 0, 1).float() / 127.5 - 1.0


@dataclass
class Row:  # one packed row's model inputs
    row: object
    embeds: dict  # placement -> what fills its tokens: ("vit", pixels) or ("lat", latents [C, h, w], t)
    targets: dict  # noise placement -> velocity target [C, h, w]


def embed_row(model, inputs: Row):
    row, c = inputs.row, model.config
    x = model.embed(row.token_ids).clone()
    for n, (kind, value, t) in inputs.embeds.items():
        p = row.images[n]
        if kind == "vit":
            x[p.start:p.end] = model.vit_in(patchify(value[None], c.vit_patch)[0])
        else:
            x[p.start:p.end] = model.latent_in(patchify(value[None], c.patch)[0]) + model.time(torch.tensor([[t]]))
    return x


class TinyFamily:
    name, recipe, param_groups, loss_parts = "tiny", TinyRecipe, ("body", "heads"), ("text", "flow")

    def model_config(self, recipe, vocab_size, latent_channels):
        return TinyConfig(vocab_size, latent_channels, recipe.hidden, recipe.layers)

    def load_config(self, folder):
        data = json.loads((Path(folder) / "config.json").read_text())
        return TinyConfig(**{k: v for k, v in data.items() if k != "family"})

    def build(self, config):
        return TinyModel(config)

    def initialize(self, model, recipe):
        pass  # nothing pretrained to load

    def from_pretrained(self, folder, device="cpu"):
        return self.from_state_dict(self.load_config(folder), _load(Path(folder) / WEIGHTS_NAME))

    def from_state_dict(self, config, state, source="<state dict>"):
        with torch.device("meta"):
            model = TinyModel(config)
        load_state_strict(model, state, source)
        return model.eval()

    def layout_config(self, config, downsample, **choices):
        return LayoutConfig(vit_patch=config.vit_patch, vae_downsample=downsample, latent_patch=config.patch,
                            max_vit_side=8, max_latent_side=8, **choices)

    def layout(self, doc, tokenizer, layout, supervise_text=True, *, config=None):
        return layout_document(doc, tokenizer, layout, supervise_text=supervise_text)

    def prepare(self, row, documents, layout, codec, generator=None, timestep_shift=1.0, *, config=None, tokenizer=None):
        embeds, targets = {}, {}
        for n, p in enumerate(row.images):
            image = documents[p.doc].segments[p.segment].image
            if p.kind == "vit":
                embeds[n] = ("vit", pixels(image, p.grid[0] * layout.vit_patch, p.grid[1] * layout.vit_patch), 0.0)
                continue
            cell = layout.vae_downsample * layout.latent_patch
            x0 = codec.encode(pixels(image, p.grid[0] * cell, p.grid[1] * cell)[None])[0]
            if p.kind == "vae":
                embeds[n] = ("lat", x0, 0.0)
                continue
            t, noise = sample_timesteps(1, timestep_shift, generator=generator), torch.randn(x0.shape, generator=generator)
            embeds[n], targets[n] = ("lat", interpolate(x0[None], noise[None], t)[0], float(t)), velocity_target(x0, noise)
        return Row(row, embeds, targets)

    def codec_pixels(self, row, documents, layout):
        return []  # nothing to batch ahead: `prepare` encodes as it goes

    def loss_counts(self, rows, config):
        return {"text": sum(int((r.labels != IGNORE).sum()) for r in rows),
                "flow": sum(p.end - p.start for r in rows for p in r.images if p.kind == "noise") * config.channels * config.patch**2}

    def loss(self, model, batch):
        hidden = model(torch.stack([embed_row(model, b) for b in batch]), torch.stack([b.row.position_ids for b in batch]),
                       torch.stack([dense_mask(b.row.spans) for b in batch]))
        labels = torch.stack([b.row.labels for b in batch])
        text = flow = hidden.sum() * 0.0
        if (labels != IGNORE).any():
            text = F.cross_entropy(model.head(hidden[labels != IGNORE]), labels[labels != IGNORE], reduction="sum")
        for i, b in enumerate(batch):
            for n, target in b.targets.items():
                p = b.row.images[n]
                v = unpatchify(model.latent_out(hidden[i:i + 1, p.start:p.end]), model.config.patch, *p.grid)
                flow = flow + (v[0] - target).pow(2).sum()
        return {"text": text, "flow": flow}

    def group_of(self, name):
        return "heads" if name.startswith(("head", "latent_out")) else "body"

    def blocks(self, model):
        return list(model.blocks)

    def runtime(self, model, tokenizer, codec, layout):
        return TinyRuntime(model, tokenizer, codec, layout)


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


class TinyRuntime:
    """No cache: a context is its token embeddings, spans and positions; every call reruns it."""

    def __init__(self, model, tokenizer, codec, layout):
        self.model, self.tokenizer, self.codec, self.layout = model, tokenizer, codec, layout
        self.target_size = tuple(layout.target_size)

    def _push(self, ctx, embeds, mode, position=None):  # an image's tokens share `position`
        n = embeds.shape[0]
        if position is None:
            positions, ctx["next"] = torch.arange(ctx["next"], ctx["next"] + n), ctx["next"] + n
        else:
            positions = torch.full((n,), position)
        ctx["spans"].append(Span(ctx["embeds"].shape[0], ctx["embeds"].shape[0] + n, mode))
        ctx["embeds"], ctx["positions"] = torch.cat([ctx["embeds"], embeds]), torch.cat([ctx["positions"], positions])

    def _run(self, ctx):
        return self.model(ctx["embeds"][None], ctx["positions"][None], dense_mask(ctx["spans"])[None])[0]

    def prefill(self, doc, recompute=False):
        ctx = {"embeds": torch.zeros(0, self.model.config.hidden), "positions": torch.zeros(0, dtype=torch.int64),
               "spans": [], "next": 0, "image": None}
        if not doc.segments:
            self.append_text(ctx, [self.tokenizer.bos_id])
            return ctx
        row = layout_document(doc, self.tokenizer, self.layout)
        embeds, end = embed_row(self.model, TinyFamily().prepare(row, [doc], self.layout, self.codec)), row.length - 1
        ctx["spans"] = [Span(s.start, min(s.end, end), s.mode) for s in row.spans if s.start < end]
        ctx["embeds"], ctx["positions"], ctx["next"] = embeds[:end], row.position_ids[:end], int(row.position_ids[end])
        return ctx

    def append_text(self, ctx, ids):
        self._push(ctx, self.model.embed(torch.tensor(ids)), "causal")

    def begin_image(self, ctx):
        ctx["image"], ctx["next"] = ctx["next"], ctx["next"] + 1

    def append_image(self, ctx, image, role):
        if ctx["image"] is None:
            self.append_text(ctx, [self.tokenizer.boi_id])
            self.begin_image(ctx)
        position, ctx["image"], L = ctx["image"], None, self.layout
        for kind in clean_token_kinds(role, L):
            grid = L.vit_grid(image.height, image.width) if kind == "vit" else L.vae_grid(image.height, image.width)
            cell = L.vit_patch if kind == "vit" else L.vae_downsample * L.latent_patch
            value = pixels(image, grid[0] * cell, grid[1] * cell)
            if kind == "vit":
                tokens = self.model.vit_in(patchify(value[None], L.vit_patch)[0])
            else:
                tokens = self.model.latent_in(patchify(self.codec.encode(value[None]), L.latent_patch)[0]) + self.model.time(torch.zeros(1, 1))
            self._push(ctx, tokens, "full", position)
        self.append_text(ctx, [self.tokenizer.eoi_id])

    def next_text(self, ctx):
        return self.model.head(self._run(ctx)[-1]).float()

    def noise(self, size, generator):
        rows, cols = self.layout.vae_grid(*size)
        p = self.layout.latent_patch
        return patchify(torch.randn(1, self.codec.latent_channels, rows * p, cols * p, generator=generator), p).unflatten(1, (rows, cols))

    def denoise(self, contexts, x, t, batched=True):  # x: [1, rows, cols, p·p·C]
        tokens = self.model.latent_in(x.flatten(1, 2)[0]) + self.model.time(t.reshape(1, 1).float())
        out = {}
        for name, ctx in contexts.items():
            trial = {**ctx, "spans": list(ctx["spans"])}
            self._push(trial, tokens, "noise", ctx["image"])
            out[name] = self.model.latent_out(self._run(trial)[-tokens.shape[0]:]).view_as(x)
        return out

    def decode(self, x, size):
        return self.codec.decode(unpatchify(x.flatten(1, 2), self.layout.latent_patch, x.shape[1], x.shape[2]))
