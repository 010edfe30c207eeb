"""The writing half of DuetGen: a Qwen2.5-VL model from `transformers`.

Images enter it the way Qwen2.5-VL reads them: the long side capped at 480 px first (DuetGen's
memory cap), then Qwen's own resize rule and patching through transformers' PIL image processor
(`Qwen2VLImageProcessorPil`: the torchvision-based fast processor does not import here), with the
sizes of our config. Positions are Qwen's 3-D M-RoPE ids, computed here from the token ids and
image grids (the same rule as `get_rope_index`, tested equal) so that a cached context can keep
appending text and images with the right ids.

`run` returns the logits and the hidden states of every decoder layer: the connector reads all
of them (or the last only), the language head only the last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn

from tapestry.models.duet.config import MLLMConfig


def cap_long_side(image: Image.Image, max_side: int) -> Image.Image:
    """Scale down (bicubic, aspect kept) so the long side is at most `max_side`."""
    long = max(image.size)
    if long <= max_side:
        return image
    scale = max_side / long
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


class ImageInput:
    """Pixels of one or more images as Qwen2.5-VL's vision tower reads them."""

    def __init__(self, config: MLLMConfig):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.config = config
        self.processor = Qwen2VLImageProcessorPil(
            patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size,
            merge_size=config.spatial_merge_size, image_mean=list(config.image_mean), image_std=list(config.image_std),
            size={"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels},
        )

    def __call__(self, images: list[Image.Image]) -> tuple[Tensor, Tensor]:
        """-> pixel_values [patches, 3·T·P·P], grid_thw [n_images, 3]."""
        capped = [cap_long_side(im.convert("RGB"), self.config.max_side) for im in images]
        out = self.processor(images=capped, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def grid(self, image: Image.Image) -> tuple[int, int, int]:
        """(t, h, w) patch grid the processor will give this image (Qwen's resize rule)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        c = self.config
        capped = cap_long_side(image, c.max_side)
        h, w = smart_resize(capped.height, capped.width, c.patch_size * c.spatial_merge_size, c.min_pixels,
                            c.max_pixels)
        return 1, h // c.patch_size, w // c.patch_size

    def tokens(self, grid_thw) -> int:
        """LLM tokens of one image of grid (t, h, w) after the 2×2 merger."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.config.spatial_merge_size**2


def mrope_positions(ids: Tensor, grids: list[Tensor], image_token_id: int, merge: int,
                    start: int = 0) -> tuple[Tensor, int]:
    """Qwen2.5-VL 3-D position ids of a token run, continuing from `start`.

    ids: [L]; grids: one (t, h, w) per image-pad run in `ids`, in order.  -> ([3, L], next start)
    Text advances all three ids by one; an image's tokens share the temporal id `start` and take
    `start + row` / `start + column` for height / width, and the next token starts after the
    image's larger side.
    """
    out = torch.empty(3, ids.shape[0], dtype=torch.long)
    is_image = (ids == image_token_id).tolist()
    grid_iter = iter(grids)
    i, pos, n = 0, start, ids.shape[0]
    while i < n:
        if not is_image[i]:
            out[:, i] = pos
            pos += 1
            i += 1
            continue
        t, h, w = (int(v) for v in next(grid_iter))
        h, w = h // merge, w // merge
        count = t * h * w
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        out[0, i:i + count] = tt.flatten() + pos
        out[1, i:i + count] = hh.flatten() + pos
        out[2, i:i + count] = ww.flatten() + pos
        pos += max(h, w)
        i += count
    return out, pos


@dataclass
class MLLMOutput:
    logits: Tensor  # [B, L, V]
    layers: list[Tensor]  # one [B, L, D] per decoder layer, as transformers' hidden_states[1:] gives them
    cache: object | None = None


class DuetMLLM(nn.Module):
    def __init__(self, config: MLLMConfig):
        super().__init__()
        from transformers import Qwen2_5_VLForConditionalGeneration

        self.config = config
        self.hf = Qwen2_5_VLForConditionalGeneration(config.hf_config())
        self.images = ImageInput(config)

    @property
    def device(self) -> torch.device:
        return self.hf.lm_head.weight.device

    def image_features(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        """ViT + merger features of the images: [tokens, D]."""
        out = self.hf.model.get_image_features(pixel_values.to(self.device), grid_thw.to(self.device),
                                               return_dict=True)
        return torch.cat(out.pooler_output, dim=0)

    def embed(self, ids: Tensor, image_token_id: int, pixel_values: Tensor | None = None,
              grid_thw: Tensor | None = None) -> Tensor:
        """ids: [L] -> embeddings [L, D] with image-pad positions filled by the vision tower."""
        embeds = self.hf.model.get_input_embeddings()(ids.to(self.device))
        if pixel_values is not None and grid_thw is not None and len(grid_thw):
            features = self.image_features(pixel_values, grid_thw).to(embeds.dtype)
            mask = ids.to(self.device) == image_token_id
            if int(mask.sum()) != features.shape[0]:
                raise ValueError(f"{int(mask.sum())} image-pad tokens but {features.shape[0]} image features")
            embeds = embeds.masked_scatter(mask[:, None], features)
        return embeds

    def run(self, embeds: Tensor, positions: Tensor, cache=None, use_cache: bool = False) -> MLLMOutput:
        """embeds: [B, L, D]; positions: [3, B, L] M-RoPE ids. Causal over the cache and itself."""
        out = self.hf.model.language_model(inputs_embeds=embeds, position_ids=positions.to(self.device),
                                           cache=cache, use_cache=use_cache, output_hidden_states=True)
        hidden = out.hidden_states  # embeddings, then one per layer
        logits = self.hf.lm_head(out.last_hidden_state)
        return MLLMOutput(logits, list(hidden[1:]), out.cache if use_cache else None)
