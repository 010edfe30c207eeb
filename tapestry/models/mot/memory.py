"""Peak memory per device of a MoT model, predicted without running it.

    estimate(config, Plan(mode="train", dtype="bf16", tokens=4096, lora_rank=16, ...))
        -> Estimate(parts={"weights": bytes, "gradients": ..., "optimizer": ..., ...}, peak=bytes)

How each part is counted:
- weights: parameter counts from the model built on the meta device; decoder Linear weights at 1
  byte (int8) or ½ byte on CUDA / 1 byte on CPU (int4, see quant.py) plus their scales; the rest
  at the model dtype. Layer offload keeps one decoder layer on the device; FSDP keeps 1/world of
  every parameter plus the layer being all-gathered (two with prefetch); FSDP CPU offload keeps
  only those gathered layers.
- gradients: one per trainable parameter, in its dtype; optimizer: AdamW's two moments in the
  parameter dtype, plus the foreach step's temporary copy (one more); EMA: a float32 copy of the
  trainable parameters.
- activations (training): the tensors autograd saves for backward, counted by running one decoder
  layer on the meta device under `saved_tensors_hooks` at the real token count and expert split
  (no memory, no compute), times the number of layers; with activation checkpointing, one layer's
  input per layer plus one layer's saved tensors during its recomputation. Plus the logits of
  supervised tokens (float32, with their gradient).
- inference: KV cache (layers × 2 × kv heads × head dim × tokens × branches) and the largest
  temporary of one layer's forward (also traced on meta), plus next-token logits.

The peak of a training step is the larger of (end of forward: weights + optimizer + EMA +
activations + logits) and (optimizer step: weights + gradients + optimizer + EMA + temporary).
benchmarks/memory.py compares this with the measured peak (MemTracker on CPU, or
torch.cuda.max_memory_allocated) on tiny configs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from tapestry.errors import TapestryError
from tapestry.models.mot.config import MoTConfig

GiB = 1024**3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class MemoryError_(TapestryError):
    pass


@dataclass
class Plan:
    mode: str = "inference"  # inference | train
    dtype: str = "bf16"  # weights (and activations) dtype
    device: str = "cuda"  # where int4 is packed (cuda) or held unpacked (cpu)
    quant: str = "none"  # inference: none | int8 | int4
    offload: bool = False  # inference: layer-wise CPU offload; training: FSDP2 CPU offload
    tokens: int = 4096  # inference: context tokens; training: tokens per packed row
    rows: int = 1  # training: rows per device and step
    image_tokens: int = 4096  # inference: latent tokens of the image being denoised
    branches: int = 1  # inference: guidance branches (each with its own KV cache)
    gen_fraction: float = 0.5  # training: share of tokens routed to the gen expert
    text_fraction: float = 0.25  # training: share of tokens with a next-token loss
    lora_rank: int = 0  # training: 0 = full fine-tune
    lora_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    lora_experts: list[str] = field(default_factory=lambda: ["und", "gen"])
    activation_checkpointing: bool = False
    world_size: int = 1  # training: FSDP2 shards over this many devices (1: no sharding)
    ema: bool = True  # training: the trainer keeps an fp32 EMA of trainable parameters
    frozen: list[str] = field(default_factory=list)  # training (full): frozen module prefixes, e.g. "vit"

    def validate(self) -> "Plan":
        if self.mode not in ("inference", "train"):
            raise MemoryError_(f"mode must be inference or train, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise MemoryError_(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.quant not in ("none", "int8", "int4"):
            raise MemoryError_(f"quant must be none, int8 or int4, got {self.quant!r}")
        if self.tokens < 1 or self.rows < 1 or self.world_size < 1 or self.branches < 1:
            raise MemoryError_("tokens, rows, branches and world_size must be >= 1")
        return self


@dataclass
class Estimate:
    parts: dict[str, int]
    peak: int
    plan: dict[str, Any]

    def gib(self) -> dict[str, float]:
        return {k: round(v / GiB, 3) for k, v in {**self.parts, "peak": self.peak}.items()}


# ---------------------------------------------------------------------------------------------


def _meta_model(config: MoTConfig):
    from tapestry.models.mot.model import MoTModel

    with torch.device("meta"):
        return MoTModel(config)


def _lora_params(model, plan: Plan) -> int:
    from tapestry.models.mot.lora import ATTENTION

    total = 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or not name.startswith("layers."):
            continue
        parts = name.split(".")  # layers.N.expert.(mlp.)proj
        if parts[2] in plan.lora_experts and parts[-1] in plan.lora_modules and \
                (parts[-1] in ATTENTION) == (len(parts) == 4):
            total += plan.lora_rank * (m.in_features + m.out_features)
    return total


def _weight_bytes(model, plan: Plan) -> tuple[int, int]:
    """(bytes of all weights, bytes of one decoder layer) at the plan's dtype / quantization."""
    size = DTYPES[plan.dtype].itemsize
    per_weight = {"none": size, "int8": 1, "int4": 0.5 if plan.device == "cuda" else 1}[plan.quant]

    def linear_bytes(m: nn.Linear) -> float:
        w = m.in_features * m.out_features
        bias = m.out_features * size if m.bias is not None else 0
        if plan.quant == "none":
            return w * size + bias
        scales = m.out_features * size if plan.quant == "int8" else 2 * size * w // 32  # scale + zero per group
        return w * per_weight + scales + bias

    total = 0.0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("layers."):
            total += linear_bytes(m)
        else:
            total += sum(p.numel() for p in m.parameters(recurse=False)) * size
    layer = sum(linear_bytes(m) if isinstance(m, nn.Linear) else
                sum(p.numel() for p in m.parameters(recurse=False)) * size for m in model.layers[0].modules())
    return int(total), int(layer)


def _trace_layer(config: MoTConfig, tokens: int, gen_fraction: float, dtype: torch.dtype,
                 train: bool, context: int = 0, on_cpu: bool = False) -> tuple[int, int]:
    """(bytes autograd saves, largest single temporary) of one decoder layer's forward over
    `tokens` new tokens (against `context` cached ones), traced on the meta device."""
    from tapestry.models.mot.model import GEN, UND, MoTLayer, Routing
    from tapestry.models.common.rope import RotaryEmbedding

    llm = config.llm
    with torch.device("meta"):
        layer = MoTLayer(llm).to(dtype)
        rope_mod = RotaryEmbedding(llm.head_dim, llm.rope_theta)
        n_gen = int(round(tokens * gen_fraction))
        experts = torch.tensor([[UND] * (tokens - n_gen) + [GEN] * n_gen], device="cpu")
        routing = Routing(und=torch.arange(tokens - n_gen), gen=torch.arange(tokens - n_gen, tokens), total=tokens)
        x = torch.empty(tokens, llm.hidden_size, dtype=dtype, requires_grad=train)
        positions = torch.arange(tokens)[None]
        rope = rope_mod(positions, dtype=dtype)
        mask = torch.ones(tokens, context + tokens, dtype=torch.bool)
        past = None
        if context:
            kv = torch.empty(1, llm.num_kv_heads, context, llm.head_dim, dtype=dtype)
            past = (kv, kv)
    del experts
    saved: dict[int, int] = {}
    keep: list[torch.Tensor] = []
    largest = 0

    def pack(t: torch.Tensor):
        if isinstance(t, nn.Parameter) or t._is_view() and isinstance(t._base, nn.Parameter):
            return t
        # one entry per storage (views share their base's), sized as the whole base: what
        # keeping it alive costs; _cdata is the tensor's C++ identity (meta tensors share no data_ptr)
        base = t._base if t._base is not None else t
        saved[base._cdata] = base.numel() * base.element_size()
        keep.append(base)  # hold it, so an identity is never reused while counting
        return t

    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal largest
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    largest = max(largest, t.numel() * t.element_size())
            return out

    params = {id(p) for p in layer.parameters()}
    import tapestry.models.mot.model as mot_model
    from unittest import mock

    class FusedAttention(torch.autograd.Function):
        """What a fused kernel (flash / memory-efficient on CUDA, flash-for-CPU) keeps for
        backward: q, k, v, the output and the row log-sum-exp; on the CPU also the boolean mask
        broadcast over heads. The meta device's math path would keep the full score matrix."""

        @staticmethod
        def forward(ctx, q, k, v):
            b, h, n, _ = q.shape
            out = q.new_empty(q.shape)
            lse = q.new_empty((b, h, n), dtype=torch.float32)
            extra = [torch.empty((b, h, n, k.shape[2]), dtype=torch.bool, device=q.device)] if on_cpu else []
            ctx.save_for_backward(q, k, v, out, lse, *extra)
            return out

    def fused(q, k, v, mask):
        return FusedAttention.apply(q, k, v)

    with mock.patch.object(mot_model, "attention", fused), torch.autograd.graph.saved_tensors_hooks(lambda t: pack(t) if id(t) not in params else t, lambda t: t), \
            Largest(), torch.set_grad_enabled(train):
        layer(x, (1, tokens), routing, rope, mask, past)
    return sum(saved.values()), largest


def estimate(config: MoTConfig, plan: Plan) -> Estimate:
    plan.validate()
    model = _meta_model(config)
    llm = config.llm
    size = DTYPES[plan.dtype].itemsize
    parts: dict[str, int] = {}
    weights, layer_weights = _weight_bytes(model, plan)
    n_layers = llm.num_layers

    if plan.mode == "inference":
        if plan.offload:
            weights = weights - n_layers * layer_weights + layer_weights
        parts["weights"] = weights
        ctx = plan.tokens + plan.image_tokens
        parts["kv_cache"] = n_layers * 2 * llm.num_kv_heads * llm.head_dim * ctx * plan.branches * size
        _, temp = _trace_layer(config, min(plan.image_tokens, 4096), 1.0, DTYPES[plan.dtype], False, context=0)
        scale = plan.image_tokens / min(plan.image_tokens, 4096)
        # a denoising step runs the image tokens of every branch at once; working set ≈ 4 temporaries
        parts["activations"] = int(4 * temp * scale * plan.branches)
        parts["logits"] = llm.vocab_size * 4 * plan.branches
        peak = sum(parts.values())
        return Estimate(parts, peak, asdict(plan))

    # training
    total_params = sum(p.numel() for p in model.parameters())
    if plan.lora_rank:
        trainable = _lora_params(model, plan)
        size = 4  # peft keeps adapters in float32 (autocast_adapter_dtype) whatever the base dtype
        parts_extra = trainable * size
    else:
        frozen = sum(p.numel() for n, p in model.named_parameters() if any(n.startswith(f) for f in plan.frozen))
        trainable = total_params - frozen
        parts_extra = 0
    w = plan.world_size
    if plan.offload:  # FSDP2 CPUOffloadPolicy: parameters, gradients and optimizer live on the CPU
        parts["weights"] = 2 * layer_weights + parts_extra
        parts["gradients"] = layer_weights if not plan.lora_rank else 0
        parts["optimizer"] = 0
        parts["ema"] = 0
    else:
        sharded = (lambda b: b) if w == 1 else (lambda b: b // w)
        gathered = 0 if w == 1 else 2 * layer_weights
        parts["weights"] = sharded(weights + parts_extra) + gathered
        parts["gradients"] = sharded(trainable * size)
        parts["optimizer"] = sharded(2 * trainable * size)
        parts["ema"] = sharded(trainable * 4) if plan.ema else 0
    tokens = plan.tokens * plan.rows
    saved, _ = _trace_layer(config, plan.tokens, plan.gen_fraction, DTYPES[plan.dtype], True,
                            on_cpu=plan.device == "cpu")
    saved *= plan.rows
    act = DTYPES[plan.dtype].itemsize
    if plan.activation_checkpointing:
        parts["activations"] = n_layers * tokens * llm.hidden_size * act + saved
    else:
        parts["activations"] = n_layers * saved
    supervised = int(tokens * plan.text_fraction)
    parts["logits"] = supervised * llm.vocab_size * 4 * 2 + tokens * llm.hidden_size * act * 2
    step_temp = 0 if plan.offload else (trainable * size) // (w if w > 1 else 1)
    forward_end = parts["weights"] + parts["optimizer"] + parts["ema"] + parts["activations"] + parts["logits"]
    optimizer_step = parts["weights"] + parts["gradients"] + parts["optimizer"] + parts["ema"] + step_temp
    parts["step_temporary"] = step_temp
    return Estimate(parts, max(forward_end, optimizer_step), asdict(plan))


def fits(config: MoTConfig, base: Plan, budgets_gib=(24, 48, 80)) -> list[dict[str, Any]]:
    """For each device size, the options (from cheapest in quality to most drastic) that fit."""
    if base.mode == "inference":
        options = [("bf16", {}), ("int8", {"quant": "int8"}), ("int4", {"quant": "int4"}),
                   ("int8 + layer offload", {"quant": "int8", "offload": True}),
                   ("bf16 + layer offload", {"offload": True})]
    else:
        options = [("full fine-tune", {"lora_rank": 0}), ("full + activation checkpointing", {"lora_rank": 0, "activation_checkpointing": True}),
                   ("LoRA r16", {"lora_rank": 16}), ("LoRA r16 + activation checkpointing", {"lora_rank": 16, "activation_checkpointing": True}),
                   ("LoRA r16 + checkpointing + FSDP2 CPU offload", {"lora_rank": 16, "activation_checkpointing": True, "offload": True}),
                   ("full + checkpointing + FSDP2 CPU offload", {"lora_rank": 0, "activation_checkpointing": True, "offload": True})]
    rows = []
    for label, change in options:
        est = estimate(config, replace(base, **change))
        rows.append({"option": label, "peak_gib": round(est.peak / GiB, 2),
                     **{f"fits_{b}": est.peak <= b * GiB * 0.95 for b in budgets_gib}, "parts_gib": est.gib()})
    return rows


def human(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


__all__ = ["Plan", "Estimate", "estimate", "fits", "human", "math"]


# ---------------------------------------------------------------------------------------------
# Measuring (for the benchmark and tests): a real step on tiny configs
# ---------------------------------------------------------------------------------------------


def _peak_of(run, device: torch.device, *tracked) -> int:
    """Peak bytes of live tensors while `run()` executes: CUDA's allocator statistics on a GPU;
    on the CPU, every storage an op creates is counted from its creation until it is freed
    (a dispatch mode with weakref finalizers, as torch's MemTracker does), on top of the
    storages alive before the run (`tracked` modules and optimizers)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    live: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key and key not in live and st.nbytes():
            live[key] = st.nbytes()
            weakref.finalize(st, live.pop, key, None)

    for item in tracked:
        tensors = list(item.parameters()) + list(item.buffers()) if isinstance(item, nn.Module) else \
            [t for state in item.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        for t in tensors:
            add(t.detach())
            if getattr(t, "grad", None) is not None:
                add(t.grad)
    peak = [sum(live.values())]

    class Live(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    add(t)
            peak[0] = max(peak[0], sum(live.values()))
            return out

    with Live():
        run()
    return peak[0]


def measure(config: MoTConfig, plan: Plan, device: str = "cpu", seed: int = 0) -> int:
    """The measured peak of one training step (the second: optimizer states exist) or of one
    prefill + denoising step, on `device`."""
    import torch.nn.functional as F

    from tapestry.models.mot.model import GEN, UND, KVCache, MoTModel

    plan.validate()
    device_ = torch.device(device)
    dtype = DTYPES[plan.dtype]
    torch.manual_seed(seed)
    with torch.device(device_):
        model = MoTModel(config).to(dtype)
    llm, lat = config.llm, config.latent
    g = torch.Generator().manual_seed(seed)
    if plan.mode == "inference":
        from tapestry.models.mot.quant import offload_layers, quantize_weights

        model.eval()
        quantize_weights(model, plan.quant)
        if plan.offload:
            offload_layers(model, device_)
        side = int(math.isqrt(plan.image_tokens))
        ids = torch.randint(0, llm.vocab_size, (1, plan.tokens), generator=g).to(device_)
        noise = torch.randn(1, lat.channels, side * lat.patch_size, side * lat.patch_size, generator=g).to(device_, dtype)

        @torch.no_grad()
        def run():
            cache = KVCache()
            c = plan.tokens
            mask = torch.ones(c, c, dtype=torch.bool, device=device_).tril()
            model(model.embed_text(ids), torch.full((1, c), UND, device=device_), torch.arange(c, device=device_)[None],
                  mask, cache=cache, update_cache=True)
            n = side * side
            tokens = model.embed_latents(noise, torch.tensor([0.5], device=device_))
            hidden = model(tokens, torch.full((1, n), GEN, device=device_), torch.full((1, n), c, device=device_),
                           torch.ones(n, c + n, dtype=torch.bool, device=device_), cache=cache)
            model.latent_out(hidden)
            model.logits(hidden[:, -1])

        return _peak_of(run, device_, model)

    if plan.lora_rank:
        from tapestry.models.mot.lora import LoraSpec, add_lora

        add_lora(model, LoraSpec(rank=plan.lora_rank, alpha=2 * plan.lora_rank, modules=list(plan.lora_modules),
                                 experts=list(plan.lora_experts)))
    model.train()
    if plan.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for layer in model.layers:
            checkpoint(layer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    ema = [p.detach().float().clone() for p in params] if plan.ema else []
    t, n_gen = plan.tokens, int(round(plan.tokens * plan.gen_fraction))
    side = max(1, int(math.isqrt(n_gen)))
    n_gen = side * side
    n_und = t - n_gen
    ids = torch.randint(0, llm.vocab_size, (plan.rows, n_und), generator=g).to(device_)
    latents = torch.randn(plan.rows, lat.channels, side * lat.patch_size, side * lat.patch_size, generator=g).to(device_)
    target = torch.randn(plan.rows, n_gen, lat.patch_dim, generator=g).to(device_)
    experts = torch.tensor([[UND] * n_und + [GEN] * n_gen] * plan.rows, device=device_)
    positions = torch.cat([torch.arange(n_und), torch.full((n_gen,), n_und)]).expand(plan.rows, -1).to(device_)
    mask = torch.ones(t, t, dtype=torch.bool, device=device_).tril()
    mask[n_und:, n_und:] = True
    supervised = max(1, int(t * plan.text_fraction))

    def step():
        optimizer.zero_grad(set_to_none=True)
        embeds = torch.cat([model.embed_text(ids), model.embed_latents(latents, torch.full((plan.rows,), 0.5, device=device_))], 1)
        hidden = model(embeds, experts, positions, mask)
        logits = model.logits(hidden[:, :supervised]).float()
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, :supervised].flatten()) + \
            (model.latent_out(hidden[:, n_und:]).float() - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.float(), 0.001)

    step()  # the first step creates the optimizer states; the second is the steady state
    return _peak_of(step, device_, model, optimizer)
