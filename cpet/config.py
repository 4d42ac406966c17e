"""Experiment configuration: frozen dataclasses, loaded from YAML plus ``key=value`` overrides.

A YAML file and the overrides both become the same nested dict, which is checked against the
dataclass fields (unknown keys are errors that list the valid ones) and then built bottom-up.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cpet.compress import plan_to_json
from cpet.errors import CpetError
from cpet.pet import get as get_method
from cpet.pet.lora import LoraConfig  # noqa: F401 - LoRA's config, re-exported (cpet.config.LoraConfig)
from cpet.roles import ALL_ROLES, check_roles
from cpet.typed import coerce_fields, require

@dataclass(frozen=True)
class ModelConfig:
    """Backbone: an HF hub id, a local folder, or the alias ``minilm`` (the embedded default)."""

    name: str = "minilm"
    max_length: int = 128
    pooling: str | None = None  # mean | last | cls; None = by architecture (encoders mean, decoders last)
    # how tasks are cast: head (a task head on the backbone) | text (text-to-text through the LM head,
    # verbalizers / generation) | auto (encoders head, T5 and decoder LMs text, as in the paper)
    formulation: str = "auto"
    # an existing `cpet compress` folder made from this model: the CLM paradigms train on it (its plan
    # replaces `compress`) instead of compressing again; it is only read, never written
    compressed: str | None = None
    # a smaller uncompressed sibling (HF id or folder) for the small_pet paradigm: the paper's "T5-base +
    # PET" row, a small model of about the compressed one's size tuned the ordinary way
    small: str | None = None

    def __post_init__(self):
        coerce_fields(self, "model")
        require(bool(self.name.strip()), "model.name", self.name, "an HF hub id, a local folder or an alias (minilm, smollm2)")
        if self.pooling not in (None, "mean", "last", "cls"):
            raise CpetError(f"model.pooling={self.pooling!r}: use mean, last or cls")
        if self.formulation not in ("auto", "head", "text"):
            raise CpetError(f"model.formulation={self.formulation!r}: use auto, head or text")
        if self.max_length < 8:
            raise CpetError(f"model.max_length={self.max_length} is too small (>= 8)")


@dataclass(frozen=True)
class TaskConfig:
    """A task and how much of it to use. ``data_dir`` falls back to $CPET_DATA, then ../shared/data."""

    name: str = "sst2"
    data_dir: str | None = None
    max_train: int | None = None  # subsample the training part (after the validation part is held out)
    val_size: int | float = 0.1  # held out of train for model selection: a count or a fraction
    max_test: int | None = None
    doc_stride: int = 64  # extractive QA: tokens of overlap between the windows of a long context

    def __post_init__(self):
        coerce_fields(self, "task")
        if isinstance(self.val_size, float):
            require(0 < self.val_size < 1, "task.val_size", self.val_size, "a fraction in (0, 1) or a count >= 1")
        else:
            require(self.val_size >= 1, "task.val_size", self.val_size, "a fraction in (0, 1) or a count >= 1")
        for key in ("max_train", "max_test"):
            v = getattr(self, key)
            require(v is None or v >= 1, f"task.{key}", v, ">= 1, or null for all")
        require(self.doc_stride >= 1, "task.doc_stride", self.doc_stride, ">= 1")


@dataclass(frozen=True)
class PetConfig:
    """The PET method the paradigms tune (a name in ``cpet.pet.METHODS``) and its options (typed by the
    method's own Config). LoRA, the default and the paper's, reads the ``lora`` section instead.

    YAML: ``pet: {method: ia3, targets: [k, v, ffn_out]}`` or just ``pet: bitfit``."""

    method: str = "lora"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method == "lora" and self.options:
            raise CpetError(f"pet: LoRA's options go in the lora section (lora.r, lora.targets ...), not pet "
                            f"({sorted(self.options)})")
        self.typed()  # unknown method or options: an error now, before anything runs

    def typed(self):
        """The method's typed config (None for LoRA: the lora section is its config)."""
        method = get_method(self.method)
        if self.method == "lora":
            return None
        try:
            return method.Config(**self.options)
        except TypeError:
            known = [f.name for f in fields(method.Config)]
            bad = sorted(set(self.options) - set(known))
            raise CpetError(f"pet: unknown option(s) {bad} for {self.method}; its options: {known}") from None


@dataclass(frozen=True)
class RecoveryConfig:
    """Knowledge-recovery bypass y = base(x) + act(x D^T) U^T on each target linear.

    The default (``recovery: paper``) is the paper's: U = 0, trained with the task. ``recovery: fitted``
    starts each module as the best rank-r map that undoes its layer's compression error and keeps it so
    while the task modules train: measured far better under 2:4 + int8 and far worse under structured
    pruning, where the fit has nothing to undo (experiments/recipe, stage 7)."""

    r: int = 32
    activation: str = "gelu"
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_ROLES
    # how the module starts: zero (U = 0, a no-op, the paper) | fit (the best rank-r map from the layer's
    # input to its output error against the uncompressed model, on calibration text: see recovery.fit_recovery)
    # | auto (per layer: fitted and kept where compression left the layer's shape, so its error is a weight
    # error the fit undoes (int8, unstructured, 2:4); zero and trained where it removed computation
    # (structured pruning, MoE FFNs) or left the layer as it was, as the paper)
    init: str = "zero"
    init_samples: int = 64  # calibration windows (of model.max_length tokens) for init=fit
    # learning rate of the recovery modules (None = train.lr; 0 = kept as they start: not trained, which
    # only makes sense for init=fit)
    lr: float | None = None

    def __post_init__(self):
        coerce_fields(self, "recovery")
        check_roles(self.targets, "recovery.targets")
        if self.activation not in ("gelu", "relu", "silu", "identity"):
            raise CpetError(f"recovery.activation={self.activation!r}: use gelu, relu, silu or identity")
        require(self.r >= 1, "recovery.r", self.r, ">= 1")
        require(0 <= self.dropout < 1, "recovery.dropout", self.dropout, "in [0, 1)")
        require(self.init in ("zero", "fit", "auto"), "recovery.init", self.init, "zero, fit or auto")
        require(self.init_samples >= 1, "recovery.init_samples", self.init_samples, ">= 1")
        require(self.lr is None or self.lr >= 0, "recovery.lr", self.lr, ">= 0, or null for train.lr")
        if self.lr == 0 and self.init == "auto":
            raise CpetError("recovery.lr=0 with recovery.init=auto would keep the zero-started modules (on "
                            "structurally pruned and MoE layers) as no-ops; auto keeps the fitted ones itself: "
                            "leave recovery.lr null, or give the trained ones a rate")
        if self.lr == 0 and self.init == "zero":
            raise CpetError("recovery.lr=0 keeps the recovery modules as they start, and with recovery.init=zero "
                            "they start as a no-op (U = 0): set recovery.init=fit (or recovery: fitted), or give "
                            "them a learning rate")
        require(self.init == "zero" or self.activation == "identity" or self.r >= 2, "recovery.r", self.r,
                ">= 2 for init=fit with a nonlinear activation (the fit uses the rank in +/- pairs)")


@dataclass(frozen=True)
class DistillConfig:
    """loss = task + alpha * MSE(teacher, student) on the chosen outputs."""

    alpha: float = 0.05
    # hidden (last hidden states, real tokens), layers (every layer's hidden states, averaged), logits
    outputs: tuple[str, ...] = ("hidden",)
    cache_teacher: bool = True

    def __post_init__(self):
        coerce_fields(self, "distill")
        bad = [o for o in self.outputs if o not in ("hidden", "layers", "logits")]
        if bad or not self.outputs:
            raise CpetError(f"distill.outputs={list(self.outputs)}: choose from ['hidden', 'layers', 'logits']")
        require(self.alpha >= 0, "distill.alpha", self.alpha, ">= 0")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    seed: int = 42
    checkpoint_every: int = 100  # optimizer steps between resumable checkpoints (0 = only at epoch ends)
    eval_every: int = 0  # validation every N optimizer steps (and at step 0) as a convergence curve; 0 = off
    # learning rate of the paradigms on the compressed backbone (None = lr). base+PET, the teacher, trains at
    # lr; a sweep of clm_lr then shares one teacher, and each CLM paradigm can take its own on validation
    clm_lr: float | None = None
    # batches of similar length (HF's group_by_length, with the batch order shuffled too): each epoch's
    # permutation is cut into chunks of GROUP_BATCHES batches, each chunk sorted by length, the batches
    # shuffled. Same examples per epoch, far less padding (MiniLM, 1,000 examples: 1.8-2.6x fewer tokens
    # on the GLUE tasks); another batch composition, so results differ from random batches by seed noise
    group_by_length: bool = False

    def __post_init__(self):
        coerce_fields(self, "train")
        for key in ("epochs", "batch_size", "eval_batch_size"):
            require(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), ">= 1")
        require(self.lr > 0, "train.lr", self.lr, "> 0")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        require(0 <= self.warmup_ratio < 1, "train.warmup_ratio", self.warmup_ratio, "in [0, 1)")
        require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, ">= 0 (0 = no clipping)")
        require(self.seed >= 0, "train.seed", self.seed, ">= 0")
        require(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every,
                ">= 0 (0 = only at epoch ends)")
        require(self.eval_every >= 0, "train.eval_every", self.eval_every, ">= 0 (0 = no convergence curve)")
        require(self.clm_lr is None or self.clm_lr > 0, "train.clm_lr", self.clm_lr, "> 0, or null for train.lr")


@dataclass(frozen=True)
class Paradigm:
    """How one row of the paper's tables trains: on the uncompressed backbone M or the compressed C;
    whether it starts from base+PET's modules (inheritance), adds recovery modules, and distils
    base+PET's hidden states / logits into its loss."""

    label: str
    doc: str
    compressed: bool = True
    inherit: bool = False
    recover: bool = False
    distill: bool = False
    trains: bool = True  # False: evaluated as assembled, no task data (the zero-data case of Figure 3)
    # which task modules: "pet" (the lora config, + the recovery config when recover) or one of Table 4's
    # parameter-controlled sets, sized to CLM+CPET's task parameters (cpet.experiments.paradigm_modules)
    modules: str = "pet"
    small: bool = False  # on model.small (the smaller sibling) instead of model.name

    @property
    def needs_teacher(self) -> bool:
        return self.inherit or self.distill

    @property
    def configured_recovery(self) -> bool:
        """It has recovery modules as the recovery section says (init, fit data); Table 4's start fresh."""
        return self.recover and self.modules == "pet"

    @property
    def sized_by_recovery(self) -> bool:
        """Its modules depend on the recovery settings (it has recovery modules, or matches CPET's size)."""
        return self.recover or self.modules != "pet"


# The paradigms (Table 2) and the ablations of Table 3: every on/off combination of inheritance (I),
# recovery (R) and distillation (D) on the compressed backbone.
PARADIGM_SPECS: dict[str, Paradigm] = {
    "base_pet": Paradigm("base+PET", "PET (+ task head) on the uncompressed backbone; CPET's teacher", compressed=False),
    "small_pet": Paradigm("small+PET", "PET (+ task head) on model.small, a smaller uncompressed sibling (the "
                          "paper's T5-base + PET row)", compressed=False, small=True),
    "clm_pet": Paradigm("CLM+PET", "fresh PET on the compressed backbone, task loss only"),
    "clm_cpet": Paradigm("CLM+CPET", "inherited PET + recovery modules, task + alpha * distillation loss",
                         inherit=True, recover=True, distill=True),
    "clm_inherit": Paradigm("CLM+I", "ablation: inherited PET, no recovery, no distillation", inherit=True),
    "clm_recover": Paradigm("CLM+R", "ablation: fresh PET + recovery modules, task loss only", recover=True),
    "clm_distill": Paradigm("CLM+D", "ablation: fresh PET, task + distillation loss", distill=True),
    "clm_inherit_recover": Paradigm("CLM+I+R", "ablation: inherited PET + recovery, task loss only",
                                    inherit=True, recover=True),
    "clm_inherit_distill": Paradigm("CLM+I+D", "ablation: inherited PET, task + distillation, no recovery",
                                    inherit=True, distill=True),
    "clm_recover_distill": Paradigm("CLM+R+D", "ablation: fresh PET + recovery, task + distillation",
                                    recover=True, distill=True),
    # Table 4: fresh modules as many task parameters as CLM+CPET's (LoRA + recovery), task loss only: does
    # adding parameters alone close the gap? (Each is CLM+PET at CPET's size; the paper's settings, with the
    # rank chosen to equal CPET's parameters rather than doubling, since the two coincide only in its set-up.)
    "clm_lora_lora": Paradigm("CLM+LoRA+LoRA", "Table 4: fresh PET plus a second, linear low-rank path of rank "
                              "recovery.r on every recovery target in place of the recovery modules; task loss only",
                              recover=True, modules="lora+lora"),
    "clm_large_lora": Paradigm("CLM+Large LoRA", "Table 4: fresh LoRA on lora.targets alone, its rank raised to "
                               "CLM+CPET's task parameters; task loss only", modules="large_lora"),
    "clm_rec_rec": Paradigm("CLM+Rec+Rec", "Table 4: recovery modules in place of LoRA: recovery modules alone on "
                            "every recovery target, their rank raised to CLM+CPET's task parameters; task loss only",
                            recover=True, modules="rec+rec"),
    "clm_large_rec": Paradigm("CLM+Large Rec", "Table 4: recovery modules alone on lora.targets (where LoRA sat), "
                              "their rank raised to CLM+CPET's task parameters; task loss only",
                              recover=True, modules="large_rec"),
    "clm_cpet_zero": Paradigm("CLM+I+R, no data", "base+PET's modules moved onto the compressed backbone plus "
                              "recovery modules fitted to the compression error on calibration text "
                              "(recovery.init=fit), no task training", inherit=True, recover=True, trains=False),
    "clm_inherit_zero": Paradigm("CLM+I, no data", "base+PET's modules moved onto the compressed backbone, no "
                                 "task training (Figure 3's zero-data point)", inherit=True, trains=False),
}
PARADIGMS = tuple(PARADIGM_SPECS)
DEFAULT_PARADIGMS = ("base_pet", "clm_pet", "clm_cpet")


@dataclass(frozen=True)
class MMLUConfig:
    """k-shot MMLU of each paradigm's model after training (language models only), as the paper
    evaluates instruction tuning. ``limit`` = questions per subject (None = all)."""

    enabled: bool = False
    shots: int = 5
    split: str = "val"
    subjects: tuple[str, ...] | None = None
    limit: int | None = None
    batch_size: int = 8
    lm_eval: bool = False  # also score the same in-memory model with the reference harness (lm-eval)

    def __post_init__(self):
        coerce_fields(self, "mmlu")
        if not 0 <= self.shots <= 5:
            raise CpetError(f"mmlu.shots={self.shots}: MMLU has 5 dev exemplars per subject (0..5)")
        require(self.split in ("val", "test"), "mmlu.split", self.split, "val or test")
        require(self.limit is None or self.limit >= 1, "mmlu.limit", self.limit, ">= 1, or null for all")
        require(self.batch_size >= 1, "mmlu.batch_size", self.batch_size, ">= 1")


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    # ordered compression plan, e.g. [{method: unstructured, sparsity: 0.5}, {method: int8}]
    compress: Any = ({"method": "int8"},)
    lora: LoraConfig = field(default_factory=LoraConfig)
    pet: PetConfig = field(default_factory=PetConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    paradigms: tuple[str, ...] = DEFAULT_PARADIGMS
    output_dir: str = "runs/experiment"
    mmlu: MMLUConfig = field(default_factory=MMLUConfig)

    def __post_init__(self):
        coerce_fields(self, "")
        require(bool(self.output_dir.strip()), "output_dir", self.output_dir, "a folder path")
        bad = [p for p in self.paradigms if p not in PARADIGMS]
        if bad:
            raise CpetError(f"paradigms: unknown {bad}; choose from {list(PARADIGMS)}")
        taught = [p for p in self.paradigms if PARADIGM_SPECS[p].needs_teacher]
        if taught and "base_pet" not in self.paradigms:
            raise CpetError(f"paradigms: {taught[0]} inherits from or distils base_pet, so base_pet must run too")
        if "clm_cpet_zero" in self.paradigms and self.recovery.init == "zero":
            raise CpetError("paradigms: clm_cpet_zero adds recovery modules with no training; with "
                            "recovery.init=zero they are no-ops (that is clm_inherit_zero): set recovery.init=fit")
        table4 = [p for p in self.paradigms if PARADIGM_SPECS[p].modules != "pet"]
        if table4 and self.pet.method != "lora":
            raise CpetError(f"paradigms: {table4[0]} (Table 4) is defined for LoRA; this config tunes {self.pet.method}")
        if "small_pet" in self.paradigms and not self.model.small:
            raise CpetError("paradigms: small_pet tunes PET on a smaller sibling backbone: set model.small "
                            "(an HF id or folder, e.g. a T5-base beside a T5-3B)")
        if len(set(self.paradigms)) != len(self.paradigms):
            raise CpetError(f"paradigms: {list(self.paradigms)} names a paradigm twice")

        # every step spelled out with its typed fields (defaults included): what ran is what is recorded
        object.__setattr__(self, "compress", tuple(plan_to_json(self.compress)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def pet_config(self):
        """The typed config of the PET method the paradigms tune (``lora`` for LoRA)."""
        return self.lora if self.pet.method == "lora" else self.pet.typed()


def _build(cls, data: Any, path: str):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with the valid ones named."""
    if not dataclasses.is_dataclass(cls):
        return data
    if cls is PetConfig:  # {method, ...the method's own options} (or just the method's name)
        if isinstance(data, str):
            return PetConfig(method=data)
        if isinstance(data, dict):
            rest = {k: v for k, v in data.items() if k not in ("method", "options")}
            return PetConfig(method=data.get("method", "lora"), options={**(data.get("options") or {}), **rest})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CpetError(f"{path or 'config'}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{path}." if path else ""
        raise CpetError(f"unknown config key {where}{unknown[0]}; valid keys here: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            value = _build(sub, value, f"{path}.{name}" if path else name)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise CpetError(f"{path or 'config'}: {e}") from None


# Named recovery recipes (``recovery: paper``): each sets how the modules start and whether they train.
RECOVERY_PRESETS = {
    "paper": {"init": "zero", "lr": None},  # U = 0, trained with the task at train.lr (the paper, the authors' code)
    "fitted": {"init": "fit", "lr": 0},  # fitted to the compression error, kept through training
    "auto": {"init": "auto", "lr": None},  # fitted + kept where the layer kept its shape, paper elsewhere
}


def _section(key: str, value: Any) -> Any:
    """``pet: ia3`` is ``pet: {method: ia3}``, and ``recovery: paper`` is that preset's fields, so either
    merges with ``pet.*`` / ``recovery.*`` keys given beside it."""
    if key == "pet" and isinstance(value, str):
        return {"method": value}
    if key == "recovery" and isinstance(value, str):
        if value not in RECOVERY_PRESETS:
            raise CpetError(f"recovery={value!r}: a recovery preset is one of {sorted(RECOVERY_PRESETS)}, or give "
                            "the fields (recovery.init, recovery.lr, ...)")
        return dict(RECOVERY_PRESETS[value])
    return value


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = _section(p, d.get(p, {}))
        if not isinstance(nxt, dict):
            raise CpetError(f"override {key}: {p} is not a section")
        d[p] = nxt
        d = nxt
    last = parts[-1]
    value = _section(last, value) if len(parts) == 1 else value
    old = d.get(last)  # a section given twice merges, as a file and its overrides do (pet.targets=[k] pet=ia3)
    d[last] = _merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-3", "task.name=rte"]`` -> nested dict; values parsed as YAML scalars/lists."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise CpetError(f"override {item!r} is not key=value (e.g. train.lr=1e-3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise CpetError(f"override {key}: cannot parse value {raw!r}: {e}") from None
        _set_dotted(out, key.strip(), value)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        v, old = _section(k, v), _section(k, out.get(k))
        out[k] = _merge(old, v) if isinstance(v, dict) and isinstance(old, dict) else v
    return out


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict:
    """A YAML file whose top level is a mapping (an empty file is {}); anything else is a CpetError."""
    p = Path(path)
    if not p.is_file():
        raise CpetError(f"{what} {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CpetError(f"{p} is not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise CpetError(f"{p}: top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> ExperimentConfig:
    """Read an experiment YAML (optional), apply dotted overrides, validate, return the config."""
    data: dict = _merge({}, base or {})  # sections given by name (recovery: auto, pet: ia3) expand here too
    if path is not None:
        data = _merge(data, read_yaml_mapping(path, "config file"))
    data = _merge(data, parse_overrides(overrides or []))
    return _build(ExperimentConfig, data, "")
