"""One experiment = the paper's paradigms on one backbone, task and compression plan.

    [1] base+PET : train PET (+head) on the uncompressed backbone M              -> teacher
    [3] CLM+PET  : compress M once -> C (saved); fresh PET on C, task loss only
    [4] CLM+CPET : PET inherited from [1], recovery modules added, trained on
                   task + alpha * MSE(teacher, student)

Each paradigm writes ``<output_dir>/<paradigm>/result.json`` and its task modules; a finished
paradigm is skipped on a rerun and an interrupted one resumes from its checkpoint, so rerunning the
same command continues where it stopped. ``results.md`` is regenerated from the JSON files.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from cpet.compress import compress, load_compressed, plan_to_json, save_compressed
from cpet.config import ExperimentConfig
from cpet.errors import CpetError
from cpet.formats import get_format
from cpet.inherit import inherit
from cpet.io import atomic_write_json
from cpet.models import load_backbone
from cpet.task_modules import build_task_model, load_task_modules, save_task_modules
from cpet.tasks import load_task
from cpet.train import evaluate, train

LABELS = {"base_pet": "base+PET", "clm_pet": "CLM+PET", "clm_cpet": "CLM+CPET"}


def run_experiment(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Run (or continue) every paradigm in ``cfg.paradigms``; returns their result records.

    Under ``accelerate launch`` / ``torchrun`` every process runs this; only the main one logs and
    writes files, the others train their data shard and wait where they need its files.
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    main = state.is_main_process
    if not main:
        log = lambda s: None  # noqa: E731
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        atomic_write_json(out / "config.json", cfg.to_dict())
    data = load_task(cfg.task)
    spec = data.spec
    log(f"task {spec.name}: {len(data.train)} train / {len(data.val)} val (held out of train) / "
        f"{len(data.test)} test ({data.test_set}) from {data.source}")
    common = {"task": spec.name, "backbone": cfg.model.name, "data_source": data.source, "test_set": data.test_set,
              "split_sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)}}
    max_len, tc = cfg.model.max_length, cfg.train
    text = use_text_formulation(cfg)
    head = "span" if spec.format == "span" else "classify"
    fmt_of = lambda model: get_format(spec, model, cfg.task.doc_stride)  # noqa: E731
    common["formulation"] = "text" if text else "head"

    def run_paradigm(paradigm: str, model, teacher=None) -> dict:
        pdir = out / paradigm
        n_params = sum(v.numel() for v in _task_tensors(model))
        log(f"[{LABELS[paradigm]}] training {n_params:,} task parameters" + (" with distillation" if teacher else ""))
        res = train(model, tokenizer, spec, data.train, data.val, tc, max_len, out_dir=pdir,
                    teacher=teacher, distill=cfg.distill if teacher is not None else None, log=log,
                    fmt=fmt_of(model))
        t0 = time.perf_counter()
        test = evaluate(model, tokenizer, spec, data.test, max_len, tc.eval_batch_size, fmt=fmt_of(model))
        eval_s = time.perf_counter() - t0
        mmlu = run_mmlu(model, tokenizer, paradigm) if cfg.mmlu.enabled else None
        if main:
            save_task_modules(model, pdir / "task", extra={"task": spec.name, "labels": list(spec.labels)})
        record = {"paradigm": paradigm, "label": LABELS[paradigm], **common,
                  "plan": plan_to_json(cfg.compress) if paradigm != "base_pet" else [],
                  "test": test, "best_val": res.best_val, "best_epoch": res.best_epoch,
                  "history": res.history, "steps": res.steps, "train_seconds": round(res.train_seconds, 2),
                  "eval_seconds": round(eval_s, 2),
                  "trainable_params": n_params,
                  **({"mmlu": mmlu} if mmlu else {}),
                  "config": {"lora": asdict(cfg.lora), "train": asdict(tc),
                             **({"recovery": asdict(cfg.recovery), "distill": asdict(cfg.distill)}
                                if paradigm == "clm_cpet" else {})}}
        if main:
            atomic_write_json(pdir / "result.json", record)
            shutil.rmtree(pdir / "checkpoint", ignore_errors=True)
        state.wait_for_everyone()
        log(f"[{LABELS[paradigm]}] test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items())
            + f" | train {res.train_seconds:.0f}s, eval {eval_s:.1f}s")
        return record

    def run_mmlu(model, tokenizer, paradigm: str) -> dict:
        from cpet.evals.mmlu import evaluate_mmlu

        if not text:
            raise CpetError("mmlu.enabled needs a language model (model.formulation=text on a decoder LM)")
        m = cfg.mmlu
        log(f"[{LABELS[paradigm]}] {m.shots}-shot MMLU ({m.split})")
        res = evaluate_mmlu(model, tokenizer, data_dir=cfg.task.data_dir, split=m.split, shots=m.shots,
                            subjects=list(m.subjects) if m.subjects else None, batch_size=m.batch_size,
                            limit=m.limit, log=log)
        return {k: res[k] for k in res if k != "questions"}

    def done(paradigm: str) -> dict | None:
        f = out / paradigm / "result.json"
        if f.is_file():
            log(f"[{LABELS[paradigm]}] already done ({f}); skipping")
            return json.loads(f.read_text())
        return None

    records = []
    backbone, tokenizer = load_backbone(cfg.model.name, lm=text)
    teacher = None
    if "base_pet" in cfg.paradigms:
        rec = done("base_pet")
        if rec is None:
            torch.manual_seed(tc.seed)
            teacher = build_task_model(backbone, spec.head_size, cfg.model.pooling, lora=cfg.lora, head=head)
            rec = run_paradigm("base_pet", teacher)
        else:
            teacher = load_task_modules(backbone, out / "base_pet" / "task")
        records.append(rec)

    clm = [p for p in cfg.paradigms if p != "base_pet"]
    if clm:
        cdir = out / "backbone_compressed"
        if main and not (cdir / "compression.json").is_file():
            log(f"compressing with plan {plan_to_json(cfg.compress)}")
            fresh, _ = load_backbone(cfg.model.name, lm=text)
            save_compressed(compress(fresh, cfg.compress), tokenizer, cdir, cfg.compress, cfg.model.name)
        state.wait_for_everyone()
        for paradigm in clm:
            rec = done(paradigm)
            if rec is None:
                compressed, _, _ = load_compressed(cdir)
                torch.manual_seed(tc.seed)
                if paradigm == "clm_pet":
                    student = build_task_model(compressed, spec.head_size, cfg.model.pooling, lora=cfg.lora, head=head)
                    rec = run_paradigm(paradigm, student)
                else:
                    student = build_task_model(compressed, spec.head_size, cfg.model.pooling,
                                               lora=cfg.lora, recovery=cfg.recovery, head=head)
                    inherit(student, teacher)
                    rec = run_paradigm(paradigm, student, teacher=teacher)
            records.append(rec)
    if main:
        write_report(out, records)
    return records


def use_text_formulation(cfg: ExperimentConfig) -> bool:
    """Text-to-text through the LM head (T5, decoder LMs under ``auto``), or a task head."""
    if cfg.model.formulation != "auto":
        return cfg.model.formulation == "text"
    from transformers import AutoConfig

    from cpet.models import ARCHITECTURES, is_lm_kind, resolve_model_path

    try:
        model_type = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name)).model_type
    except Exception:  # noqa: BLE001 - load_backbone reports an unreachable model with the full story
        return False
    return model_type in ARCHITECTURES and is_lm_kind(ARCHITECTURES[model_type].kind)


def _task_tensors(model):
    from cpet.layers import task_state_dict

    return task_state_dict(model).values()


def results_table(records: list[dict]) -> str:
    """Markdown: one row per paradigm with its test metrics, times and trainable parameter count."""
    metrics = []
    for r in records:
        metrics += [m for m in r["test"] if m not in metrics]
    mmlu = any("mmlu" in r for r in records)
    head = ["paradigm", *metrics, *(["MMLU"] if mmlu else []), "best val", "train s", "eval s", "task params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pct(metric: str, value: float) -> str:  # log-likelihoods are not fractions
        return f"{value:.3f}" if metric == "answer_logprob" else f"{100 * value:.2f}"

    for r in records:
        key = next(iter(r["best_val"]))
        row = [r["label"], *(pct(m, r["test"][m]) if m in r["test"] else "" for m in metrics),
               *([f"{100 * r['mmlu']['micro_avg']:.2f}" if "mmlu" in r else ""] if mmlu else []),
               pct(key, r["best_val"][key]), f"{r['train_seconds']:.0f}", f"{r['eval_seconds']:.1f}",
               f"{r['trainable_params']:,}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(out: Path, records: list[dict]) -> Path:
    if not records:
        return out / "results.md"
    r0 = records[0]
    plan = next((r["plan"] for r in records if r["plan"]), [])
    plan_s = " + ".join(f"{s['method']}" + (f"({s['pattern']}, {s['sparsity']:.0%})" if s["method"] == "unstructured" else "")
                        for s in plan) or "none"
    text = (f"# {r0['task']} on {r0['backbone']}\n\n"
            f"Compression plan: {plan_s}. Splits: {r0['split_sizes']} (test = {r0.get('test_set', 'the official validation set')}).\n"
            f"Metrics on the test set, in percent; 'best val' selects the checkpoint.\n\n"
            + results_table(records) + "\n")
    (out / "results.md").write_text(text)
    return out / "results.md"
