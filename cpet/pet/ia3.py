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

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from cpet.errors import CpetError
from cpet.layers import attach, register_kind
from cpet.pet.base import PetMethod, peft_layers, peft_name
from cpet.roles import check_roles
from cpet.typed import coerce_fields

register_kind("ia3_in", "in", rank=10)
register_kind("ia3", "out", rank=10)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.ia3_l(?:\.[^.]+)?$")


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

    def peft_reads(self, key):
        return _KEY.match(key) is not None

    def peft_import(self, model, cfg, tensors, what):
        """PEFT's ``<module path>.ia3_l``: (out, 1) scales a layer's output, (1, in) its input (the
        ``feedforward_modules``); cpet's ``ia3.l`` / ``ia3_in.l`` hold the same vectors."""
        state, names = {}, set()
        for value, m, name, layer in peft_layers(model, tensors, _KEY, what):
            if value.shape == (1, layer.in_features) and value.shape != (layer.out_features, 1):
                kind, side, n = "ia3_in", "in", layer.in_features
            elif value.shape == (layer.out_features, 1):
                kind, side, n = "ia3", "out", layer.out_features
            else:
                raise CpetError(f"{what}: {m.group(0)} has shape {tuple(value.shape)}, which fits neither the input "
                                f"({layer.in_features}) nor the output ({layer.out_features}) of {name}")
            attach(model, [name], kind, lambda i, o, side=side, n=n: Scale(n, side))
            names.add(name)
            state[f"{name}.{kind}.l"] = value.float().flatten()
        if not names:
            raise CpetError(f"{what}: no IA3 tensors found in adapter_model.safetensors")
        return sorted(names), state

    def peft_export(self, desc, state, base_config, what):
        entry = desc[self.name]
        vectors = {peft_name(n): (state[f"{n}.{kind}.l"], kind == "ia3_in")
                   for kind, names in entry["modules"].items() for n in names}
        tensors = {f"base_model.model.{n}.ia3_l": (v[None, :] if inp else v[:, None]).contiguous()
                   for n, (v, inp) in vectors.items()}
        return tensors, {"target_modules": sorted(vectors), "init_ia3_weights": True,
                         "feedforward_modules": sorted(n for n, (_, inp) in vectors.items() if inp)}


METHOD = IA3Method()
