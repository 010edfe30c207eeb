"""Document -> the duet MLLM's token sequence, its labels, and the images the DiT will see.

    BOS, then the reading order:
      text              its tokens (supervised when the segment is a target)
      given image       <|vision_start|> <|image_pad|> × n <|vision_end|>
      target image      <BOV> <|vision_start|> <|image_pad|> × n <|vision_end|>
    EOS (supervised when the document has targets)

<BOV> is supervised: emitting it is how the model decides that an image comes next (N-to-M),
as DuetGen trains it. A target image still enters the MLLM as clean pixels after its <BOV>
(teacher forcing), exactly as a generated image is appended at inference before the model
decides what follows. The DiT's text condition for target image k is the hidden states of every
token before its <BOV>; its "last text chunk" — the text since the previous image, whoever wrote
it — is what DuetGen's guidance negative removes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor

from tapestry.errors import TapestryError

IGNORE = -100
DUET_EXTRA = ("<|vision_start|>", "<|video_pad|>")


class DuetLayoutError(TapestryError):
    """A Document cannot be laid out for the duet model; the message names the document and segment."""


@dataclass(frozen=True)
class DuetTokens:
    """The ids the duet layout uses, by role."""

    bos: int
    eos: int
    pad: int
    bov: int  # the tokenizer's begin-of-image role: what the model emits to draw
    vision_start: int | None  # Qwen's <|vision_start|>; a tokenizer without it omits the marker
    vision_end: int
    image_pad: int
    video_pad: int  # Qwen needs an id for video pads (never used here); pad when absent

    @classmethod
    def from_tokenizer(cls, tokenizer) -> DuetTokens:
        backend = tokenizer.backend
        start, video = (backend.token_to_id(name) for name in DUET_EXTRA)
        return cls(tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.boi_id, start,
                   tokenizer.eoi_id, tokenizer.image_id, tokenizer.pad_id if video is None else video)

    def opening(self) -> list[int]:
        return [] if self.vision_start is None else [self.vision_start]


def duet_specials():
    """Qwen2.5-VL's special strings, with DuetGen's <BOV> as the token the model emits to draw."""
    from tapestry.models.common.tokenizer import SpecialTokens

    return SpecialTokens(bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>", boi="<BOV>",
                         eoi="<|vision_end|>", image="<|image_pad|>")


def add_duet_tokens(tokenizer):
    """A TextTokenizer with the duet roles: <BOV> and Qwen's vision tokens added where missing."""
    from tokenizers import AddedToken

    from tapestry.models.common.tokenizer import TextTokenizer

    specials = duet_specials()
    backend = tokenizer.backend
    wanted = specials.all() + list(DUET_EXTRA)
    backend.add_special_tokens([AddedToken(t, special=True) for t in wanted if backend.token_to_id(t) is None])
    return TextTokenizer(backend, specials)


def train_duet_tokenizer(texts, vocab_size: int):
    from tapestry.models.common.tokenizer import train_bpe

    return add_duet_tokens(train_bpe(texts, vocab_size, duet_specials()))


@dataclass
class DuetImage:
    segment: int  # index into doc.segments
    role: str
    image: Image.Image
    start: int  # image-pad tokens [start, end) in `ids`
    end: int
    bov: int | None  # position of its <BOV> (target images)
    chunk: tuple[int, int]  # the last text chunk before it: token range [a, b) (may be empty)
    grid_thw: Tensor  # [3]


@dataclass
class DuetLayout:
    doc_id: str
    ids: Tensor  # [L]
    labels: Tensor  # [L]: labels[i] = ids[i + 1] where that token is supervised, else IGNORE
    positions: Tensor  # [3, L] M-RoPE ids
    images: list[DuetImage] = field(default_factory=list)
    pixel_values: Tensor | None = None  # [patches, 3·T·P·P] of all images in order
    grid_thw: Tensor | None = None  # [n_images, 3]
    image_token_id: int = 0  # the id of image-pad tokens in `ids`

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])

    @property
    def targets(self) -> list[int]:
        """Indices into `images` of target images (those with a <BOV>)."""
        return [k for k, im in enumerate(self.images) if im.bov is not None]


def layout_duet(doc, tokenizer, tokens: DuetTokens, image_input, close: bool = True,
                pixels: bool = True, supervise_text: bool = True) -> DuetLayout:
    """One Document -> its duet sequence. `close=False` leaves it open (no EOS): a prompt.
    `pixels=False` computes the token grids without processing pixels (packing needs only sizes)."""
    from tapestry.document import TextSegment

    has_targets = any(getattr(s, "role", None) == "target" for s in doc.segments)
    pictures = []
    for item, index in doc.reading_order_with_segments():
        if not isinstance(item, str):
            if item.image is None:
                raise DuetLayoutError(f"document {doc.id!r} segments[{index}]: image has no pixels "
                                      f"({item.role}); the duet layout needs every image")
            pictures.append(item.image)
    pixel_values = None
    if pictures and pixels:
        pixel_values, grids = image_input(pictures)
    else:
        grids = torch.tensor([image_input.grid(im) for im in pictures], dtype=torch.long).reshape(-1, 3)
    ids: list[int] = [tokens.bos]
    supervised: list[bool] = [False]
    images: list[DuetImage] = []
    chunk_start = 1
    k = 0
    for item, index in doc.reading_order_with_segments():
        segment = doc.segments[index]
        if isinstance(item, str):
            assert isinstance(segment, TextSegment)
            piece = tokenizer.encode(item)
            ids.extend(piece)
            supervised.extend([segment.role == "target"] * len(piece))
            continue
        bov = None
        chunk = (chunk_start, len(ids))
        if item.role == "target":
            bov = len(ids)
            ids.append(tokens.bov)
            supervised.append(True)
        opening = tokens.opening()
        ids.extend(opening)
        supervised.extend([False] * len(opening))
        count = image_input.tokens(grids[k])
        start = len(ids)
        ids.extend([tokens.image_pad] * count)
        supervised.extend([False] * count)
        ids.append(tokens.vision_end)
        supervised.append(False)
        images.append(DuetImage(index, item.role, item.image, start, start + count, bov, chunk, grids[k]))
        chunk_start = len(ids)
        k += 1
    if close:
        ids.append(tokens.eos)
        supervised.append(has_targets)
    if not supervise_text:
        supervised = [False] * len(supervised)
    ids_t = torch.tensor(ids, dtype=torch.long)
    labels = torch.full_like(ids_t, IGNORE)
    flags = torch.tensor(supervised[1:], dtype=torch.bool)
    labels[:-1][flags] = ids_t[1:][flags]
    positions, _ = mrope_positions_for(ids_t, grids, tokens, image_input)
    return DuetLayout(doc.id, ids_t, labels, positions, images, pixel_values, grids, tokens.image_pad)


def mrope_positions_for(ids: Tensor, grids, tokens: DuetTokens, image_input, start: int = 0):
    from tapestry.models.duet.mllm import mrope_positions

    return mrope_positions(ids, list(grids), tokens.image_pad, image_input.config.spatial_merge_size, start)


def context_indices(layout: DuetLayout, k: int, drop_last_chunk: bool = False) -> Tensor:
    """Token positions whose hidden states condition the DiT on image k: everything before its
    <BOV>, minus the last text chunk for the guidance negative."""
    image = layout.images[k]
    end = image.bov if image.bov is not None else image.chunk[1]
    keep = torch.ones(end, dtype=torch.bool)
    if drop_last_chunk:
        a, b = image.chunk
        keep[a:b] = False
    return keep.nonzero().flatten()
