"""DuetGen's interleaved-generation criteria (papers/001 §4, Table 1; Cooking-200 / How-to-500).

Five criteria, each rated 1-5 by an MLLM judge (the paper used GPT-5):
    sequence level  text completeness (T-Com), image completeness (I-Com), image coherence (I-Co:
                    consistency of objects and style across the generated images and with the
                    user's images)
    image level     image quality (I-Q), image-text coherence (IT-Co: the image shows what the
                    text around it says); rated per generated image, averaged over the images.

Aggregation: each criterion's mean over samples (samples where it is missing are left out and
counted); overall = the mean of the five criterion means.
"""

from __future__ import annotations

from tapestry.eval.judge import Judge, scores_check
from tapestry.eval.protocols import EvalSample, criterion_means, document_parts, mean_or_none, output_images, text_around

NAME = "duetgen"
SOURCE = "DuetGen: Towards General Purpose Interleaved Multimodal Generation (papers/001), Table 1 criteria"
SEQUENCE = ["text_completeness", "image_completeness", "image_coherence"]
IMAGE = ["image_quality", "image_text_coherence"]
CRITERIA = SEQUENCE + IMAGE
PROMPT_VERSION = "duetgen-1"

SEQUENCE_SYSTEM = """You are a strict judge of interleaved image-text answers. You see the user's
request (with any images it holds), then the model's answer, text with images tagged <IMG_k>.
Rate from 1 (very poor) to 5 (excellent):
- text_completeness: the text fully answers the request, every needed step or part is there.
- image_completeness: every step or part that needs a picture has one; no image is missing.
- image_coherence: objects, people and style stay consistent across the answer's images and with
  the user's images (e.g. the same dish, the same animal, the same tools).
Look closely for fine-grained mismatches with the user's images.
Answer with JSON only: {"text_completeness": n, "image_completeness": n, "image_coherence": n}"""

IMAGE_SYSTEM = """You are a strict judge of one image inside an interleaved answer. You see the
image and the text next to it. Rate from 1 (very poor) to 5 (excellent):
- image_quality: sharp, plausible, free of artifacts and distortions, pleasing.
- image_text_coherence: the image shows exactly what the text around it describes.
Answer with JSON only: {"image_quality": n, "image_text_coherence": n}"""


def score(judge: Judge, sample: EvalSample) -> dict:
    row = {"id": sample.id, "category": sample.category, "scores": {}, "missing": {}}
    prompt_parts, n_given = document_parts(sample.prompt)
    answer_parts, _ = document_parts(sample.output, n_given)
    got = judge.ask("duetgen-sequence", SEQUENCE_SYSTEM, ["REQUEST:", *prompt_parts, "ANSWER:", *answer_parts],
                    scores_check(SEQUENCE, 1, 5), PROMPT_VERSION)
    for c in SEQUENCE:
        row["scores"][c] = got.value[c] if got.ok else None
        if not got.ok:
            row["missing"][c] = got.missing
    images = output_images(sample.output)
    per_image: dict[str, list] = {c: [] for c in IMAGE}
    failures = []
    for k, image in enumerate(images):
        one = judge.ask("duetgen-image", IMAGE_SYSTEM, [image, f"Text next to the image:\n{text_around(sample.output, k)}"],
                        scores_check(IMAGE, 1, 5), PROMPT_VERSION)
        for c in IMAGE:
            per_image[c].append(one.value[c] if one.ok else None)
        if not one.ok:
            failures.append(f"image {k}: {one.missing}")
    for c in IMAGE:
        row["scores"][c] = mean_or_none(per_image[c])
        if row["scores"][c] is None:
            row["missing"][c] = "; ".join(failures) if failures else "no generated image to rate"
    row["image_scores"] = per_image
    return row


def aggregate(rows: list[dict]) -> dict:
    means = criterion_means(rows, CRITERIA)
    present = [m["mean"] for m in means.values() if m["mean"] is not None]
    overall = round(sum(present) / len(present), 4) if len(present) == len(CRITERIA) else None
    return {"criteria": means, "overall": overall}
