"""Task-agnostic compression of a backbone: an ordered plan of methods, each one file.

A plan is a list of ``{"method": NAME, **fields}``; ``compress(model, plan)`` applies them in order,
in place. The compressed backbone saves once (safetensors + its plan) and serves every task.
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn as nn

from cpet.compress import int8, moefication, structured, unstructured
from cpet.errors import CpetError
from cpet.compress.calibration import make_calibration
from cpet.fingerprint import FORMAT as FINGERPRINT_FORMAT
from cpet.fingerprint import digest, tensor_digest
from cpet.io import atomic_write, atomic_write_json, load_safetensors, read_json

# name -> the method's module: Config, apply(model, cfg, calib) and skeleton(model, cfg, saved_state)
METHODS = {
    "int8": int8,
    "unstructured": unstructured,
    "structured": structured,
    "moefication": moefication,
}


# The paper's method names (Table 1); "Q+UP+M" style strings concatenate them in the order written.
PRESETS = {
    "Q": [{"method": "int8"}],
    "UP": [{"method": "unstructured", "pattern": "2:4"}],
    "SP": [{"method": "structured", "ffn": 0.5, "heads": 0.5}],
    "M": [{"method": "moefication", "experts": 16, "top": 0.25}],
}


def resolve_plan(plan) -> list[dict]:
    """A list of steps as is; a preset string such as ``"UP+Q"`` -> its steps."""
    if isinstance(plan, dict):
        raise CpetError("compress: expected a list of steps like [{method: unstructured, sparsity: 0.5}, {method: int8}]")
    if isinstance(plan, str):
        steps = []
        for token in plan.split("+"):
            if token.strip() not in PRESETS:
                raise CpetError(f"compress plan {plan!r}: unknown preset {token.strip()!r}; presets: "
                                f"{sorted(PRESETS)} joined by '+', or a list of steps")
            steps += PRESETS[token.strip()]
        return [dict(s) for s in steps]
    return list(plan)


def parse_plan(plan) -> list[tuple[str, object]]:
    """Validate a plan -> [(method name, its Config)]; unknown methods/fields are clear errors."""
    plan = resolve_plan(plan)
    steps = []
    for i, step in enumerate(plan):
        if not isinstance(step, dict) or "method" not in step:
            raise CpetError(f"compress[{i}]: each step needs a 'method' key, got {step!r}")
        args = dict(step)
        name = args.pop("method")
        if name not in METHODS:
            raise CpetError(f"compress[{i}]: unknown method {name!r}; available: {sorted(METHODS)}")
        cfg_cls = METHODS[name].Config
        valid = {f.name for f in fields(cfg_cls)}
        bad = sorted(set(args) - valid)
        if bad:
            raise CpetError(f"compress[{i}] ({name}): unknown field {bad[0]!r}; valid: {sorted(valid)}")
        try:
            steps.append((name, cfg_cls(**args)))
        except CpetError as e:
            raise CpetError(f"compress[{i}] ({name}): {e}") from None
    return steps


def plan_to_json(plan) -> list[dict]:
    return [{"method": name, **asdict(cfg)} for name, cfg in parse_plan(plan)]


def needs_calibration(plan) -> bool:
    return any(getattr(cfg, "calibrated", False) for _, cfg in parse_plan(plan))


def compression_inputs(source_digest: str, plan, tokenizer, lm: bool = False, data_dir: str | None = None):
    """(record, calibration) for compressing a backbone: the record of everything the compressed weights
    depend on (source weights, resolved plan, the LM head kept or not, the calibration windows) that
    ``save_compressed`` stores as the folder's fingerprint, and the calibration the plan reads (None if
    it reads none), made once for both."""
    calib = make_calibration(tokenizer, data_dir=data_dir) if needs_calibration(plan) else None
    record = {"format": FINGERPRINT_FORMAT, "source": source_digest, "plan": plan_to_json(plan), "lm": lm,
              "calibration": None if calib is None else tensor_digest(calib.input_ids)}
    return record, calib


def compress(model: nn.Module, plan, calibration=None, tokenizer=None, data_dir: str | None = None) -> nn.Module:
    """Apply each step of ``plan`` to ``model`` in place (the backbone, not a TaskModel).

    Data-dependent steps (Wanda, activation-scored structured pruning) read ``calibration``; if it is
    not given it is made from ``tokenizer`` and the default task-agnostic text.
    """
    steps = parse_plan(plan)
    if calibration is None and needs_calibration(plan):
        if tokenizer is None:
            raise CpetError("this plan needs calibration text: pass tokenizer= (or calibration=) to compress")
        calibration = make_calibration(tokenizer, data_dir=data_dir)
    for name, cfg in steps:
        model = METHODS[name].apply(model, cfg, calibration)
    model.eval()
    return model


FORMAT = "cpet-compressed-v1"
SPARSE_MIN = 0.4  # a weight (>= 2-D) with at least this fraction of zeros is stored as values + bitmask


def pack_sparse(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(non-zero values in row-major order, bitmask packed 8 per uint8) of a tensor."""
    mask = (t != 0).flatten()
    bits = torch.nn.functional.pad(mask, (0, (-mask.numel()) % 8)).view(-1, 8).to(torch.uint8)
    packed = (bits << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)
    return t.flatten()[mask].contiguous(), packed


def unpack_sparse(values: torch.Tensor, packed: torch.Tensor, shape) -> torch.Tensor:
    n = int(torch.tensor(shape).prod())
    mask = ((packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[:n].bool()
    out = torch.zeros(n, dtype=values.dtype)
    out[mask] = values
    return out.view(*shape)


def save_compressed(model: nn.Module, tokenizer, out_dir: str | os.PathLike, plan, source: str,
                    fingerprint: dict | None = None) -> Path:
    """Backbone weights as safetensors (int8 as int8; weights that are >= 40% zeros as non-zero values +
    a bitmask) + HF config + tokenizer + compression.json (written last: a folder without it is
    incomplete, so an old one is removed first and a crash never leaves a mislabelled folder).
    ``fingerprint``: the record of what produced it (source digest, plan, calibration digest)."""
    from safetensors.torch import save

    out = Path(out_dir)
    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compression.json").unlink(missing_ok=True)
    state, aliases, seen, sparse = {}, {}, {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.dtype)
        if v.numel() and key in seen:  # tied tensors (e.g. T5's shared embedding) are stored once
            aliases[k] = seen[key]
            continue
        seen[key] = k
        if v.ndim >= 2 and v.numel() >= 1024 and (v == 0).float().mean().item() >= SPARSE_MIN:
            values, bits = pack_sparse(v)
            state[f"{k}.__nz_values"], state[f"{k}.__nz_mask"] = values, bits
            sparse[k] = list(v.shape)
            continue
        state[k] = v.contiguous()
    atomic_write(out / "model.safetensors", save(state, metadata={"format": FORMAT}))
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    meta = {"plan": plan_to_json(plan), "source": source, "format": FORMAT, "aliases": aliases,
            "sparse": sparse, "model_class": type(model).__name__,
            **({"fingerprint": {"hash": digest(fingerprint), "inputs": fingerprint}} if fingerprint else {})}
    atomic_write_json(out / "compression.json", meta)
    return out


def check_output_dir(out: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    """Refuse to write a compressed backbone where it would destroy something: the source model's own
    folder (or a folder inside it or holding it), a file, or a folder holding files that are not a cpet
    compressed backbone. An earlier cpet compressed backbone may be replaced (that is what -o asks)."""
    o = Path(out).resolve()
    if o.exists() and not o.is_dir():
        raise CpetError(f"{out} is a file; pass a folder for the compressed backbone (-o DIR)")
    if source is not None and Path(source).exists():
        src = Path(source).resolve()
        if o == src or src in o.parents or o in src.parents:
            raise CpetError(f"-o {out} would write into the source model's folder {src} (its weights would be "
                            "overwritten); pick a folder outside it")
    if o.is_dir() and any(o.iterdir()) and not (o / "compression.json").is_file() and not written_by_cpet(o):
        raise CpetError(f"{out} is not empty and is not a cpet compressed backbone (it would be overwritten); "
                        "pick an empty or new folder")


def written_by_cpet(folder: Path) -> bool:
    """A folder whose model.safetensors cpet wrote (its header says so), e.g. one a crash left unfinished."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - missing or unreadable: not ours
        return False


def load_compressed(path: str | os.PathLike):
    """Rebuild the architecture, re-create the compressed layer types, load the exact saved tensors."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

    p = Path(path)
    if not (p / "compression.json").is_file():
        raise CpetError(f"{p} is not a cpet compressed backbone (no compression.json); make one with cpet compress")
    fix = f"the folder is damaged: compress again with cpet compress (into {p} or another folder)"
    meta = read_json(p / "compression.json", "compressed backbone record", fix)
    if not isinstance(meta, dict) or "plan" not in meta:
        raise CpetError(f"{p / 'compression.json'} is not a cpet compression record (no plan); {fix}")
    config = AutoConfig.from_pretrained(p)
    with torch.device("cpu"):
        cls_name = meta.get("model_class")
        if cls_name and cls_name.endswith(("ForCausalLM", "ForConditionalGeneration")):  # text-to-text LMs
            import transformers

            model = getattr(transformers, cls_name)(config)
        else:
            model = T5EncoderModel(config) if config.model_type in ("t5", "mt5") else AutoModel.from_config(config)
    state = load_safetensors(p / "model.safetensors", "compressed backbone weights", fix)
    for k, shape in meta.get("sparse", {}).items():
        state[k] = unpack_sparse(state.pop(f"{k}.__nz_values"), state.pop(f"{k}.__nz_mask"), shape)
    for alias, name in meta.get("aliases", {}).items():
        state[alias] = state[name]
    for name, cfg in parse_plan(meta["plan"]):  # layer types and shapes; the values are loaded below
        model = METHODS[name].skeleton(model, cfg, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise CpetError(f"{p}: saved tensors do not fit the plan (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(p) if (p / "tokenizer_config.json").is_file() else None
    return model, tokenizer, meta
