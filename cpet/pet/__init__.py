"""The PET methods cpet tunes, one module each (a ``PetMethod`` in ``METHOD``): LoRA, IA3, BitFit, serial and parallel
bottleneck adapters, prompt and prefix tuning. Nothing outside this package names a method: task folders, inheritance and
training go through ``METHODS`` and the branch kinds the methods register (``cpet.layers``)."""

from __future__ import annotations

from cpet.errors import CpetError
from cpet.pet import adapter, bitfit, ia3, lora, prefix, prompt
from cpet.pet.base import PetMethod

METHODS: dict[str, PetMethod] = {m.name: m for m in (lora.METHOD, ia3.METHOD, bitfit.METHOD, adapter.METHOD,
                                                   adapter.PARALLEL, prompt.METHOD, prefix.METHOD)}
PET_KINDS: tuple[str, ...] = tuple(k for m in METHODS.values() for k in m.kinds)


def get(name: str) -> PetMethod:
    if name not in METHODS:
        raise CpetError(f"unknown PET method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


def method_of(cfg) -> PetMethod:
    """The method a typed PET config belongs to."""
    for m in METHODS.values():
        if isinstance(cfg, m.Config):
            return m
    raise CpetError(f"{type(cfg).__name__} is not the config of a registered PET method")
