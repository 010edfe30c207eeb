"""A judge protocol over a set of samples: resumable, budgeted, reported.

    OUT/judgements/<id>.json   one sample's row (written atomically as soon as it is judged)
    OUT/scores.jsonl           every row, in sample order
    OUT/summary.json           the protocol's aggregation + usage + provenance
    OUT/report.md              the same for people

A rerun reuses stored rows (and the response cache answers repeated calls), so nothing is
judged twice; a row with a failed judgement is asked again (its successful calls come from the
cache), so a server that was down only costs a rerun. When the budget is spent the run stops cleanly: what was judged is written, the
rest is listed as not judged, and a rerun with more budget carries on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import tapestry
from tapestry.atomic import atomic_write_text
from tapestry.eval.judge import Judge, JudgeBudgetSpent
from tapestry.eval.protocols import EvalSample


# Missing for good (the sample cannot have it); any other reason is a failed call, asked again on resume.
PERMANENT = ("not applicable", "no generated image", "the entry has no")


def _settled(row: dict) -> bool:
    return all(str(why).startswith(PERMANENT) for why in (row.get("missing") or {}).values())


def _name(sample_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in sample_id)


JUDGE_WRITER = "tapestry eval judge"
# what a run folder held before output markers existed (it resumes): judgements/ first
JUDGE_LEGACY = ("judgements", "cache", "budget.json", "scores.jsonl", "summary.json", "report.md")


def run_protocol(protocol, samples: list[EvalSample], judge: Judge, out: str | Path, command: list[str],
                 progress: Callable[[int, int], None] | None = None, overwrite: bool = False) -> dict[str, Any]:
    from tapestry.atomic import claim_output_dir

    out = Path(out)
    claim_output_dir(out, JUDGE_WRITER, overwrite, legacy=JUDGE_LEGACY)
    rows, reused, stopped = [], 0, None
    for k, sample in enumerate(samples):
        path = out / "judgements" / f"{_name(sample.id)}.json"
        stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if stored is not None and _settled(stored):
            rows.append(stored)
            reused += 1
        else:
            try:
                row = protocol.score(judge, sample)
            except JudgeBudgetSpent as e:
                stopped = str(e)
                break
            atomic_write_text(path, json.dumps(row) + "\n")
            rows.append(row)
        if progress:
            progress(k + 1, len(samples))
    not_judged = [s.id for s in samples[len(rows):]]
    record = {"command": command, "tapestry": tapestry.__version__,
              "settings": {"protocol": protocol.NAME, "judge_model": judge.model}}
    summary = {"protocol": protocol.NAME, "source": protocol.SOURCE, "judge_model": judge.model,
               "samples": len(samples), "judged": len(rows), "reused": reused, "not_judged": not_judged,
               "stopped": stopped, "usage": judge.usage(), "result": protocol.aggregate(rows),
               "missing": {r["id"]: r["missing"] for r in rows if r.get("missing")}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out / "summary.json", json.dumps({**summary, "run": record}, indent=1) + "\n")
    from tapestry.eval.report import provenance_lines

    lines = [f"# {protocol.NAME} ({protocol.SOURCE})", "", *provenance_lines(record), "",
             f"Judged {len(rows)} of {len(samples)} sample(s) ({reused} reused from an earlier run).", "",
             "```json", json.dumps(summary["result"], indent=1), "```"]
    if stopped:
        lines += ["", f"**Stopped:** {stopped}. {len(not_judged)} sample(s) not judged; rerun to resume."]
    if summary["missing"]:
        lines += ["", "## Missing judgements (left out of the means, never scored 0)", ""]
        lines += [f"- `{sid}`: " + "; ".join(f"{c}: {why}" for c, why in m.items()) for sid, m in summary["missing"].items()]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return summary
