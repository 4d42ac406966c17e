"""PEFT adapter folders in and out: import adapters people already have, export ours for peft users.

This module does the folder (``adapter_config.json`` + ``adapter_model.safetensors``), the checks, and what
no method can carry; each method with a PEFT type (``PetMethod.peft_type``: LoRA, IA3, prompt and prefix
tuning) reads and writes its own tensors (``peft_import`` / ``peft_export``). Only safetensors files are
read: a pickled ``adapter_model.bin`` is refused (never unpickle untrusted files). Nothing is dropped
silently: an adapter holding more than its method's tensors (PEFT's ``modules_to_save``: a trained
classifier or LM head, embeddings) is refused on import, and a task with what PEFT cannot hold (recovery
modules, a task head, other methods' modules) on export, unless the caller asks for the PET modules alone.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save

from cpet.compress.moefication import in_experts
from cpet.errors import CpetError
from cpet.io import atomic_write, atomic_write_json, require_new_folder
from cpet.layers import Adapted, task_state_dict
from cpet.models import ARCHITECTURES
from cpet.pet import METHODS
from cpet.task_modules import describe, load_into, read_task_folder

PEFT_TYPES = tuple(m.peft_type for m in METHODS.values() if m.peft_type)
EXPORTED = tuple(m.name for m in METHODS.values() if m.peft_type)  # the methods whose modules a PEFT adapter holds


def _by_peft_type(peft_type: str):
    return next(m for m in METHODS.values() if m.peft_type == peft_type)


def read_peft(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, {peft key: tensor}) with checks for what cpet cannot represent."""
    d = Path(adapter_dir)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise CpetError(f"{d} is not a PEFT adapter folder (no adapter_config.json)")
    cfg = json.loads(cfg_path.read_text())
    if not (d / "adapter_model.safetensors").is_file():
        hint = " (only a pickled adapter_model.bin is there; re-save it with safe_serialization=True)" \
            if (d / "adapter_model.bin").is_file() else ""
        raise CpetError(f"{d}: no adapter_model.safetensors{hint}")
    if cfg.get("peft_type", "LORA") not in PEFT_TYPES:
        raise CpetError(f"{d}: peft_type {cfg.get('peft_type')} is not one cpet reads ({', '.join(PEFT_TYPES)})")
    for key, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out layers")):
        if cfg.get(key):
            raise CpetError(f"{d}: {why} adapters are not supported by cpet yet")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CpetError(f"{d}: per-module rank_pattern / alpha_pattern are not supported by cpet yet")
    if cfg.get("bias", "none") != "none":
        raise CpetError(f"{d}: bias={cfg['bias']!r} adapters are not supported (only bias='none')")
    return cfg, load_file(str(d / "adapter_model.safetensors"))


def import_peft(model: nn.Module, adapter_dir: str | os.PathLike, pet_only: bool = False) -> list[str]:
    """Attach the PEFT adapter in ``adapter_dir`` (LoRA, IA3, prompt or prefix tuning) to ``model`` (a
    TaskModel or a bare backbone); returns the wrapped module names (in ``model``). Module paths are
    matched to the backbone's by dropping leading components (an adapter trained on
    ``BertForSequenceClassification``, paths ``bert.encoder...``, fits a ``BertModel``). An adapter that
    also holds other tensors (``modules_to_save``: a trained head or embeddings) is refused, naming them,
    unless ``pet_only``: without them the model would not compute what the adapter's model did."""
    cfg, tensors = read_peft(adapter_dir)
    what = str(adapter_dir)
    method = _by_peft_type(cfg.get("peft_type", "LORA"))
    if cfg.get("modules_to_save") and not pet_only:  # refused before anything is attached
        raise CpetError(_extra_message(what, sorted(cfg["modules_to_save"]), "PEFT's modules_to_save: a trained head "
                                                                              "or embeddings"))
    extra = sorted(k for k in tensors if not method.peft_reads(k))
    if extra and not pet_only:
        raise CpetError(_extra_message(what, extra, f"tensors cpet's {method.name} does not read: modules_to_save, "
                                                    f"or a part of {method.name} cpet does not have, e.g. on embeddings"))
    names, state = method.peft_import(model, cfg, tensors, what)
    if state:
        load_into(model, state, what=what)
    return names


def _extra_message(what: str, extra: list[str], kind: str) -> str:
    shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
    return (f"{what}: the adapter also holds {shown} ({kind}); importing would drop them and the model would not "
            "compute what the adapter's model did. Import the rest alone on purpose with pet_only=True "
            "(cpet import-peft --pet-only)")


def _shrunk(method, entry: dict, pruned: dict[str, set[str]]) -> str | None:
    """The first layer whose PET tensors run along a side structured pruning shrank (by the branch module's
    ``AXES``), or None."""
    for kind, names in method.by_kind(entry).items():
        if not any(pruned.get(n) for n in names):
            continue
        axes = getattr(method.make(8, 8, method.Config(), kind), "AXES", {})  # the module's sides, whatever its size
        for n in names:
            if {side for side, _ in axes.values()} & pruned.get(n, set()):
                return n
    return None


def _lost(desc: dict) -> list[str]:
    """What a PEFT adapter cannot carry of a task (its task-folder description): recovery modules, modules
    of methods PEFT has no type for, and the task head (cpet's head pools the encoder's states its own
    way; no HF class's head, hence no ``modules_to_save``, computes the same function)."""
    lost = []
    if "recovery" in desc:
        lost.append(f"the recovery modules on {len(desc['recovery']['modules'])} layers")
    lost += [f"the {m.name} modules" for m in METHODS.values() if m.peft_type is None and m.name in desc]
    if desc.get("head", "classify") != "lm":
        lost.append(f"the task head ({desc.get('head', 'classify')}, {desc.get('num_labels', '?')} outputs)")
    return lost


def export_peft(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None,
                pet_only: bool = False) -> Path:
    """Write a task model's PET modules (LoRA, IA3, prompt or prefix tuning) as a PEFT adapter folder that
    ``PeftModel.from_pretrained`` loads onto the uncompressed backbone class (e.g. ``AutoModel``). A model
    with what PEFT cannot hold (recovery modules, other methods' modules, a task head) is refused, naming
    it, unless ``pet_only``: never a silent drop. PET on a structurally pruned backbone is refused: its
    tensors have the pruned widths, which no adapter of the dense model fits."""
    config = getattr(getattr(model, "backbone", model), "config", None)
    pruned = {name: {side for side in ("in", "out") if hasattr(m.base, f"kept_{side}")}
              for name, m in model.named_modules() if isinstance(m, Adapted)}
    return _export(describe(model), task_state_dict(model), Path(out_dir), base_model_name_or_path, pet_only,
                   "export_peft", config.to_dict() if config is not None else None, pruned)


def export_task_folder(task_dir: str | os.PathLike, out_dir: str | os.PathLike, base_model: str | None = None,
                       pet_only: bool = False) -> tuple[Path, str | None]:
    """``cpet export-peft``: a cpet task folder's PET modules as a PEFT adapter folder, read from the files
    (no model loaded). Returns (folder, base model it names: by default the model the task was trained on,
    or the source of its compressed backbone). Refuses what PEFT cannot hold unless ``pet_only``, a task
    trained on a structurally pruned backbone, and a non-empty output folder."""
    out = require_new_folder(out_dir)
    desc, state = read_task_folder(task_dir)
    bb = desc.get("backbone") or {}
    if base_model is None:
        base_model = bb.get("source") or bb.get("path")
        meta = Path(str(base_model)) / "compression.json" if base_model else None
        if meta is not None and meta.is_file():  # trained on a cpet compressed folder: name its source model
            base_model = json.loads(meta.read_text()).get("source", base_model)
    base_config = None
    if base_model is not None and (Path(str(base_model)) / "config.json").is_file():
        base_config = json.loads((Path(str(base_model)) / "config.json").read_text())
    pruned = _pruned_sides(bb.get("plan") or [], [n for m in EXPORTED if m in desc for n in METHODS[m].layers_of(desc[m])])
    return _export(desc, state, out, base_model, pet_only, str(task_dir), base_config, pruned), base_model


def _pruned_sides(plan: list, names: list[str]) -> dict[str, set[str]]:
    """{layer: the sides ("in" / "out") a structured step of ``plan`` shrank} for the named layers, read from
    the plan and the layers' roles: heads shrink q / k / v outputs and o's input, FFN neurons ffn_in's output and
    ffn_out's input."""
    steps = [st for st in plan if isinstance(st, dict) and st.get("method") == "structured"]
    sides: dict[str, set[str]] = {}
    for st in steps:
        cut = ({"q": "out", "k": "out", "v": "out", "o": "in"} if st.get("heads", 0.0) > 0 else {}) | \
              ({"ffn_in": "out", "ffn_out": "in"} if st.get("ffn", 0.5) > 0 else {})
        for n in names:
            role = next((r for a in ARCHITECTURES.values() for r, pat in a.roles.items() if re.search(pat, n)), None)
            if role in cut:
                sides.setdefault(n, set()).add(cut[role])
    return sides


def _export(desc: dict, state: dict[str, torch.Tensor], out: Path, base_model: str | None, pet_only: bool,
            what: str, base_config: dict | None = None, pruned: dict[str, set[str]] | None = None) -> Path:
    """A task (its description + tensors, keys as cpet saves them) as the PEFT folder of its one method with
    a PEFT type (``base_config``: the base model's config, for the task type prompts need and the head
    width of prefixes; ``pruned``: {layer: sides structured pruning shrank})."""
    present = [m for m in EXPORTED if m in desc]
    if not present:
        raise CpetError(f"{what}: no {', '.join(EXPORTED)} modules to export (the methods PEFT has a type for)")
    if len(present) > 1:
        raise CpetError(f"{what}: {' and '.join(present)} modules; a PEFT adapter is one type")
    shrunk = _shrunk(METHODS[present[0]], desc[present[0]], pruned or {})
    if shrunk:
        raise CpetError(f"{what}: its {present[0]} modules on {shrunk} (and any others) were trained on a structurally "
                        "pruned layer and have its pruned width, which no PEFT adapter of the dense model fits; export "
                        "the task trained on the uncompressed model (base+PET), or one on a backbone without structured "
                        "pruning of the layers its PET sits on")
    inner = [n for m in present for n in METHODS[m].layers_of(desc[m]) if in_experts(n)]
    if inner:
        raise CpetError(f"{what}: its PET sits inside a MoE FFN's experts ({inner[0]}), which no PEFT adapter of the "
                        "dense model represents; export a task trained on a backbone without MoEfication")
    lost = _lost(desc)
    if lost and not pet_only:
        raise CpetError(f"{what}: a PEFT adapter cannot hold {' and '.join(lost)}, so exporting would drop "
                        "them and the adapter would not compute this task. Export the PET modules alone on purpose "
                        "with pet_only=True (cpet export-peft --pet-only), or serve the task folder with cpet")
    method = METHODS[present[0]]
    tensors, config = method.peft_export(desc, state, base_config, what)
    config = {"peft_type": method.peft_type, **config}
    if "task_type" not in config:
        config.update(fan_in_fan_out=False, modules_to_save=None, task_type=None)
    config.update(inference_mode=True, base_model_name_or_path=base_model)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter_model.safetensors", save(tensors))
    atomic_write_json(out / "adapter_config.json", config)
    return out
