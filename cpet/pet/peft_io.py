"""LoRA, IA3 and prompt tuning in the PEFT format: import adapters people already have, export ours for
peft users.

LoRA: PEFT keys look like ``base_model.model.<module path>.lora_A.weight`` (A: (r, in), B: (out, r)) and
the scale is ``lora_alpha / r`` (``/ sqrt(r)`` with rslora). cpet stores the same tensors as
``backbone.<module path>.lora.A`` / ``.B``, so the conversion is renaming.
IA3: ``<module path>.ia3_l``, (out, 1) scaling a layer's output, or (1, in) scaling its input for the
``feedforward_modules``; cpet's ``ia3.l`` / ``ia3_in.l`` hold the same vectors.
Prompt tuning: ``prompt_embeddings`` (tokens, d) is cpet's ``prompt.embeddings``; PEFT picks the model
class that puts them in front from ``task_type`` (FEATURE_EXTRACTION for encoders, CAUSAL_LM,
SEQ_2_SEQ_LM with the prompt on the encoder only: ``num_transformer_submodules: 1``).
Prefix tuning: ``prompt_embeddings`` (tokens, layers * 2 * width) holds per attention layer its key then
its value prefixes (heads x head width), cpet's ``prefix_kv.p`` on each key / value projection; only
``prefix_projection: false`` (no reparameterizing MLP) is read.
Only safetensors files are read: a pickled ``adapter_model.bin`` is refused (never unpickle untrusted files).
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
from safetensors.torch import save

from cpet.layers import attach, task_state_dict
from cpet.compress.moefication import in_experts
from cpet.pet import METHODS, prefix, prompt
from cpet.pet.ia3 import Scale
from cpet.pet.lora import add_lora_to
from cpet.io import atomic_write, atomic_write_json, require_new_folder
from cpet.task_modules import describe, load_into, read_task_folder

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_IA3_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.ia3_l(?:\.[^.]+)?$")
PEFT_TYPES = ("LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING")
EXPORTED = ("lora", "ia3", "prompt", "prefix")  # the methods whose modules a PEFT adapter holds


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


def import_peft(model: nn.Module, adapter_dir: str | os.PathLike) -> list[str]:
    """Attach the PEFT LoRA in ``adapter_dir`` to ``model`` (a TaskModel or a bare backbone).

    Module paths are matched to the backbone's by dropping leading components (so an adapter trained
    on ``BertForSequenceClassification`` -- paths ``bert.encoder...`` -- fits a ``BertModel``).
    Returns the wrapped module names (in ``model``).
    """
    cfg, tensors = read_peft(adapter_dir)
    backbone, prefix = _backbone(model)
    modules = dict(backbone.named_modules())
    if cfg.get("peft_type") in ("PROMPT_TUNING", "PREFIX_TUNING"):
        return _import_tokens(model, cfg, tensors, str(adapter_dir))
    if cfg.get("peft_type", "LORA") == "IA3":
        return _import_ia3(model, backbone, prefix, modules, tensors, adapter_dir)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # alpha/sqrt(r) == (alpha*sqrt(r))/r
    state, names = {}, set()
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            continue  # modules_to_save etc.: cpet's task head is its own
        path = _module_path(m["path"], modules, adapter_dir, backbone)
        names.add(prefix + path)
        state[f"{prefix}{path}.lora.{m['ab']}"] = value.float()
    if not names:
        raise CpetError(f"{adapter_dir}: no LoRA tensors found in adapter_model.safetensors")
    add_lora_to(model, names, LoraConfig(r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0))))
    load_into(model, state, what=str(adapter_dir))
    return sorted(names)


def _module_path(path: str, modules: dict, adapter_dir, backbone) -> str:
    """An adapter's module path matched to the backbone's by dropping leading components."""
    orig = path
    while path not in modules and "." in path:
        path = path.split(".", 1)[1]
    if path not in modules:
        raise CpetError(f"{adapter_dir}: adapter module {orig!r} not found in {type(backbone).__name__}")
    return path


def _import_ia3(model, backbone, prefix, modules, tensors, adapter_dir) -> list[str]:
    state, names = {}, set()
    for key, value in tensors.items():
        m = _IA3_KEY.match(key)
        if m is None:
            continue
        path = _module_path(m["path"], modules, adapter_dir, backbone)
        layer = modules[path]
        if value.shape == (1, layer.in_features) and value.shape != (layer.out_features, 1):
            kind, side, n = "ia3_in", "in", layer.in_features
        elif value.shape == (layer.out_features, 1):
            kind, side, n = "ia3", "out", layer.out_features
        else:
            raise CpetError(f"{adapter_dir}: {key} has shape {tuple(value.shape)}, which fits neither the input "
                            f"({layer.in_features}) nor the output ({layer.out_features}) of {path}")
        attach(model, [prefix + path], kind, lambda i, o, side=side, n=n: Scale(n, side))
        names.add(prefix + path)
        state[f"{prefix}{path}.{kind}.l"] = value.float().flatten()
    if not names:
        raise CpetError(f"{adapter_dir}: no IA3 tensors found in adapter_model.safetensors")
    load_into(model, state, what=str(adapter_dir))
    return sorted(names)


def _import_tokens(model, cfg, tensors, what: str) -> list[str]:
    """A PEFT prompt- or prefix-tuning adapter: its ``prompt_embeddings``, read by the method's own layout."""
    if "prompt_embeddings" not in tensors:
        raise CpetError(f"{what}: no prompt_embeddings in adapter_model.safetensors")
    if cfg["peft_type"] == "PREFIX_TUNING":
        if cfg.get("prefix_projection"):
            raise CpetError(f"{what}: prefix_projection (an MLP reparameterizing the prefixes) is not supported "
                            "by cpet; re-save the adapter's computed prefixes, or train without it")
        return prefix.METHOD.attach_tensors(model, tensors["prompt_embeddings"], what)
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise CpetError(f"{what}: num_transformer_submodules={cfg['num_transformer_submodules']} (prompts on the "
                        "decoder input too); cpet puts virtual tokens on the encoder only")
    return prompt.METHOD.attach_tensors(model, tensors["prompt_embeddings"], what)


def _module_names(entry: dict) -> list[str]:
    """The layer names of a method's task-folder entry (a list, or {kind: [names]})."""
    mods = entry.get("modules", [])
    return list(mods) if isinstance(mods, list) else [n for names in mods.values() for n in names]


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
    """Write a task model's LoRA or IA3 as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads
    onto the uncompressed backbone class (e.g. ``AutoModel``). A model with what PEFT cannot hold
    (recovery modules, other methods' modules, a task head) is refused, naming it, unless ``pet_only``:
    never a silent drop."""
    config = getattr(getattr(model, "backbone", model), "config", None)
    return _export(describe(model), task_state_dict(model), Path(out_dir), base_model_name_or_path, pet_only,
                   "export_peft", config.to_dict() if config is not None else None)


def export_task_folder(task_dir: str | os.PathLike, out_dir: str | os.PathLike, base_model: str | None = None,
                       pet_only: bool = False) -> tuple[Path, str | None]:
    """``cpet export-peft``: a cpet task folder's LoRA or IA3 as a PEFT adapter folder, read from the files
    (no model loaded). Returns (folder, base model it names: by default the model the task was trained on,
    or the source of its compressed backbone). Refuses what PEFT cannot hold unless ``pet_only``, and a
    non-empty output folder."""
    out = require_new_folder(out_dir)
    desc, state = read_task_folder(task_dir)
    if base_model is None:
        bb = desc.get("backbone") or {}
        base_model = bb.get("source") or bb.get("path")
        meta = Path(str(base_model)) / "compression.json" if base_model else None
        if meta is not None and meta.is_file():  # trained on a cpet compressed folder: name its source model
            base_model = json.loads(meta.read_text()).get("source", base_model)
    base_config = None
    if base_model is not None and (Path(str(base_model)) / "config.json").is_file():
        base_config = json.loads((Path(str(base_model)) / "config.json").read_text())
    return _export(desc, state, out, base_model, pet_only, str(task_dir), base_config), base_model


def _export(desc: dict, state: dict[str, torch.Tensor], out: Path, base_model: str | None, pet_only: bool,
            what: str, base_config: dict | None = None) -> Path:
    """A task (its description + tensors, keys as cpet saves them) as a PEFT LoRA, IA3, prompt- or
    prefix-tuning folder (``base_config``: the base model's config, for the task type prompts need and
    the head width of prefixes)."""
    seq2seq = bool((base_config or {}).get("is_encoder_decoder"))
    present = [m for m in EXPORTED if m in desc]
    if not present:
        raise CpetError(f"{what}: no LoRA, IA3, prompt- or prefix-tuning modules to export (PEFT's types cpet writes)")
    if len(present) > 1:
        raise CpetError(f"{what}: {' and '.join(present)} modules; a PEFT adapter is one type")
    inner = [n for m in present for n in _module_names(desc[m]) if in_experts(n)]
    if inner:
        raise CpetError(f"{what}: its PET sits inside a MoE FFN's experts ({inner[0]}), which no PEFT adapter of the "
                        "dense model represents; export a task trained on a backbone without MoEfication")
    lost = _lost(desc)
    if lost and not pet_only:
        raise CpetError(f"{what}: a PEFT adapter cannot hold {' and '.join(lost)}, so exporting would drop "
                        "them and the adapter would not compute this task. Export the PET modules alone on purpose "
                        "with pet_only=True (cpet export-peft --pet-only), or serve the task folder with cpet")
    strip = lambda n: n[len("backbone."):] if n.startswith("backbone.") else n  # noqa: E731
    task_type = None
    if "prompt" in desc or "prefix" in desc:
        task_type = "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM" if desc.get("head") == "lm" else "FEATURE_EXTRACTION"
    if "prefix" in desc:
        if base_config is None:
            raise CpetError(f"{what}: writing prefixes needs the base model's config (its head width); name the "
                            "base model (--base-model)")
        layers = len(desc["prefix"]["modules"]["prefix_kv"]) // 2  # a key and a value projection each
        flat = prefix.peft_prefixes(desc["prefix"], state, what)
        width = flat.shape[1] // (2 * layers)
        tensors = {"prompt_embeddings": flat}
        config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": flat.shape[0], "token_dim": width,
                  "num_layers": layers, "num_attention_heads": width // prefix.head_dim(base_config),
                  "encoder_hidden_size": width, "prefix_projection": False, "num_transformer_submodules": 1}
    elif "prompt" in desc:
        emb = state["prompt.embeddings"]
        tensors = {"prompt_embeddings": emb.contiguous()}
        config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": emb.shape[0], "token_dim": emb.shape[1],
                  "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM"}
    elif "ia3" in desc:
        vectors = {strip(n): (state[f"{n}.{kind}.l"], kind == "ia3_in")
                   for kind, names in desc["ia3"]["modules"].items() for n in names}
        tensors = {f"base_model.model.{n}.ia3_l": (l[None, :] if inp else l[:, None]).contiguous()
                   for n, (l, inp) in vectors.items()}
        config = {"peft_type": "IA3", "target_modules": sorted(vectors),
                  "feedforward_modules": sorted(n for n, (_, inp) in vectors.items() if inp), "init_ia3_weights": True}
    else:
        d = desc["lora"]
        tensors = {}
        for n in d["modules"]:
            tensors[f"base_model.model.{strip(n)}.lora_A.weight"] = state[f"{n}.lora.A"].contiguous()
            tensors[f"base_model.model.{strip(n)}.lora_B.weight"] = state[f"{n}.lora.B"].contiguous()
        config = {"peft_type": "LORA", "r": d["r"], "lora_alpha": d["alpha"], "lora_dropout": d.get("dropout", 0.0),
                  "target_modules": sorted(strip(n) for n in d["modules"]), "bias": "none", "init_lora_weights": True}
    if task_type is None:
        config.update(fan_in_fan_out=False, modules_to_save=None)
    config.update(task_type=task_type, inference_mode=True, base_model_name_or_path=base_model)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter_model.safetensors", save(tensors))
    atomic_write_json(out / "adapter_config.json", config)
    return out
