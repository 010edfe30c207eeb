"""ILScore (ILLUME-X, papers/002 §5.1 and Appendix B): four dimensions, each on 0-10.

    D1 image-text accuracy   coherence, content accuracy, relevance and responsiveness,
                             logicality, creativity and originality (the whole answer; the
                             golden answer is shown when the benchmark has one: "w GT" prompt)
    D2 single image accuracy conceptual consistency, relation matching, detail faithfulness,
                             clarity and plausibility, aesthetics (per image, averaged)
    D3 image sequence        cross-image content consistency, style consistency (needs >= 2
       accuracy              images; otherwise not applicable and left out)
    D4 text accuracy         D1's five metrics on the text alone

A dimension is the mean of its sub-scores. Aggregation as in the paper's Table 2: per task
(category) the mean of each dimension over samples, the task's Overall = the mean of its D1-D4,
and AVG = the mean over tasks (macro average).
"""

from __future__ import annotations

from tapestry.eval.judge import Judge, scores_check
from tapestry.eval.protocols import EvalSample, document_parts, mean_or_none, output_images, output_text, text_around

NAME = "ilscore"
SOURCE = "ILLUME-X (papers/002), ILScore, Appendix B"
DIMENSIONS = ["D1", "D2", "D3", "D4"]
CRITERIA = DIMENSIONS
ANSWER_METRICS = ["coherence", "content_accuracy", "relevance", "logicality", "creativity"]
IMAGE_METRICS = ["conceptual_consistency", "relation_matching", "detail_faithfulness", "clarity_plausibility",
                 "aesthetics"]
SEQUENCE_METRICS = ["content_consistency", "style_consistency"]
PROMPT_VERSION = "ilscore-1"

_SCALE = "Score each from 0 (absent or wrong) to 10 (flawless)."

D1_SYSTEM = f"""You evaluate an interleaved text-image answer to a query (images tagged <IMG_k>).
{_SCALE}
- coherence: text and images connect smoothly in theme and content and convey one message.
- content_accuracy: the facts in the text and the visual elements are correct.
- relevance: the answer responds to the query and what it asks for.
- logicality: steps, content flow and the order of text and figures are rational and easy to follow.
- creativity: the content is novel, distinctive and engaging.
When a reference answer is given, use it to judge correctness, not as the only valid answer.
Answer with JSON only: {{"coherence": n, "content_accuracy": n, "relevance": n, "logicality": n, "creativity": n}}"""

D2_SYSTEM = f"""You evaluate one generated image against the text it belongs to. {_SCALE}
- conceptual_consistency: the core objects, scenes and characters in the text appear in the image.
- relation_matching: spatial relations and interactions described are reflected in the layout.
- detail_faithfulness: key attributes (colour, quantity, emotion, actions) are shown faithfully.
- clarity_plausibility: the image is clear, subjects identifiable, no physical paradoxes.
- aesthetics: composition, colour and lighting have basic aesthetic quality, no severe distortion.
Answer with JSON only: {{"conceptual_consistency": n, "relation_matching": n, "detail_faithfulness": n, "clarity_plausibility": n, "aesthetics": n}}"""

D3_SYSTEM = f"""You evaluate a sequence of generated images from one answer. {_SCALE}
- content_consistency: objects, characters and scenes keep their appearance and identity across images.
- style_consistency: the images share one artistic style.
Answer with JSON only: {{"content_consistency": n, "style_consistency": n}}"""

D4_SYSTEM = D1_SYSTEM.replace("an interleaved text-image answer", "the text of an answer (text only)").replace(
    "text and images connect smoothly in theme and content", "the text is smooth and connected in theme and content")


def _dimension(got, metrics) -> tuple[float | None, str | None]:
    if not got.ok:
        return None, got.missing
    return sum(got.value[m] for m in metrics) / len(metrics), None


def score(judge: Judge, sample: EvalSample) -> dict:
    row = {"id": sample.id, "category": sample.category, "scores": {}, "missing": {}}
    query, n_given = document_parts(sample.prompt)
    answer, _ = document_parts(sample.output, n_given)
    golden = []
    if sample.golden is not None:
        golden = ["REFERENCE ANSWER:", *document_parts(sample.golden, n_given, "REF")[0]]
    checks = {m: scores_check(ANSWER_METRICS, 0, 10) for m in ("D1", "D4")}
    got = judge.ask("ilscore-d1", D1_SYSTEM, ["QUERY:", *query, *golden, "ANSWER:", *answer], checks["D1"], PROMPT_VERSION)
    row["scores"]["D1"], why = _dimension(got, ANSWER_METRICS)
    if why:
        row["missing"]["D1"] = why
    images = output_images(sample.output)
    per_image, failures = [], []
    for k, image in enumerate(images):
        one = judge.ask("ilscore-d2", D2_SYSTEM, [image, f"Text: {text_around(sample.output, k)}"],
                        scores_check(IMAGE_METRICS, 0, 10), PROMPT_VERSION)
        value, why = _dimension(one, IMAGE_METRICS)
        per_image.append(value)
        if why:
            failures.append(f"image {k}: {why}")
    row["scores"]["D2"] = mean_or_none(per_image)
    if row["scores"]["D2"] is None:
        row["missing"]["D2"] = "; ".join(failures) or "no generated image"
    if len(images) >= 2:
        seq = judge.ask("ilscore-d3", D3_SYSTEM, [p for k, im in enumerate(images) for p in (f"<IMG_{k}>", im)],
                        scores_check(SEQUENCE_METRICS, 0, 10), PROMPT_VERSION)
        row["scores"]["D3"], why = _dimension(seq, SEQUENCE_METRICS)
        if why:
            row["missing"]["D3"] = why
    else:
        row["scores"]["D3"] = None
        row["missing"]["D3"] = f"not applicable: {len(images)} generated image(s), a sequence needs 2"
    text = output_text(sample.output)
    got = judge.ask("ilscore-d4", D4_SYSTEM, ["QUERY:", *[p for p in query if isinstance(p, str)], "ANSWER TEXT:",
                                               text or "(no text)"], checks["D4"], PROMPT_VERSION)
    row["scores"]["D4"], why = _dimension(got, ANSWER_METRICS)
    if why:
        row["missing"]["D4"] = why
    return row


def aggregate(rows: list[dict]) -> dict:
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r.get("category") or "all", []).append(r)
    tasks = {}
    for task, items in sorted(by_task.items()):
        dims = {d: mean_or_none([r["scores"].get(d) for r in items]) for d in DIMENSIONS}
        present = [v for v in dims.values() if v is not None]
        tasks[task] = {**{d: None if v is None else round(v, 4) for d, v in dims.items()},
                       "overall": round(sum(present) / len(present), 4) if present else None, "n": len(items)}
    avg = {key: mean_or_none([t[key] for t in tasks.values()]) for key in DIMENSIONS + ["overall"]}
    return {"tasks": tasks, "avg": {k: None if v is None else round(v, 4) for k, v in avg.items()},
            "missing": {d: sum(1 for r in rows if r["scores"].get(d) is None) for d in DIMENSIONS}}
