"""LoRA (Hu et al., 2021) as a side branch of any linear-like layer.

    y = base(x) + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r), B starts at 0

The base layer (fp32, int8, pruned ...) is frozen; only A and B train. Weights are stored with
peft's orientation, so import/export to the PEFT format is a pure renaming (see ``peft_io``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from cpet.layers import attach, register_kind
from cpet.models import target_modules
from cpet.errors import CpetError
from cpet.pet.base import PetMethod, peft_layers, peft_name
from cpet.roles import check_roles
from cpet.typed import coerce_fields, require

register_kind("lora", "add", rank=10)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        coerce_fields(self, "lora")
        check_roles(self.targets, "lora.targets")
        require(self.r >= 1, "lora.r", self.r, ">= 1")
        require(self.alpha > 0, "lora.alpha", self.alpha, "> 0")
        require(0 <= self.dropout < 1, "lora.dropout", self.dropout, "in [0, 1)")


class LoRA(nn.Module):
    AXES = {"A": ("in", 1), "B": ("out", 0)}  # which side of its layer each dimension runs along

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as peft
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.A.T) @ self.B.T * self.scaling  # (..., r) -> (..., out)

    def hparams(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": getattr(self.dropout, "p", 0.0)}


def add_lora_to(model: nn.Module, names, cfg: LoraConfig) -> list[str]:
    """Attach a fresh LoRA branch to each named linear (wrapping it); returns the names."""
    return attach(model, names, "lora", lambda i, o: LoRA(i, o, cfg.r, cfg.alpha, cfg.dropout))


def apply(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Add LoRA on every linear whose role is in ``cfg.targets`` (by the architecture map)."""
    add_lora_to(model, target_modules(model, cfg.targets, ports=True), cfg)
    return model


class LoraMethod(PetMethod):
    """The registry's LoRA. Its task-folder entry keeps cpet's first format: {r, alpha, dropout, modules: [...]}."""

    name, Config, kinds, peft_type, fusable = "lora", LoraConfig, ("lora",), "LORA", True

    def make(self, in_features: int, out_features: int, cfg, kind: str) -> nn.Module:
        return LoRA(in_features, out_features, cfg.r, cfg.alpha, cfg.dropout)

    def describe(self, model: nn.Module) -> dict | None:
        d = super().describe(model)
        return None if d is None else {**{k: v for k, v in d.items() if k != "modules"}, "modules": d["modules"]["lora"]}

    def rebuild(self, model: nn.Module, desc: dict) -> None:
        add_lora_to(model, desc["modules"], LoraConfig(r=desc["r"], alpha=desc["alpha"], dropout=desc["dropout"]))

    def peft_reads(self, key):
        return _KEY.match(key) is not None

    def peft_import(self, model, cfg, tensors, what):
        """PEFT keys ``base_model.model.<module path>.lora_A.weight`` (A: (r, in), B: (out, r)), scale
        ``lora_alpha / r`` (``/ sqrt(r)`` with rslora): cpet's ``<path>.lora.A`` / ``.B``, a renaming."""
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        if cfg.get("use_rslora"):
            alpha = alpha * math.sqrt(r)  # alpha/sqrt(r) == (alpha*sqrt(r))/r
        state, names = {}, set()
        for value, m, name, _ in peft_layers(model, tensors, _KEY, what):
            names.add(name)
            state[f"{name}.lora.{m['ab']}"] = value.float()
        if not names:
            raise CpetError(f"{what}: no LoRA tensors found in adapter_model.safetensors")
        add_lora_to(model, names, LoraConfig(r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0))))
        return sorted(names), state

    def peft_export(self, desc, state, base_config, what):
        entry = desc[self.name]
        tensors = {}
        for n in entry["modules"]:
            tensors[f"base_model.model.{peft_name(n)}.lora_A.weight"] = state[f"{n}.lora.A"].contiguous()
            tensors[f"base_model.model.{peft_name(n)}.lora_B.weight"] = state[f"{n}.lora.B"].contiguous()
        return tensors, {"r": entry["r"], "lora_alpha": entry["alpha"], "lora_dropout": entry.get("dropout", 0.0),
                         "target_modules": sorted(peft_name(n) for n in entry["modules"]), "bias": "none",
                         "init_lora_weights": True}

    def low_rank_pairs(self, entry, state):
        scale, pairs = entry["alpha"] / entry["r"], {}
        for n in entry["modules"]:
            A, B = state[f"{n}.lora.A"], state[f"{n}.lora.B"]
            if A.shape[0] != entry["r"] or B.shape[-1] != entry["r"]:  # the scale is alpha / the recorded r
                raise CpetError(f"{n}: LoRA tensors of rank {A.shape[0]} / {B.shape[-1]}, but the task folder records "
                                f"r={entry['r']}; the folder was edited or mixed up: re-save the task")
            pairs[n] = (A, B * scale)
        return pairs


METHOD = LoraMethod()
