"""The one wrapper every add-on hangs from, and the name filters that decide what trains and saves.

    y = base(x) + sum_k branch_k(x)

``Adapted`` calls ``self.base(x)`` without looking inside, so the same LoRA / recovery branches
work over fp32, int8 and pruned layers alike. Branch module names are the kinds in
``TRAINABLE_KINDS``; a parameter trains (and saves with its task) iff its dotted name contains one
of them as a path component (``...query.lora.A``, ``...query.recovery.U``, ``head.out.weight``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

BRANCH_KINDS = ("lora", "recovery", "bank")  # forward order of side branches (bank: many tasks, cpet.bank)
TRAINABLE_KINDS = ("lora", "recovery", "head")


class Adapted(nn.Module):
    """A linear-like ``base`` plus side branches (each returns a delta of the base's output shape)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base's stored weight (some HF models read ``.weight.dtype`` of their linears)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        for kind in BRANCH_KINDS:
            branch = self._modules.get(kind)
            if branch is not None:
                y = branch.add_to(y, x) if kind == "bank" else y + branch(x)  # the bank accumulates in place
        return y


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """``model.<name> = module`` for a dotted name."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def wrap(model: nn.Module, name: str) -> Adapted:
    """Replace ``model.<name>`` by ``Adapted(it)`` (once) and return the wrapper."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        from cpet.errors import CpetError

        raise CpetError(f"module {name!r} not found in {type(model).__name__}; "
                        "were these task modules made for another backbone?") from None
    if isinstance(module, Adapted):
        return module
    wrapped = Adapted(module)
    set_module(model, name, wrapped)
    return wrapped


def attach(model: nn.Module, names, kind: str, make) -> list[str]:
    """Wrap each named layer (once) and hang a fresh ``make(in_features, out_features)`` branch on it
    under ``kind`` (one of BRANCH_KINDS); returns the sorted names."""
    if kind not in BRANCH_KINDS:
        raise ValueError(f"unknown branch kind {kind!r}; known: {BRANCH_KINDS}")
    names = sorted(names)
    for name in names:
        layer = wrap(model, name)
        setattr(layer, kind, make(layer.in_features, layer.out_features))
    return names


def kind_of(param_name: str) -> str | None:
    parts = param_name.split(".")
    for kind in TRAINABLE_KINDS:
        if kind in parts:
            return kind
    return None


def freeze_backbone(model: nn.Module) -> list[str]:
    """requires_grad only for task modules (lora / recovery / head); returns the trainable names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(kind_of(name) is not None)
        if p.requires_grad:
            names.append(name)
    return names


def task_state_dict(model: nn.Module, kinds: tuple[str, ...] = TRAINABLE_KINDS) -> dict[str, torch.Tensor]:
    """The task's own tensors (never the backbone), detached copies."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if kind_of(n) in kinds}
