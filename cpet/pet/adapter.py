"""Bottleneck adapters.

Serial (Houlsby et al., 2019): after the attention output projection and after the FFN's down-projection,
before the residual sum,

    y = h + s * U act(D h),   h = layer(x)          D: (r, out), U: (out, r), U starts at 0 (identity)

Parallel (He et al., 2022): beside each FFN, y = FFN(x) + s * U act(D x), x the FFN's input (a tap on the
FFN's first linear hands it to the adapter on its last; a MoE FFN carries both).

s = alpha / r. On a compressed layer an adapter reads what the layer computes (recovery included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from cpet.errors import CpetError
from cpet.layers import register_kind, wrap
from cpet.models import target_modules
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


METHOD = AdapterMethod()


# ---------------------------------------------------------------- parallel adapters (He et al., 2022)
register_kind("ptap", "in", rank=90, trainable=False)
register_kind("padapter", "out", rank=30)


@dataclass(frozen=True)
class ParallelAdapterConfig:
    """A bottleneck beside each FFN: FFN(x) + s * U act(D x), x the FFN's input (He et al., "Towards a
    unified view of parameter-efficient transfer learning", 2022: the parallel adapter at the FFN)."""

    r: int = 16
    alpha: float = 16.0
    activation: str = "gelu"

    def __post_init__(self):
        coerce_fields(self, "pet")
        require(self.r >= 1, "pet.r", self.r, ">= 1")
        require(self.alpha > 0, "pet.alpha", self.alpha, "> 0")
        if self.activation not in ACTIVATIONS:
            raise CpetError(f"pet.activation={self.activation!r}: use one of {sorted(ACTIVATIONS)}")


class Tap(nn.Module):
    """On the FFN's first linear (input stage): hands the FFN's input to its parallel adapter."""

    def __init__(self):
        super().__init__()
        self.x: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.x = x
        return x


class Parallel(Bottleneck):
    """On the FFN's last linear (output stage): y + s * U act(D x) with x from its tap (D, U, AXES as the serial
    adapter's: x and y both have the hidden size, the FFN's out side)."""

    def __init__(self, features: int, r: int, alpha: float, activation: str):
        super().__init__(features, r, alpha, activation)
        self.__dict__["tap"] = None  # the paired Tap (not a submodule: it lives on the FFN's first linear)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        tap = self.__dict__["tap"]
        if tap is None or tap.x is None:
            raise CpetError("parallel adapter: its FFN's input was not seen (the tap on the FFN's first linear "
                            "did not run before it)")
        x, tap.x = tap.x, None
        return y + self.act(x @ self.D.T) @ self.U.T * (self.alpha / self.r)


def _pairs(ins: list[str], outs: list[str]) -> list[tuple[str, str]]:
    """Each FFN's (first linear, last linear): for every last linear the first linear sharing the longest
    name prefix (its own block; a MoE FFN is both)."""
    def common(a: str, b: str) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n
    return [(max(ins, key=lambda i: (common(i, o), -ins.index(i))), o) for o in outs]


class ParallelAdapterMethod(PetMethod):
    name, Config, kinds = "parallel_adapter", ParallelAdapterConfig, ("padapter", "ptap")

    def _install(self, model: nn.Module, pairs: list[tuple[str, str]], cfg) -> None:
        for tin, out in pairs:
            first, last = wrap(model, tin), wrap(model, out)
            first.ptap = Tap()
            last.padapter = Parallel(last.out_features, cfg.r, cfg.alpha, cfg.activation)
            last.padapter.__dict__["tap"] = first.ptap

    def apply(self, model: nn.Module, cfg) -> list[str]:
        ins = sorted(target_modules(model, ("ffn_in",), ports=True))
        outs = sorted(target_modules(model, ("ffn_out",), ports=True))
        if not ins or not outs:
            raise CpetError(f"parallel_adapter: no FFN found in {model.__class__.__name__}")
        pairs = _pairs(ins, outs)
        self._install(model, pairs, cfg)
        return sorted({n for p in pairs for n in p})

    def describe(self, model: nn.Module) -> dict | None:
        d = super().describe(model)
        if d is None:
            return None
        outs = d["modules"]["padapter"]
        taps = {id(model.get_submodule(n).ptap): n for n in d["modules"]["ptap"]}
        first = model.get_submodule(outs[0]).padapter
        return {"pairs": [[taps[id(model.get_submodule(o).padapter.__dict__["tap"])], o] for o in outs],
                **first.hparams()}

    def by_kind(self, entry: dict) -> dict[str, list[str]]:
        return {"ptap": [p[0] for p in entry["pairs"]], "padapter": [p[1] for p in entry["pairs"]]}

    def rebuild(self, model: nn.Module, desc: dict) -> None:
        self._install(model, [tuple(p) for p in desc["pairs"]], ParallelAdapterConfig(
            **{k: v for k, v in desc.items() if k != "pairs"}))


PARALLEL = ParallelAdapterMethod()
