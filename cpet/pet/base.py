"""What a PET method is to cpet (the registry in ``cpet.pet`` holds one of these per method).

A method adds branch modules to wrapped layers (``cpet.layers.Adapted``), under kinds it registers
with their stage (``register_kind``). Each branch module class declares ``AXES``: for each of its
parameters, which of its layer's sides a dimension runs along (``("in", d)`` or ``("out", d)``), so
inheritance after structured pruning slices a teacher's tensor to the student's kept rows / columns
without knowing the method (``cpet.inherit``). A method's task-folder entry (``describe`` /
``rebuild``) says where its modules sit and their hyper-parameters. A method PEFT has a type for reads and
writes that type's tensors (``peft_import`` / ``peft_export``; ``cpet.pet.peft_io`` does the folder, the
checks and what no method can carry); one the bank fuses gives its low-rank pairs (``low_rank_pairs``).
"""

from __future__ import annotations

import torch
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

    def by_kind(self, entry: dict) -> dict[str, list[str]]:
        """{kind: layer names} of a task-folder entry (``describe``'s: {"modules": {kind: [names]}}, or a list for a
        method whose format keeps one kind)."""
        mods = entry.get("modules", [])
        return {self.kinds[0]: list(mods)} if isinstance(mods, list) else {k: list(v) for k, v in mods.items()}

    def layers_of(self, entry: dict) -> list[str]:
        """Every layer name a task-folder entry puts this method's modules on."""
        return [n for names in self.by_kind(entry).values() for n in names]

    # ------------------------------------------------------------ PEFT interop (methods with a peft_type)
    def peft_reads(self, key: str) -> bool:
        """Whether a tensor of a PEFT adapter of this type is one of this method's (``peft_io`` refuses an
        adapter holding others before anything is attached)."""
        return False

    def peft_import(self, model: nn.Module, cfg: dict, tensors: dict[str, torch.Tensor],
                    what: str) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Attach this method's modules from a PEFT adapter (its ``adapter_config.json`` as a dict and its
        tensors): (wrapped layer names, {model parameter name: tensor} still to load)."""
        raise CpetError(f"{self.name}: PEFT has no adapter type for it")

    def peft_export(self, desc: dict, state: dict[str, torch.Tensor], base_config: dict | None,
                    what: str) -> tuple[dict[str, torch.Tensor], dict]:
        """A task's modules of this method (the task's description, its entry under ``desc[self.name]``, and
        tensors, keys as cpet saves them; ``base_config``: the base model's config as a dict, or None) as PEFT
        stores them: (tensors, ``adapter_config.json`` fields of the type; ``peft_io`` adds the common ones)."""
        raise CpetError(f"{self.name}: PEFT has no adapter type for it")

    def low_rank_pairs(self, entry: dict, state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer name: (down (r, in), up (out, r) with the scale folded in)} of a fusable method's branches."""
        raise CpetError(f"{self.name}: not a low-rank additive branch (fusable is False)")


def backbone_of(model: nn.Module) -> tuple[nn.Module, str]:
    """(the backbone, the prefix of its parameter names in ``model``): a task model's, or the model itself."""
    return (model.backbone, "backbone.") if hasattr(model, "backbone") and hasattr(model, "head") else (model, "")


def peft_module_path(path: str, modules: dict, what: str, backbone: nn.Module) -> str:
    """An adapter's module path matched to the backbone's by dropping leading components (an adapter trained
    on ``BertForSequenceClassification``, paths ``bert.encoder...``, fits a ``BertModel``)."""
    orig = path
    while path not in modules and "." in path:
        path = path.split(".", 1)[1]
    if path not in modules:
        raise CpetError(f"{what}: adapter module {orig!r} not found in {type(backbone).__name__}")
    return path


def peft_layers(model: nn.Module, tensors: dict[str, torch.Tensor], pattern, what: str):
    """(tensor, key's match, layer name in ``model``, layer) for each adapter tensor whose key ``pattern`` (a
    compiled regex with a ``path`` group) matches, the module path matched to the backbone's."""
    backbone, prefix = backbone_of(model)
    modules = dict(backbone.named_modules())
    for key, value in tensors.items():
        m = pattern.match(key)
        if m is not None:
            path = peft_module_path(m["path"], modules, what, backbone)
            yield value, m, prefix + path, modules[path]


def peft_name(name: str) -> str:
    """A cpet layer name as PEFT's module path under the base model (the task model's ``backbone.`` off)."""
    return name[len("backbone."):] if name.startswith("backbone.") else name
