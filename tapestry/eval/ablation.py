"""The papers' ablations as runs of `tapestry eval toyworld` over the same scenes.

    placement   Inset's placement ablation, as the paper runs it: two models trained with equal
                budgets on the same scenes, one on inline documents only (images in the
                sentence), one on image-first documents only (references first, named by
                position), each evaluated in its own layout on the same compose scenes, by the
                number of references (1-4), graded and exact, paired by scene (the difference
                inline - image-first has its own bootstrap CI). With one checkpoint instead, the
                same scenes in both layouts through that one model (what the layout alone is
                worth to a model trained on both).
    references  Inset's ViT-only vs ViT+VAE references: one checkpoint of each, same scenes.
    compare     any two checkpoints that differ in one switch (MM-Interleaved's with vs without
                MMFS, DuetGen's all-layer vs last-layer connector), on the same samples: per
                task and number of reference images (1-4), graded and exact, each with its CI,
                and the difference A - B paired by sample with its own bootstrap CI.
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

from tapestry.atomic import atomic_write_text, claim_output_dir
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


def paired_difference_of(a: list[dict], b: list[dict], key: Callable[[dict], Any], field: str, n_boot: int,
                         seed: int) -> dict:
    """mean(a[field] - b[field]) over the items both scored, matched by `key`, with a bootstrap CI."""
    b_by = {key(r): r for r in b if r.get(field) is not None}
    diffs = [float(r[field]) - float(b_by[key(r)][field]) for r in a if r.get(field) is not None and key(r) in b_by]
    return mean_ci(diffs, n_boot, seed)


def _by_scene(r: dict) -> tuple:
    return (r["task"], r["index"])


def placement_table(inline: list[dict], first: list[dict], n_boot: int, seed: int) -> dict[str, dict]:
    """Per number of references ("1".."4", then "all"): each model's graded and exact
    {n, mean, ci95} and the paired inline - image-first differences."""
    def part(items: list[dict], field: str) -> dict:
        return mean_ci([float(r[field]) for r in items if r.get(field) is not None], n_boot, seed)

    groups: dict[str, tuple[list[dict], list[dict]]] = {}
    for count in sorted({r.get("references") for r in inline + first if r.get("references")}):
        groups[str(count)] = ([r for r in inline if r.get("references") == count],
                              [r for r in first if r.get("references") == count])
    groups["all"] = (inline, first)
    table = {}
    for label, (a, b) in groups.items():
        table[label] = {"inline": {"graded": part(a, "total"), "exact": part(a, "exact")},
                        "image_first": {"graded": part(b, "total"), "exact": part(b, "exact")},
                        "inline_minus_image_first": {
                            "graded": paired_difference_of(a, b, _by_scene, "total", n_boot, seed),
                            "exact": paired_difference_of(a, b, _by_scene, "exact", n_boot, seed)}}
    return table


def _cell(block: dict) -> str:
    ci = block["ci95"]
    mean = "-" if block["mean"] is None else f"{block['mean']:.3f}"
    return f"{mean} {f'[{ci[0]:.3f}, {ci[1]:.3f}]' if ci else ''}".rstrip()


ABLATION_WRITER = "tapestry eval ablation"


def placement(config: ToyWorldEvalConfig, out: Path, command: list[str], progress=None,
              inline_checkpoint: str | None = None, image_first_checkpoint: str | None = None,
              overwrite: bool = False) -> dict:
    """Two checkpoints (inline_checkpoint, image_first_checkpoint: each judged in its own layout)
    or one (config.checkpoint, judged in both layouts). See the module docstring."""
    if any(t not in ("compose", "edit", "understand") for t in config.tasks):
        raise EvalError("placement compares layouts: --tasks may hold compose, edit, understand only")
    if (inline_checkpoint is None) != (image_first_checkpoint is None):
        raise EvalError("placement: give both --inline and --image-first (two models), or neither (--checkpoint)")
    claim_output_dir(out, ABLATION_WRITER, overwrite)
    if inline_checkpoint is not None:
        runs = {}
        for label, layout, checkpoint in (("inline", "inline", inline_checkpoint),
                                          ("image_first", "image-first", image_first_checkpoint)):
            runs[label] = run_toyworld(dataclasses.replace(config, checkpoint=checkpoint, layouts=(layout,)),
                                       out / label, command, progress=progress)
        inline, first = _scores(out / "inline"), _scores(out / "image_first")
        tasks_summary = {label: summary["layouts"] for label, summary in runs.items()}
        records = {label: json.loads((out / label / "run.json").read_text()) for label in runs}
        record = {"command": command, "tapestry": records["inline"]["tapestry"],
                  "settings": {"checkpoint": f"inline={inline_checkpoint} image_first={image_first_checkpoint}",
                               "checkpoint_hash": f"inline={records['inline']['settings']['checkpoint_hash']} "
                                                  f"image_first={records['image_first']['settings']['checkpoint_hash']}",
                               "benchmark": records["inline"]["settings"]["benchmark"], "split": config.split,
                               "seed": config.seed, "side": config.side}}
        mode, models = "two checkpoints", {"inline": inline_checkpoint, "image_first": image_first_checkpoint}
        where = "Per-sample scores: `inline/scores.jsonl`, `image_first/scores.jsonl`."
    else:
        summary = run_toyworld(dataclasses.replace(config, layouts=("inline", "image-first")), out / "run", command,
                               progress=progress)
        scores = _scores(out / "run")
        inline = [r for r in scores if r["layout"] == "inline"]
        first = [r for r in scores if r["layout"] == "image-first"]
        tasks_summary = summary["layouts"]
        record = json.loads((out / "run" / "run.json").read_text())
        mode, models = "one checkpoint", {"inline": config.checkpoint, "image_first": config.checkpoint}
        where = "Per-sample scores: `run/scores.jsonl`."
    table = placement_table(inline, first, config.bootstrap, config.seed)
    every = table["all"]
    result = {"ablation": "placement", "mode": mode, "models": models,
              "inline": every["inline"]["graded"], "image_first": every["image_first"]["graded"],
              "inline_minus_image_first": every["inline_minus_image_first"]["graded"],
              "by_references": table, "tasks": tasks_summary}
    for metric in ("graded", "exact"):
        rows = [(f"{label} ref{'s' if label != '1' else ''} {name}", row[key][metric]["mean"], row[key][metric]["ci95"])
                for label, row in table.items() for key, name in (("inline", "inline"), ("image_first", "image-first"))]
        plot_bars(rows, out / ("placement.png" if metric == "graded" else "placement_exact.png"), f"Placement ({mode}): {metric}",
                  ylabel="exact rate" if metric == "exact" else "judge score")
    lines = [f"Mode: {mode} (inline: `{models['inline']}`, image-first: `{models['image_first']}`); "
             f"tasks: {', '.join(config.tasks)}; rows by the number of reference images (compose), "
             "then all samples. Cells: mean [95 % bootstrap CI]; differences are paired by scene.", "",
             "| references | n | inline graded | image-first graded | inline − image-first graded | "
             "inline exact | image-first exact | inline − image-first exact |", "|---|---|---|---|---|---|---|---|"]
    for label, row in table.items():
        n = f"{row['inline']['graded']['n']} / {row['image_first']['graded']['n']}"
        lines.append(f"| {label} | {n} | {_cell(row['inline']['graded'])} | {_cell(row['image_first']['graded'])} | "
                     f"{_cell(row['inline_minus_image_first']['graded'])} | {_cell(row['inline']['exact'])} | "
                     f"{_cell(row['image_first']['exact'])} | {_cell(row['inline_minus_image_first']['exact'])} |")
    lines += ["", "![graded](placement.png) ![exact](placement_exact.png)", "", where]
    return _write(out, "Ablation: placement (Inset)", record, lines, result)


def references(config: ToyWorldEvalConfig, vit: str, vae: str, out: Path, command: list[str], progress=None, overwrite: bool = False) -> dict:
    claim_output_dir(out, ABLATION_WRITER, overwrite)
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


def _by_sample(r: dict) -> str:
    return r["id"]


def compare_table(a: list[dict], b: list[dict], names: tuple[str, str], n_boot: int, seed: int) -> dict[str, dict]:
    """Rows "<task> <references>" (a task's samples with that many reference images; tasks with
    none get one row "<task>"), then "all": each model's graded and exact {n, mean, ci95} and
    the paired differences A - B (key "<A>_minus_<B>")."""
    def part(items: list[dict], field: str) -> dict:
        return mean_ci([float(r[field]) for r in items if r.get(field) is not None], n_boot, seed)

    groups: dict[str, tuple[list[dict], list[dict]]] = {}
    for task, count in sorted({(r["task"], r.get("references") or 0) for r in a + b}):
        def pick(items, task=task, count=count):
            return [r for r in items if r["task"] == task and (r.get("references") or 0) == count]
        groups[f"{task} {count}" if count else task] = (pick(a), pick(b))
    groups["all"] = (a, b)
    first, second = names
    table = {}
    for label, (x, y) in groups.items():
        table[label] = {first: {"graded": part(x, "total"), "exact": part(x, "exact")},
                        second: {"graded": part(y, "total"), "exact": part(y, "exact")},
                        f"{first}_minus_{second}": {
                            "graded": paired_difference_of(x, y, _by_sample, "total", n_boot, seed),
                            "exact": paired_difference_of(x, y, _by_sample, "exact", n_boot, seed)}}
    return table


def compare(config: ToyWorldEvalConfig, a: str, b: str, names: tuple[str, str], out: Path, command: list[str],
            progress=None, overwrite: bool = False) -> dict:
    """Two checkpoints on the same samples (see the module docstring); `names` label them."""
    first, second = names
    if first == second or any(not n.replace("-", "_").isidentifier() for n in names):
        raise EvalError(f"--names: two different names of letters, digits, '-' or '_', got {first!r} and {second!r}")
    claim_output_dir(out, ABLATION_WRITER, overwrite)
    runs = {label: run_toyworld(dataclasses.replace(config, checkpoint=checkpoint), out / label, command,
                                progress=progress)
            for label, checkpoint in ((first, a), (second, b))}
    table = compare_table(_scores(out / first), _scores(out / second), names, config.bootstrap, config.seed)
    diff = f"{first}_minus_{second}"
    result = {"ablation": "compare", "models": {first: a, second: b}, first: table["all"][first]["graded"],
              second: table["all"][second]["graded"], diff: table["all"][diff]["graded"], "by_references": table,
              "tasks": {label: summary["layouts"] for label, summary in runs.items()}}
    for metric in ("graded", "exact"):
        rows = [(f"{label} {name}", row[name][metric]["mean"], row[name][metric]["ci95"])
                for label, row in table.items() for name in names]
        plot_bars(rows, out / ("compare.png" if metric == "graded" else "compare_exact.png"),
                  f"{first} vs {second}: {metric}", ylabel="exact rate" if metric == "exact" else "judge score")
    records = {label: json.loads((out / label / "run.json").read_text()) for label in names}
    record = {"command": command, "tapestry": records[first]["tapestry"],
              "settings": {"checkpoint": f"{first}={a} {second}={b}",
                           "checkpoint_hash": " ".join(f"{label}={records[label]['settings']['checkpoint_hash']}"
                                                       for label in names),
                           "benchmark": records[first]["settings"]["benchmark"], "split": config.split,
                           "seed": config.seed, "side": config.side}}
    lines = [f"{first}: `{a}`; {second}: `{b}`; tasks: {', '.join(config.tasks)}. Rows: a task's samples by "
             "their number of reference images, then all samples. Cells: mean [95 % bootstrap CI]; "
             "differences are paired by sample.", "",
             f"| samples | n | {first} graded | {second} graded | {first} − {second} graded | {first} exact | "
             f"{second} exact | {first} − {second} exact |", "|---|---|---|---|---|---|---|---|"]
    for label, row in table.items():
        lines.append(f"| {label} | {row[first]['graded']['n']} | {_cell(row[first]['graded'])} | "
                     f"{_cell(row[second]['graded'])} | {_cell(row[diff]['graded'])} | {_cell(row[first]['exact'])} | "
                     f"{_cell(row[second]['exact'])} | {_cell(row[diff]['exact'])} |")
    lines += ["", "![graded](compare.png) ![exact](compare_exact.png)", "",
              f"Per-sample scores: `{first}/scores.jsonl`, `{second}/scores.jsonl`."]
    return _write(out, f"Ablation: {first} vs {second}", record, lines, result)


def guidance_grid(grid: dict[str, list[float]]) -> list[dict[str, float]]:
    names = sorted(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def guidance(config: ToyWorldEvalConfig, rule: str, grid: dict[str, list[float]], out: Path, command: list[str],
             progress=None, baseline: bool = True, overwrite: bool = False) -> dict:
    if not grid:
        raise EvalError("--grid: give at least one scale, e.g. --grid gamma_txt=1,2,4,8 --grid gamma_img=1")
    claim_output_dir(out, ABLATION_WRITER, overwrite)
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
