"""Reports: summaries with 95 % bootstrap intervals, report.md, report.html (sample grid), plots.

Every report states how to get the same numbers again: the exact command, the tapestry version,
the checkpoint hash, the seeds and (for judge protocols) the judge model. Plots use matplotlib's
Agg backend (no display needed); matplotlib is the `eval` extra.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from tapestry.atomic import atomic_file, atomic_write_text
from tapestry.toyworld.evaluate import bootstrap_ci, strict_blocks


def mean_ci(values: list[float], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """{"n", "mean", "ci95"} of the values that exist (missing ones are counted apart)."""
    mean = round(float(np.mean(values)), 4) if values else None
    return {"n": len(values), "mean": mean, "ci95": bootstrap_ci(values, n=n_boot, seed=seed)}


def layout_key(layout: str | None) -> str:
    return (layout or "none").replace("-", "_")


def summarize_toyworld(results: Iterable[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Overall, per task and per task/layout; a missing sample is listed, never averaged in.
    Each block holds the graded {n, mean, ci95} and the strict figures beside it: "exact"
    ({n, mean, ci95}), and story's "persistence_exact" / how-to's "count_exact"."""
    results = list(results)
    scored = [r for r in results if "total" in r]
    missing = [{"id": r["id"], "reason": r["missing"]} for r in results if "total" not in r]
    tasks: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in scored:
        tasks.setdefault(r["task"], {}).setdefault(layout_key(r.get("layout")), []).append(r)

    def block(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {**mean_ci([float(r["total"]) for r in items], n_boot, seed), **strict_blocks(items, n_boot, seed)}

    return {
        "overall": block(scored),
        "tasks": {t: block([r for rs in by.values() for r in rs]) for t, by in tasks.items()},
        "layouts": {t: {lay: block(rs) for lay, rs in by.items()} for t, by in tasks.items()},
        "samples": len(results),
        "missing": missing,
    }


def json_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The `--json` shape of issue 8: {"overall", "tasks": {task: {layout: mean}}, "ci95": {...}}
    (graded), plus "exact" in the same shape (strict, issue 20) with story's persistence_exact and
    how-to's count_exact as {task: {layout: rate}}."""
    layouts = summary["layouts"]

    def strict(key: str) -> dict[str, Any]:
        return {t: {lay: b[key]["mean"] for lay, b in by.items() if key in b} for t, by in layouts.items()
                if any(key in b for b in by.values())}

    exact = summary["overall"].get("exact", {})
    return {
        "overall": summary["overall"]["mean"],
        "tasks": {t: {lay: b["mean"] for lay, b in by.items()} for t, by in layouts.items()},
        "ci95": {"overall": summary["overall"]["ci95"],
                 **{t: {lay: b["ci95"] for lay, b in by.items()} for t, by in layouts.items()}},
        "exact": {"overall": exact.get("mean"), "tasks": strict("exact"),
                  "ci95": {"overall": exact.get("ci95"),
                           **{t: {lay: b["exact"]["ci95"] for lay, b in by.items() if "exact" in b}
                              for t, by in layouts.items()}},
                  "persistence_exact": strict("persistence_exact"), "count_exact": strict("count_exact")},
    }


# ------------------------------------------------------------------ plots
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - the eval extra is missing
        return None
    return plt


def _save(fig, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_bars(rows: list[tuple[str, float | None, list[float] | None]], path: Path, title: str,
              ylabel: str = "judge score", ylim: tuple[float, float] | None = (0.0, 1.0)) -> Path | None:
    """One bar per (label, mean, ci95) with its interval as an error bar."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    labels = [r[0] for r in rows]
    means = [r[1] if r[1] is not None else math.nan for r in rows]
    lo = [m - r[2][0] if r[2] else 0.0 for m, r in zip(means, rows)]
    hi = [r[2][1] - m if r[2] else 0.0 for m, r in zip(means, rows)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 3.4))
    ax.bar(range(len(rows)), means, yerr=[lo, hi], capsize=4, color="#4c78a8")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title + " (bars: 95 % bootstrap CI)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


def plot_lines(series: dict[str, list[tuple[float, float | None, list[float] | None]]], path: Path, title: str,
               xlabel: str, ylabel: str = "judge score") -> Path | None:
    """Lines of (x, mean, ci95) per series, the interval shaded."""
    plt = _pyplot()
    if plt is None or not series:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for name, points in series.items():
        points = sorted(points)
        xs = [p[0] for p in points]
        ys = [p[1] if p[1] is not None else math.nan for p in points]
        ax.plot(xs, ys, marker="o", label=name)
        if all(p[2] for p in points):
            ax.fill_between(xs, [p[2][0] for p in points], [p[2][1] for p in points], alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + " (shaded: 95 % bootstrap CI)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return path


# ------------------------------------------------------------- reports
def provenance_lines(record: dict[str, Any]) -> list[str]:
    settings = record.get("settings", {})
    lines = [f"- command: `{' '.join(record.get('command', []))}`",
             f"- tapestry {record.get('tapestry')}"]
    for key in ("checkpoint", "checkpoint_hash", "benchmark", "split", "seed", "side", "judge_model", "protocol"):
        if key in settings:
            lines.append(f"- {key}: `{settings[key]}`")
    if settings.get("generation"):
        lines.append(f"- generation: `{json.dumps(settings['generation'], sort_keys=True)}`")
    return lines


def _fmt(block: dict[str, Any]) -> str:
    ci = block.get("ci95")
    ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
    mean = "-" if block.get("mean") is None else f"{block['mean']:.3f}"
    return f"| {block['n']} | {mean} | {ci_text} |"


def _fmt_strict(block: dict[str, Any]) -> str:
    """The exact rate and its CI, then story's persistence / how-to's image count rate, as the
    cells that follow `_fmt`'s."""
    exact = block.get("exact") or {}
    ci = exact.get("ci95")
    mean = "-" if exact.get("mean") is None else f"{exact['mean']:.3f}"
    extra = [f"{name} {block[key]['mean']:.3f}" for key, name in (("persistence_exact", "persistence exact"),
                                                                    ("count_exact", "image count exact"))
             if (block.get(key) or {}).get("mean") is not None]
    return f" {mean} | {f'[{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '-'} | {', '.join(extra) or '-'} |"


def _png_data_url(image, side: int = 96) -> str:
    from PIL import Image

    if image is None:
        return ""
    image = image.convert("RGB")
    if max(image.size) > side:
        image.thumbnail((side, side), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _doc_cell(doc, roles: tuple[str, ...]) -> str:
    from tapestry.document import ImageSegment, TextSegment
    from tapestry.toyworld.evaluate import _pixels

    parts = []
    for segment in doc.segments:
        if isinstance(segment, TextSegment) and segment.role in roles:
            parts.append(f"<span>{html.escape(segment.text)}</span>")
        elif isinstance(segment, ImageSegment) and segment.role in roles:
            url = _png_data_url(_pixels(segment))
            parts.append(f'<img src="{url}" alt="{segment.role}">' if url else "<em>(no image)</em>")
    return " ".join(parts) or "<em>(nothing)</em>"


def write_toyworld_report(out: Path, results: list[dict[str, Any]], summary: dict[str, Any],
                          record: dict[str, Any], expected_docs, grid: int = 40) -> None:
    """scores.jsonl, summary.json, plots, report.md and report.html under `out`."""
    from tapestry.storage import load_folder

    atomic_write_text(out / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    atomic_write_text(out / "summary.json", json.dumps({**summary, "run": record}, indent=1) + "\n")
    rows = [(f"{t}/{lay}", b["mean"], b["ci95"]) for t, by in summary["layouts"].items() for lay, b in by.items()]
    plot = plot_bars(rows, out / "scores_by_task.png", "ToyWorld judge score per task/layout")
    exact = summary["overall"].get("exact") or {}
    lines = ["# ToyWorld evaluation", "", *provenance_lines(record), "",
             f"Overall: graded **{summary['overall']['mean']}** (95 % CI {summary['overall']['ci95']}), "
             f"exact **{exact.get('mean')}** (95 % CI {exact.get('ci95')}); "
             f"n = {summary['overall']['n']}, missing {len(summary['missing'])}", "",
             "Graded: the judge's weighted attribute average. Exact: the share of images with every entity right "
             "in every attribute, the right background and nothing extra (docs/toyworld.md).", "",
             "| task | layout | n | graded | 95 % CI | exact | 95 % CI | strict, also |", "|---|---|---|---|---|---|---|---|"]
    for task, by in summary["layouts"].items():
        for lay, block in by.items():
            lines.append(f"| {task} | {lay} " + _fmt(block) + _fmt_strict(block))
    if plot is not None:
        lines += ["", f"![scores per task]({plot.name})"]
    if summary["missing"]:
        lines += ["", "## Missing (not scored, not counted as 0)", ""]
        lines += [f"- `{m['id']}`: {m['reason']}" for m in summary["missing"]]
    lines += ["", "Per-sample scores: `scores.jsonl`; predictions: `predictions/<id>/`; sample grid: `report.html`."]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    # The grid: the first `grid` samples, picked round-robin over tasks so each task shows.
    by_task: dict[str, list] = {}
    for doc, result in zip(expected_docs, results):
        by_task.setdefault(result["task"], []).append((doc, result))
    picked = []
    while len(picked) < grid and any(by_task.values()):
        for task in list(by_task):
            if by_task[task] and len(picked) < grid:
                picked.append(by_task[task].pop(0))
    rows_html = []
    for doc, result in picked:
        pred_dir = out / "predictions" / "".join(c if c.isalnum() or c in "-_." else "_" for c in doc.id)
        try:
            predicted_cell = _doc_cell(load_folder(pred_dir), ("target",)) if (pred_dir / "doc.json").is_file() \
                else "<em>(none)</em>"
        except Exception as e:  # noqa: BLE001 - a damaged prediction is shown, not fatal to the report
            predicted_cell = f"<em>{html.escape(str(e))}</em>"
        score = result.get("total")
        score_cell = f"{score:.3f}" if score is not None else f"missing: {html.escape(str(result.get('missing')))}"
        if score is not None and result.get("exact") is not None:
            score_cell += f"<br>exact {float(result['exact']):.2f}"
        rows_html.append(f"<tr><td>{html.escape(doc.id)}</td><td>{_doc_cell(doc, ('reference', 'context'))}</td>"
                         f"<td>{predicted_cell}</td><td>{_doc_cell(doc, ('target',))}</td><td>{score_cell}</td></tr>")
    table = "\n".join(f"<li>{html.escape(line[2:])}</li>" for line in provenance_lines(record))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>ToyWorld evaluation</title>
<style>body{{font-family:sans-serif;margin:1.5em}}td{{border-top:1px solid #ddd;padding:4px;vertical-align:top;max-width:28em}}
img{{image-rendering:pixelated;margin:2px;border:1px solid #ccc}}</style></head><body>
<h1>ToyWorld evaluation</h1><ul>{table}</ul>
<p>Overall graded {summary['overall']['mean']} (95 % CI {summary['overall']['ci95']}), exact {exact.get('mean')} (95 % CI {exact.get('ci95')}), n = {summary['overall']['n']}.</p>
{f'<img src="{plot.name}" alt="scores per task">' if plot is not None else ''}
<table><tr><th>sample</th><th>input</th><th>output</th><th>expected</th><th>score</th></tr>
{chr(10).join(rows_html)}</table></body></html>
"""
    atomic_write_text(out / "report.html", page)
