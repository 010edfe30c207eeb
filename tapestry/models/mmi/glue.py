"""The `mmi` family's glue: Document -> token sequence -> batch -> NTP + λ·NIP.

Sequence of one document: BOS, then the reading order — text as tokens, each image as
`<boi>` + Q placeholder tokens (filled with the image's resampled tokens) + `<eoi>` — then EOS.
Everything is causal. An image becomes readable through MMFS from its `<eoi>` on, so its own
tokens (and its `<boi>`) see only earlier images.

Image generation for image j conditions the decoder on the LLM states of the document up to and
including image j's `<boi>` (causal, so nothing of image j leaks), resampled to 77 tokens, plus
MMFS over images 0 … j−1 of the same document. With probability `condition_dropout` that
condition is the learned negative embedding instead (classic CFG's ∅); the document's text loss
is untouched by the drop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from tapestry.layout import IGNORE
from tapestry.models.mmi.config import MMIConfig
from tapestry.models.mmi.model import ImageMemory, MMIModel


@dataclass
class ImageSlot:
    segment: int  # index in doc.segments
    role: str
    boi: int  # position of <boi>
    start: int  # first placeholder position
    end: int  # one past the last placeholder (= the <eoi> position)
    index: int  # place among the document's images (0 = first)
    image_loss: bool  # whether this image is a NIP target


@dataclass
class MMISequence:
    doc_id: str
    ids: list[int]
    labels: list[int]
    slots: list[ImageSlot] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def layout_document(doc, tokenizer, config: MMIConfig) -> MMISequence:
    from tapestry.document import ImageSegment

    queries = config.resampler.queries
    ids: list[int] = [tokenizer.bos_id]
    supervised: list[bool] = [False]  # supervised[i]: token i is a next-token target
    slots: list[ImageSlot] = []
    items = doc.reading_order_with_segments()
    has_targets = any(getattr(s, "role", None) == "target" for s in doc.segments)
    for n, (item, segment_index) in enumerate(items):
        segment = doc.segments[segment_index]
        if isinstance(item, str):
            pieces = tokenizer.encode(item)
            ids += pieces
            supervised += [config.text_loss == "all" or segment.role == "target"] * len(pieces)
            continue
        assert isinstance(item, ImageSegment)
        index = len(slots)
        if index >= config.mmfs.max_images:
            raise ValueError(f"document {doc.id!r} has more than {config.mmfs.max_images} images "
                             f"(mmfs.max_images of this model)")
        first = index == 0 if config.skip_first_image == "first_image" else n == 0
        wanted = config.image_loss == "all" or item.role == "target"
        boi = len(ids)
        ids.append(tokenizer.boi_id)
        supervised.append(item.role == "target" or config.text_loss == "all")  # learn *when* to draw
        ids += [tokenizer.image_id] * queries
        supervised += [False] * queries
        slots.append(ImageSlot(segment_index, item.role, boi, boi + 1, boi + 1 + queries, index, wanted and not first))
        ids.append(tokenizer.eoi_id)
        supervised.append(False)
    ids.append(tokenizer.eos_id)
    supervised.append(has_targets or config.text_loss == "all")
    labels = [ids[i + 1] if supervised[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]
    return MMISequence(doc.id, ids, labels, slots)


def pixels_to_tensor(image: Image.Image, side: int) -> Tensor:
    """PIL -> [3, side, side] in [-1, 1] (bicubic resize when needed)."""
    if image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return array.view(side, side, 3).permute(2, 0, 1).float() / 127.5 - 1.0


def visibility(slots_per_row: Sequence[Sequence[ImageSlot]], length: int, images: int) -> Tensor:
    """[B, L, M]: token p of row b may read image m of that row iff p >= the image's <eoi>."""
    visible = torch.zeros(len(slots_per_row), length, images, dtype=torch.bool)
    for b, slots in enumerate(slots_per_row):
        for m, slot in enumerate(slots[:images]):  # images = 0 when the model has no MMFS
            visible[b, slot.end :, m] = True
    return visible


def causal_mask(lengths: Sequence[int], length: int) -> Tensor:
    """[B, L, L]: causal within each row's real tokens; a pad position sees itself (no NaN rows)."""
    base = torch.ones(length, length, dtype=torch.bool).tril()
    masks = []
    for n in lengths:
        valid = torch.arange(length) < n
        masks.append((base & valid[None, :]) | torch.eye(length, dtype=torch.bool))
    return torch.stack(masks)


def noise_scheduler(config: MMIConfig):
    from diffusers import DDPMScheduler

    d = config.decoder
    return DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                         beta_schedule=d.beta_schedule, prediction_type=d.prediction_type)


@dataclass
class MMIBatch:
    sequences: list[MMISequence]
    ids: Tensor  # [B, L]
    labels: Tensor  # [B, L]
    mask: Tensor  # [B, L, L]
    positions: Tensor  # [B, L]
    encoder_pixels: Tensor  # [N, 3, S, S] every image of the batch, row by row
    image_rows: list[list[int]]  # per row, indices into encoder_pixels in slot order
    nip: list[tuple[int, int]]  # (row, slot) of every image-loss target
    latents: Tensor  # [K, C, h, w] clean latents of the targets
    noise: Tensor  # [K, C, h, w]
    timesteps: Tensor  # [K] DDPM steps
    dropped: Tensor  # [K] bool: condition replaced by the learned negative


@torch.no_grad()
def prepare_batch(config: MMIConfig, sequences: Sequence[MMISequence], documents: Sequence, vae, pad_id: int,
                  generator: torch.Generator | None = None) -> MMIBatch:
    """Tensors for a batch of one-document rows; targets VAE-encoded, noised and dropped (seeded)."""
    length = max(len(s) for s in sequences)
    b = len(sequences)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s.ids)
        labels[i, : len(s)] = torch.tensor(s.labels)
    side = config.vision.image_size
    target_side = config.decoder.sample_size * vae.downsample
    pixels, rows, nip, latents = [], [], [], []
    for r, (seq, doc) in enumerate(zip(sequences, documents)):
        rows.append([])
        for j, slot in enumerate(seq.slots):
            segment = doc.segments[slot.segment]
            if segment.image is None:
                raise ValueError(f"document {seq.doc_id!r} segments[{slot.segment}] has no pixels")
            rows[-1].append(len(pixels))
            pixels.append(pixels_to_tensor(segment.image, side))
            if slot.image_loss:
                nip.append((r, j))
                latents.append(vae.encode(pixels_to_tensor(segment.image, target_side)[None])[0])
    k = len(nip)
    scheduler = noise_scheduler(config)
    if k:
        x0 = torch.stack(latents)
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (k,), generator=generator)
        dropped = torch.rand(k, generator=generator) < config.condition_dropout
    else:
        c, h = config.decoder.latent_channels, config.decoder.sample_size
        x0, noise = torch.zeros(0, c, h, h), torch.zeros(0, c, h, h)
        timesteps, dropped = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
    return MMIBatch(
        sequences=list(sequences), ids=ids, labels=labels, mask=causal_mask([len(s) for s in sequences], length),
        positions=torch.arange(length).expand(b, length).clone(),
        encoder_pixels=torch.stack(pixels) if pixels else torch.zeros(0, 3, side, side),
        image_rows=rows, nip=nip, latents=x0, noise=noise, timesteps=timesteps, dropped=dropped)


def encode_images(model: MMIModel, batch: MMIBatch) -> tuple[Tensor, ImageMemory]:
    """Embeddings [B, L, D] with image tokens in place, and the batch's image memory."""
    device = model.device
    embeds = model.lm.embed(batch.ids.to(device))
    cfg = model.config
    levels = len(cfg.vision.levels)
    per_row: list[list[list[Tensor]]] = [[] for _ in batch.image_rows]
    if batch.encoder_pixels.shape[0]:
        tokens, maps = model.encoder(batch.encoder_pixels.to(device))
        embeds = embeds.clone()
        for r, (seq, indices) in enumerate(zip(batch.sequences, batch.image_rows)):
            for slot, n in zip(seq.slots, indices):
                embeds[r, slot.start : slot.end] = tokens[n].to(embeds.dtype)
                if maps:
                    per_row[r].append([m[n] for m in maps])
    memory, _ = ImageMemory.stack(per_row, levels, cfg.vision.feature_dim, cfg.vision.level_sides(), device,
                                  embeds.dtype)
    return embeds, memory


def decoder_inputs(model: MMIModel, batch: MMIBatch, hidden: Tensor, memory: ImageMemory):
    """Condition [K, 77, X] (negative where dropped) and the decoder's memory and visibility."""
    device = hidden.device
    k = len(batch.nip)
    longest = max(batch.sequences[r].slots[j].boi + 1 for r, j in batch.nip)
    context = hidden.new_zeros(k, longest, hidden.shape[-1])
    key_mask = torch.zeros(k, longest, dtype=torch.bool, device=device)
    for n, (r, j) in enumerate(batch.nip):
        end = batch.sequences[r].slots[j].boi + 1
        context[n, :end] = hidden[r, :end]
        key_mask[n, :end] = True
    cond = model.decoder.condition(context, key_mask)
    dropped = batch.dropped.to(device)[:, None, None]
    cond = torch.where(dropped, model.decoder.negative_condition(k).to(cond.dtype), cond)
    rows = torch.tensor([r for r, _ in batch.nip], device=device)
    dec_memory = ImageMemory([f[rows] for f in memory.features], memory.index[rows])
    visible = torch.zeros(k, memory.count, dtype=torch.bool, device=device)
    for n, (_, j) in enumerate(batch.nip):
        visible[n, :j] = True  # the images before this one in its document
    return cond, dec_memory, visible


def training_loss(model: MMIModel, batch: MMIBatch) -> dict[str, Tensor]:
    """{"loss": NTP + λ·NIP, "text": NTP, "image": NIP}, means over supervised tokens / latent elements."""
    device = model.device
    embeds, memory = encode_images(model, batch)
    slots = [s.slots for s in batch.sequences]
    visible = visibility(slots, batch.ids.shape[1], memory.count).to(device)
    hidden = model.lm(embeds, batch.positions.to(device), batch.mask.to(device), memory, visible)
    labels = batch.labels.to(device)
    supervised = labels != IGNORE
    zero = hidden.sum() * 0.0  # keeps every parameter in the graph on a batch without one of the parts
    text = F.cross_entropy(model.lm.logits(hidden[supervised]).float(), labels[supervised]) if supervised.any() else zero
    image = zero
    if batch.nip:
        cond, dec_memory, dec_visible = decoder_inputs(model, batch, hidden, memory)
        scheduler = noise_scheduler(model.config)
        x0, noise, t = batch.latents.to(device), batch.noise.to(device), batch.timesteps.to(device)
        x_t = scheduler.add_noise(x0, noise, t)
        target = noise if model.config.decoder.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        prediction = model.decoder(x_t, t, cond, dec_memory, dec_visible)
        image = F.mse_loss(prediction.float(), target.float())
    return {"loss": text + model.config.nip_weight * image, "text": text, "image": image}
