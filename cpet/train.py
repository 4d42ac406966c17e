"""The trainer: AdamW + warmup/linear decay over the task modules only, eval each epoch, best-on-val,
resumable checkpoints, optional distillation from a frozen teacher (CPET's recovery objective).

    loss = CE(student) + alpha * distill(teacher, student)          (alpha term only with a teacher)

Runs unchanged under ``accelerate launch``: the Accelerator places the model, wraps it for several
processes and does the backward; each process trains on its shard of every epoch's permutation.
Exact resume: a checkpoint holds the task tensors, AdamW state, the RNG state, the best state so far
and the position in the epoch; data order is a function of (seed, epoch), so the rest replays identically.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from cpet.config import DistillConfig, TrainConfig
from cpet.distill import Teacher, distill_loss
from cpet.errors import CpetError
from cpet.formats import Format, feature_length, get_format, model_inputs
from cpet.io import load_safetensors, read_json
from cpet.layers import freeze_backbone, kind_of, task_state_dict
from cpet.tasks import Example, TaskSpec


# ---------------------------------------------------------------- evaluation
def evaluate(model, tokenizer, spec: TaskSpec, examples: list[Example], max_length: int, batch_size: int = 64,
             features=None, fmt: Format | None = None) -> dict[str, float]:
    """The task's metrics on ``examples`` (the format decides how: heads, spans or text-to-text)."""
    fmt = fmt or get_format(spec, model)
    return fmt.evaluate(model, tokenizer, examples, max_length, batch_size, features)


# ---------------------------------------------------------------- checkpoints
def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict, directory: Path) -> None:
    from safetensors.torch import save_file

    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def _load_checkpoint(directory: Path) -> tuple[dict, dict] | None:
    for d in (directory, directory.with_name(directory.name + ".old")):  # .old survives a crash mid-swap
        if (d / "trainer.json").is_file() and (d / "state.safetensors").is_file():
            fix = f"delete {d} to restart this training from its beginning"
            return load_safetensors(d / "state.safetensors", "training checkpoint", fix), \
                read_json(d / "trainer.json", "training checkpoint", fix)
    return None


# ---------------------------------------------------------------- training
@dataclass
class TrainResult:
    best_val: dict[str, float]
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    steps: int = 0
    curve: list[dict] = field(default_factory=list)  # validation every ``eval_every`` steps (step 0 included)
    # seconds in the training steps alone (batch, forward, backward, optimizer), without validation, curve
    # points, checkpoints or the teacher's forward (its outputs are cached, so its cost depends on what ran
    # before); None when resumed from a checkpoint that did not record it
    step_seconds: float | None = None


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


GROUP_BATCHES = 16  # train.group_by_length: batches per length-sorted chunk (512 examples at batch 32)


def epoch_batches(features: list[dict], cfg: TrainConfig, epoch: int, shard: int = 0, shards: int = 1) -> list[list[int]]:
    """Feature indices of each optimizer step of ``epoch`` on process ``shard`` of ``shards``: a function of
    (seed, epoch) only, so a resumed run replays it. Random batches, or with ``cfg.group_by_length`` batches
    of similar length: the same permutation cut into chunks of ``GROUP_BATCHES`` batches, each chunk sorted
    by length (ties keep the random order), the batches then shuffled. Chunks are whole batches, so both
    give ceil(n / batch_size) steps."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    perm = torch.randperm(len(features), generator=g).tolist()[shard::shards]
    size = cfg.batch_size
    if not cfg.group_by_length:
        return [perm[s: s + size] for s in range(0, len(perm), size)]
    chunk = GROUP_BATCHES * size
    batches = []
    for c in range(0, len(perm), chunk):
        part = sorted(perm[c: c + chunk], key=lambda i: feature_length(features[i]), reverse=True)
        batches += [part[s: s + size] for s in range(0, len(part), size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def train(model: nn.Module, tokenizer, spec: TaskSpec, train_set: list[Example], val_set: list[Example],
          cfg: TrainConfig, max_length: int, out_dir: str | Path | None = None,
          teacher: nn.Module | None = None, distill: DistillConfig | None = None,
          log: Callable[[str], None] = print, on_step: Callable[[int], None] | None = None,
          resume: bool = True, fmt: Format | None = None, fingerprint: str | None = None,
          recovery_lr: float | None = None, teacher_store: dict | None = None) -> TrainResult:
    """Train the task modules of ``model`` (backbone frozen) and leave the best-on-val state loaded.

    ``out_dir/checkpoint`` is written every ``cfg.checkpoint_every`` steps and at epoch ends; with
    ``resume`` an existing checkpoint there is continued exactly. ``on_step(step)`` runs after each
    optimizer step (used by tests to interrupt a run). ``fingerprint`` (of everything the run depends on)
    is stored in each checkpoint; resuming a checkpoint made with another one is refused.
    ``recovery_lr``: the learning rate of recovery modules (default ``cfg.lr``, as everything else; 0: they
    are kept as they are, frozen, and saved with the rest).
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)
    trainable = freeze_backbone(model)
    # kept recovery modules (recovery.lr=0, or those a fit marked kept): frozen like the backbone, still task
    # tensors (saved and loaded with the task)
    kept = {id(p) for m in model.modules() if getattr(m, "kept", False) for p in m.parameters()}
    for n, p in model.named_parameters():
        if kind_of(n) == "recovery" and (recovery_lr == 0 or id(p) in kept):
            p.requires_grad_(False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: the model has no PET / recovery / head parameters")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = []  # (decay or not) x (recovery modules at their own lr, or the rest at train.lr)
    for decays in (True, False):
        for own, lr in ((False, cfg.lr), (True, cfg.lr if recovery_lr is None else recovery_lr)):  # PET + head; recovery
            params = [p for n, p in named.items() if (p.ndim >= 2) == decays and (kind_of(n) == "recovery") == own]
            if params:
                groups.append({"params": params, "weight_decay": cfg.weight_decay if decays else 0.0,
                               "base_lr": lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    teach = Teacher(teacher.to(device), cache=distill.cache_teacher, outputs=distill.outputs, store=teacher_store) \
        if teacher is not None else None

    layer_outputs = {"output_layers": True} if teach is not None and "layers" in distill.outputs else {}
    fmt = fmt or get_format(spec, model)
    features = fmt.encode(tokenizer, train_set, max_length, train=True)
    val_features = fmt.encode(tokenizer, val_set, max_length, train=False)
    steps_per_epoch = math.ceil(len(features) / (cfg.batch_size * accelerator.num_processes))
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_ratio * total))

    ckpt_dir = Path(out_dir) / "checkpoint" if out_dir else None
    step, epoch, pos = 0, 0, 0
    best_val, best_epoch, best_state, history, curve = None, -1, None, [], []
    elapsed, step_seconds = 0.0, 0.0
    loaded = _load_checkpoint(ckpt_dir) if (ckpt_dir and resume) else None
    if loaded:
        tensors, meta = loaded
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise CpetError(f"{ckpt_dir} was made by a run with another config (fingerprint "
                            f"{meta.get('fingerprint')} vs {fingerprint}); delete it to start this training afresh")
        missing = [n for n in named if f"param.{n}" not in tensors]
        if missing:
            raise CpetError(f"{ckpt_dir} does not hold {missing[0]} (another model or PET config?); "
                            "delete it to start this training afresh")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(tensors[f"param.{n}"])
        opt_state = optimizer.state_dict()
        for gi, group in enumerate(opt_state["param_groups"]):
            for pid in group["params"]:
                if f"opt.{pid}.exp_avg" in tensors:
                    opt_state["state"][pid] = {k: tensors[f"opt.{pid}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
        optimizer.load_state_dict(opt_state)
        torch.set_rng_state(tensors["rng"])
        step, epoch, pos = meta["step"], meta["epoch"], meta["pos"]
        best_val, best_epoch, history, elapsed = meta["best_val"], meta["best_epoch"], meta["history"], meta["elapsed"]
        curve = meta.get("curve", [])
        step_seconds = meta.get("step_seconds")  # None: a checkpoint from before it was recorded
        if any(k.startswith("best.") for k in tensors):
            best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        log(f"  resumed from {ckpt_dir} at step {step} (epoch {epoch + 1}, batch {pos})")

    def save_checkpoint():
        if ckpt_dir is None or not accelerator.is_main_process:
            return
        tensors = {f"param.{n}": p.detach() for n, p in named.items()}
        for pid, st in optimizer.state_dict()["state"].items():
            for k in ("step", "exp_avg", "exp_avg_sq"):
                tensors[f"opt.{pid}.{k}"] = torch.as_tensor(st[k]).detach()
        tensors["rng"] = torch.get_rng_state()
        if best_state is not None:
            tensors.update({f"best.{k}": v for k, v in best_state.items()})
        meta = {"step": step, "epoch": epoch, "pos": pos, "best_val": best_val, "best_epoch": best_epoch,
                "history": history, "elapsed": elapsed, "fingerprint": fingerprint, "curve": curve,
                "step_seconds": step_seconds}
        _atomic_save(tensors, meta, ckpt_dir)

    key_metric = spec.metrics[0]
    def validate() -> dict[str, float]:
        """Validation metrics at this step; the curve point of the same step is reused, not recomputed."""
        if curve and curve[-1]["step"] == step:
            return {k[4:]: v for k, v in curve[-1].items() if k.startswith("val_")}
        return fmt.evaluate(accelerator.unwrap_model(prepared), tokenizer, val_set, max_length,
                            cfg.eval_batch_size, val_features)

    def curve_point():
        """Validation metrics at this step for the convergence curve (model back in train mode after)."""
        curve.append({"step": step, **{f"val_{k}": v for k, v in validate().items()}})
        prepared.train()
        if teach is not None:
            teach.model.eval()

    t_start = time.perf_counter() - elapsed
    if cfg.eval_every and step == 0 and not curve:
        curve_point()  # where training starts (inherited modules start above chance)
    while epoch < cfg.epochs:
        batches = epoch_batches(features, cfg, epoch, accelerator.process_index, accelerator.num_processes)
        prepared.train()
        if teach is not None:
            teach.model.eval()
        running, seen = 0.0, 0
        for b in range(pos, len(batches)):
            t_step = time.perf_counter()
            batch = fmt.collate(features, batches[b], tokenizer.pad_token_id)
            out = prepared(**model_inputs(batch, device), **layer_outputs)
            loss = fmt.loss(out, batch)
            if teach is not None and distill.alpha > 0:
                t_teach = time.perf_counter()
                target = teach(batch)  # cached per row (and shared across an experiment's paradigms): timed apart
                t_step += time.perf_counter() - t_teach
                loss = loss + distill.alpha * distill_loss(target, out, distill.outputs)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * _lr_factor(step, total, warmup)
            accelerator.backward(loss)
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(list(named.values()), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, pos = step + 1, b + 1
            running, seen = running + loss.item(), seen + 1
            if step_seconds is not None:
                step_seconds += time.perf_counter() - t_step
            if (b + 1) % max(1, len(batches) // 5) == 0 or b + 1 == len(batches):
                log(f"  epoch {epoch + 1}/{cfg.epochs} batch {b + 1}/{len(batches)} "
                    f"loss {running / seen:.4f} ({time.perf_counter() - t_start:.0f}s)")
            elapsed = time.perf_counter() - t_start
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save_checkpoint()
            if cfg.eval_every and step % cfg.eval_every == 0:
                curve_point()
            if on_step is not None:
                on_step(step)
        metrics = validate()  # an epoch ending on an eval_every step reuses that curve point
        history.append({"epoch": epoch + 1, "step": step, **{f"val_{k}": v for k, v in metrics.items()}})
        log(f"  epoch {epoch + 1}: val " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if best_val is None or metrics[key_metric] > best_val[key_metric]:
            best_val, best_epoch = metrics, epoch + 1
            best_state = task_state_dict(accelerator.unwrap_model(prepared))
        epoch, pos = epoch + 1, 0
        elapsed = time.perf_counter() - t_start
        save_checkpoint()
    model = accelerator.unwrap_model(prepared)
    if best_state is not None:
        load_task_state(model, best_state)
    return TrainResult(best_val, best_epoch, history, time.perf_counter() - t_start, step, curve, step_seconds)


def load_task_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)
