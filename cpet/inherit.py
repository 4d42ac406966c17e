"""PET knowledge inheritance (CPET section 3.3): start the compressed model's PET from the teacher's.

    theta_P(C) <- theta_P(M)         (matched by parameter name; the head comes along)

Compression that keeps shapes (int8, unstructured pruning) keeps every name and shape, so this is
a copy. Recovery modules are not inherited: the teacher has none; they start as a no-op.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cpet.errors import CpetError
from cpet.layers import kind_of, task_state_dict


def inherit(student: nn.Module, teacher: nn.Module | dict[str, torch.Tensor],
            kinds: tuple[str, ...] = ("lora", "head")) -> list[str]:
    """Copy the teacher's ``kinds`` tensors into the student; returns the copied names.

    Every teacher tensor of those kinds must exist in the student with the same shape and every
    student tensor of those kinds must be covered, else a CpetError names the first mismatch.
    """
    src = task_state_dict(teacher, kinds) if isinstance(teacher, nn.Module) else \
        {k: v for k, v in teacher.items() if kind_of(k) in kinds}
    dst = {n: p for n, p in student.named_parameters() if kind_of(n) in kinds}
    if not src:
        raise CpetError(f"inherit: the teacher has no {'/'.join(kinds)} tensors to inherit")
    missing_in_student = sorted(set(src) - set(dst))
    if missing_in_student:
        raise CpetError(f"inherit: teacher tensor {missing_in_student[0]!r} has no counterpart in the student "
                        f"({len(missing_in_student)} in all); add the same PET targets to both")
    missing_in_teacher = sorted(set(dst) - set(src))
    if missing_in_teacher:
        raise CpetError(f"inherit: student tensor {missing_in_teacher[0]!r} is missing from the teacher "
                        f"({len(missing_in_teacher)} in all)")
    for name, value in src.items():
        if value.shape != dst[name].shape:
            raise CpetError(f"inherit: {name} is {tuple(value.shape)} in the teacher but {tuple(dst[name].shape)} "
                            "in the student (shape-changing compression needs sliced inheritance)")
    with torch.no_grad():
        for name, value in src.items():
            dst[name].copy_(value)
    return sorted(src)
