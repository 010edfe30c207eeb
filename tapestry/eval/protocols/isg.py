"""ISG-Bench (Chen et al., "Interleaved Scene Graphs for Interleaved Text-and-Image Generation
Assessment", ICLR 2025): four levels, each benchmark entry carrying its own graph (`predict`).

    structural  1 when the answer's sequence of text and image blocks (consecutive texts merged)
                is the one the entry's `predict.structural.Answer` asks for, else 0 (no judge).
    block       each `block_qa` question relates two blocks (subject, relation, object, e.g. a
                text that describes an image); the judge rates 1-10 how well it holds; the mean.
    image       each `image_qa` question is asked of its generated image, yes/no; share of yes.
    holistic    the judge rates the whole answer 1-10 against the query and golden answer.

When the structure does not match, the blocks cannot be resolved: as in ISG's own scoring the
block level is then its minimum 1 and the image level 0 (the model's failure, not the judge's).
A failed judgement is left out and reported missing. Aggregation: per ISG category group (8
groups, ISG's mapping) the share of structural passes and the means of the other levels; AVG is
the mean over groups.
"""

from __future__ import annotations

import re

from tapestry.document import Document, ImageSegment, TextSegment
from tapestry.eval.judge import Judge, scores_check, yes_no_check
from tapestry.eval.protocols import EvalSample, document_parts, mean_or_none, pixels

NAME = "isg"
SOURCE = "ISG-Bench (Chen et al., ICLR 2025), four-level interleaved scene graph evaluation"
CRITERIA = ["structural", "block", "image", "holistic"]
PROMPT_VERSION = "isg-1"
GROUPS = {
    "Style Transfer": ["Art Style Transfer", "Scene Attribute Transfer", "Photo Variation", "Portrait Variation"],
    "Progressive": ["Animation Images", "Animation Text-Image", "Attribute Transfer"],
    "3D Scene": ["3D_object", "multi-Perspective Scene Generation"],
    "Image Decomposition": ["Realistic Object Detection", "Imaginary Object Detection"],
    "Image-Text Complementation": ["HowTo", "Scientific"],
    "Temporal Prediction": ["Prediction", "painting"],
    "Visual Story Telling": ["visual storytelling text-image", "visual storytelling image", "visual storytelling text"],
    "VQA": ["Object_VQA", "Historical"],
}
_TOKEN = re.compile(r"<(gen|query)_(text|img)(\d+)>")

BLOCK_SYSTEM = """You check one relation between two parts of an interleaved answer.
You see the subject, the object and the relation that should hold between them, and a question.
Rate from 1 (the relation does not hold at all) to 10 (it holds perfectly).
Answer with JSON only: {"score": <integer 1-10>, "reason": "<one sentence>"}"""

IMAGE_SYSTEM = """You answer one yes/no question about an image. Look only at the image.
Answer with JSON only: {"answers": ["yes" or "no"]}"""

HOLISTIC_SYSTEM = """You judge an interleaved text-and-image answer as a whole: does it follow the
query's instructions and structure, is it accurate, are text and images coherent and of good
quality? A golden answer is shown for reference. Rate from 1 (useless) to 10 (excellent).
Answer with JSON only: {"score": <integer 1-10>, "reason": "<one or two sentences>"}"""


def group_of(category: str | None) -> str:
    return next((g for g, members in GROUPS.items() if category in members), category or "other")


def blocks(doc: Document | None) -> list[tuple[str, object]]:
    """[("text", str) | ("image", PIL image)], consecutive texts merged."""
    out: list[tuple[str, object]] = []
    for s in (doc.segments if doc is not None else []):
        if isinstance(s, TextSegment):
            if not s.text.strip():
                continue
            if out and out[-1][0] == "text":
                out[-1] = ("text", f"{out[-1][1]}\n{s.text}")
            else:
                out.append(("text", s.text))
        elif isinstance(s, ImageSegment):
            out.append(("image", pixels(s)))
    return out


def _numbered(items: list[tuple[str, object]], side: str) -> dict[str, tuple[str, object]]:
    table, counts = {}, {"text": 0, "image": 0}
    for kind, value in items:
        counts[kind] += 1
        table[f"<{side}_{'img' if kind == 'image' else 'text'}{counts[kind]}>"] = (kind, value)
    return table


def structure_matches(expected_tokens: list[str], output: Document | None) -> bool:
    want = []
    for token in expected_tokens:
        m = _TOKEN.fullmatch(token.strip())
        kind = "image" if m and m.group(2) == "img" else "text"
        if not want or not (kind == "text" and want[-1] == "text"):
            want.append(kind)
    return [k for k, _ in blocks(output)] == want


def _content(token: str, table: dict) -> list:
    kind, value = table.get(token.strip(), ("text", f"(unresolved {token})"))
    return [value] if kind == "image" and value is not None else [str(value)]


def score(judge: Judge, sample: EvalSample) -> dict:
    row = {"id": sample.id, "category": sample.category, "group": group_of(sample.category), "scores": {}, "missing": {}}
    graph = sample.extra.get("isg") or {}
    answer_tokens = (graph.get("structural") or {}).get("Answer")
    if answer_tokens:
        ok = structure_matches(answer_tokens, sample.output)
        row["scores"]["structural"] = 1.0 if ok else 0.0
    else:
        ok = False
        row["scores"]["structural"] = None
        row["missing"]["structural"] = "the entry has no predict.structural.Answer"
    table = {**_numbered(blocks(sample.prompt), "query"), **_numbered(blocks(sample.output), "gen")}
    block_qs = (graph.get("block_qa") or {}).get("questions") or []
    image_qs = (graph.get("image_qa") or {}).get("questions") or []
    if not ok and answer_tokens:
        row["scores"]["block"], row["scores"]["image"] = 1.0, 0.0
        row["note"] = "structure does not match: block 1, image 0 (ISG's rule)"
    else:
        values, failures = [], []
        for q in block_qs:
            got = judge.ask("isg-block", BLOCK_SYSTEM, ["SUBJECT:", *_content(q["subject"], table), "OBJECT:",
                                                        *_content(q["object"], table), f"RELATION: {q.get('relation', '')}",
                                                        f"QUESTION: {q.get('Question', '')}"],
                            scores_check(["score"], 1, 10), PROMPT_VERSION)
            values.append(got.value["score"] if got.ok else None)
            if not got.ok:
                failures.append(got.missing)
        row["scores"]["block"] = mean_or_none(values)
        if row["scores"]["block"] is None:
            row["missing"]["block"] = "; ".join(failures) or "the entry has no block_qa questions"
        answers, failures = [], []
        for q in image_qs:
            got = judge.ask("isg-image", IMAGE_SYSTEM, [*_content(q["image"], table), f"QUESTION: {q.get('Question', '')}"],
                            yes_no_check(1), PROMPT_VERSION)
            answers.append((1.0 if got.value[0] else 0.0) if got.ok else None)
            if not got.ok:
                failures.append(got.missing)
        row["scores"]["image"] = mean_or_none(answers)
        if row["scores"]["image"] is None:
            row["missing"]["image"] = "; ".join(failures) or "the entry has no image_qa questions"
    query, n = document_parts(sample.prompt)
    golden = document_parts(sample.golden, n, "GOLD")[0] if sample.golden is not None else ["(none)"]
    answer, _ = document_parts(sample.output, n)
    got = judge.ask("isg-holistic", HOLISTIC_SYSTEM, ["QUERY:", *query, "GOLDEN ANSWER:", *golden, "ANSWER:", *answer],
                    scores_check(["score"], 1, 10), PROMPT_VERSION)
    row["scores"]["holistic"] = got.value["score"] if got.ok else None
    if not got.ok:
        row["missing"]["holistic"] = got.missing
    return row


def aggregate(rows: list[dict]) -> dict:
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r.get("group") or group_of(r.get("category")), []).append(r)
    groups = {g: {c: (None if (m := mean_or_none([r["scores"].get(c) for r in items])) is None else round(m, 4))
                  for c in CRITERIA} | {"n": len(items)} for g, items in sorted(by_group.items())}
    avg = {c: mean_or_none([g[c] for g in groups.values()]) for c in CRITERIA}
    return {"groups": groups, "avg": {c: None if v is None else round(v, 4) for c, v in avg.items()},
            "missing": {c: sum(1 for r in rows if r["scores"].get(c) is None) for c in CRITERIA}}
