"""LoRA adapters on the MoT decoder through `peft`, with the two experts chosen separately.

    spec = LoraSpec(rank=16, experts=["gen"], modules=["q_proj", "v_proj", "up_proj"])
    add_lora(model, spec)          # peft LoRA layers injected in place; only they train
    save_adapter(model, spec, DIR) # adapter_model.safetensors + adapter_config.json, nothing else
    load_adapter(model, DIR)       # the same adapters on a fresh base model
    merge_lora(model)              # W + (alpha / r)·B·A folded in; a plain MoTModel again

Module names are the decoder's own: `layers.N.{und,gen}.{q,k,v,o}_proj` and
`layers.N.{und,gen}.mlp.{gate,up,down}_proj`. Choosing `experts=["gen"]` adapts only what
image tokens pass through (the understanding path stays bitwise the base model's), which is how a
generation-only fine-tune keeps BAGEL's understanding intact.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from tapestry.errors import TapestryError
from tapestry.models.common.checkpoint import read_json_file
from tapestry.models.common.config import section_from_dict

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "tapestry.mot_lora"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
EXPERTS = ("und", "gen")


class LoraError(TapestryError):
    pass


@dataclass
class LoraSpec:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    modules: list[str] = field(default_factory=lambda: list(ATTENTION + MLP))
    experts: list[str] = field(default_factory=lambda: list(EXPERTS))
    layers: list[int] = field(default_factory=list)  # empty: every decoder layer

    def validate(self, num_layers: int | None = None) -> "LoraSpec":
        if self.rank < 0:
            raise LoraError(f"lora.rank must be >= 1 (or 0: no adapters), got {self.rank}")
        if self.alpha <= 0:
            raise LoraError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise LoraError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        bad = sorted(set(self.modules) - set(ATTENTION + MLP))
        if bad or not self.modules:
            raise LoraError(f"lora.modules: unknown {bad}; choose from {list(ATTENTION + MLP)}")
        bad = sorted(set(self.experts) - set(EXPERTS))
        if bad or not self.experts:
            raise LoraError(f"lora.experts: unknown {bad}; choose from {list(EXPERTS)}")
        if num_layers is not None and any(not 0 <= i < num_layers for i in self.layers):
            raise LoraError(f"lora.layers {self.layers}: the decoder has layers 0..{num_layers - 1}")
        return self

    def target_regex(self) -> str:
        layers = "|".join(str(i) for i in self.layers) if self.layers else r"\d+"
        names = [m if m in ATTENTION else f"mlp\\.{m}" for m in self.modules]
        return rf"layers\.({layers})\.({'|'.join(self.experts)})\.({'|'.join(names)})"

    def peft_config(self):
        from peft import LoraConfig

        # a str target is matched with re.fullmatch against every module name
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_regex(), bias="none")


def add_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Inject LoRA layers into `model` in place and freeze every other parameter."""
    from peft import inject_adapter_in_model

    spec.validate(len(model.layers))
    if spec.rank == 0:
        raise LoraError("lora.rank is 0: there are no adapters to add")
    inject_adapter_in_model(spec.peft_config(), model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name and param.dtype != torch.float32:
            # inject_adapter_in_model makes adapters in the base dtype (bf16 for BAGEL); a bf16
            # weight drops most of a small AdamW update, so adapters train in float32 (what
            # peft's get_peft_model does with autocast_adapter_dtype)
            param.data = param.data.float()
    if not any(p.requires_grad for p in model.parameters()):
        raise LoraError(f"lora: no module matched {spec.target_regex()!r}")
    return model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def adapter_state_dict(model: nn.Module) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(model: nn.Module, spec: LoraSpec, folder: str | Path, base: str = "") -> Path:
    """Write only the adapters (and the spec that made them) into `folder`, whole (a folder holding
    files this function did not write is refused: tapestry.atomic.output_dir)."""
    from safetensors.torch import save_file

    from tapestry.atomic import output_dir

    folder = Path(folder)
    with output_dir(folder, "save_adapter", flag="folder") as tmp:
        save_file(adapter_state_dict(model), str(tmp / ADAPTER_WEIGHTS), metadata={"format": FORMAT})
        record = {"format": FORMAT, "base": base, **asdict(spec)}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return folder


def read_spec(folder: str | Path) -> LoraSpec:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise LoraError(f"{folder}: no {ADAPTER_CONFIG}; an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    record = read_json_file(path, "a LoRA adapter config (save_adapter writes it)")
    if record.pop("format", None) != FORMAT:
        raise LoraError(f"{path}: not a tapestry MoT LoRA adapter (format should be {FORMAT!r})")
    record.pop("base", None)
    spec = section_from_dict(LoraSpec, record, str(path), LoraError)
    try:
        return spec.validate()
    except LoraError as exc:
        raise LoraError(f"{path}: {exc}") from None


def load_adapter(model: nn.Module, folder: str | Path) -> LoraSpec:
    """Add the adapters saved in `folder` to a base model (refusing any key that does not fit)."""
    from peft import set_peft_model_state_dict

    from tapestry.models.common.checkpoint import load_safetensors

    spec = read_spec(folder)
    add_lora(model, spec)
    state = load_safetensors(Path(folder) / ADAPTER_WEIGHTS, device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    if unexpected or missing:
        raise LoraError(f"{folder}: adapter keys do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return spec


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base Linear and put the base Linear back in its place."""
    from peft.tuners.lora import LoraLayer

    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, module in targets:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    for param in model.parameters():
        param.requires_grad_(True)
    return model
