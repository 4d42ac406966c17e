"""A task's own modules (PET + recovery + head): attach to a backbone, save, load.

On disk, one folder per task: ``task_modules.safetensors`` (only lora / recovery / head tensors,
never the backbone) and ``task_config.json`` (which modules sit where, their hyper-parameters, the
task's labels). Both written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from cpet.config import RecoveryConfig
from cpet.errors import CpetError
from cpet.io import atomic_write, atomic_write_json, load_safetensors, read_json
from cpet.layers import branch_layers, task_state_dict
from cpet.models import LMTaskModel, TaskModel
from cpet.pet import METHODS, method_of
from cpet import recovery as recovery_mod

FORMAT = "cpet-task-v1"


def is_language_model(backbone: nn.Module) -> bool:
    """A backbone with its LM head (causal LM, T5ForConditionalGeneration): tasks go text-to-text."""
    get = getattr(backbone, "get_output_embeddings", None)
    return get is not None and get() is not None


def build_task_model(backbone: nn.Module, num_labels: int, pooling: str | None = None,
                     lora=None, recovery: RecoveryConfig | None = None,
                     head: str = "classify", pet=None) -> TaskModel:
    """Backbone + task head (``classify`` or ``span``), plus fresh PET modules (``pet``, or ``lora``: the
    typed config of any registered method, e.g. a LoraConfig) and/or recovery modules on their target
    roles. A language model (with its LM head) gets no task head: it answers text-to-text."""
    model = LMTaskModel(backbone) if is_language_model(backbone) else TaskModel(backbone, num_labels, pooling,
                                                                                 head=head)
    for cfg in (lora, pet):
        if cfg is not None:
            method_of(cfg).apply(model, cfg)
    if recovery is not None:
        recovery_mod.apply(model, recovery)
    return model


def describe(model: TaskModel) -> dict:
    """What the task's modules are and where they sit (enough to rebuild them on a backbone)."""
    desc: dict = {"format": FORMAT, "head": model.head_type}
    if model.head is not None:
        desc.update(num_labels=model.head.out.out_features, pooling=model.head.pooling)
    for name, method in METHODS.items():
        entry = method.describe(model)
        if entry is not None:
            desc[name] = entry
    rec_names = branch_layers(model, "recovery")
    if rec_names:
        b = model.get_submodule(rec_names[0]).recovery
        act = next(k for k, v in recovery_mod.ACTIVATIONS.items() if isinstance(b.act, v))
        desc["recovery"] = {"r": b.D.shape[0], "activation": act, "dropout": getattr(b.dropout, "p", 0.0),
                            "modules": rec_names}
    return desc


def save_task_modules(model: TaskModel, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in task_state_dict(model).items()}
    atomic_write(out / "task_modules.safetensors", save(state))
    atomic_write_json(out / "task_config.json", {**describe(model), **(extra or {})})
    return out


def read_task_folder(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(task config, task tensors) of a saved task folder; a missing, foreign or damaged folder is a
    CpetError naming the file."""
    p = Path(path)
    cfg_path, st_path = p / "task_config.json", p / "task_modules.safetensors"
    if not cfg_path.is_file() or not st_path.is_file():
        raise CpetError(f"{p} is not a cpet task folder (needs task_config.json and task_modules.safetensors)")
    fix = "the task folder is damaged: copy it again, or retrain the task"
    desc = read_json(cfg_path, "task config", fix)
    if not isinstance(desc, dict) or not str(desc.get("format", "")).startswith("cpet-task"):
        raise CpetError(f"{cfg_path} is not a cpet task config (no 'format: cpet-task-v1'); {fix}")
    return desc, load_safetensors(st_path, "task modules", fix)


def load_task_modules(backbone: nn.Module, path: str | os.PathLike) -> TaskModel:
    """Rebuild the saved task's modules on ``backbone`` and load their exact tensors."""
    p = Path(path)
    desc, state = read_task_folder(p)
    head = desc.get("head", "classify")
    if (head == "lm") != is_language_model(backbone):
        raise CpetError(f"{p} was trained {'text-to-text on a language model' if head == 'lm' else 'with a task head'}"
                        f"; load it on a backbone {'with' if head == 'lm' else 'without'} its LM head "
                        f"(model.formulation={'text' if head == 'lm' else 'head'})")
    model = LMTaskModel(backbone) if head == "lm" else TaskModel(backbone, desc["num_labels"], desc["pooling"], head=head)
    if "recovery" in desc:  # first: PET saved inside a wrapped layer (a MoE FFN's ports) is named under it
        d = desc["recovery"]
        cfg = RecoveryConfig(r=d["r"], activation=d["activation"], dropout=d["dropout"])
        recovery_mod.add_recovery_to(model, d["modules"], cfg)
    for name, method in METHODS.items():
        if name in desc:
            method.rebuild(model, desc[name])
    load_into(model, state, what=str(p))
    return model


def load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str = "weights") -> None:
    """Copy task tensors by name into ``model``; every tensor must find a slot of the same shape."""
    params = {n: p for n, p in model.named_parameters()}
    missing = [k for k in state if k not in params]
    if missing:
        raise CpetError(f"{what}: {len(missing)} tensors have no place in the model, e.g. {missing[0]!r}")
    bad = [(k, tuple(v.shape), tuple(params[k].shape)) for k, v in state.items() if v.shape != params[k].shape]
    if bad:
        k, got, want = bad[0]
        raise CpetError(f"{what}: {k} has shape {got} but the model expects {want} "
                        f"({len(bad)} mis-shaped); was it trained on a different backbone or rank?")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
