"""Move a task onto a compressed backbone with no task data (the zero-data case of CPET, Figure 3).

    task folder (or PEFT LoRA) trained on the uncompressed model M  +  compressed backbone C
      -> the same PET + head inherited onto C (sliced after structured pruning)
       + recovery modules fitted to C's compression error on calibration text (recovery.init=fit)
      -> a cpet task folder for C

No task example is read: what C loses is estimated layer by layer against M on task-agnostic text.
The result serves as is, or is the start of CLM+CPET training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


from cpet.compress import load_compressed
from cpet.compress.calibration import make_calibration
from cpet.config import RecoveryConfig
from cpet.errors import CpetError
from cpet.fingerprint import digest, model_digest
from cpet.inherit import inherit, onto_student
from cpet.io import read_json, require_new_folder
from cpet.models import LMTaskModel, TaskModel, load_backbone, resolve_model_path
from cpet.pet import METHODS, PET_KINDS
from cpet.pet.peft_io import import_peft
from cpet.recovery import apply as add_recovery
from cpet.recovery import fit_recovery
from cpet.task_modules import describe, is_language_model, load_task_modules, save_task_modules
from cpet.tasks import TASKS


def _teacher(task_dir: Path, source: str, lm: bool) -> tuple[TaskModel, dict]:
    """The task on the uncompressed backbone, and the extra fields of its task config (task, labels)."""
    base, _ = load_backbone(source, lm=lm)
    if (task_dir / "adapter_config.json").is_file():  # a PEFT LoRA: text-to-text on a language model
        if not lm:
            raise CpetError(f"{task_dir} is a PEFT adapter; cpet adapts PEFT adapters of language models (an "
                            "encoder task also needs its head: train it with cpet run, or import it as a task)")
        teacher = LMTaskModel(base)
        import_peft(teacher, task_dir)
        return teacher, {"adapted_from_peft": str(task_dir)}
    teacher = load_task_modules(base, task_dir)
    desc = read_json(task_dir / "task_config.json", "task config", "copy the task folder again")
    if "recovery" in desc:
        raise CpetError(f"{task_dir} already has recovery modules: it was trained on a compressed backbone. "
                        "Adapt the task trained on the uncompressed model (base+PET's task folder)")
    return teacher, {k: desc[k] for k in ("task", "labels") if k in desc}


def adapt(task_dir: str | os.PathLike, compressed_dir: str | os.PathLike, out_dir: str | os.PathLike,
          recovery: RecoveryConfig = RecoveryConfig(), max_length: int = 128, data_dir: str | None = None,
          log: Callable[[str], None] = print, task: str | None = None) -> Path:
    """Write a task folder for the compressed backbone in ``compressed_dir`` from the task in ``task_dir``
    (trained on the backbone the compressed one was made from), with no task data; returns its path.
    ``task``: the cpet task it solves (a PEFT adapter does not say; text-to-text prediction needs its
    prompt and verbalizers)."""
    task_dir, out = Path(task_dir), require_new_folder(out_dir)
    if out.resolve() == task_dir.resolve():
        raise CpetError("the output folder is the input task folder; choose a new one")
    if not task_dir.is_dir():
        raise CpetError(f"task folder {task_dir} does not exist")
    student_bb, tokenizer, meta = load_compressed(compressed_dir)
    if tokenizer is None:
        raise CpetError(f"{compressed_dir} has no tokenizer files; compress again with cpet compress")
    lm = is_language_model(student_bb)
    teacher, extra = _teacher(task_dir, meta["source"], lm)
    if task is not None:
        if task not in TASKS:
            raise CpetError(f"unknown task {task!r}; available: {sorted(TASKS)}")
        extra = {**extra, "task": task, "labels": list(TASKS[task].labels)}
    desc = describe(teacher)
    if lm:
        student = LMTaskModel(student_bb)
    else:
        student = TaskModel(student_bb, desc["num_labels"], desc["pooling"], head=desc["head"])
    for name, method in METHODS.items():
        if name in desc:  # (FFN PET of the teacher goes onto the ports of the student's MoE FFNs)
            method.rebuild(student, onto_student(student, desc[name]))
    add_recovery(student, recovery)
    inherit(student, teacher, kinds=(*PET_KINDS, "head") if student.head is not None else PET_KINDS)
    calib = make_calibration(tokenizer, samples=recovery.init_samples, seq_len=max_length, data_dir=data_dir)
    removed = fit_recovery(student, teacher, calib, log=log)
    backbone = _backbone_record(compressed_dir, meta)
    save_task_modules(student, out, extra={**extra, "adapted_from": str(task_dir), "backbone": backbone,
                                           "recovery_fit": {"calibration_windows": len(calib.input_ids),
                                                            "window": max_length,
                                                            "mean_error_removed": round(sum(removed.values()) / max(1, len(removed)), 4)}})
    log(f"adapted task written to {out} (load it on {compressed_dir})")
    return out


def _backbone_record(compressed_dir: str | os.PathLike, meta: dict) -> dict:
    """What a task folder records about the compressed backbone it is for (a bank refuses any other)."""
    return {"path": str(Path(compressed_dir).resolve()), "source": meta["source"], "plan": meta["plan"],
            "fingerprint": (meta.get("fingerprint") or {}).get("hash") or digest(meta.get("fingerprint") or meta)}


def import_peft_task(peft_dir: str | os.PathLike, backbone_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     task: str | None = None, pet_only: bool = False) -> Path:
    """``cpet import-peft``: a PEFT adapter (LoRA, IA3, prompt or prefix tuning) of a language model as a cpet task
    folder on ``backbone_dir`` (a cpet compressed folder, or the uncompressed model), as it is: no recovery
    modules, no fit (``cpet adapt`` adds those). Encoder tasks need cpet's task head, which a PEFT adapter does
    not carry: refused. An adapter with ``modules_to_save`` is refused unless ``pet_only`` (``import_peft``)."""
    out = require_new_folder(out_dir)
    if (Path(backbone_dir) / "compression.json").is_file():
        bb, _, meta = load_compressed(backbone_dir)
        record = _backbone_record(backbone_dir, meta)
    else:
        bb, _ = load_backbone(str(backbone_dir), lm=True)
        record = {"path": str(backbone_dir), "plan": [], "fingerprint": model_digest(resolve_model_path(str(backbone_dir)))}
    if not is_language_model(bb):
        raise CpetError(f"{backbone_dir} is an encoder: its tasks need cpet's task head, which a PEFT adapter does "
                        "not carry. Train the task with cpet run (or cpet adapt a cpet task folder)")
    model = LMTaskModel(bb)
    import_peft(model, peft_dir, pet_only)
    extra = {"imported_from_peft": str(peft_dir), "backbone": record}
    if task is not None:
        if task not in TASKS:
            raise CpetError(f"unknown task {task!r}; available: {sorted(TASKS)}")
        extra.update(task=task, labels=list(TASKS[task].labels))
    return save_task_modules(model, out, extra=extra)
