"""LoRA in the PEFT format: import adapters people already have, export ours for peft users.

PEFT keys look like ``base_model.model.<module path>.lora_A.weight`` (A: (r, in), B: (out, r)) and
the scale is ``lora_alpha / r`` (``/ sqrt(r)`` with rslora). cpet stores the same tensors as
``backbone.<module path>.lora.A`` / ``.B``, so the conversion is renaming. Only safetensors files
are read: a pickled ``adapter_model.bin`` is refused (never unpickle untrusted files).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from cpet.config import LoraConfig
from cpet.errors import CpetError
from cpet.layers import Adapted
from cpet.pet.lora import add_lora_to
from cpet.io import atomic_write, atomic_write_json
from cpet.task_modules import load_into

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _backbone(model: nn.Module) -> tuple[nn.Module, str]:
    return (model.backbone, "backbone.") if hasattr(model, "backbone") and hasattr(model, "head") else (model, "")


def read_peft(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, {peft key: tensor}) with checks for what cpet cannot represent."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise CpetError(f"{d} is not a PEFT adapter folder (no adapter_config.json)")
    cfg = json.loads(cfg_path.read_text())
    if not (d / "adapter_model.safetensors").is_file():
        hint = " (only a pickled adapter_model.bin is there; re-save it with safe_serialization=True)" \
            if (d / "adapter_model.bin").is_file() else ""
        raise CpetError(f"{d}: no adapter_model.safetensors{hint}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CpetError(f"{d}: peft_type {cfg.get('peft_type')} is not LoRA")
    for key, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out layers")):
        if cfg.get(key):
            raise CpetError(f"{d}: {why} adapters are not supported by cpet yet")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CpetError(f"{d}: per-module rank_pattern / alpha_pattern are not supported by cpet yet")
    if cfg.get("bias", "none") != "none":
        raise CpetError(f"{d}: bias={cfg['bias']!r} adapters are not supported (only bias='none')")
    return cfg, load_file(str(d / "adapter_model.safetensors"))


def import_peft(model: nn.Module, adapter_dir: str | os.PathLike) -> list[str]:
    """Attach the PEFT LoRA in ``adapter_dir`` to ``model`` (a TaskModel or a bare backbone).

    Module paths are matched to the backbone's by dropping leading components (so an adapter trained
    on ``BertForSequenceClassification`` -- paths ``bert.encoder...`` -- fits a ``BertModel``).
    Returns the wrapped module names (in ``model``).
    """
    cfg, tensors = read_peft(adapter_dir)
    backbone, prefix = _backbone(model)
    modules = dict(backbone.named_modules())
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # alpha/sqrt(r) == (alpha*sqrt(r))/r
    state, names = {}, set()
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            continue  # modules_to_save etc.: cpet's task head is its own
        path = m["path"]
        while path not in modules and "." in path:
            path = path.split(".", 1)[1]
        if path not in modules:
            raise CpetError(f"{adapter_dir}: adapter module {m['path']!r} not found in {type(backbone).__name__}")
        names.add(prefix + path)
        state[f"{prefix}{path}.lora.{m['ab']}"] = value.float()
    if not names:
        raise CpetError(f"{adapter_dir}: no LoRA tensors found in adapter_model.safetensors")
    add_lora_to(model, names, LoraConfig(r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0))))
    load_into(model, state, what=str(adapter_dir))
    return sorted(names)


def export_peft(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA branches as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads
    onto the uncompressed backbone class (e.g. ``AutoModel``)."""
    from safetensors.torch import save

    backbone, prefix = _backbone(model)
    tensors, targets, ranks, alphas, drops = {}, [], set(), set(), set()
    for name, mod in backbone.named_modules():
        if isinstance(mod, Adapted) and "lora" in mod._modules:
            lo = mod.lora
            tensors[f"base_model.model.{name}.lora_A.weight"] = lo.A.detach().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = lo.B.detach().contiguous()
            targets.append(name)
            ranks.add(lo.r), alphas.add(lo.alpha), drops.add(getattr(lo.dropout, "p", 0.0))
    if not targets:
        raise CpetError("export_peft: the model has no LoRA modules")
    if len(ranks) > 1 or len(alphas) > 1:
        raise CpetError("export_peft: PEFT needs one rank and alpha for all modules")
    config = {
        "peft_type": "LORA", "task_type": None, "r": ranks.pop(), "lora_alpha": alphas.pop(),
        "lora_dropout": drops.pop() if len(drops) == 1 else 0.0, "target_modules": sorted(targets),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path, "init_lora_weights": True,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter_model.safetensors", save(tensors))
    atomic_write_json(out / "adapter_config.json", config)
    return out
