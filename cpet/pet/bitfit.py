"""BitFit (Ben Zaken et al., 2022): tune only the biases.

    y = layer(x) + b          b: (out,), starts at 0

A trainable bias *delta* on each target linear: the same function as tuning the layer's own bias,
and it works on every layer type (int8 and sparse layers keep their bias as a frozen buffer; a layer
without a bias gets one). The original also tunes LayerNorm biases; cpet's BitFit tunes the linears'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from cpet.layers import register_kind
from cpet.pet.base import PetMethod
from cpet.roles import ALL_ROLES, check_roles
from cpet.typed import coerce_fields

register_kind("bitfit", "add", rank=30)


@dataclass(frozen=True)
class BitFitConfig:
    targets: tuple[str, ...] = ALL_ROLES

    def __post_init__(self):
        coerce_fields(self, "pet")
        check_roles(self.targets, "pet.targets")


class BiasDelta(nn.Module):
    AXES = {"b": ("out", 0)}

    def __init__(self, out_features: int):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b.expand(*x.shape[:-1], self.b.shape[0])

    def hparams(self) -> dict:
        return {}


class BitFitMethod(PetMethod):
    name, Config, kinds = "bitfit", BitFitConfig, ("bitfit",)

    def make(self, in_features: int, out_features: int, cfg, kind: str) -> nn.Module:
        return BiasDelta(out_features)


METHOD = BitFitMethod()
