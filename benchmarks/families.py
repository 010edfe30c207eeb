"""The model families side by side at equal parameter count: per-image latency and training
throughput of `duet` and `mmi` against `mot`, ratios inside one run (DESIGN §12).

    python benchmarks/families.py [--quick] [--threads N]

Each family gets a small model of about the same trainable parameter count (the autoencoder
not counted: it is frozen or outside the model), the same autoencoder (a ToyAutoencoder of the
default architecture with random weights: the same compute as a trained one), the same ToyWorld
sources (story and compose at 32 px), the same packing budget and rows, no condition dropout.

Figures:
    params_<family>                 trainable parameters (equal-size check; config has the ratio)
    image_latency_ms_<family>       one target image after a short prompt through the engine:
                                    prefill, 10 Euler steps under `cfg` (two branches), decode;
                                    median wall time
    train_tokens_per_s_<family>     real tokens per second of whole training steps (packing, pixels,
                                    encoding, forward, backward, AdamW), as train_throughput.py
    train_docs_per_s_<family>       documents per second of the same steps: the families lay the
                                    same documents out in different token counts, so this is the
                                    like-for-like one
    image_latency_ratio_<f>_mot     <f> ÷ mot (lower is faster)
    train_tokens_per_s_ratio_<f>_mot, train_docs_per_s_ratio_<f>_mot   <f> ÷ mot (higher is faster)
No figure has a target: the families differ by design (duet runs a multimodal LLM and a video
DiT; mmi a UNet with MMFS); these numbers say what that costs here.

The ToyWorld column (`--toyworld DIR`, once per checkpoint; `default` is the shipped mot model):
each checkpoint is scored by `tapestry.eval.toyworld.run_toyworld` on the first N scenes of each
task of toyworld-bench-v1 (`--toyworld-n`, 10; --quick: 2), with the checkpoint's own generation
defaults, as `tapestry eval toyworld --n N` would. Training a ToyWorld-sized model of each family
takes an hour or more here, so the benchmark scores checkpoints made by the commands in
docs/models.md rather than training them itself; `--toyworld-only` skips the speed figures.
    toyworld_graded_<family>, toyworld_exact_<family>       overall, 95 % bootstrap CI in config.ci95
    toyworld_<task>_graded_<family>                         per task
    toyworld_graded_ratio_<f>_mot                           <f> ÷ mot (when a mot checkpoint is given)
<family> is the checkpoint's own (its pipeline.json), so two checkpoints of one family (an
ablation) are told apart by a `_2`, `_3` suffix in the order given.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from _common import figure, log, parse_args  # noqa: E402

BENCH = "families"
SIDE = 32
STEPS = 10  # Euler steps per image

COMMON = {
    "seed": 0,
    "layout": {"target_size": [SIDE, SIDE]},
    "data": {"budget": 512, "rows": 2, "lookahead": 256,
             "sources": [{"name": "story", "task": "story", "side": SIDE, "weight": 0.5},
                         {"name": "compose", "task": "compose", "layout": "inline", "side": SIDE, "weight": 0.5}]},
    "dropout": {"policy": "none"},
    "optim": {"lr": 1e-3},
    "ema": {"decay": 0.0},
    "checkpoint": {"every": 100000},
    "eval": {"every": 0, "judge_every": 0},
}
TOKENIZER = {"vocab_size": 400, "tokenizer_docs": 100, "tokenizer_english_chars": 0}

# 0.77-0.80 M trainable parameters each (printed as params_<family>; within 4 % of mot)
MODELS = {
    "mot": {
        "family": "mot",
        "llm": {"hidden_size": 96, "intermediate_size": 256, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                "head_dim": 24},
        "vit": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 1, "num_heads": 2, "patch_size": 8,
                "max_patches_per_side": 4},
        "latent": {"patch_size": 2, "max_side": 4, "timestep_freq_dim": 64},
    },
    "duet": {
        "family": "duet",
        "target_size": [SIDE, SIDE],
        "mllm": {"hidden_size": 96, "intermediate_size": 256, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                 "mrope_section": [4, 4, 4], "vision_depth": 1, "vision_hidden_size": 64,
                 "vision_intermediate_size": 128, "vision_num_heads": 2, "patch_size": 8, "min_pixels": 1024},
        "connector": {"layers": "all", "hidden_size": 96},
        "dit": {"kind": "wan", "num_layers": 3, "num_heads": 2, "head_dim": 32, "in_channels": 8, "text_dim": 96,
                "ffn_dim": 192, "freq_dim": 64},
        "autoencoder": {"kind": "toy"},  # pretrained: the shared stand-in, set below
    },
    "mmi": {
        "family": "mmi",
        "vision": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 1, "num_heads": 2, "patch_size": 8,
                   "image_size": SIDE, "feature_dim": 32, "norm_groups": 4},
        "resampler": {"queries": 16, "blocks": 1, "dim": 32, "heads": 2},
        "llm": {"hidden_size": 96, "intermediate_size": 256, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2},
        "mmfs": {"every": 2, "heads": 4, "points": 4, "max_images": 8},
        "decoder": {"sample_size": SIDE // 4, "block_out_channels": [16, 32], "attention_head_dim": [2, 4],
                    "cross_attention_dim": 32, "norm_num_groups": 8, "tokens": 77, "resampler_heads": 2,
                    "mmfs_dim": 32, "mmfs_heads": 2, "mmfs_points": 2},
    },
}
FROZEN = {"duet": ("vae",)}  # groups that are not the family's trainable model


def stand_in_vae(folder: Path) -> str:
    from tapestry.models.vae.toy import ToyAEConfig, ToyAutoencoder

    torch.manual_seed(0)
    ToyAutoencoder(ToyAEConfig(resolution=SIDE)).save_pretrained(folder)
    return str(folder)


def config_for(name: str, vae: str, threads: int):
    from tapestry.train.config import config_from_data

    model = {**MODELS[name], **TOKENIZER}
    if name == "duet":
        model["autoencoder"] = {**model["autoencoder"], "pretrained": vae}
    else:
        model["vae"] = vae
    stages = [{"name": "main", "steps": 100000}]
    return config_from_data({**COMMON, "model": model, "stages": stages, "parallel": {"threads": threads}})


def trainable(family, model) -> int:
    frozen = FROZEN.get(family.name, ())
    return sum(p.numel() for n, p in model.named_parameters() if family.group_of(n) not in frozen)


def measure(name: str, vae: str, run_dir: Path, warmup: int, steps: int, repeats: int, threads: int) -> dict:
    from tapestry.document import Document, ImageSegment, TextSegment
    from tapestry.infer.engine import Engine, GenerationOptions
    from tapestry.train.loop import Trainer, prepare_run_dir
    from tapestry.train.parallel import init_distributed

    config = config_for(name, vae, threads)
    d = init_distributed(config.parallel)
    prepare_run_dir(config, run_dir, False, d)
    trainer = Trainer(config, run_dir, d, quiet=True)
    stage = config.stages[0]
    built = trainer.build(stage)
    params = trainable(trainer.family, built.model)
    for s in range(warmup):
        trainer.step(built, s, stage)
    tokens, docs_before = 0, trainer.packer.stream.drawn - len(trainer.packer.waiting)
    started = time.perf_counter()
    for s in range(warmup, warmup + steps):
        tokens += trainer.step(built, s, stage)["tokens"]
    seconds = time.perf_counter() - started
    docs = trainer.packer.stream.drawn - len(trainer.packer.waiting) - docs_before

    model = built.model.eval().requires_grad_(False)
    engine = Engine(trainer.family.runtime(model, trainer.tokenizer, trainer.codec, trainer.layout))
    prompt = Document("bench", [TextSegment("a red circle above a blue square"), ImageSegment("target")])
    options = GenerationOptions(seed=0, steps=STEPS, guidance="cfg", max_new_tokens=0)
    engine.generate(prompt, options)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate(prompt, options)
        times.append(time.perf_counter() - t0)
    assert out.segments[1].image is not None and out.segments[1].image.size == (SIDE, SIDE)
    log(f"{name}: image latencies {[round(t * 1e3) for t in times]} ms")
    return {"params": params, "latency_ms": statistics.median(times) * 1e3, "tokens_per_s": tokens / seconds,
            "docs_per_s": docs / seconds, "tokens": tokens, "docs": docs, "seconds": seconds}


def toyworld_column(checkpoints: list[str], n: int) -> None:
    """Score each checkpoint on the first n scenes per task of toyworld-bench-v1 (module docstring)."""
    from tapestry.eval.toyworld import ToyWorldEvalConfig, run_toyworld
    from tapestry.models.pipeline_folder import read_pipeline_record, resolve_checkpoint

    names: dict[str, dict] = {}
    for checkpoint in checkpoints:
        family = read_pipeline_record(resolve_checkpoint(checkpoint))[1]
        name, k = family, 1
        while name in names:
            k += 1
            name = f"{family}_{k}"
        with tempfile.TemporaryDirectory(prefix="families-toyworld-") as tmp:
            config = ToyWorldEvalConfig(checkpoint=checkpoint, split="test", n=n)
            summary = run_toyworld(config, Path(tmp) / "run", command=["benchmarks/families.py"] + sys.argv[1:])
            settings = json.loads((Path(tmp) / "run" / "run.json").read_text(encoding="utf-8"))["settings"]
        base = {"checkpoint": checkpoint, "family": family, "checkpoint_hash": settings["checkpoint_hash"],
                "generation": settings["generation"], "split": "test", "n_scenes_per_task": n}
        overall = summary["overall"]
        names[name] = overall
        log(f"{name}: toyworld graded {overall['mean']:.3f} {overall['ci95']}, exact {overall['exact']['mean']:.3f}")
        figure(BENCH, f"toyworld_graded_{name}", overall["mean"], "score", None, True,
               {**base, "n": overall["n"], "ci95": overall["ci95"]})
        figure(BENCH, f"toyworld_exact_{name}", overall["exact"]["mean"], "rate", None, True,
               {**base, "n": overall["n"], "ci95": overall["exact"]["ci95"]})
        for task, block in summary["tasks"].items():
            figure(BENCH, f"toyworld_{task}_graded_{name}", block["mean"], "score", None, True,
                   {**base, "task": task, "n": block["n"], "ci95": block["ci95"]})
    if "mot" in names:
        for name, overall in names.items():
            if name != "mot":
                figure(BENCH, f"toyworld_graded_ratio_{name}_mot", overall["mean"] / max(names["mot"]["mean"], 1e-9),
                       "x", None, True, {"n_scenes_per_task": n})


def _options(parser) -> None:
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--toyworld", action="append", default=[], metavar="DIR",
                        help="a checkpoint to score on toyworld-bench-v1 ('default' or a pipeline folder); repeat")
    parser.add_argument("--toyworld-n", type=int, default=None, help="scenes per task (10; --quick: 2)")
    parser.add_argument("--toyworld-only", action="store_true", help="skip the latency and throughput figures")


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, _options)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.toyworld:
        toyworld_column(args.toyworld, args.toyworld_n or (2 if args.quick else 10))
    else:
        log("families: no --toyworld checkpoints; the ToyWorld column is skipped (docs/models.md has the runs)")
    if args.toyworld_only:
        return
    warmup, steps, repeats = (1, 3, 3) if args.quick else (2, 8, 7)
    config = {"side": SIDE, "euler_steps": STEPS, "guidance": "cfg", "budget": COMMON["data"]["budget"],
              "rows": COMMON["data"]["rows"], "train_steps": steps, "latency_repeats": repeats,
              "threads": torch.get_num_threads(), "device": "cpu"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        vae = stand_in_vae(Path(tmp) / "vae")
        for name in ("mot", "duet", "mmi"):
            r = results[name] = measure(name, vae, Path(tmp) / name, warmup, steps, repeats, args.threads)
            log(f"{name:4s}: {r['params'] / 1e6:.3f} M params, image {r['latency_ms']:.0f} ms, "
                f"{r['tokens_per_s']:.0f} tok/s, {r['docs_per_s']:.2f} docs/s ({r['tokens']} tokens, {r['docs']} docs)")
    base = results["mot"]
    for name, r in results.items():
        cfg = {**config, "family": name, "params_ratio_to_mot": round(r["params"] / base["params"], 3),
               "train_tokens": r["tokens"], "train_docs": r["docs"], "train_seconds": round(r["seconds"], 3)}
        figure(BENCH, f"params_{name}", r["params"], "parameters", None, False, cfg)
        figure(BENCH, f"image_latency_ms_{name}", r["latency_ms"], "ms", None, False, cfg)
        figure(BENCH, f"train_tokens_per_s_{name}", r["tokens_per_s"], "tokens/s", None, True, cfg)
        figure(BENCH, f"train_docs_per_s_{name}", r["docs_per_s"], "docs/s", None, True, cfg)
    for name in ("duet", "mmi"):
        r = results[name]
        cfg = {**config, "params_ratio_to_mot": round(r["params"] / base["params"], 3)}
        figure(BENCH, f"image_latency_ratio_{name}_mot", r["latency_ms"] / base["latency_ms"], "x", None, False, cfg)
        figure(BENCH, f"train_tokens_per_s_ratio_{name}_mot", r["tokens_per_s"] / base["tokens_per_s"], "x", None,
               True, cfg)
        figure(BENCH, f"train_docs_per_s_ratio_{name}_mot", r["docs_per_s"] / base["docs_per_s"], "x", None, True,
               cfg)


if __name__ == "__main__":
    main()
