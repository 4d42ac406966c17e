"""What a PET method is to cpet (the registry in ``cpet.pet`` holds one of these per method).

A method adds branch modules to wrapped layers (``cpet.layers.Adapted``), under kinds it registers
with their stage (``register_kind``). Each branch module class declares ``AXES``: for each of its
parameters, which of its layer's sides a dimension runs along (``("in", d)`` or ``("out", d)``), so
inheritance after structured pruning slices a teacher's tensor to the student's kept rows / columns
without knowing the method (``cpet.inherit``). A method's task-folder entry (``describe`` /
``rebuild``) says where its modules sit and their hyper-parameters.
"""

from __future__ import annotations

import torch.nn as nn

from cpet.errors import CpetError
from cpet.layers import attach, branch_layers
from cpet.models import target_modules


class PetMethod:
    """One PET method. Subclasses set ``name``, ``Config`` (a frozen dataclass; ``cfg.targets`` are the
    roles it adapts), ``kinds`` (its branch kinds) and ``peft_type`` (PEFT's name for it, or None), and
    implement ``make(in_features, out_features, cfg, kind)``; the rest is shared."""

    name: str = ""
    Config: type = object
    kinds: tuple[str, ...] = ()
    peft_type: str | None = None
    fusable: bool = False  # served by cpet.bank's fused down / up pairs (a low-rank additive branch)

    def make(self, in_features: int, out_features: int, cfg, kind: str) -> nn.Module:
        raise NotImplementedError

    def kind_for(self, role: str, cfg) -> str:
        """The branch kind a layer playing ``role`` gets (a method with one kind: that one)."""
        return self.kinds[0]

    def apply(self, model: nn.Module, cfg) -> list[str]:
        """Fresh modules on every layer whose role is in ``cfg.targets``; returns the layer names."""
        layers = target_modules(model, tuple(cfg.targets), ports=True)  # a MoE FFN: its inner projections
        if not layers:
            raise CpetError(f"{self.name}: no layer of {model.__class__.__name__} plays the roles {list(cfg.targets)}")
        for name in sorted(layers):  # sorted: the random init of each layer as cpet has always drawn it
            kind = self.kind_for(layers[name], cfg)
            attach(model, [name], kind, lambda i, o, k=kind: self.make(i, o, cfg, k))
        return sorted(layers)

    def placed(self, model: nn.Module) -> dict[str, list[str]]:
        """{kind: sorted names of the wrapped layers carrying it} for this method's kinds present."""
        return {kind: names for kind in self.kinds if (names := branch_layers(model, kind))}

    def describe(self, model: nn.Module) -> dict | None:
        """The task-folder entry: {"modules": {kind: [layer names]}, **hyper-parameters}; None if absent."""
        placed = self.placed(model)
        if not placed:
            return None
        first = model.get_submodule(next(iter(placed.values()))[0] + "." + next(iter(placed)))
        return {"modules": placed, **first.hparams()}

    def rebuild(self, model: nn.Module, desc: dict) -> None:
        """Attach empty modules where ``desc`` (``describe``'s entry) says; tensors are loaded after. The
        entry's hyper-parameters are what each module's ``hparams()`` recorded: its Config's fields."""
        cfg = self.Config(**{k: v for k, v in desc.items() if k != "modules"})
        for kind, names in desc["modules"].items():
            if kind not in self.kinds:
                raise CpetError(f"{self.name}: unknown module kind {kind!r} in the task folder (known: {self.kinds})")
            attach(model, names, kind, lambda i, o, k=kind: self.make(i, o, cfg, k))
