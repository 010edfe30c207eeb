"""How a model is scaled, applied from outside (torchtitan's split): the model code imports nothing
from torch.distributed; this module wraps it.

    init_distributed()    torchrun's environment -> process group (gloo on CPU, nccl on GPU)
    parallelize(module)   activation checkpointing and torch.compile per block (the family's
                          `blocks(model)`: decoder layers), then DDP or FSDP2 (`fully_shard` per
                          block, then the root; with `cpu_offload`, FSDP2's CPUOffloadPolicy)

Under FSDP2 a parameter unused on one process (an expert with no tokens in its rows) still
takes part in the gradient reduce-scatter as zeros (`set_reduce_scatter_unused_params`), so
processes never disagree on what to reduce. One process and DDP give such parameters a zero
gradient too (`fill_missing_grads`), so every mode takes the same optimizer step.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
from torch import nn

from tapestry.train.config import ParallelConfig, TrainConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp
    device: torch.device = torch.device("cpu")
    threads_before: int = 0  # torch's thread count before `parallel.threads` set it (0: untouched)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.mode != "none"


def resolve_device(config: ParallelConfig, local_rank: int = 0) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainConfigError("parallel.device = \"cuda\" but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(config: ParallelConfig) -> Dist:
    """One process, or the process group torchrun describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mode = config.mode
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none" and world > 1:
        raise TrainConfigError(f"parallel.mode = \"none\" but torchrun started {world} processes; use ddp or fsdp")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config, local_rank)
    threads_before = 0
    if config.threads:  # a process-wide setting: shutdown() puts it back for in-process callers
        threads_before = torch.get_num_threads()
        torch.set_num_threads(config.threads)
    if mode == "none":
        return Dist(device=device, threads_before=threads_before)
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:  # ddp/fsdp asked for without torchrun: a group of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, mode, device, threads_before)


def shutdown(d: Dist) -> None:
    if d.threads_before:
        torch.set_num_threads(d.threads_before)
    if d.mode != "none":
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.mode != "none":
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(d: Dist, tensor: torch.Tensor) -> torch.Tensor:
    if d.mode == "none":
        return tensor
    import torch.distributed as dist

    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def broadcast_object(d: Dist, obj):
    if d.mode == "none":
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the LossModule's model, as its family names them."""
    return module.family.blocks(module.model)


def parallelize(module: nn.Module, config: ParallelConfig, d: Dist) -> nn.Module:
    """Apply activation checkpointing, compile and DDP/FSDP2 to a LossModule, in that order."""
    if config.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        # composable checkpointing keeps parameter names unchanged (no wrapper module in the path)
        for layer in decoder_layers(module):
            checkpoint(layer)
    if config.compile:
        # per decoder layer, as torchtitan does: small graphs, shared by all layers; dynamic
        # because the number of tokens routed to each expert changes every step
        for layer in decoder_layers(module):
            layer.compile(dynamic=True)
    if d.mode == "fsdp":
        import warnings

        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        # a block may return views of its outputs (MoTLayer: keys and values for the KV cache);
        # FSDP2 warns that an in-place op on such a view would skip its all-gather. The models
        # here never modify them in place, so the warning does not apply.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

        mesh = init_device_mesh(d.device.type, (d.world_size,))
        # CPU offload: each process keeps its shards (and their gradients and AdamW states) in
        # pinned host memory; FSDP2 copies a block's shards to the device before gathering it
        offload = CPUOffloadPolicy(pin_memory=d.device.type == "cuda") if config.cpu_offload else OffloadPolicy()
        for layer in decoder_layers(module):
            fully_shard(layer, mesh=mesh, offload_policy=offload)
        fully_shard(module, mesh=mesh, offload_policy=offload)
        module.set_reduce_scatter_unused_params(True)
        return module
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [d.device.index] if d.device.type == "cuda" else None
        # unused: an expert without tokens in this process's rows, or ViT without given images
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The LossModule inside a DDP wrapper (FSDP2 wraps in place)."""
    return module.module if hasattr(module, "module") and hasattr(module, "reducer") else module


@torch.no_grad()
def fill_missing_grads(module: nn.Module) -> None:
    """A trainable parameter left without a gradient (its path was unused by every process this
    step) gets a zero one, as FSDP2's reduce-scatter of unused parameters gives it."""
    for param in module.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)


def clip_grad_norm(module: nn.Module, max_norm: float) -> float:
    """Global gradient norm (over all shards under FSDP2), clipped to max_norm when max_norm > 0."""
    params = [p for p in module.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
