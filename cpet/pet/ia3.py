"""IA3 (Liu et al., 2022, "Few-shot parameter-efficient fine-tuning is better and cheaper than in-context
learning"): learned vectors that rescale activations.

    attention keys / values:   y = layer(x) * l          l: (out,), starts at 1
    FFN down-projection:       y = layer(x * l)          l: (in,),  starts at 1  (the FFN's inner activations)

On a compressed layer the scaling applies to what the layer computes, recovery modules included (IA3
rescales the recovered output). On a MoE FFN (MoEfication) it scales the inner activations of the
selected experts (the MoE's last port), as on the dense FFN. PEFT's IA3 stores the same vectors (``ia3_l``: (out, 1), or
(1, in) for feed-forward modules).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from cpet.layers import register_kind
from cpet.pet.base import PetMethod
from cpet.roles import check_roles
from cpet.typed import coerce_fields

register_kind("ia3_in", "in", rank=10)
register_kind("ia3", "out", rank=10)


@dataclass(frozen=True)
class IA3Config:
    targets: tuple[str, ...] = ("k", "v", "ffn_out")
    # roles scaled on their input (PEFT's feedforward_modules); the others on their output
    input_side: tuple[str, ...] = ("ffn_out",)

    def __post_init__(self):
        coerce_fields(self, "pet")
        check_roles(self.targets, "pet.targets")
        check_roles(self.input_side, "pet.input_side")


class Scale(nn.Module):
    """x * l along the last dimension."""

    def __init__(self, features: int, axis: str):
        super().__init__()
        self.l = nn.Parameter(torch.ones(features))
        self.AXES = {"l": (axis, 0)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.l

    def hparams(self) -> dict:
        return {}


class IA3Method(PetMethod):
    name, Config, kinds, peft_type = "ia3", IA3Config, ("ia3", "ia3_in"), "IA3"

    def kind_for(self, role: str, cfg) -> str:
        return "ia3_in" if role in cfg.input_side else "ia3"  # (a MoE FFN: its last port reads the activations)

    def make(self, in_features: int, out_features: int, cfg, kind: str) -> nn.Module:
        return Scale(in_features, "in") if kind == "ia3_in" else Scale(out_features, "out")


METHOD = IA3Method()
