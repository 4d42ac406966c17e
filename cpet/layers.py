"""The one wrapper every add-on hangs from, and the name filters that decide what trains and saves.

    x' = in_k(x)  ...                 input transforms   (IA3 on a layer's input)
    y  = base(x') + sum_k add_k(x')   additive branches  (LoRA, recovery, BitFit, the bank)
    y  = out_k(y) ...                 output transforms  (IA3 scaling, serial adapters)

A ``model``-stage kind is a module on the task model itself that extends the input sequence (prompt
tuning's virtual tokens: ``TaskModel`` calls its ``extend``). ``Adapted`` calls ``self.base(x)`` without looking inside, so every branch works over fp32, int8 and
pruned layers alike. A branch's module name is its kind; kinds are registered with their stage by the
modules that define them (``register_kind``: cpet.pet's methods, cpet.recovery; the bank's here). A parameter
trains (and saves with its task) iff its dotted name contains a trainable kind as a path component
(``...query.lora.A``, ``...query.recovery.U``, ``head.out.weight``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cpet.errors import CpetError

STAGES = ("in", "add", "out", "model")  # model: on the task model, not a layer (virtual input tokens)
_STAGE: dict[str, tuple[str, int]] = {}  # branch kind -> (stage, rank within the stage: the forward order)
_ORDER: dict[str, tuple[str, ...]] = {s: () for s in STAGES}
TRAINABLE_KINDS: tuple[str, ...] = ("head",)
BRANCH_KINDS: tuple[str, ...] = ()


def register_kind(kind: str, stage: str = "add", rank: int = 50, trainable: bool = True) -> None:
    """Declare a branch kind: where it acts in ``Adapted.forward`` (``stage``; within a stage by ``rank``,
    so the order, hence the float rounding, does not depend on import order) and whether its parameters
    are task parameters. Registering the same kind again the same way is a no-op."""
    global TRAINABLE_KINDS, BRANCH_KINDS
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: use one of {STAGES}")
    if kind in _STAGE:
        if _STAGE[kind] != (stage, rank):
            raise ValueError(f"branch kind {kind!r} is already registered as {_STAGE[kind]}")
        return
    _STAGE[kind] = (stage, rank)
    _ORDER[stage] = tuple(sorted((k for k, (s, _) in _STAGE.items() if s == stage), key=lambda k: _STAGE[k][1]))
    BRANCH_KINDS = tuple(k for s in STAGES for k in _ORDER[s])
    if trainable:
        TRAINABLE_KINDS = TRAINABLE_KINDS + (kind,)


def stage_of(kind: str) -> str:
    return _STAGE[kind][0]


def model_kinds() -> tuple[str, ...]:
    """The registered model-stage kinds, in their forward order."""
    return _ORDER["model"]


register_kind("bank", "add", rank=90, trainable=False)  # many tasks' LoRA + recovery, fused (cpet.bank)


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
        return self.forward_with(x, self.base)

    def has_branches(self) -> bool:
        return any(k != "base" for k in self._modules)

    def transform_in(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` after the layer's input transforms: what its base and additive branches read."""
        for kind in _ORDER["in"]:
            if self._modules.get(kind) is not None:
                x = self._modules[kind](x)
        return x

    def added(self, x: torch.Tensor, skip: tuple[str, ...] = (), base=None) -> torch.Tensor:
        """base(x) + the additive branches not in ``skip``, for an ``x`` already past the input transforms
        (before any output transform); ``base`` defaults to ``self.base``."""
        mods = self._modules
        y = (self.base if base is None else base)(x)  # (..., out)
        for kind in _ORDER["add"]:
            branch = mods.get(kind)
            if branch is not None and kind not in skip:
                y = branch.add_to(y, x) if kind == "bank" else y + branch(x)  # the bank accumulates in place
        return y

    def forward_with(self, x: torch.Tensor, base) -> torch.Tensor:
        """The stages around ``base(x')`` (``self.base`` in ``forward``; a compound module that computes an
        inner projection itself, the MoE FFN's, passes its own)."""
        y = self.added(self.transform_in(x), base=base)
        for kind in _ORDER["out"]:
            branch = self._modules.get(kind)
            if branch is not None:
                y = branch(y)
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
    if kind not in _STAGE:
        raise ValueError(f"unknown branch kind {kind!r}; known: {BRANCH_KINDS}")
    names = sorted(names)
    for name in names:
        layer = wrap(model, name)
        setattr(layer, kind, make(layer.in_features, layer.out_features))
    return names


def branch_layers(model: nn.Module, kind: str) -> list[str]:
    """Sorted names of the wrapped layers that carry a ``kind`` branch."""
    return sorted(n for n, m in model.named_modules() if isinstance(m, Adapted) and m._modules.get(kind) is not None)


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


def task_state_dict(model: nn.Module, kinds: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The task's own tensors (never the backbone), detached copies; ``kinds``: only those (default: every
    trainable kind)."""
    kinds = TRAINABLE_KINDS if kinds is None else kinds
    return {n: p.detach().clone() for n, p in model.named_parameters() if kind_of(n) in kinds}
