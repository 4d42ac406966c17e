"""LoRA (Hu et al., 2021) as a side branch of any linear-like layer.

    y = base(x) + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r), B starts at 0

The base layer (fp32, int8, pruned ...) is frozen; only A and B train. Weights are stored with
peft's orientation, so import/export to the PEFT format is a pure renaming (see ``peft_io``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from cpet.config import LoraConfig
from cpet.layers import attach


class LoRA(nn.Module):
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


def add_lora_to(model: nn.Module, names, cfg: LoraConfig) -> list[str]:
    """Attach a fresh LoRA branch to each named linear (wrapping it); returns the names."""
    return attach(model, names, "lora", lambda i, o: LoRA(i, o, cfg.r, cfg.alpha, cfg.dropout))


def apply(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Add LoRA on every linear whose role is in ``cfg.targets`` (by the architecture map)."""
    from cpet.models import target_modules

    add_lora_to(model, target_modules(model, cfg.targets), cfg)
    return model
