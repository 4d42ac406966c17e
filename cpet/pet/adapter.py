"""Bottleneck adapters (Houlsby et al., 2019), serial: after the attention output projection and after the
FFN's down-projection, before the residual sum,

    y = h + s * U act(D h),   h = layer(x)          D: (r, out), U: (out, r), U starts at 0 (identity)

with s = alpha / r. On a compressed layer the adapter reads what the layer computes (recovery included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from cpet.errors import CpetError
from cpet.layers import register_kind
from cpet.pet.base import PetMethod
from cpet.roles import check_roles
from cpet.typed import coerce_fields, require

register_kind("adapter", "out", rank=20)
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


@dataclass(frozen=True)
class AdapterConfig:
    r: int = 16
    alpha: float = 16.0
    activation: str = "gelu"
    targets: tuple[str, ...] = ("o", "ffn_out")

    def __post_init__(self):
        coerce_fields(self, "pet")
        check_roles(self.targets, "pet.targets")
        require(self.r >= 1, "pet.r", self.r, ">= 1")
        require(self.alpha > 0, "pet.alpha", self.alpha, "> 0")
        if self.activation not in ACTIVATIONS:
            raise CpetError(f"pet.activation={self.activation!r}: use one of {sorted(ACTIVATIONS)}")


class Bottleneck(nn.Module):
    AXES = {"D": ("out", 1), "U": ("out", 0)}  # it reads and writes the layer's output

    def __init__(self, features: int, r: int, alpha: float, activation: str):
        super().__init__()
        self.r, self.alpha, self.activation = r, alpha, activation
        self.D = nn.Parameter(torch.empty(r, features))
        self.U = nn.Parameter(torch.zeros(features, r))
        nn.init.kaiming_uniform_(self.D, a=math.sqrt(5))
        self.act = ACTIVATIONS[activation]()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.act(h @ self.D.T) @ self.U.T * (self.alpha / self.r)

    def hparams(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "activation": self.activation}


class AdapterMethod(PetMethod):
    name, Config, kinds = "adapter", AdapterConfig, ("adapter",)

    def make(self, in_features: int, out_features: int, cfg, kind: str) -> nn.Module:
        return Bottleneck(out_features, cfg.r, cfg.alpha, cfg.activation)

    def config_from(self, hp: dict):
        return AdapterConfig(**hp)


METHOD = AdapterMethod()
