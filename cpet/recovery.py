"""Knowledge-recovery modules (CPET section 3.4): a bottleneck bypass beside each compressed linear.

    y = base(x) + act(dropout(x) D^T) U^T      D: (r, in), U: (out, r), U starts at 0

Frozen: the (compressed) base. Trained: D and U, jointly with the task's PET module, under
``task + alpha * MSE(teacher, student)`` (see ``distill``). A fresh module is a no-op.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from cpet.config import RecoveryConfig
from cpet.layers import attach

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity}


class Recovery(nn.Module):
    def __init__(self, in_features: int, out_features: int, r: int, activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.D = nn.Parameter(torch.empty(r, in_features))
        self.U = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.D, a=math.sqrt(5))
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dropout(x) @ self.D.T) @ self.U.T  # (..., r) -> (..., out)


def add_recovery_to(model: nn.Module, names, cfg: RecoveryConfig) -> list[str]:
    """Attach a fresh recovery bypass to each named linear (wrapping it); returns the names."""
    return attach(model, names, "recovery", lambda i, o: Recovery(i, o, cfg.r, cfg.activation, cfg.dropout))


def apply(model: nn.Module, cfg: RecoveryConfig) -> nn.Module:
    """Add a recovery bypass on every linear whose role is in ``cfg.targets``."""
    from cpet.models import target_modules

    add_recovery_to(model, target_modules(model, cfg.targets), cfg)
    return model
