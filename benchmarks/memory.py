"""The peak-memory estimator against measured peaks on tiny configs, and its table for
BAGEL-7B-MoT (DESIGN §12: within 15 %).

    python benchmarks/memory.py [--quick] [--device cpu|cuda]

Measured: the mot family's `memory.measure` runs the step for real — the second training step
(AdamW states exist) or one image's generation step (prefill + one batched denoising step) — and
takes the peak of live storages (CPU: counted from creation to release; CUDA:
max_memory_allocated). Predicted: `estimate`, which never runs the model.

Figures: `estimate_error_<config>` = predicted ÷ measured − 1 per tiny config; `estimate_error`,
the worst |predicted ÷ measured − 1| over them (target ≤ 0.15); `bagel7b_<option>_gib`, the
predicted peak per device of BAGEL-7B-MoT for inference (bf16 / int8 / int4, 4096 context +
4096 image tokens, one branch) and training (full, LoRA r16, LoRA r16 with FSDP2 CPU offload;
8192 tokens per row, bf16, activation checkpointing). --quick is the same run (nothing repeats).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import figure, log, model_config, parse_args  # noqa: E402

from tapestry.models import family as families  # noqa: E402

BENCH = "memory"
TARGET = 0.15


def tiny_configs():
    def config(hidden: int, layers: int):
        return model_config("mot", {
            "llm": {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_layers": layers, "num_heads": 4,
                    "num_kv_heads": 2, "head_dim": hidden // 4},
            "vit": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "patch_size": 8,
                    "max_patches_per_side": 4},
            "latent": {"patch_size": 2, "max_side": 16, "timestep_freq_dim": 32}}, vocab_size=512, latent_channels=4)

    return {"h96-l2": config(96, 2), "h128-l4": config(128, 4)}


def tiny_plans(device: str):
    Plan = families.get("mot").benchmark_parts().memory.Plan
    train = Plan(mode="train", dtype="fp32", device=device, tokens=256)
    infer = Plan(mode="inference", dtype="fp32", device=device, tokens=256, image_tokens=64)
    return {
        "train": train,
        "train-checkpointing": replace(train, activation_checkpointing=True),
        "train-lora8": replace(train, lora_rank=8, ema=False),
        "infer": infer,
        "infer-3-branches": replace(infer, branches=3),
        "infer-int8": replace(infer, quant="int8"),
        "infer-int4-bf16": replace(infer, dtype="bf16", quant="int4"),
    }


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv,
                      lambda p: p.add_argument("--device", default="cpu", help="where the measured steps run"))
    parts = families.get("mot").benchmark_parts()
    BAGEL_7B, memory = parts.BAGEL_7B, parts.memory
    GiB, Plan, estimate, measure = memory.GiB, memory.Plan, memory.estimate, memory.measure

    worst, worst_at = 0.0, ""
    for cname, config in tiny_configs().items():
        for pname, plan in tiny_plans(args.device).items():
            predicted, measured = estimate(config, plan).peak, measure(config, plan, device=args.device)
            error = predicted / measured - 1
            log(f"{cname} {pname}: predicted {predicted} B, measured {measured} B ({error:+.3f})")
            figure(BENCH, f"estimate_error_{cname}_{pname}", error, "ratio", None, False,
                   {"predicted_bytes": predicted, "measured_bytes": measured, "device": args.device, **asdict(plan)})
            if abs(error) > abs(worst):
                worst, worst_at = error, f"{cname} {pname}"
    figure(BENCH, "estimate_error", abs(worst), "ratio", TARGET, False,
           {"worst": worst_at, "signed": round(worst, 4), "device": args.device, "quick": args.quick})

    infer = Plan(mode="inference", dtype="bf16", tokens=4096, image_tokens=4096)
    train = Plan(mode="train", dtype="bf16", tokens=8192, activation_checkpointing=True)
    table = {"infer_bf16": infer, "infer_int8": replace(infer, quant="int8"), "infer_int4": replace(infer, quant="int4"),
             "train_full": train, "train_lora16": replace(train, lora_rank=16),
             "train_lora16_offload": replace(train, lora_rank=16, offload=True)}
    for name, plan in table.items():
        est = estimate(BAGEL_7B, plan)
        figure(BENCH, f"bagel7b_{name}_gib", est.peak / GiB, "GiB", None, False,
               {"parts_gib": est.gib(), **asdict(plan)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
