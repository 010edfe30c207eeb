"""Weight-only int8 / int4 inference through `torchao`, and layer-wise CPU offload.

    quantize_weights(model, "int8")   every decoder Linear (both experts) to int8 weights with a
                                      per-row scale; activations stay in the model's dtype
    quantize_weights(model, "int4")   int4 weights in groups of `group_size` columns
    offload_layers(model, "cuda")     decoder layers live on the CPU and visit the GPU one at a
                                      time; everything else stays on the GPU

What runs where (torchao 0.18): int8 is `Int8WeightOnlyConfig` on any device. int4 on CUDA is
`Int4WeightOnlyConfig` (tile-packed, 0.5 byte per weight); on CPU it is `IntxWeightOnlyConfig`
with int4 values held unpacked in int8 (1 byte per weight: the accuracy of int4, not its memory).
Embeddings, lm_head, the ViT, the connector and the latent projections stay unquantized: they are
a small share of BAGEL's weights and the most sensitive.
"""

from __future__ import annotations

import torch
from torch import nn

from tapestry.errors import TapestryError

MODES = ("none", "int8", "int4")


class QuantError(TapestryError):
    pass


def _config(mode: str, group_size: int, device: torch.device):
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if mode == "int8":
        return Int8WeightOnlyConfig()
    if device.type == "cuda":
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


def decoder_linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("layers.")]


def quantize_weights(model: nn.Module, mode: str, group_size: int = 32) -> nn.Module:
    """Quantize the decoder's Linear weights in place (see the module docstring)."""
    if mode not in MODES:
        raise QuantError(f"quantization {mode!r} is not one of {MODES}")
    if mode == "none":
        return model
    try:
        from torchao.quantization import quantize_
    except ImportError:
        raise QuantError("quantized inference needs torchao: pip install torchao") from None
    device = next(model.parameters()).device
    in_features = {m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")}
    if mode == "int4" and any(f % group_size for f in in_features):
        raise QuantError(f"int4 groups of {group_size} must divide every decoder Linear's input width {sorted(in_features)}")
    config = _config(mode, group_size, device)
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.startswith("layers."))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy (quantized tensors count their int data and scales)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None and type(t) not in (torch.Tensor, nn.Parameter):
            names, _ = t.__tensor_flatten__()
            total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
        else:
            total += t.numel() * t.element_size()
    return total


class _Offload:
    """Hooks that give one decoder layer its weights on the compute device just before it runs
    and drop them right after; the CPU copies (pinned for a GPU) are the only lasting ones."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu: dict[int, dict[str, torch.Tensor]] = {}

    def hold(self, layer: nn.Module) -> None:
        pin = self.device.type == "cuda"
        copies = {}
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            cpu = t.detach().to("cpu")
            copies[name] = cpu.pin_memory() if pin else cpu
            t.data = copies[name]
        self.cpu[id(layer)] = copies

    def _swap(self, layer: nn.Module, to_device: bool) -> None:
        copies = self.cpu[id(layer)]
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            t.data = copies[name].to(self.device, non_blocking=True) if to_device else copies[name]

    def before(self, module: nn.Module, args):
        self._swap(module, True)

    def after(self, module: nn.Module, args, output):
        self._swap(module, False)
        return output


def offload_layers(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Keep the decoder layers on the CPU (pinned when a GPU is the target) and run each on
    `device` in turn: peak device memory holds one layer's weights instead of all of them. The
    rest of the model (embeddings, lm_head, ViT, latent I/O, fixed tables) moves to `device`.
    For inference (no_grad): under autograd the swapped-out weights would be saved for backward."""
    device = torch.device(device)
    for name, child in model.named_children():
        if name != "layers":
            child.to(device)
    model.build_fixed_tables(device)
    hooks = _Offload(device)
    for layer in model.layers:
        hooks.hold(layer)
        layer.register_forward_pre_hook(hooks.before)
        layer.register_forward_hook(hooks.after)
    model._offload = hooks
    return model
