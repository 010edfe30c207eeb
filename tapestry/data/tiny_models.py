"""Tiny checkpoints with random weights in the published layouts of the local model providers,
for tests, dry runs and benchmarks (they are not models of anything: their boxes, masks and
scores are random but deterministic):

    python -m tapestry.data.samples tiny-models DIR
      DIR/owlv2/  DIR/sam/  DIR/dinov2/  DIR/clip/  DIR/quality.safetensors

Each folder is written by transformers' own classes (`save_pretrained` of the model, its PIL
image processor and its tokenizer) from a tiny config, so its files, `model_type`, tensor names
and preprocessor fields are exactly those of the published checkpoints
(google/owlv2-base-patch16-ensemble, facebook/sam-vit-base, facebook/dinov2-small,
openai/clip-vit-base-patch32); only the sizes differ. Swap in the real folders for real answers.
"""

from __future__ import annotations

import json
from pathlib import Path

KINDS = ("owlv2", "sam", "dinov2", "clip", "quality")


def _tokenizer(folder: Path) -> None:
    """A byte-level CLIP BPE tokenizer with no merges (one token per character): the CLIP
    tokenizer's files and settings, with a vocabulary small enough for a tiny text model."""
    from transformers import CLIPTokenizer

    # byte-level BPE's alphabet: printable Latin-1 bytes stand for themselves, the others for
    # the code points from 256 up (so every byte is a visible character)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.save_pretrained(str(folder))


VOCAB = 2 * 256 + 2
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)


def write_owlv2(folder: Path) -> Path:
    from transformers import Owlv2Config, Owlv2ForObjectDetection
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    config = Owlv2Config(text_config=TEXT, projection_dim=32,
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=64, patch_size=16))
    Owlv2ForObjectDetection(config).eval().save_pretrained(str(folder))
    Owlv2ImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(str(folder))
    _tokenizer(folder)
    return folder


def write_sam(folder: Path) -> Path:
    from transformers import SamConfig, SamModel
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    config = SamConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16, output_channels=16, window_size=2, global_attn_indexes=[1],
                           mlp_dim=64, num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=16))
    SamModel(config).eval().save_pretrained(str(folder))
    SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                         mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16}
                         ).save_pretrained(str(folder))
    return folder


def write_dinov2(folder: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).eval().save_pretrained(str(folder))
    BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(str(folder))
    return folder


def write_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    config = CLIPConfig(text_config=TEXT, projection_dim=32,
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8))
    CLIPModel(config).eval().save_pretrained(str(folder))
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    _tokenizer(folder)
    return folder


def write_quality(path: Path) -> Path:
    from tapestry.data.providers.quality_net import QualityNet, QualityNetConfig, save

    return save(QualityNet(QualityNetConfig(image_size=64, channels=(8, 16, 16, 32), hidden=16)), path)


def write_tiny_models(folder: str | Path, kinds: tuple[str, ...] = KINDS, seed: int = 0) -> dict[str, Path]:
    """The tiny checkpoints of `kinds` under `folder`: {kind: path}."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writers = {"owlv2": write_owlv2, "sam": write_sam, "dinov2": write_dinov2, "clip": write_clip}
    out: dict[str, Path] = {}
    for kind in kinds:
        torch.manual_seed(seed)
        if kind == "quality":
            out[kind] = write_quality(folder / "quality.safetensors")
        else:
            target = folder / kind
            target.mkdir(exist_ok=True)
            out[kind] = writers[kind](target)
    (folder / "README.json").write_text(json.dumps(
        {"what": "tiny random-weight checkpoints in published layouts (tapestry.data.tiny_models); "
                 "not models of anything", "kinds": list(out), "seed": seed}, indent=1) + "\n")
    return out
