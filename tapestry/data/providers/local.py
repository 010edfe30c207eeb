"""Local model providers: specialist models loaded from checkpoint folders on this machine, run
batched on the CPU or a GPU. A stage picks one in the pipeline config with `local:/path/to/dir`
beside `provider` (the run's OpenAI-compatible or offline chat provider):

    --set detect.model=local:/models/owlv2-base-patch16-ensemble     open-vocabulary detection
    --set masks.source=local:/models/sam-vit-base                     masks from boxes
    --set redundancy.embedder=local:/models/dinov2-small              image embeddings
    --set validate.clip=local:/models/clip-vit-base-patch32           image-text similarity
    --set aesthetic.scorer=local:/models/quality.safetensors          a learned quality scorer

Folders are read in the layout their publishers use (`transformers`' `save_pretrained`):
`config.json` (its `model_type` says which model it is: owlv2, sam, dinov2, clip),
`model.safetensors` (or a sharded `model.safetensors.index.json`), `preprocessor_config.json`,
and for models that read text (owlv2, clip) the tokenizer files. Images are preprocessed by
transformers' PIL image processors built from `preprocessor_config.json` (the fast ones need
torchvision, which does not import beside the CPU torch build here). The quality scorer is
tapestry's own small network in one `.safetensors` file (`quality_net`).

`check_checkpoint(spec, stage, role)` validates a folder without loading its weights (the
files, `model_type`, and every tensor's name and shape in the safetensors headers against the
model the config describes), so a wrong folder is one error line naming the folder, the stage
and what is wrong, raised before any input is processed. Models are loaded once per process
(`load`) and run in batches of the caller's size; nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tapestry.errors import TapestryError

PREFIX = "local:"
ROLES = {
    "detector": ("owlv2",),
    "segmenter": ("sam",),
    "embedder": ("dinov2", "clip"),
    "image-text": ("clip",),
    "quality": ("tapestry-quality",),
}
# model_type -> (transformers model class, PIL image processor class, reads text)
_MODELS = {
    "owlv2": ("Owlv2ForObjectDetection", "transformers.models.owlv2.image_processing_pil_owlv2:Owlv2ImageProcessorPil",
              True),
    "sam": ("SamModel", "transformers.models.sam.image_processing_pil_sam:SamImageProcessorPil", False),
    "dinov2": ("Dinov2Model", "transformers.models.bit.image_processing_pil_bit:BitImageProcessorPil", False),
    "clip": ("CLIPModel", "transformers.models.clip.image_processing_pil_clip:CLIPImageProcessorPil", True),
}
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


class CheckpointError(TapestryError):
    """A checkpoint folder that cannot serve its stage: one line naming folder, stage and problem."""

    def __init__(self, folder: str | Path, stage: str, problem: str):
        super().__init__(f"{folder}: stage {stage}: {problem}")


def is_local(spec: str | None) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def spec_path(spec: str) -> Path:
    return Path(os.path.expanduser(spec[len(PREFIX):]))


def device_name(device: str = "auto") -> str:
    """`auto`: a GPU when torch sees one (TAPESTRY_DATA_DEVICE overrides), else the CPU."""
    if device == "auto":
        device = os.environ.get("TAPESTRY_DATA_DEVICE", "auto")
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ------------------------------------------------------------------- checking
def _read_json(path: Path, folder: Path, stage: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(folder, stage, f"cannot read {path.name}: {e.strerror or e}") from None
    except ValueError as e:
        raise CheckpointError(folder, stage, f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(folder, stage, f"{path.name} must hold a JSON object")
    return value


def _weight_shapes(folder: Path, stage: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        names = sorted(set(_read_json(index, folder, stage).get("weight_map", {}).values()))
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if not files or missing:
            raise CheckpointError(folder, stage, f"model.safetensors.index.json names missing shard(s): "
                                  f"{', '.join(missing) or 'none listed'}")
    else:
        extra = " (pytorch_model.bin is not read: convert it to safetensors)" if (folder / "pytorch_model.bin").is_file() else ""
        raise CheckpointError(folder, stage, f"no model.safetensors{extra}")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(folder, stage, f"{file.name} is not a readable safetensors file: {e}") from None
    return shapes


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # its load report and warnings: we report ourselves
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for a hub


def _load_model(folder: Path, model_type: str, stage: str) -> Any:
    """The model of `folder` through transformers' own loader (which maps the published tensor
    names onto its modules); every missing, unexpected or misshapen tensor is an error."""
    import torch
    import transformers

    _quiet_transformers()
    cls = getattr(transformers, _MODELS[model_type][0])
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32,
                                          output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:  # noqa: BLE001 - the edge: one line, not a traceback
        raise CheckpointError(folder, stage, f"cannot load the {model_type} model: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(folder, stage, f"{len(missing)} weight(s) missing, e.g. {', '.join(missing[:3])}{more} "
                              f"(not a {model_type} checkpoint of this config?)")
    wrong = sorted(info.get("mismatched_keys") or [], key=lambda x: x[0])
    if wrong:
        key, got, want = wrong[0]
        raise CheckpointError(folder, stage, f"{len(wrong)} weight(s) of the wrong shape, e.g. {key}: "
                              f"{list(got)} in the file, {list(want)} for config.json")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        raise CheckpointError(folder, stage, f"{len(unexpected)} weight(s) the model does not have, e.g. "
                              f"{', '.join(unexpected[:3])}")
    return model.eval()


def _check_files(spec: str, stage: str, role: str) -> tuple[Path, str]:
    path = spec_path(spec)
    allowed = ROLES[role]
    if not path.is_dir():
        raise CheckpointError(path, stage, "not a folder (expected a checkpoint folder with config.json, "
                              "model.safetensors and preprocessor_config.json)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(path, stage, "no config.json")
    config = _read_json(config_path, path, stage)
    model_type = config.get("model_type")
    if model_type not in allowed:
        raise CheckpointError(path, stage, f"config.json has model_type {model_type!r}; this stage needs "
                              f"{' or '.join(allowed)} (a {role})")
    if not (path / "preprocessor_config.json").is_file():
        raise CheckpointError(path, stage, "no preprocessor_config.json")
    _read_json(path / "preprocessor_config.json", path, stage)
    if _MODELS[model_type][2] and not any(all((path / f).is_file() for f in group) for group in TOKENIZER_FILES):
        raise CheckpointError(path, stage, "no tokenizer (tokenizer.json, or vocab.json with merges.txt)")
    _weight_shapes(path, stage)  # readable safetensors headers
    return path, model_type


def check_checkpoint(spec: str, stage: str, role: str) -> dict[str, Any]:
    """Validate the folder (or file, for the quality scorer) of `spec` for `stage` in `role`:
    files, model_type, then a load that must find every tensor with its shape. Returns a short
    description for provenance; raises `CheckpointError`."""
    if "tapestry-quality" in ROLES[role]:
        from tapestry.data.providers.quality_net import check_file

        return check_file(spec_path(spec), stage)
    path, model_type = _check_files(spec, stage, role)
    model = _load_model(path, model_type, stage)
    return {"path": str(path), "model_type": model_type,
            "parameters": int(sum(p.numel() for p in model.parameters()))}


# -------------------------------------------------------------------- loading
@dataclass
class Loaded:
    path: Path
    model_type: str
    model: Any
    processor: Any
    tokenizer: Any
    config: Any
    device: str


@functools.lru_cache(maxsize=8)
def _load(path: str, stage: str, role: str, device: str) -> Loaded:
    import importlib

    import transformers

    folder, model_type = _check_files(PREFIX + path, stage, role)
    model_name, processor_path, reads_text = _MODELS[model_type]
    model = _load_model(folder, model_type, stage)
    module, _, name = processor_path.partition(":")
    processor_cls = getattr(importlib.import_module(module), name)
    values = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
    values = {k: v for k, v in values.items() if k not in ("image_processor_type", "processor_class")}
    try:
        processor = processor_cls(**values)
        tokenizer = (transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
                     if reads_text else None)
    except Exception as e:  # noqa: BLE001 - the edge: one line, not a traceback
        raise CheckpointError(folder, stage, f"cannot load the preprocessor or tokenizer: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
    model = model.to(device)
    return Loaded(folder, model_type, model, processor, tokenizer, model.config, device)


def load(spec: str, stage: str, role: str, device: str = "auto") -> Loaded:
    return _load(str(spec_path(spec).resolve()), stage, role, device_name(device))


def _pil(images: Sequence[np.ndarray]) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(np.ascontiguousarray(image)).convert("RGB") for image in images]


def _chunks(n: int, size: int) -> list[range]:
    size = max(1, int(size))
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


# ------------------------------------------------------------------- detector
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a: [N, 4] against b: [M, 4] (x0, y0, x1, y1) -> [N, M]."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


class LocalDetector:
    """Open-vocabulary detection (OWLv2 layout): images and text queries -> labelled boxes on
    the 0-1000 grid with scores, best first, after per-label non-maximum suppression."""

    def __init__(self, spec: str, stage: str = "detect", device: str = "auto"):
        self.loaded = load(spec, stage, "detector", device)
        self.model = f"{self.loaded.model_type}:{self.loaded.path.name}"

    def detect(self, images: Sequence[np.ndarray], queries: Sequence[Sequence[str]], min_score: float = 0.1,
               max_objects: int = 8, nms_iou: float = 0.5, batch_size: int = 8,
               template: str = "a photo of a {}") -> list[list[dict[str, Any]]]:
        import torch

        m = self.loaded
        length = int(m.config.text_config.max_position_embeddings)
        out: list[list[dict[str, Any]]] = []
        for chunk in _chunks(len(images), batch_size):
            batch_images = [images[i] for i in chunk]
            batch_queries = [list(queries[i]) or ["object"] for i in chunk]
            width = max(len(q) for q in batch_queries)
            # OWLv2 takes the same number of queries per image: pad with empty ones, masked below.
            texts = [template.format(q[k]) if k < len(q) else "" for q in batch_queries for k in range(width)]
            tokens = m.tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            pixels = m.processor(images=_pil(batch_images), return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                result = m.model(input_ids=tokens["input_ids"].to(m.device),
                                 attention_mask=tokens["attention_mask"].to(m.device),
                                 pixel_values=pixels.to(m.device))
            # logits: [B, P, Q] per patch and query; pred_boxes: [B, P, 4] (cx, cy, w, h) of the padded square
            scores = torch.sigmoid(result.logits).float().cpu().numpy()
            boxes = result.pred_boxes.float().cpu().numpy()
            for b, index in enumerate(chunk):
                h, w = images[index].shape[:2]
                n_queries = len(batch_queries[b])
                per_patch = scores[b, :, :n_queries]
                best, label = per_patch.max(axis=1), per_patch.argmax(axis=1)
                cx, cy, bw, bh = boxes[b].T
                side = max(h, w)  # the processor pads to a square at the bottom and right
                xyxy = np.stack([(cx - bw / 2) * side / w, (cy - bh / 2) * side / h,
                                 (cx + bw / 2) * side / w, (cy + bh / 2) * side / h], axis=1)
                xyxy = np.clip(xyxy, 0.0, 1.0) * 1000.0
                # boxes under one grid unit a side (squeezed flat by the clipping) are no objects
                keep = np.flatnonzero((best >= min_score) & (xyxy[:, 2] - xyxy[:, 0] >= 1) & (xyxy[:, 3] - xyxy[:, 1] >= 1))
                keep = keep[np.argsort(-best[keep], kind="stable")]
                chosen: list[int] = []
                for k in keep:
                    same = [c for c in chosen if label[c] == label[k]]
                    if same and box_iou(xyxy[[k]], xyxy[same]).max() > nms_iou:
                        continue
                    chosen.append(int(k))
                    if len(chosen) >= max_objects:
                        break
                out.append([{"label": batch_queries[b][label[k]],
                             "box": [round(float(v), 1) for v in xyxy[k]], "score": round(float(best[k]), 4)}
                            for k in chosen])
        return out


# ------------------------------------------------------------------ segmenter
class LocalSegmenter:
    """Promptable segmentation (SAM layout): per image, one mask per box (0-1000 grid), with
    the model's predicted IoU. The image encoder runs once per image (batched over images), the
    mask decoder over all of an image's boxes at once (batched over boxes)."""

    def __init__(self, spec: str, stage: str = "masks", device: str = "auto"):
        self.loaded = load(spec, stage, "segmenter", device)
        self.model = f"{self.loaded.model_type}:{self.loaded.path.name}"

    def segment(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Sequence[float]]],
                batch_size: int = 8) -> list[list[tuple[np.ndarray, float]]]:
        import torch

        m = self.loaded
        out: list[list[tuple[np.ndarray, float]]] = [[] for _ in images]
        for chunk in _chunks(len(images), batch_size):
            inputs = m.processor(images=_pil([images[i] for i in chunk]), return_tensors="pt")
            with torch.inference_mode():
                # embeddings: [B, C, h, w], one pass of the (heavy) image encoder per image
                embeddings = m.model.get_image_embeddings(inputs["pixel_values"].to(m.device))
            for b, index in enumerate(chunk):
                h, w = images[index].shape[:2]
                if not boxes[index]:
                    continue
                rh, rw = (int(v) for v in inputs["reshaped_input_sizes"][b])
                grid = np.asarray(boxes[index], dtype=np.float32) / 1000.0
                # boxes in the resized image's pixels: [1, N, 4]
                prompt = torch.from_numpy(grid * np.array([rw, rh, rw, rh], np.float32))[None]
                masks, ious = [], []
                for part in _chunks(prompt.shape[1], max(1, batch_size * 4)):
                    with torch.inference_mode():
                        result = m.model(image_embeddings=embeddings[b:b + 1], input_boxes=prompt[:, part].to(m.device),
                                         multimask_output=False)
                    # pred_masks: [1, n, 1, mh, mw] logits at low resolution
                    full = m.processor.post_process_masks(result.pred_masks.float().cpu(),
                                                          inputs["original_sizes"][b:b + 1],
                                                          inputs["reshaped_input_sizes"][b:b + 1])[0]
                    masks += [full[k, 0].numpy().astype(bool) for k in range(full.shape[0])]
                    ious += result.iou_scores[0, :, 0].float().cpu().tolist()
                assert masks[0].shape == (h, w)
                out[index] = [(mask, round(float(iou), 4)) for mask, iou in zip(masks, ious)]
        return out


# ------------------------------------------------------------------- embedder
class LocalEmbedder:
    """Image embeddings (DINOv2 layout: the normalised CLS token; CLIP layout: the projected
    image features), L2-normalised, [N, D] float32; with CLIP also text embeddings and
    image-text cosine similarity."""

    def __init__(self, spec: str, stage: str = "redundancy", device: str = "auto", role: str = "embedder"):
        self.loaded = load(spec, stage, role, device)
        self.model = f"{self.loaded.model_type}:{self.loaded.path.name}"

    def embed(self, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        import torch

        m = self.loaded
        parts = []
        for chunk in _chunks(len(images), batch_size):
            pixels = m.processor(images=_pil([images[i] for i in chunk]), return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                if m.model_type == "clip":
                    features = m.model.get_image_features(pixel_values=pixels.to(m.device))
                    features = getattr(features, "pooler_output", features)
                else:
                    features = m.model(pixel_values=pixels.to(m.device)).pooler_output
            parts.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        if not parts:
            return np.zeros((0, 0), np.float32)
        return np.concatenate(parts).astype(np.float32)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        import torch

        m = self.loaded
        if m.model_type != "clip":
            raise TapestryError(f"{m.path}: a {m.model_type} checkpoint has no text encoder (image-text "
                                "similarity needs a clip checkpoint)")
        length = int(m.config.text_config.max_position_embeddings)
        parts = []
        for chunk in _chunks(len(texts), batch_size):
            tokens = m.tokenizer([texts[i] for i in chunk], padding="max_length", max_length=length,
                                 truncation=True, return_tensors="pt")
            with torch.inference_mode():
                features = m.model.get_text_features(input_ids=tokens["input_ids"].to(m.device),
                                                     attention_mask=tokens["attention_mask"].to(m.device))
                features = getattr(features, "pooler_output", features)
            parts.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(parts).astype(np.float32)

    def similarity(self, images: Sequence[np.ndarray], texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """Cosine similarity of each image with its text: [N] in [-1, 1]."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} image(s) but {len(texts)} text(s)")
        a, b = self.embed(images, batch_size), self.embed_texts(texts, batch_size)
        return (a * b).sum(axis=1)


# ------------------------------------------------------------ configs, provenance
def local_specs(config: Any) -> list[tuple[str, str, str]]:
    """(stage, spec, role) of every `local:` model a pipeline config names. Operators declare
    which of their fields may hold one in `local_fields = {field: role}`."""
    import dataclasses

    found: list[tuple[str, str, str]] = []

    def walk(node: Any) -> None:
        if not dataclasses.is_dataclass(node) or isinstance(node, type):
            return
        for name, role in (getattr(type(node), "local_fields", None) or {}).items():
            spec = getattr(node, name, None)
            if is_local(spec):
                found.append((getattr(node, "name", name), spec, role))
        for f in dataclasses.fields(node):
            walk(getattr(node, f.name))

    walk(config)
    return found


def check_config(config: Any) -> dict[str, dict[str, Any]]:
    """Every local model of `config` checked (see `check_checkpoint`): {stage: description}.
    Run before any input is processed, so a wrong folder stops the run at the edge."""
    return {stage: check_checkpoint(spec, stage, role) for stage, spec, role in local_specs(config)}


@functools.lru_cache(maxsize=16)
def checkpoint_digest(spec: str) -> str:
    """16 hex of the sha256 of a local model's config and weight files (for provenance)."""
    import hashlib

    path = spec_path(spec)
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.name == "config.json" or p.name.endswith(".safetensors"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def provenance(config: Any) -> dict[str, dict[str, str]]:
    """{stage: {"model": spec path, "sha256": digest}} of the local models a config uses."""
    return {stage: {"model": str(spec_path(spec)), "role": role, "sha256": checkpoint_digest(spec)}
            for stage, spec, role in local_specs(config)}
