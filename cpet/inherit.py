"""PET knowledge inheritance (CPET section 3.3): start the compressed model's PET from the teacher's.

    theta_P(C) <- theta_P(M)         (matched by parameter name; the head comes along)

Compression that keeps shapes (int8, unstructured pruning) keeps every name and shape, so this is
a copy. After structured pruning the student's layers record which original rows/columns they kept
(``kept_out`` / ``kept_in``), and each teacher tensor is sliced to them along the dimensions its
branch module declares (``AXES``: which side of the layer a dimension runs along), e.g. for LoRA

    A (r, in)  -> A[:, kept_in]        B (out, r) -> B[kept_out, :]

which is exactly the teacher's update restricted to the surviving neurons / heads; the same rule moves
IA3's vectors, BitFit's biases and adapters. Recovery modules are not inherited: the teacher has none.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cpet.compress.moefication import MoEFFN, port_sources
from cpet.errors import CpetError
from cpet.layers import kind_of, task_state_dict
from cpet.pet import PET_KINDS


def inherit(student: nn.Module, teacher: nn.Module | dict[str, torch.Tensor],
            kinds: tuple[str, ...] = (*PET_KINDS, "head")) -> list[str]:
    """Copy the teacher's ``kinds`` tensors into the student; returns the copied names.

    Every teacher tensor of those kinds must exist in the student with the same shape and every
    student tensor of those kinds must be covered, else a CpetError names the first mismatch.
    """
    src = task_state_dict(teacher, kinds) if isinstance(teacher, nn.Module) else \
        {k: v for k, v in teacher.items() if kind_of(k) in kinds}
    own = {n: p for n, p in student.named_parameters() if kind_of(n) in kinds}
    to_teacher = _port_names(student)  # a MoE FFN's ports take the PET of the dense FFN's linears
    names = {_renamed(n, to_teacher): n for n in own}  # teacher name -> student name
    dst = {t: own[n] for t, n in names.items()}
    if not src:
        raise CpetError("inherit: the teacher has no PET or head tensors to inherit")
    missing_in_student = sorted(set(src) - set(dst))
    if missing_in_student:
        moe = any(getattr(m, "roles", None) for m in student.modules())
        raise CpetError(f"inherit: teacher tensor {missing_in_student[0]!r} has no counterpart in the student "
                        f"({len(missing_in_student)} in all); " + (
                            "the student's FFNs are MoE modules (MoEfication): its PET must target the same "
                            "roles (on a MoE, PET sits on the experts' inner projections)"
                            if moe else "add the same PET targets to both"))
    missing_in_teacher = sorted(set(dst) - set(src))
    if missing_in_teacher:
        raise CpetError(f"inherit: student tensor {missing_in_teacher[0]!r} is missing from the teacher "
                        f"({len(missing_in_teacher)} in all)")
    src = {name: _slice_to_student(student, names[name], value) for name, value in src.items()}
    for name, value in src.items():
        if value.shape != dst[name].shape:
            raise CpetError(f"inherit: {name} is {tuple(value.shape)} in the teacher but {tuple(dst[name].shape)} "
                            "in the student (shape-changing compression needs sliced inheritance)")
    with torch.no_grad():
        for name, value in src.items():
            dst[name].copy_(value)
    return sorted(names[n] for n in src)


def _port_names(student: nn.Module) -> dict[str, str]:
    """Each MoE FFN port of the student -> the dense FFN linear whose PET it takes (same shapes, same
    neuron order)."""
    model_type = getattr(getattr(getattr(student, "backbone", student), "config", None), "model_type", "")
    out = {}
    for name, mod in student.named_modules():
        if isinstance(mod, MoEFFN):
            block = name[: -len(".base")] if name.endswith(".base") else name  # wrapped by recovery: its place
            ins, last = port_sources(model_type, block, len(mod.in_ports))
            out.update({f"{name}.in_ports.{i}": src for i, src in enumerate(ins)})
            out[f"{name}.out_port"] = last
    return out


def onto_student(student: nn.Module, entry):
    """A teacher's task-folder entry (layer names inside lists / mappings) with the dense FFN layers a
    student's MoE FFNs replaced renamed to those MoEs' ports (the student has no recovery wrapper yet)."""
    ports = {src: port for port, src in _port_names(student).items()}

    def rename(e):
        if isinstance(e, str):
            return ports.get(e, e)
        if isinstance(e, list):
            return [rename(x) for x in e]
        if isinstance(e, dict):
            return {k: rename(v) for k, v in e.items()}
        return e
    return rename(entry) if ports else entry


def _renamed(name: str, ports: dict[str, str]) -> str:
    for port, src in ports.items():
        if name.startswith(port + "."):
            return src + name[len(port):]
    return name


def _slice_to_student(student: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """Slice a teacher branch tensor by the kept indices of the student's (structurally pruned) base layer,
    along the dimensions its branch module declares in ``AXES``."""
    parts = name.split(".")
    if len(parts) < 3:
        return value
    try:
        branch = student.get_submodule(".".join(parts[:-1]))
    except AttributeError:
        return value
    axis = getattr(branch, "AXES", {}).get(parts[-1])
    if axis is None:
        return value
    side, dim = axis
    base = getattr(student.get_submodule(".".join(parts[:-2])), "base", None)
    kept, size = (getattr(base, "kept_in", None), getattr(base, "in_features", None)) if side == "in" else \
        (getattr(base, "kept_out", None), getattr(base, "out_features", None))
    if kept is not None and value.shape[dim] != size:
        return value.index_select(dim, torch.as_tensor(kept).to(value.device))
    return value
