"""Training throughput of the default recipe (configs/toyworld-default.toml) on this machine.

Figures (DESIGN §12, one JSON line each):
    tokens_per_s        real (non-padding) tokens per second of whole training steps — packing,
                        pixels, VAE encoding, forward, backward, AdamW, EMA — for each variant:
                        plain, activation checkpointing, torch.compile, both
    peak_rss_mib        peak resident memory of the process during that variant's steps
    packing_efficiency  real tokens / budget of the real loader's rows (target 0.98)

The autoencoder is a ToyAutoencoder of the default architecture with random weights when the
config's trained one is absent: the same compute per step, which is all that is measured here.

    python benchmarks/train_throughput.py [--quick] [--config configs/toyworld-default.toml]
        [--variants plain] [--keep-freed-memory]

Without --keep-freed-memory the steps run on glibc's default allocator settings, which cost
about 11 % of a step on the default recipe (tapestry/allocator.py); `tapestry train` applies
them, so give the flag (with one variant) for the speed a training run sees.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from _common import figure, log, parse_args, reset_peak_rss, rss_kib  # noqa: E402

BENCH = "train_throughput"
VARIANTS = {
    "plain": {},
    "activation_checkpointing": {"parallel.activation_checkpointing": "true"},
    "compile": {"parallel.compile": "true"},
    "activation_checkpointing+compile": {"parallel.activation_checkpointing": "true", "parallel.compile": "true"},
}


def stand_in_vae(folder: Path, resolution: int) -> str:
    from tapestry.models.vae.toy import ToyAEConfig, ToyAutoencoder

    torch.manual_seed(0)
    ToyAutoencoder(ToyAEConfig(resolution=resolution)).save_pretrained(folder)
    return str(folder)


def build_trainer(config_path: str, overrides: dict[str, str], run_dir: Path, vae: str):
    from tapestry.train.config import load_config
    from tapestry.train.loop import Trainer, prepare_run_dir
    from tapestry.train.parallel import init_distributed

    sets = [f"{k}={v}" for k, v in overrides.items()] + [f"model.vae={vae}", "eval.every=0", "eval.judge_every=0"]
    config = load_config(config_path, sets)
    d = init_distributed(config.parallel)
    prepare_run_dir(config, run_dir, False, d)
    return Trainer(config, run_dir, d, quiet=True), config


def measure(trainer, config, warmup: int, steps: int) -> tuple[float, float, int]:
    stage = config.stages[0]
    built = trainer.build(stage)
    for s in range(warmup):  # compile and allocator warm-up are not throughput
        trainer.step(built, s, stage)
    reset_peak_rss()
    tokens, started = 0, time.perf_counter()
    for s in range(warmup, warmup + steps):
        tokens += trainer.step(built, s, stage)["tokens"]
    seconds = time.perf_counter() - started
    return tokens / seconds, rss_kib()[1] / 1024, tokens


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, extra=lambda p: (
        p.add_argument("--config", default="configs/toyworld-default.toml"),
        p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS)),
        p.add_argument("--keep-freed-memory", action="store_true",
                       help="the allocator settings `tapestry train` applies (tapestry/allocator.py): "
                            "its step speed; peak_rss then keeps earlier variants' heap, so run one variant")))
    kept = False
    if args.keep_freed_memory:
        from tapestry.allocator import keep_freed_memory

        kept = keep_freed_memory()
    warmup, steps = (2, 3) if args.quick else (3, 10)
    from tapestry.train.config import load_config

    base = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae = base.model.vae
        if not Path(vae).is_dir() and not vae.startswith("pool:"):
            vae = stand_in_vae(tmp / "vae", base.layout.target_size[0])
            log(f"{base.model.vae} not found: a random-weight ToyAutoencoder of the same shape stands in")
        stand_ins = {}
        init_vit = getattr(base.model.arch, "init_vit", "")  # a mot recipe key
        if init_vit and not Path(init_vit).is_dir():
            stand_ins["model.init_vit"] = ""  # the recipe's encoder, randomly initialized: same compute
            log(f"{init_vit} not found: the encoder starts from random weights (same compute)")
        shared_tokenizer = None
        for name in args.variants.split(","):
            overrides = {**stand_ins, **VARIANTS[name]}
            run = tmp / name
            if shared_tokenizer is not None:  # train the BPE once, not per variant
                overrides["model.tokenizer"] = shared_tokenizer
            trainer, config = build_trainer(args.config, overrides, run, vae)
            shared_tokenizer = shared_tokenizer or str(run / "tokenizer")
            log(f"{name}: {warmup} warm-up + {steps} timed steps of {config.data.rows} x {config.data.budget} tokens")
            speed, peak, tokens = measure(trainer, config, warmup, steps)
            cfg = {"variant": name, "rows": config.data.rows, "budget": config.data.budget, "steps": steps,
                   "threads": torch.get_num_threads(), "config": args.config, "keep_freed_memory": kept,
                   "parameters": sum(p.numel() for p in trainer.build(config.stages[0]).model.parameters())}
            figure(BENCH, "tokens_per_s", speed, "tokens/s", None, True, cfg)
            figure(BENCH, "peak_rss_mib", peak, "MiB", None, False, cfg)

        trainer, config = build_trainer(args.config, {**stand_ins, "model.tokenizer": shared_tokenizer}, tmp / "packing", vae)
        packer = trainer.packer
        n = 10 if args.quick else 40
        efficiency = sum(packer.next_batch({s.name: s.weight for s in config.data.sources}).efficiency
                         for _ in range(n)) / n
        figure(BENCH, "packing_efficiency", efficiency, "ratio", 0.98, True,
               {"steps": n, "rows": config.data.rows, "budget": config.data.budget,
                "lookahead": config.data.lookahead, "config": args.config})


if __name__ == "__main__":
    main()
