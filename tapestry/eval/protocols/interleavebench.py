"""InterleaveBench (Inset, papers/000 §3.3 "Evaluation Protocol" and §4 "Evaluation Details").

A dual-perspective LLM-as-judge:
(i)  Image consistency: identity preservation of the referenced subjects, rated 1-5 and
     normalized to [0, 1] as (s - 1) / 4. It penalizes identity drift and tolerates changes the
     instruction asks for (pose, lighting, viewpoint).
(ii) Text consistency: an LLM pre-formulates binary questions about the attributes and relations
     the instruction states; a VLM answers them on the generated image; the score is the share
     answered "yes". Questions come with the sample (`extra["questions"]`) or are formulated by
     the judge once (cached like every call) and stored in the row.

Aggregation: the mean of each over samples, overall and by number of reference images (the
paper's table is by object count). The paper used Doubao-Seed-1.6 as judge.
"""

from __future__ import annotations

from tapestry.document import ImageSegment
from tapestry.eval.judge import Judge, scores_check
from tapestry.eval.protocols import EvalSample, criterion_means, document_parts, output_images, output_text

NAME = "interleavebench"
SOURCE = "Inset: Images in Sentences (papers/000), InterleaveBench evaluation protocol"
CRITERIA = ["image_consistency", "text_consistency"]
PROMPT_VERSION = "interleavebench-1"

IMAGE_SYSTEM = """You judge identity preservation in image generation from interleaved instructions.
You see the instruction with its reference images, then the generated image.
Rate how well every referenced subject keeps its identity in the generated image, from 1 to 5:
5 every subject is clearly the same identity; 4 small identity details differ; 3 some subjects are
recognizable, others drift; 2 most identities are lost; 1 no referenced identity is preserved.
Penalize identity drift (different face, breed, object design, colours, markings). Do not penalize
changes the instruction asks for or that follow reasonably from it (pose, lighting, viewpoint,
expression, scale, placement).
Answer with JSON only: {"score": <integer 1-5>, "reason": "<one sentence>"}"""

QUESTION_SYSTEM = """You write verification questions for a text-to-image instruction.
List the binary (yes/no) questions that check every attribute and relation the instruction
states: objects present, their colours, materials, counts, actions, and spatial relations.
Each question must be answerable from the image alone and be answered "yes" by a perfect image.
Answer with JSON only: {"questions": ["...", "..."]} (at most 12 questions)."""

ANSWER_SYSTEM = """You answer yes/no questions about one image. Look only at the image.
Answer with JSON only: {"answers": ["yes" or "no", ...]} with one answer per question, in order."""


def _questions_check(answer):
    items = answer.get("questions") if isinstance(answer, dict) else None
    if not isinstance(items, list) or not items or not all(isinstance(q, str) and q.strip() for q in items):
        raise ValueError('expected {"questions": ["...", ...]} with at least one question')
    return [q.strip() for q in items[:12]]


def _answers_check(count: int):
    from tapestry.eval.judge import yes_no_check

    return yes_no_check(count)


def score(judge: Judge, sample: EvalSample) -> dict:
    row = {"id": sample.id, "category": sample.category, "scores": {}, "missing": {}}
    references = [s for s in sample.prompt.segments if isinstance(s, ImageSegment)]
    row["references"] = len(references)
    images = output_images(sample.output)
    instruction = output_text(sample.prompt)
    if not images:  # the model made no image: the worst rating, not a failed judgement
        row["scores"] = {"image_consistency": 0.0, "text_consistency": 0.0}
        row["note"] = "no generated image"
        return row
    generated = images[0]
    parts, _ = document_parts(sample.prompt, 1, "REF")
    got = judge.ask("interleavebench-image", IMAGE_SYSTEM,
                    ["Instruction with reference images:", *parts, "Generated image:", generated],
                    scores_check(["score"], 1, 5), PROMPT_VERSION)
    if got.ok:
        row["scores"]["image_consistency"] = (got.value["score"] - 1.0) / 4.0
    else:
        row["scores"]["image_consistency"] = None
        row["missing"]["image_consistency"] = got.missing
    questions = sample.extra.get("questions")
    if not questions:
        asked = judge.ask("interleavebench-questions", QUESTION_SYSTEM, [f"Instruction: {instruction}"],
                          _questions_check, PROMPT_VERSION)
        if not asked.ok:
            row["scores"]["text_consistency"] = None
            row["missing"]["text_consistency"] = f"questions: {asked.missing}"
            return row
        questions = asked.value
    row["questions"] = list(questions)
    numbered = "\n".join(f"{k + 1}. {q}" for k, q in enumerate(questions))
    answered = judge.ask("interleavebench-answers", ANSWER_SYSTEM, [generated, f"Questions:\n{numbered}"],
                         _answers_check(len(questions)), PROMPT_VERSION)
    if answered.ok:
        row["answers"] = answered.value
        row["scores"]["text_consistency"] = sum(answered.value) / len(answered.value)
    else:
        row["scores"]["text_consistency"] = None
        row["missing"]["text_consistency"] = answered.missing
    return row


def aggregate(rows: list[dict]) -> dict:
    by_refs: dict[int, list[dict]] = {}
    for r in rows:
        by_refs.setdefault(int(r.get("references", 0)), []).append(r)
    return {"criteria": criterion_means(rows, CRITERIA),
            "by_references": {str(k): criterion_means(v, CRITERIA) for k, v in sorted(by_refs.items())}}

