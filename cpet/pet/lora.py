"""LoRA (Hu et al., 2021) as a side branch of any linear-like layer.

    y = base(x) + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r), B starts at 0

The base layer (fp32, int8, pruned ...) is frozen; only A and B train. Weights are stored with
peft's orientation, so import/export to the PEFT format is a pure renaming (see ``peft_io``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from cpet.layers import attach, register_kind
from cpet.models import target_modules
from cpet.pet.base import PetMethod
from cpet.roles import check_roles
from cpet.typed import coerce_fields, require

register_kind("lora", "add", rank=10)


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


METHOD = LoraMethod()
