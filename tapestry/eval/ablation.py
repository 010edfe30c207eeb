"""The papers' ablations as runs of `tapestry eval toyworld` over the same scenes.

    placement   Inset's placement ablation: the same compose scenes written inline (images in the
                sentence) and image-first (references first, named by position), one checkpoint.
                Paired by scene: the difference inline - image-first has its own bootstrap CI.
    references  Inset's ViT-only vs ViT+VAE references: one checkpoint of each, same scenes.
    guidance    ILLUME-X's γ_txt/γ_img table (or any rule's scales): one run per grid point, plus
                the unguided run as the reference row; score vs scale plotted per task.

Each variant is an ordinary, resumable toyworld run in its own sub-folder of OUT, so a killed
ablation resumes variant by variant, sample by sample.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any, Callable

from tapestry.atomic import atomic_write_text
from tapestry.eval.report import mean_ci, plot_bars, plot_lines, provenance_lines
from tapestry.eval.toyworld import EvalError, ToyWorldEvalConfig, run_toyworld


def _scores(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "scores.jsonl").read_text(encoding="utf-8").splitlines() if line]


def paired_difference(a: list[dict], b: list[dict], key: Callable[[dict], Any], n_boot: int, seed: int) -> dict:
    """mean(a - b) over the items both scored, matched by `key`, with a bootstrap CI."""
    b_by = {key(r): r for r in b if "total" in r}
    diffs = [float(r["total"]) - float(b_by[key(r)]["total"]) for r in a if "total" in r and key(r) in b_by]
    return mean_ci(diffs, n_boot, seed)


def _write(out: Path, title: str, record: dict, lines: list[str], result: dict) -> dict:
    atomic_write_text(out / "ablation.json", json.dumps({**result, "run": record}, indent=1) + "\n")
    atomic_write_text(out / "report.md", "\n".join([f"# {title}", "", *provenance_lines(record), "", *lines]) + "\n")
    return result


def _row(label: str, block: dict) -> str:
    ci = block["ci95"]
    mean = "-" if block["mean"] is None else f"{block['mean']:.3f}"
    return f"| {label} | {block['n']} | {mean} | {f'[{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '-'} |"


def placement(config: ToyWorldEvalConfig, out: Path, command: list[str], progress=None) -> dict:
    config = dataclasses.replace(config, layouts=("inline", "image-first"))
    if any(t not in ("compose", "edit", "understand") for t in config.tasks):
        raise EvalError("placement compares layouts: --tasks may hold compose, edit, understand only")
    summary = run_toyworld(config, out / "run", command, progress=progress)
    scores = _scores(out / "run")
    inline = [r for r in scores if r["layout"] == "inline"]
    first = [r for r in scores if r["layout"] == "image-first"]
    by_scene = lambda r: (r["task"], r["index"])  # noqa: E731 - the pairing rule, named where used
    result = {"ablation": "placement", "inline": mean_ci([r["total"] for r in inline if "total" in r], config.bootstrap, config.seed),
              "image_first": mean_ci([r["total"] for r in first if "total" in r], config.bootstrap, config.seed),
              "inline_minus_image_first": paired_difference(inline, first, by_scene, config.bootstrap, config.seed),
              "tasks": summary["layouts"]}
    plot_bars([("inline", result["inline"]["mean"], result["inline"]["ci95"]),
               ("image-first", result["image_first"]["mean"], result["image_first"]["ci95"])],
              out / "placement.png", "Placement: inline vs image-first")
    lines = ["| layout | n | mean | 95 % CI |", "|---|---|---|---|", _row("inline", result["inline"]),
             _row("image-first", result["image_first"]), _row("inline − image-first (paired)", result["inline_minus_image_first"]),
             "", "![placement](placement.png)", "", "Per-sample scores: `run/scores.jsonl`."]
    record = json.loads((out / "run" / "run.json").read_text())
    return _write(out, "Ablation: placement (Inset)", record, lines, result)


def references(config: ToyWorldEvalConfig, vit: str, vae: str, out: Path, command: list[str], progress=None) -> dict:
    runs = {}
    for label, checkpoint in (("vit", vit), ("vit_vae", vae)):
        runs[label] = run_toyworld(dataclasses.replace(config, checkpoint=checkpoint), out / label, command, progress=progress)
    by_sample = lambda r: r["id"]  # noqa: E731
    diff = paired_difference(_scores(out / "vit"), _scores(out / "vit_vae"), by_sample, config.bootstrap, config.seed)
    result = {"ablation": "references", "vit": runs["vit"]["overall"], "vit_vae": runs["vit_vae"]["overall"],
              "vit_minus_vit_vae": diff, "tasks": {k: v["tasks"] for k, v in runs.items()}}
    rows = [(f"{task} {label}", b["mean"], b["ci95"]) for label, s in runs.items() for task, b in s["tasks"].items()]
    plot_bars(rows, out / "references.png", "References: ViT only vs ViT+VAE")
    lines = ["| references | n | mean | 95 % CI |", "|---|---|---|---|", _row(f"ViT only (`{vit}`)", result["vit"]),
             _row(f"ViT + VAE (`{vae}`)", result["vit_vae"]), _row("ViT − ViT+VAE (paired)", diff), "",
             "![references](references.png)"]
    record = {"command": command, "tapestry": json.loads((out / "vit" / "run.json").read_text())["tapestry"],
              "settings": {"checkpoint": f"vit={vit} vit_vae={vae}", "seed": config.seed, "split": config.split}}
    return _write(out, "Ablation: references (Inset ViT-only vs ViT+VAE)", record, lines, result)


def guidance_grid(grid: dict[str, list[float]]) -> list[dict[str, float]]:
    names = sorted(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def guidance(config: ToyWorldEvalConfig, rule: str, grid: dict[str, list[float]], out: Path, command: list[str],
             progress=None, baseline: bool = True) -> dict:
    if not grid:
        raise EvalError("--grid: give at least one scale, e.g. --grid gamma_txt=1,2,4,8 --grid gamma_img=1")
    points = guidance_grid(grid)
    variants: list[tuple[str, str, dict]] = [("none", "none", {})] if baseline else []
    variants += [(f"{rule}-" + ",".join(f"{k}={v:g}" for k, v in p.items()), rule, p) for p in points]
    table = []
    for label, rule_name, scales in variants:
        summary = run_toyworld(dataclasses.replace(config, guidance=rule_name, guidance_scales=dict(scales)),
                               out / label, command, progress=progress)
        table.append({"variant": label, "rule": rule_name, "scales": scales, "overall": summary["overall"],
                      "tasks": summary["tasks"]})
    # Score vs the first swept scale, one line per value of the others (and per task).
    swept = sorted(grid)[0]
    series: dict[str, list] = {}
    for row in table:
        if row["rule"] == "none":
            continue
        rest = ",".join(f"{k}={v:g}" for k, v in row["scales"].items() if k != swept)
        series.setdefault(f"overall {rest}".strip(), []).append(
            (row["scales"][swept], row["overall"]["mean"], row["overall"]["ci95"]))
        for task, block in row["tasks"].items():
            series.setdefault(f"{task} {rest}".strip(), []).append((row["scales"][swept], block["mean"], block["ci95"]))
    plot_lines(series, out / "guidance.png", f"{rule} guidance sweep", xlabel=swept)
    tasks = sorted({t for row in table for t in row["tasks"]})
    lines = ["| variant | n | overall | 95 % CI | " + " | ".join(tasks) + " |",
             "|---|---|---|---|" + "---|" * len(tasks)]
    for row in table:
        cells = " | ".join("-" if row["tasks"].get(t, {}).get("mean") is None else f"{row['tasks'][t]['mean']:.3f}"
                           for t in tasks)
        lines.append(_row(row["variant"], row["overall"]) + f" {cells} |")
    lines += ["", "![guidance](guidance.png)"]
    first = out / variants[0][0] / "run.json"
    record = {"command": command, "tapestry": json.loads(first.read_text())["tapestry"],
              "settings": {**json.loads(first.read_text())["settings"], "generation": {"rule": rule, "grid": grid}}}
    return _write(out, f"Ablation: guidance ({rule})", record, lines, {"ablation": "guidance", "rule": rule, "rows": table})
