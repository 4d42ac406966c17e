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

import shutil
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from cpet.compress import (compress, compression_inputs, load_compressed, plan_to_json, save_compressed,
                           written_by_cpet)
from cpet.compress.calibration import make_calibration
from cpet.config import PARADIGM_SPECS, PARADIGMS, ExperimentConfig, LoraConfig, RecoveryConfig
from cpet.errors import CpetError
from cpet.evals.mmlu import evaluate_mmlu, run_lm_eval
from cpet.fingerprint import FORMAT as FINGERPRINT_FORMAT
from cpet.fingerprint import diff, digest, examples_digest, model_digest, provenance, tensor_digest
from cpet.formats import get_format
from cpet.inherit import inherit
from cpet.io import atomic_write_json, folder_lock, read_json
from cpet.layers import task_state_dict
from cpet.models import ARCHITECTURES, is_lm_kind, load_backbone, resolve_model_path, target_modules
from cpet.pet import PET_KINDS, method_of
from cpet.recovery import branches_off, fit_recovery
from cpet.task_modules import build_task_model, load_task_modules, save_task_modules
from cpet.tasks import load_task
from cpet.train import TrainResult, evaluate, train

LABELS = {name: spec.label for name, spec in PARADIGM_SPECS.items()}


FINGERPRINT = "fingerprint.json"


@dataclass(frozen=True)
class RunLayout:
    """``cpet run``: <root>/<paradigm>/ and <root>/backbone_compressed/, named by role, so a folder made
    with another config is met (and refused) on a rerun."""

    root: Path
    shared = False

    def paradigm_dir(self, paradigm: str, fp: str) -> Path:
        return self.root / paradigm

    def backbone_dir(self, fp: str) -> Path:
        return self.root / "backbone_compressed"


@dataclass(frozen=True)
class StoreLayout:
    """``cpet grid``: content-addressed, <root>/paradigms/<paradigm>-<fingerprint>/ and
    <root>/backbones/<fingerprint>/. A folder's name is its inputs' fingerprint, so cells share what
    they have in common (one compressed backbone per model, plan and calibration; one teacher per task,
    seed and PET config) and a changed config never meets a stale folder."""

    root: Path
    shared = True

    def paradigm_dir(self, paradigm: str, fp: str) -> Path:
        return self.root / "paradigms" / f"{paradigm}-{fp}"

    def backbone_dir(self, fp: str) -> Path:
        return self.root / "backbones" / fp

# what a paradigm folder may hold (all written by cpet): --fresh removes exactly these
PARADIGM_FILES = ("result.json", "checkpoint", "checkpoint.tmp", "checkpoint.old", "task", FINGERPRINT)


def run_experiment(cfg: ExperimentConfig, log: Callable[[str], None] = print, fresh: bool = False,
                   layout: RunLayout | StoreLayout | None = None) -> list[dict]:
    """Run (or continue) every paradigm in ``cfg.paradigms``; returns their result records.

    Each paradigm folder (and the compressed backbone) records the fingerprint of what produced it;
    a rerun continues only where the fingerprint matches. A folder made with another config stops
    the run with a message naming the differences, before anything is trained or written; with
    ``fresh`` those folders are removed and their paradigms run again.

    Under ``accelerate launch`` / ``torchrun`` every process runs this; only the main one logs and
    writes files, the others train their data shard and wait where they need its files.
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    main = state.is_main_process
    if not main:
        log = lambda s: None  # noqa: E731
    if cfg.model.compressed:  # train on an existing compressed backbone: its plan is the run's plan
        cfg = replace(cfg, compress=tuple(_shared_backbone_meta(cfg.model.compressed)["plan"]))
    layout = layout or RunLayout(Path(cfg.output_dir))
    out = layout.root
    if out.exists() and not out.is_dir():
        raise CpetError(f"output_dir {out} is a file; pass a folder (-o DIR)")
    data = load_task(cfg.task)  # data errors before any folder is made
    spec = data.spec
    max_len, tc = cfg.model.max_length, cfg.train
    text = use_text_formulation(cfg.model.name, cfg.model.formulation)
    backbone, tokenizer = load_backbone(cfg.model.name, lm=text)
    records_in, calibration, init_calib = _fingerprint_inputs(cfg, data, text, tokenizer)
    fps = {k: digest(v) for k, v in records_in.items()}
    pdirs = {p: layout.paradigm_dir(p, fps[p]) for p in PARADIGMS if p in fps}
    cdir = Path(cfg.model.compressed) if cfg.model.compressed else layout.backbone_dir(fps["compressed"])
    clm = [p for p in cfg.paradigms if PARADIGM_SPECS[p].compressed]

    def making(folder: Path):
        """Exclusive while ``folder`` is checked or made, so concurrent runs on one store make it once.
        Single-process runs only: the processes of one distributed run decide together, and two distributed
        runs on one store are not supported."""
        return folder_lock(folder, log) if state.num_processes == 1 else nullcontext()

    if main:  # every stale folder is found before anything runs
        for paradigm in cfg.paradigms:
            with making(pdirs[paradigm]):
                _check_folder(pdirs[paradigm], records_in[paradigm], LABELS[paradigm], fresh, log)
        if clm and not cfg.model.compressed:
            with making(cdir):  # (not while another run is writing it)
                _check_compressed(cdir, records_in["compressed"], fresh, log)
        out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    log(f"task {spec.name}: {len(data.train)} train / {len(data.val)} val (held out of train) / "
        f"{len(data.test)} test ({data.test_set}) from {data.source}")
    common = {"task": spec.name, "backbone": cfg.model.name, "data_source": data.source, "test_set": data.test_set,
              "split_sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)}}
    head = "span" if spec.format == "span" else "classify"
    fmt_of = lambda model: get_format(spec, model, cfg.task.doc_stride)  # noqa: E731
    common["formulation"] = "text" if text else "head"

    # the teacher's outputs per training row, shared by this experiment's distilling paradigms (one teacher,
    # the same rows and batches): the teacher runs over the training set once, not once per paradigm
    teacher_store: dict = {}

    def run_paradigm(paradigm: str, model, teacher=None, tokenizer=tokenizer,
                     modules: tuple = (cfg.pet_config, None), previous: dict | None = None) -> dict:
        """``modules``: the (PET, recovery) configs ``model``'s task modules were built from; ``previous``: the
        record this run retrains (its task modules were lost), kept in the new record."""
        pdir, fp = pdirs[paradigm], fps[paradigm]
        if main:
            atomic_write_json(pdir / FINGERPRINT, {"hash": fp, "inputs": records_in[paradigm]})
        n_params = sum(v.numel() for v in _task_tensors(model))
        log(f"[{LABELS[paradigm]}] " + (f"training {n_params:,} task parameters" + (" with distillation" if teacher else "")
                                         if PARADIGM_SPECS[paradigm].trains else
                                         f"{n_params:,} task parameters, evaluated as assembled (no task data)"))
        if PARADIGM_SPECS[paradigm].trains:
            ptc = replace(tc, lr=tc.clm_lr or tc.lr) if PARADIGM_SPECS[paradigm].compressed else tc
            res = train(model, tokenizer, spec, data.train, data.val, ptc, max_len, out_dir=pdir,
                        teacher=teacher, distill=cfg.distill if teacher is not None else None, log=log,
                        fmt=fmt_of(model), fingerprint=fp,
                        recovery_lr=modules[1].lr if PARADIGM_SPECS[paradigm].recover and modules[1] else None,
                        teacher_store=teacher_store)
        else:  # as assembled: no task data touches the modules
            val = evaluate(model, tokenizer, spec, data.val, max_len, tc.eval_batch_size, fmt=fmt_of(model))
            res = TrainResult(val, 0)
        t0 = time.perf_counter()
        test = evaluate(model, tokenizer, spec, data.test, max_len, tc.eval_batch_size, fmt=fmt_of(model))
        eval_s = time.perf_counter() - t0
        mmlu = run_mmlu(model, tokenizer, paradigm) if cfg.mmlu.enabled else None
        if main:
            save_task_modules(model, pdir / "task", extra={
                "task": spec.name, "labels": list(spec.labels),
                "backbone": backbone_record(cfg, paradigm, fps, records_in, cdir)})
        record = {"paradigm": paradigm, "label": LABELS[paradigm], **common,
                  "plan": plan_to_json(cfg.compress) if PARADIGM_SPECS[paradigm].compressed else [],
                  "test": test, "best_val": res.best_val, "best_epoch": res.best_epoch,
                  "history": res.history, "curve": res.curve, "steps": res.steps,
                  "train_seconds": round(res.train_seconds, 2),
                  **({"step_seconds": round(res.step_seconds, 3)} if res.step_seconds is not None else {}),
                  "eval_seconds": round(eval_s, 2),
                  "trainable_params": n_params,
                  **({"mmlu": mmlu} if mmlu else {}),
                  "config": {**_pet_record(modules[0]), **({"recovery": asdict(modules[1])} if modules[1] else {}),
                             "train": asdict(tc),
                             **({"distill": asdict(cfg.distill)} if PARADIGM_SPECS[paradigm].distill else {})},
                  "fingerprint": fp, "provenance": {**provenance(), "data": records_in[paradigm]["task"]["examples"],
                                                    "backbone_weights": records_in[paradigm]["model"]["weights"]}}
        if previous is not None:  # what the lost modules scored, and whether training again reproduced it
            record["retrained"] = {"why": "task modules missing", "previous_test": previous.get("test"),
                                   "same_test": previous.get("test") == test,
                                   "previous_provenance": previous.get("provenance")}
            if previous.get("test") != test:
                log(f"[{LABELS[paradigm]}] note: trained again, it scores {test} where the lost run scored "
                    f"{previous.get('test')} (result.json now holds this run; the earlier one is in its 'retrained')")
        if main:
            atomic_write_json(pdir / "result.json", record)
            shutil.rmtree(pdir / "checkpoint", ignore_errors=True)
        state.wait_for_everyone()
        log(f"[{LABELS[paradigm]}] test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items())
            + f" | train {res.train_seconds:.0f}s, eval {eval_s:.1f}s")
        return record

    def run_mmlu(model, tokenizer, paradigm: str) -> dict:
        if not text:
            raise CpetError("mmlu.enabled needs a language model (model.formulation=text on a decoder LM)")
        m = cfg.mmlu
        log(f"[{LABELS[paradigm]}] {m.shots}-shot MMLU ({m.split})")
        subjects = list(m.subjects) if m.subjects else None
        res = evaluate_mmlu(model, tokenizer, data_dir=cfg.task.data_dir, split=m.split, shots=m.shots,
                            subjects=subjects, batch_size=m.batch_size, limit=m.limit, log=log)
        out = {k: res[k] for k in res if k != "questions"}
        if m.lm_eval:  # the reference harness on the same in-memory model (task modules included)
            ref = run_lm_eval(model, tokenizer, shots=m.shots, limit=m.limit, batch_size=m.batch_size,
                              data_dir=cfg.task.data_dir, split=m.split, subjects=subjects)
            ours = "".join(res["subjects"][s]["predictions"] for s in sorted(res["subjects"]))
            theirs = "".join(ref["subjects"][s]["predictions"] for s in sorted(ref["subjects"]))
            out["lm_eval"] = {"harness": ref["harness"], "micro_avg": ref["micro_avg"],
                              "n_questions": ref["n_questions"],
                              "same_answer": sum(a == b for a, b in zip(ours, theirs)) / max(len(ours), 1)}
            log(f"[{LABELS[paradigm]}] MMLU cpet {res['micro_avg']:.4f}, lm-eval {ref['micro_avg']:.4f} "
                f"(same answer on {out['lm_eval']['same_answer']:.1%} of the questions)")
        return out

    def done(paradigm: str) -> dict | None:
        f = pdirs[paradigm] / "result.json"
        if f.is_file():
            log(f"[{LABELS[paradigm]}] already done with this config ({f}); skipping")
            return read_json(f, f"{LABELS[paradigm]} result", f"delete {f.parent} (or rerun with --fresh) to run it again")
        return None

    records = []
    teacher = None
    # the paradigms still to run that learn from base+PET (inherit or distil): they need its task modules
    taught = [p for p in clm if PARADIGM_SPECS[p].needs_teacher and not (pdirs[p] / "result.json").is_file()]
    if "base_pet" in cfg.paradigms:
        with making(pdirs["base_pet"]):
            rec, kept = done("base_pet"), None
            tdir = pdirs["base_pet"] / "task"
            if rec is not None and taught and not (tdir / "task_modules.safetensors").is_file():
                # a store whose result.json was kept without the task folder (e.g. a git checkout: the
                # folders are not committed): the same config and seed train the teacher again
                log(f"[{LABELS['base_pet']}] its task modules ({tdir}) are missing and {LABELS[taught[0]]} learns "
                    "from them: training it again with the same config")
                kept, rec = rec, None
            if rec is None:
                torch.manual_seed(tc.seed)
                teacher = build_task_model(backbone, spec.head_size, cfg.model.pooling, pet=cfg.pet_config,
                                           head=head)
                rec = run_paradigm("base_pet", teacher, previous=kept)
            elif taught:
                teacher = load_task_modules(backbone, tdir)
        records.append(rec)

    if "small_pet" in cfg.paradigms:
        with making(pdirs["small_pet"]):
            rec = done("small_pet")
            if rec is None:
                small, small_tok = load_backbone(cfg.model.small, lm=text)
                torch.manual_seed(tc.seed)
                rec = run_paradigm("small_pet", build_task_model(small, spec.head_size, cfg.model.pooling,
                                                                 pet=cfg.pet_config, head=head), tokenizer=small_tok)
        records.append(rec)

    if clm:
        if main and not cfg.model.compressed:
            with making(cdir):
                if not (cdir / "compression.json").is_file():
                    log(f"compressing with plan {plan_to_json(cfg.compress)}")
                    fresh_backbone, _ = load_backbone(cfg.model.name, lm=text)
                    compress(fresh_backbone, cfg.compress, calibration=calibration)
                    save_compressed(fresh_backbone, tokenizer, cdir, cfg.compress, cfg.model.name,
                                    fingerprint=records_in["compressed"])
        state.wait_for_everyone()
        for paradigm in clm:
            with making(pdirs[paradigm]):
                rec = done(paradigm)
                if rec is None:
                    how = PARADIGM_SPECS[paradigm]
                    compressed, _, _ = load_compressed(cdir)
                    torch.manual_seed(tc.seed)
                    lora_cfg, rec_cfg = paradigm_modules(cfg, paradigm, compressed)
                    student = build_task_model(compressed, spec.head_size, cfg.model.pooling, pet=lora_cfg,
                                               recovery=rec_cfg, head=head)
                    if how.inherit:
                        inherit(student, teacher)
                    if rec_cfg is not None and rec_cfg.init != "zero":
                        fit_recovery_from(student, teacher if teacher is not None else backbone, how.inherit,
                                          init_calib, log, rec_cfg)
                    rec = run_paradigm(paradigm, student, teacher=teacher if how.distill else None,
                                       modules=(lora_cfg, rec_cfg))
            records.append(rec)
    if main and not layout.shared:  # the config of the last completed run (each paradigm's inputs: fingerprint.json)
        atomic_write_json(out / "config.json", cfg.to_dict())
        write_report(out, records)
    return records


def _fingerprint_inputs(cfg: ExperimentConfig, data, text: bool, tokenizer):
    """What each paradigm's result depends on (and the compressed backbone's): config values that change
    results (not output paths, eval batch size or checkpoint spacing), the backbone's weight digest and
    the digest of the exact train / val / test examples; and the plan's calibration windows (made once,
    for the record and for compressing)."""
    train = {k: v for k, v in asdict(cfg.train).items() if k not in ("eval_batch_size", "checkpoint_every", "clm_lr")}
    if not cfg.train.group_by_length:  # added later: off is how every earlier result was made, so it keeps their fingerprints
        del train["group_by_length"]
    model = {"name": cfg.model.name, "weights": model_digest(resolve_model_path(cfg.model.name)),
             "max_length": cfg.model.max_length,
             "pooling": cfg.model.pooling, "formulation": "text" if text else "head"}
    task = {**{k: v for k, v in asdict(cfg.task).items() if k != "data_dir"},
            "examples": examples_digest(data.train, data.val, data.test)}
    base = {"format": FINGERPRINT_FORMAT, "model": model, "task": task, **_pet_record(cfg.pet_config), "train": train,
            "mmlu": _mmlu_record(cfg) if cfg.mmlu.enabled else None}
    if cfg.model.compressed:
        meta = _shared_backbone_meta(cfg.model.compressed)
        compressed, calib = meta["fingerprint"]["inputs"], None
        if compressed.get("source") != model["weights"] or compressed.get("lm") != text:
            raise CpetError(f"model.compressed={cfg.model.compressed} was made from {meta.get('source')!r}"
                            f"{' with its LM head' if compressed.get('lm') else ''}, not from model.name="
                            f"{cfg.model.name!r}{' with its LM head' if text else ''} (weights differ); set "
                            "model.name to its source, or compress this model with cpet compress")
    else:
        compressed, calib = compression_inputs(model["weights"], cfg.compress, tokenizer, lm=text,
                                               data_dir=cfg.task.data_dir)
    fits = cfg.recovery.init != "zero" and any(PARADIGM_SPECS[p].configured_recovery for p in cfg.paradigms)
    init_calib = make_calibration(tokenizer, samples=cfg.recovery.init_samples, seq_len=cfg.model.max_length,
                                  data_dir=cfg.task.data_dir) if fits else None
    clm = {**base, "compressed": digest(compressed), "train": {**train, "lr": cfg.train.clm_lr or cfg.train.lr}}
    assembled = {**base, "compressed": digest(compressed)}  # no training: clm_lr plays no part
    distill = {k: v for k, v in asdict(cfg.distill).items() if k != "cache_teacher"}
    out = {"base_pet": base, "compressed": compressed}
    if cfg.model.small:
        out["small_pet"] = {**base, "model": {**model, "name": cfg.model.small,
                                              "weights": model_digest(resolve_model_path(cfg.model.small))}}
    for name, how in PARADIGM_SPECS.items():
        if how.compressed:
            out[name] = {**(clm if how.trains else assembled), "how": {"inherit": how.inherit, "recover": how.recover, "distill": how.distill,
                                        **({} if how.trains else {"trains": False}),
                                        **({} if how.modules == "pet" else {"modules": how.modules})},
                         **({"recovery": asdict(cfg.recovery)} if how.sized_by_recovery else {}),
                         **({"recovery_init_data": tensor_digest(init_calib.input_ids)}
                            if how.configured_recovery and init_calib is not None else {}),
                         **({"distill": distill} if how.distill else {}),
                         **({"teacher": digest(base)} if how.needs_teacher else {})}
    return out, calib, init_calib


def paradigm_modules(cfg: ExperimentConfig, paradigm: str, backbone) -> tuple[LoraConfig | None,
                                                                             RecoveryConfig | None]:
    """The (LoRA, recovery) configs a paradigm's task modules are built from on ``backbone`` (the one it
    trains on: structured pruning changes the widths). Table 4's sets take CLM+CPET's task parameters
    (LoRA on lora.targets + recovery on recovery.targets) and spend them otherwise, each fresh
    (recovery.init=zero)."""
    how = PARADIGM_SPECS[paradigm]
    if how.modules == "pet":
        return cfg.pet_config, (cfg.recovery if how.recover else None)
    # (Table 4 with another PET method is refused when the config is read)

    def width(roles, ports: bool) -> int:  # sum of (in + out) over the layers playing ``roles``: parameters per unit of rank
        return sum(backbone.get_submodule(n).in_features + backbone.get_submodule(n).out_features
                   for n in target_modules(backbone, roles, ports=ports))

    # PET sits on a MoE FFN's inner projections (its ports), recovery on the MoE as a whole
    cpet = cfg.lora.r * width(cfg.lora.targets, True) + cfg.recovery.r * width(cfg.recovery.targets, False)
    fresh = replace(cfg.recovery, init="zero", lr=cfg.recovery.lr or None)  # fresh modules train
    sized = lambda roles, ports=False: max(1, round(cpet / width(roles, ports)))  # noqa: E731
    if how.modules == "lora+lora":
        return cfg.lora, replace(fresh, activation="identity")
    if how.modules == "large_lora":
        r = sized(cfg.lora.targets, True)
        return replace(cfg.lora, r=r, alpha=cfg.lora.alpha * r / cfg.lora.r), None  # alpha / r kept
    if how.modules == "rec+rec":
        return None, replace(fresh, r=sized(cfg.recovery.targets))
    if how.modules == "large_rec":
        return None, replace(fresh, r=sized(cfg.lora.targets), targets=cfg.lora.targets)
    raise CpetError(f"paradigm {paradigm}: unknown module set {how.modules!r}")


def _mmlu_record(cfg: ExperimentConfig) -> dict:
    """MMLU settings as fingerprints record them (lm_eval only when on: fingerprints made before it stand)."""
    d = asdict(cfg.mmlu)
    if not d["lm_eval"]:
        del d["lm_eval"]
    return d


def _pet_record(pet_cfg) -> dict:
    """A PET config as results and fingerprints record it: LoRA as ``lora`` (as before other methods
    existed, so those fingerprints stand), another method as ``pet`` {method, its options}."""
    if isinstance(pet_cfg, LoraConfig):
        return {"lora": asdict(pet_cfg)}
    if pet_cfg is None:
        return {}
    return {"pet": {"method": method_of(pet_cfg).name, **asdict(pet_cfg)}}


def _shared_backbone_meta(folder: str) -> dict:
    """compression.json of a ``model.compressed`` folder, which must carry its fingerprint."""
    p = Path(folder)
    if not (p / "compression.json").is_file():
        raise CpetError(f"model.compressed={folder} is not a cpet compressed backbone (no compression.json); "
                        "make one with cpet compress")
    meta = read_json(p / "compression.json", "compressed backbone record", f"compress again into {p}")
    if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint"), dict) or "plan" not in meta:
        raise CpetError(f"model.compressed={folder} has no fingerprint (made by an older cpet); compress again "
                        "with cpet compress")
    return meta


def backbone_record(cfg: ExperimentConfig, paradigm: str, fps: dict, records_in: dict, cdir: Path) -> dict:
    """What a task folder records about the backbone it was trained on (a bank refuses any other)."""
    if not PARADIGM_SPECS[paradigm].compressed:
        m = records_in[paradigm]["model"]
        return {"fingerprint": m["weights"], "path": m["name"], "plan": []}
    return {"fingerprint": fps["compressed"], "path": str(cdir), "plan": plan_to_json(cfg.compress)}


def fit_recovery_from(student, reference, with_pet: bool, calib, log, cfg: RecoveryConfig) -> dict[str, float]:
    """``recovery.init=fit`` / ``auto``: fit the student's recovery modules (auto: those on layers that kept
    their shape) to the compression error against the uncompressed ``reference``, the teacher's PET
    included when the student inherited it (its output is then what the student should reproduce), the
    plain backbone otherwise. Fitted modules are kept through training under auto or recovery.lr=0."""
    kw = {"log": lambda s: log("  " + s), "only_kept_shape": cfg.init == "auto",
          "keep": cfg.init == "auto" or cfg.lr == 0}
    if with_pet:
        return fit_recovery(student, reference, calib, **kw)
    with ExitStack() as stack:  # the plain uncompressed backbone: every PET branch of the teacher off
        for kind in PET_KINDS:
            stack.enter_context(branches_off(reference, kind))
        return fit_recovery(student, reference, calib, **kw)


def _check_folder(folder: Path, record: dict, what: str, fresh: bool, log) -> None:
    """Continue a folder made with the same inputs; otherwise stop (or, with ``fresh``, clear it)."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    why = _stale(_read_fingerprint(folder / FINGERPRINT), record)
    if why is None:
        return
    if not fresh:
        raise CpetError(f"{folder} holds {what} results made with another config ({why}). Keep them and run "
                        f"into another folder (-o DIR), or add --fresh to discard them and run {what} again.")
    log(f"--fresh: discarding {folder} ({why})")
    for name in PARADIGM_FILES:
        p = folder / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _check_compressed(cdir: Path, record: dict, fresh: bool, log) -> None:
    if not cdir.is_dir() or not any(cdir.iterdir()):
        return
    meta_file = cdir / "compression.json"
    if not meta_file.is_file():
        if written_by_cpet(cdir):  # a save that a crash cut short (compression.json is written last)
            log(f"{cdir} is an unfinished cpet save; compressing again")
            shutil.rmtree(cdir)
            return
        raise CpetError(f"{cdir} exists but is not a cpet compressed backbone (no compression.json); "
                        "move it away or run into another folder (-o DIR)")
    meta = read_json(meta_file, "compressed backbone record", f"delete {cdir} (or add --fresh) to compress again")
    why = _stale(meta.get("fingerprint"), record)
    if why is None:
        return
    if not fresh:
        raise CpetError(f"{cdir} was compressed from other inputs ({why}). Run into another folder (-o DIR), "
                        "or add --fresh to compress again (the CLM paradigms then rerun too).")
    log(f"--fresh: discarding {cdir} ({why})")
    shutil.rmtree(cdir)


def _stale(old: dict | None, record: dict) -> str | None:
    """None if ``old`` (a stored {"hash", "inputs"}) was made from ``record``; else what differs."""
    if old is not None and old.get("hash") == digest(record):
        return None
    return diff(old["inputs"], record) if old else "it has no fingerprint: made by an older cpet, or by hand"


def _read_fingerprint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    rec = read_json(path, "fingerprint", f"delete {path.parent} (or add --fresh) to run it again")
    return rec if isinstance(rec, dict) and "hash" in rec and "inputs" in rec else None


def use_text_formulation(name: str, formulation: str = "auto") -> bool:
    """Text-to-text through the LM head (T5, decoder LMs under ``auto``), or a task head, for model ``name``."""
    if formulation != "auto":
        return formulation == "text"
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(resolve_model_path(name)).model_type
    except Exception:  # noqa: BLE001 - load_backbone reports an unreachable model with the full story
        return False
    return model_type in ARCHITECTURES and is_lm_kind(ARCHITECTURES[model_type].kind)


def _task_tensors(model):
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
