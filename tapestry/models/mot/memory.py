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
  supervised tokens (float32, with their gradient). Attention is a stand-in with what fused
  kernels keep (`_stand_in_attention`), not the meta device's math path.
- inference: the generation of one image (`_generation_step`: each branch's prefill into its KV
  cache, then one batched denoising step) run whole on the meta device, counting every storage
  from its creation to its release (`_live_peak`); reported as KV cache (layers × 2 × kv heads ×
  head dim × tokens × branches), next-token logits, and the rest as activations.

The peak of a training step is the larger of (end of forward: weights + optimizer + EMA +
activations + logits) and (optimizer step: weights + gradients + optimizer + EMA + temporary).
`measure` runs the same step for real — `_live_peak` on the CPU (storages alive, as torch's
MemTracker counts them; tracemalloc does not see torch's allocator and RSS counts the
allocator's cache and the interpreter), torch.cuda.max_memory_allocated on a GPU — and
tests/test_mot_memory.py and benchmarks/memory.py compare the two on tiny configs.
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


def _stand_in_attention(on_cpu: bool):
    """What a fused attention kernel (flash / memory-efficient on CUDA, flash-for-CPU) allocates
    and keeps for backward: the output and the row log-sum-exp, with q, k, v saved; on the CPU
    also the boolean mask turned into an additive mask [B, 1, N, K] of q's dtype (what
    torch's CPU flash kernel does). Without it the meta device would take SDPA's math path and
    count the full score matrix, which no fused kernel materializes."""

    class FusedAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            b, h, n, _ = q.shape
            extra = [q.new_empty((b, 1, n, k.shape[2]))] if on_cpu else []
            out = q.new_empty(q.shape)
            lse = q.new_empty((b, h, n), dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse, *extra)
            return out

        @staticmethod
        def backward(ctx, grad):  # never run: meta tracing stops at the forward
            raise NotImplementedError

    def fused(q, k, v, mask):
        return FusedAttention.apply(q, k, v)

    return fused


def _trace_layer(config: MoTConfig, tokens: int, gen_fraction: float, dtype: torch.dtype,
                 on_cpu: bool = False) -> int:
    """Bytes autograd saves for backward in one decoder layer's forward over `tokens` tokens
    (a share `gen_fraction` of them routed to the gen expert), traced on the meta device."""
    from unittest import mock

    import tapestry.models.mot.model as mot_model
    from tapestry.models.common.rope import RotaryEmbedding
    from tapestry.models.mot.model import MoTLayer, Routing

    llm = config.llm
    with torch.device("meta"):
        layer = MoTLayer(llm).to(dtype)
        rope = RotaryEmbedding(llm.head_dim, llm.rope_theta)(torch.arange(tokens)[None], dtype=dtype)
        n_gen = int(round(tokens * gen_fraction))
        routing = Routing(und=torch.arange(tokens - n_gen), gen=torch.arange(tokens - n_gen, tokens), total=tokens)
        x = torch.empty(tokens, llm.hidden_size, dtype=dtype, requires_grad=True)
        mask = torch.ones(tokens, tokens, dtype=torch.bool)
    params = {id(p) for p in layer.parameters()}
    saved: dict[int, int] = {}
    keep: list[torch.Tensor] = []

    def pack(t: torch.Tensor):
        if id(t) in params or isinstance(t, nn.Parameter) or t._is_view() and isinstance(t._base, nn.Parameter):
            return t
        # one entry per storage (views share their base's), sized as the whole base: what
        # keeping it alive costs; _cdata is the tensor's C++ identity (meta tensors share no data_ptr)
        base = t._base if t._base is not None else t
        saved[base._cdata] = base.numel() * base.element_size()
        keep.append(base)  # hold it, so an identity is never reused while counting
        return t

    with mock.patch.object(mot_model, "attention", _stand_in_attention(on_cpu)), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, (1, tokens), routing, rope, mask, None)
    return sum(saved.values())


def _storages(t: torch.Tensor):
    """The plain tensors holding `t`'s bytes (a torchao quantized weight is a wrapper of several)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        for name in t.__tensor_flatten__()[0]:
            yield from _storages(getattr(t, name))
    else:
        yield t


def _live_peak(run, *tracked) -> tuple[int, int]:
    """(bytes alive before, peak bytes alive while `run()` executes) on the CPU or the meta device.

    Every storage an op creates is counted from its creation until it is freed (a dispatch mode
    with weakref finalizers, as torch's MemTracker does), on top of the storages of `tracked`
    (modules, optimizers, lists of tensors) alive before the run."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    live: dict[int, int] = {}
    total = [0]

    def drop(key: int) -> None:
        total[0] -= live.pop(key, 0)

    def add(t: torch.Tensor) -> None:
        for plain in _storages(t):
            st = plain.untyped_storage()
            key = st._cdata  # the C++ storage: unique while alive, on any device (meta has no data_ptr)
            if key not in live and st.nbytes():
                live[key] = st.nbytes()
                total[0] += live[key]
                weakref.finalize(st, drop, key)

    for item in tracked:
        if isinstance(item, nn.Module):
            tensors = list(item.parameters()) + list(item.buffers())
        elif isinstance(item, torch.optim.Optimizer):
            tensors = [t for state in item.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        else:
            tensors = list(item)
        for t in tensors:
            add(t.detach())
            if getattr(t, "grad", None) is not None:
                add(t.grad)
    before = total[0]
    peak = [before]

    class Live(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type in ("cpu", "meta"):
                    add(t)
            peak[0] = max(peak[0], total[0])
            return out

    with Live():
        run()
    return before, peak[0]


def _generation_step(model, plan: "Plan", device: torch.device):
    """What generating one image holds at its peak, as a function to run: every guidance branch
    prefills `tokens` context tokens into its own KV cache, then one denoising step runs the
    `image_tokens` latent tokens of all branches at once against their caches (batched into one
    padded cache, as MoTRuntime does for more than one branch), then the velocity head and the
    next-token logits. Token values do not matter to memory: zeros."""
    from tapestry.models.mot.model import GEN, UND, KVCache, batched_step_mask

    lat = model.config.latent
    c, branches = plan.tokens, plan.branches
    side = max(1, int(math.isqrt(plan.image_tokens)))  # a square image of about image_tokens tokens
    n = side * side
    ids = torch.zeros(1, c, dtype=torch.long, device=device)
    noise = torch.zeros(1, lat.channels, side * lat.patch_size, side * lat.patch_size, device=device,
                        dtype=model.dtype)
    t = torch.full((1,), 0.5, device=device)
    # Routing reads expert ids (nonzero): on the meta device they stay real CPU tensors; every
    # call here routes all its tokens to one expert, so no index ever meets a meta tensor
    route = torch.device("cpu") if device.type == "meta" else device

    @torch.no_grad()
    def run():
        caches = []
        for _ in range(branches):
            cache = KVCache()
            mask = torch.ones(c, c, dtype=torch.bool, device=device).tril()
            model(model.embed_text(ids), torch.full((1, c), UND, device=route),
                  torch.arange(c, device=device)[None], mask, cache=cache, update_cache=True)
            caches.append(cache)
        tokens = model.embed_latents(noise, t)  # [1, n, D]
        step = torch.ones(n, c + n, dtype=torch.bool, device=device)
        if branches > 1:
            cache, lengths = KVCache.batch(caches)
            mask = batched_step_mask([step] * branches, lengths)
            tokens = tokens.expand(branches, -1, -1)
        else:
            cache, mask = caches[0], step
        hidden = model(tokens, torch.full((branches, n), GEN, device=route),
                       torch.full((branches, n), c, device=device), mask, cache=cache)
        model.latent_out(hidden)
        model.logits(hidden[:, -1])

    return run


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
        parts["logits"] = llm.vocab_size * size * plan.branches
        # everything generation allocates (caches, the batched cache, each layer's temporaries,
        # heads), run on the meta device: the peak of live bytes above the weights
        from unittest import mock

        import tapestry.models.mot.model as mot_model

        meta = model.to(DTYPES[plan.dtype])
        run = _generation_step(meta, plan, torch.device("meta"))
        with mock.patch.object(mot_model, "attention", _stand_in_attention(plan.device == "cpu")):
            before, top = _live_peak(run, meta)
        parts["activations"] = max(0, top - before - parts["kv_cache"] - parts["logits"])
        return Estimate(parts, sum(parts.values()), asdict(plan))

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
    if plan.offload:  # FSDP2 CPUOffloadPolicy: parameters (adapters too), gradients and optimizer
        # live on the CPU; a layer and the one prefetched after it are on the device
        parts["weights"] = 2 * layer_weights + 2 * parts_extra // n_layers
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
    saved = _trace_layer(config, plan.tokens, plan.gen_fraction, DTYPES[plan.dtype], on_cpu=plan.device == "cpu")
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
    """For each device size, the options (from cheapest in quality to most drastic) that fit.
    Every option sets what it names and leaves the rest of `base` (tokens, rows, world size...);
    LoRA rows use the plan's rank, or 16 when the plan is a full fine-tune."""
    if base.mode == "inference":
        options = [("bf16", {"quant": "none", "offload": False}), ("int8", {"quant": "int8", "offload": False}),
                   ("int4", {"quant": "int4", "offload": False}),
                   ("int8 + layer offload", {"quant": "int8", "offload": True}),
                   ("bf16 + layer offload", {"quant": "none", "offload": True})]
    else:
        r = base.lora_rank or 16
        options = [("full fine-tune", {"lora_rank": 0, "activation_checkpointing": False, "offload": False}),
                   ("full + activation checkpointing", {"lora_rank": 0, "activation_checkpointing": True, "offload": False}),
                   (f"LoRA r{r}", {"lora_rank": r, "activation_checkpointing": False, "offload": False}),
                   (f"LoRA r{r} + activation checkpointing", {"lora_rank": r, "activation_checkpointing": True, "offload": False}),
                   (f"LoRA r{r} + checkpointing + FSDP2 CPU offload", {"lora_rank": r, "activation_checkpointing": True, "offload": True}),
                   ("full + checkpointing + FSDP2 CPU offload", {"lora_rank": 0, "activation_checkpointing": True, "offload": True})]
    rows = []
    for label, change in options:
        est = estimate(config, replace(base, **change))
        rows.append({"option": label, "peak_gib": round(est.peak / GiB, 2), "peak_bytes": est.peak,
                     **{f"fits_{b}": est.peak <= b * GiB * 0.95 for b in budgets_gib}, "parts_gib": est.gib()})
    return rows


def human(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


__all__ = ["Plan", "Estimate", "estimate", "fits", "human", "math"]


# ---------------------------------------------------------------------------------------------
# Measuring (for the benchmark and tests): a real step on tiny configs
# ---------------------------------------------------------------------------------------------


def _peak_of(run, device: torch.device, *tracked) -> int:
    """Peak bytes of live tensors while `run()` executes: CUDA's allocator statistics on a GPU,
    `_live_peak`'s count of storages on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _live_peak(run, *tracked)[1]


def measure(config: MoTConfig, plan: Plan, device: str = "cpu", seed: int = 0) -> int:
    """The measured peak of one training step (the second: optimizer states exist) or of one
    image's generation step (`_generation_step`), on `device`."""
    import torch.nn.functional as F

    from tapestry.models.mot.model import GEN, UND, MoTModel

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
        return _peak_of(_generation_step(model, plan, device_), device_, model)

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
    return _peak_of(step, device_, model, optimizer, ema)
