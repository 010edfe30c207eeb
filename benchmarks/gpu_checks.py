"""Checks that need a GPU, in one script (issue 18, item 5). On a machine without CUDA it prints
one `skipped` figure and exits 0.

    python benchmarks/gpu_checks.py [--quick]

1. flex_attention with the layout's block masks, training forward + backward, equals the dense
   (SDPA + boolean mask) path: outputs and every gradient (`max_abs_diff`).
2. bf16 autocast: the training loss and velocity under autocast against float32 (`rel_error`).
3. NCCL with one process: init, all_reduce, destroy (`ok`).
4. torch.compile of the denoising step (a latent block against a KV cache) equals eager, and
   its speed-up.
5. Training throughput (tokens/s) and MFU of a mid-size MoT on bf16 (6·N·tokens + attention FLOPs
   over the device's dense bf16 peak).
6. The peak-memory estimator against torch.cuda.max_memory_allocated (training full /
   checkpointed / LoRA, inference with 3 branches) on a mid-size bf16 config.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from _common import figure, model_config, parse_args  # noqa: E402

from tapestry.layout import GEN, UND  # noqa: E402
from tapestry.models import family as families  # noqa: E402

BENCH = "gpu_checks"
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def _config(hidden=256, layers=2, heads=4, kv=2, vocab=1024):
    llm = {"hidden_size": hidden, "intermediate_size": 3 * hidden, "num_layers": layers, "num_heads": heads,
           "num_kv_heads": kv, "head_dim": hidden // heads}
    return model_config("mot", {"llm": llm, "use_vit": False, "latent": {"patch_size": 2, "max_side": 64}},
                        vocab_size=vocab, latent_channels=16)


def _model(config):
    return families.get("mot").build(config)


def _row(model, text: int, side: int, device, seed=0):
    """A packed row: text (causal), a noisy image block (noise span, gen expert), more text."""
    from tapestry.layout import Span

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.llm.vocab_size, (1, 2 * text), generator=g).to(device)
    lat = torch.randn(1, 16, 2 * side, 2 * side, generator=g).to(device)
    n = side * side
    embeds = torch.cat([model.embed_text(ids[:, :text]), model.embed_latents(lat, torch.tensor([0.5], device=device)),
                        model.embed_text(ids[:, text:])], 1)
    experts = torch.tensor([[UND] * text + [GEN] * n + [UND] * text], device=device)
    positions = torch.cat([torch.arange(text), torch.full((n,), text), torch.arange(text + 1, 2 * text + 1)])[None].to(device)
    spans = [Span(0, text, "causal"), Span(text, text + n, "noise"), Span(text + n, 2 * text + n, "causal")]
    return embeds, experts, positions, spans, ids


def check_flex(device, quick):
    from tapestry.layout import block_mask, dense_mask

    torch.manual_seed(0)
    model = _model(_config()).to(device)
    results = {}
    for name in ("dense", "flex"):
        model.zero_grad()
        embeds, experts, positions, spans, _ = _row(model, 384, 16, device)
        mask = dense_mask(spans, device=device) if name == "dense" else block_mask(spans, device=device)
        out = model(embeds, experts, positions, mask)
        out.float().pow(2).mean().backward()
        results[name] = (out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    out_diff = (results["dense"][0] - results["flex"][0]).abs().max().item()
    grad_diff = max((results["dense"][1][n] - g).abs().max().item() for n, g in results["flex"][1].items())
    figure(BENCH, "flex_vs_dense_forward_max_abs_diff", out_diff, "abs", 1e-3, False, {"tokens": 1024})
    figure(BENCH, "flex_vs_dense_grad_max_abs_diff", grad_diff, "abs", 1e-3, False, {"tokens": 1024})


def check_autocast(device, quick):
    from tapestry.layout import dense_mask

    torch.manual_seed(0)
    model = _model(_config()).to(device)
    embeds, experts, positions, spans, _ = _row(model, 256, 16, device)
    mask = dense_mask(spans, device=device)
    with torch.no_grad():
        ref = model(embeds, experts, positions, mask).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(embeds, experts, positions, mask).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    figure(BENCH, "bf16_autocast_rel_error", rel, "ratio", 0.05, False, {"tokens": 768})


def check_nccl(device, quick):
    import torch.distributed as dist

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    dist.init_process_group("nccl")
    t = torch.ones(4, device=device)
    dist.all_reduce(t)
    ok = bool(torch.equal(t, torch.ones(4, device=device)))
    dist.destroy_process_group()
    figure(BENCH, "nccl_one_process_all_reduce", float(ok), "bool", 1.0, True, {})


def check_compile(device, quick):
    torch.manual_seed(0)
    model = _model(_config(hidden=512, layers=4, heads=8)).to(device, torch.bfloat16).eval()
    c, side = 2048, 16
    n = side * side
    cache = families.get("mot").benchmark_parts().KVCache()
    with torch.no_grad():
        ids = torch.randint(0, 1024, (1, c), device=device)
        model(model.embed_text(ids), torch.full((1, c), UND, device=device), torch.arange(c, device=device)[None],
              torch.ones(c, c, dtype=torch.bool, device=device).tril(), cache=cache, update_cache=True)
    x = torch.randn(1, 16, 2 * side, 2 * side, device=device)
    experts, positions = torch.full((1, n), GEN, device=device), torch.full((1, n), c, device=device)
    mask = torch.ones(n, c + n, dtype=torch.bool, device=device)

    def step(x):
        tokens = model.embed_latents(x, torch.tensor([0.5], device=device))
        return model.latent_out(model(tokens, experts, positions, mask, cache=cache))

    compiled = torch.compile(step)
    with torch.no_grad():
        eager_out, compiled_out = step(x), compiled(x)
        diff = (eager_out.float() - compiled_out.float()).abs().max().item()

        def timed(fn, repeats):
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(repeats):
                fn(x)
            torch.cuda.synchronize()
            return (time.perf_counter() - started) / repeats

        repeats = 10 if quick else 50
        eager_s, compiled_s = timed(step, repeats), timed(compiled, repeats)
    figure(BENCH, "compiled_denoise_max_abs_diff", diff, "abs", 5e-2, False, {"context": c, "image_tokens": n})
    figure(BENCH, "compiled_denoise_speedup", eager_s / compiled_s, "x", 1.0, True,
           {"context": c, "image_tokens": n, "eager_ms": round(eager_s * 1e3, 3), "compiled_ms": round(compiled_s * 1e3, 3)})


def check_throughput(device, quick):
    from tapestry.layout import block_mask

    cfg = _config(hidden=1024, layers=8, heads=16, kv=4, vocab=32000)
    torch.manual_seed(0)
    model = _model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    text, side = 1024, 32
    embeds, experts, positions, spans, ids = _row(model, text, side, device)
    mask = block_mask(spans, device=device)
    tokens = embeds.shape[1]

    def step():
        opt.zero_grad(set_to_none=True)
        e, _, _, _, _ = _row(model, text, side, device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(e, experts, positions, mask)
            loss = model.logits(out[:, :text]).float().logsumexp(-1).mean() + model.latent_out(out[:, text:-text]).float().pow(2).mean()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    repeats = 3 if quick else 10
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / repeats
    llm = cfg.llm
    # per token each expert path costs the same: one expert's matmul parameters are active
    active = llm.num_layers * (llm.hidden_size * (llm.num_heads + 2 * llm.num_kv_heads) * llm.head_dim
                               + llm.num_heads * llm.head_dim * llm.hidden_size + 3 * llm.hidden_size * llm.intermediate_size)
    attention = 4 * llm.num_layers * tokens * tokens * llm.num_heads * llm.head_dim  # QK^T and AV, fwd+bwd ×3 below
    flops = 6 * active * tokens + 3 * attention + 6 * llm.hidden_size * llm.vocab_size * text
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    figure(BENCH, "train_tokens_per_s", tokens / seconds, "tokens/s", None, True,
           {"device": name, "tokens": tokens, "hidden": llm.hidden_size, "layers": llm.num_layers})
    if peak:
        figure(BENCH, "train_mfu", flops / seconds / (peak * 1e12), "ratio", None, True,
               {"device": name, "peak_tflops": peak, "tokens": tokens})


def check_memory_estimate(device, quick):
    """The estimator against torch.cuda.max_memory_allocated on a mid-size config (bf16), where the
    fused-attention stand-in is what the CUDA kernels really keep (`estimate_error_cuda_*`)."""
    from dataclasses import asdict

    memory = families.get("mot").benchmark_parts().memory
    Plan, estimate, measure = memory.Plan, memory.estimate, memory.measure

    config = _config(hidden=512, layers=4, heads=8, kv=2, vocab=4096)
    plans = {"train": Plan(mode="train", dtype="bf16", tokens=2048),
             "train_checkpointing": Plan(mode="train", dtype="bf16", tokens=2048, activation_checkpointing=True),
             "train_lora16": Plan(mode="train", dtype="bf16", tokens=2048, lora_rank=16, ema=False),
             "infer": Plan(mode="inference", dtype="bf16", tokens=2048, image_tokens=1024, branches=3)}
    for name, plan in plans.items():
        predicted, measured = estimate(config, plan).peak, measure(config, plan, device=str(device))
        figure(BENCH, f"estimate_error_cuda_{name}", predicted / measured - 1, "ratio", None, False,
               {"predicted_bytes": predicted, "measured_bytes": measured, **asdict(plan)})


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    if not torch.cuda.is_available():
        figure(BENCH, "skipped", 1.0, "bool", None, False, {"reason": "no CUDA device"})
        return 0
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    failed = 0
    for check in (check_flex, check_autocast, check_nccl, check_compile, check_throughput, check_memory_estimate):
        try:
            check(device, args.quick)
        except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
            failed += 1
            figure(BENCH, f"{check.__name__}_error", 1.0, "bool", 0.0, False, {"error": repr(exc)[:300]})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
