"""Many tasks on one shared backbone: task modules in the slots of a bank, routed per batch row.

    every wrapped linear:  y = base(x) + per task segment s of the batch:
                               act_R( x W_down[s]^T ) W_up[s]^T          (one fused down / up pair)
    W_down[s] = [A_s; D_s]  (r_l + r_r, in)     W_up[s] = [scaling_s B_s, U_s]  (out, r_l + r_r)
    act_R: identity on the first r_l (LoRA) columns, the recovery activation on the last r_r

A task (LoRA + recovery + head + labels, a cpet task folder) is copied into a new last slot: per wrapped
layer one fused pair of its own ranks (unloading deletes them and moves the last slot into the hole, so
memory is really freed). Heads stay outside the backbone, one small module per task. A batch's rows carry
task names; each run of consecutive rows of one task is a segment (callers sort rows by task, so each task
is one), and each segment pays one down and one up matmul per layer whatever its task's branches are.

The plain reference (``cpet.task_modules.load_task_modules`` of each task on its own copy of the
backbone) stays; tests hold the bank to it. Training does not go through the bank: a task trains as
plain ``Adapted`` branches and is loaded here to serve.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from cpet.compress import load_compressed
from cpet.compress.moefication import in_experts
from cpet.errors import CpetError
from cpet.fingerprint import model_digest
from cpet.layers import Adapted, wrap
from cpet.models import (ClassificationHead, LMTaskModel, SpanHead, TaskModel, get_arch, load_backbone,
                         resolve_model_path)
from cpet.pet import METHODS
from cpet.recovery import ACTIVATIONS
from cpet.task_modules import is_language_model, read_task_folder


class Routing:
    """The current batch's task segments [(slot, start row, end row)], read by every bank branch."""

    def __init__(self):
        self.segments: list[tuple[int, int, int]] | None = None
        self.single: int | None = None  # every row on this slot, whatever the batch (generation)


class BankBranch(nn.Module):
    """One wrapped layer's add-ons for every slot: per slot one fused pair, W_down^T (in, r_l + r_r) and
    W_up^T (r_l + r_r, out) stored as the GEMMs read them, each of its task's own ranks (no padding; a slot whose task has no branch on
    this layer is None and costs nothing). Loading appends tensors, unloading deletes them: nothing is
    reallocated, so memory follows the loaded tasks."""

    def __init__(self, in_features: int, out_features: int, routing: Routing, activation: str):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.routing = routing
        self.act = ACTIVATIONS[activation]().forward  # the bound function: no module-call overhead
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, int] | None] = []  # per slot: (down, up, r_lora)

    def grow(self, slots: int) -> None:
        self.pairs += [None] * (slots - len(self.pairs))

    def set(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, D: torch.Tensor | None,
            U: torch.Tensor | None) -> None:
        """The slot's LoRA (A (r, in), B already scaled (out, r)) and recovery (D (k, in), U (out, k))."""
        downs = [t for t in (A, D) if t is not None]
        ups = [t for t in (B, U) if t is not None]
        if not downs:
            self.pairs[slot] = None
            return
        # stored as the GEMMs read them: down (in, r), up (r, out), both contiguous
        down, up = torch.cat(downs).t().contiguous(), torch.cat(ups, dim=1).t().contiguous()
        self.pairs[slot] = (down, up, 0 if A is None else A.shape[0])

    def drop(self, slot: int) -> None:
        """Remove ``slot``: the last slot moves into its place."""
        last = self.pairs.pop()
        if slot < len(self.pairs):
            self.pairs[slot] = last

    @property
    def nbytes(self) -> int:
        return sum(d.numel() * d.element_size() + u.numel() * u.element_size() for d, u, _ in filter(None, self.pairs))

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y`` (the base layer's output on ``x``) plus each segment's add-ons, accumulated in place
        (inference: one GEMM down, the activation on the recovery columns, one GEMM-accumulate up)."""
        routing, n = self.routing, x.shape[0]
        segments = ((routing.single, 0, n),) if routing.single is not None else routing.segments
        if segments is None:
            raise CpetError("a bank-wrapped backbone ran without task routing: call it through TaskBank")
        if torch.is_grad_enabled() or not y.is_contiguous():
            y = y.clone(memory_format=torch.contiguous_format)  # never write into a tensor autograd may need
        if n == 0:
            return y
        x2, y2 = x.reshape(-1, self.in_features), y.view(-1, self.out_features)  # (n*T, in), (n*T, out)
        per_row = x2.shape[0] // n
        for slot, a, b in segments:
            pair = self.pairs[slot]
            if pair is None:
                continue
            down, up, r_lora = pair
            if a == 0 and b == n:
                xs, ys = x2, y2
            else:
                xs, ys = x2[a * per_row:b * per_row], y2[a * per_row:b * per_row]
            h = torch.mm(xs, down)  # (rows, r_l + r_r)
            if r_lora == 0:
                h = self.act(h)
            elif r_lora < h.shape[1]:  # recovery columns through the activation
                h[:, r_lora:] = self.act(h[:, r_lora:])
            ys.addmm_(h, up)
        return y


@dataclass
class LoadedTask:
    name: str
    slot: int
    path: str
    head_type: str  # classify | span | lm
    labels: list[str]
    head: nn.Module | None
    bytes: int
    backbone: dict | None
    config: dict = field(default_factory=dict)
    pinned: bool = False


class TaskBank:
    """A shared (frozen, possibly compressed) backbone serving the tasks loaded into its slots.

    ``fingerprint``: the backbone's identity (``compression.json``'s fingerprint hash for a cpet
    compressed folder); a task folder that records another backbone is refused, naming both.
    ``activation``: the recovery activation of every task in this bank (one per bank).
    """

    def __init__(self, backbone: nn.Module, fingerprint: str | None = None, activation: str = "gelu"):
        if any(isinstance(m, Adapted) for m in backbone.modules()):
            raise CpetError("TaskBank needs a bare backbone (this one already carries task branches)")
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.fingerprint, self.activation = fingerprint, activation
        self.routing = Routing()
        self.tasks: dict[str, LoadedTask] = {}
        self.slots = 0
        self.branches: dict[str, BankBranch] = {}  # backbone module name -> its bank branch
        self.lock = threading.RLock()
        self.lm = is_language_model(backbone)

    @classmethod
    def open(cls, backbone: str | os.PathLike, activation: str = "gelu") -> tuple["TaskBank", object]:
        """(bank, tokenizer) on a ``cpet compress`` folder, or on an uncompressed model (name or folder)
        that base+PET tasks were trained on; the bank knows the backbone's fingerprint."""
        p = Path(backbone)
        if (p / "compression.json").is_file():
            model, tokenizer, meta = load_compressed(p)
            fp = (meta.get("fingerprint") or {}).get("hash")
            if tokenizer is None:
                raise CpetError(f"{p} has no tokenizer files; compress again with cpet compress")
        else:
            model, tokenizer = load_backbone(str(backbone))
            fp = model_digest(resolve_model_path(str(backbone)))
        return cls(model, fp, activation), tokenizer

    # ------------------------------------------------------------ loading
    def load(self, name: str, path: str | os.PathLike, pin: bool = False) -> LoadedTask:
        """Copy the task folder at ``path`` into a new slot under ``name`` (replacing a task of that name)."""
        p = Path(path)
        desc, state = read_task_folder(p)
        recorded = (desc.get("backbone") or {}).get("fingerprint")
        if recorded and self.fingerprint and recorded != self.fingerprint:
            raise CpetError(f"{p} was trained on backbone {recorded} ({(desc.get('backbone') or {}).get('path', '?')}),"
                            f" not on this one ({self.fingerprint}); load it on its own backbone")
        other = [m for m in METHODS if m in desc and not METHODS[m].fusable]
        if other:
            fusable = ", ".join(m for m in METHODS if METHODS[m].fusable)
            raise CpetError(f"{p} tunes {other[0]}; the bank serves tasks of low-rank additive PET ({fusable}) + "
                            "recovery, fused per layer. Evaluate it with cpet run, or load it on its own copy of the "
                            "backbone (load_task_modules)")
        fused = [m for m in METHODS if m in desc]
        if len(fused) > 1:
            raise CpetError(f"{p} tunes {' and '.join(fused)}; a bank slot fuses one low-rank PET per layer")
        inner = [n for m in fused for n in METHODS[m].layers_of(desc[m]) if in_experts(n)]
        if inner:
            raise CpetError(f"{p} has {fused[0]} inside a MoE FFN's experts ({inner[0]}); the bank fuses whole layers "
                            f"only. Load it on its own copy of the backbone (load_task_modules), or give {fused[0]} "
                            "attention targets")
        rec = desc.get("recovery")
        if rec and rec["activation"] != self.activation:
            raise CpetError(f"{p}: recovery activation {rec['activation']!r}, but this bank serves "
                            f"{self.activation!r} recovery modules (one activation per bank)")
        head_type = desc.get("head", "classify")
        if (head_type == "lm") != self.lm:
            raise CpetError(f"{p} is a {'text-to-text' if head_type == 'lm' else 'task-head'} task; this bank's "
                            f"backbone {'is' if self.lm else 'is not'} a language model")
        with self.lock:
            if name in self.tasks:
                self.unload(name)
            slot = self._new_slot()
            try:
                head = self._install(slot, desc, state, p)
            except Exception:
                for br in self.branches.values():
                    br.drop(slot)
                self.slots -= 1
                raise
            task = LoadedTask(name, slot, str(p), head_type, list(desc.get("labels") or []), head,
                              sum(v.numel() * v.element_size() for v in state.values()), desc.get("backbone"),
                              desc, pin)
            self.tasks[name] = task
        return task

    def _new_slot(self) -> int:
        self.slots += 1
        for br in self.branches.values():
            br.grow(self.slots)
        return self.slots - 1

    def _branch(self, name: str) -> BankBranch:
        if name not in self.branches:
            wrapped = wrap(self.backbone, name)
            br = BankBranch(wrapped.in_features, wrapped.out_features, self.routing, self.activation)
            br.grow(self.slots)
            wrapped.bank = br
            self.branches[name] = br
        return self.branches[name]

    @torch.no_grad()
    def _install(self, slot: int, desc: dict, state: dict[str, torch.Tensor], p: Path) -> nn.Module | None:
        prefix = "backbone."
        rec = desc.get("recovery")
        method = next((m for m in METHODS if m in desc), None)  # load() allows one, and only a fusable one
        pairs = METHODS[method].low_rank_pairs(desc[method], state) if method else {}
        names = set(pairs) | set((rec or {}).get("modules", []))
        for full in sorted(names):
            name = full[len(prefix):] if full.startswith(prefix) else full
            try:
                self.backbone.get_submodule(name)
            except AttributeError:
                raise CpetError(f"{p}: module {name!r} is not in this backbone; was the task trained on another "
                                "architecture or compression plan?") from None
            br = self._branch(name)
            A = B = D = U = None
            if full in pairs:
                A, B = pairs[full]  # (r, in), (out, r) with the scale folded in
                self._check(p, full, A, (A.shape[0], br.in_features))
                self._check(p, full, B, (br.out_features, A.shape[0]))
            if rec is not None and full in rec["modules"]:
                D, U = state[f"{full}.recovery.D"], state[f"{full}.recovery.U"]
                self._check(p, full, D, (rec["r"], br.in_features))
                self._check(p, full, U, (br.out_features, rec["r"]))
            br.set(slot, A, B, D, U)
        head_type = desc.get("head", "classify")
        if head_type == "lm":
            return None
        hidden = self.backbone.config.hidden_size if hasattr(self.backbone.config, "hidden_size") \
            else self.backbone.config.d_model
        head = SpanHead(hidden) if head_type == "span" else \
            ClassificationHead(hidden, desc["num_labels"], desc["pooling"] or get_arch(self.backbone).pooling)
        hs = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        try:
            head.load_state_dict(hs)
        except RuntimeError as e:
            raise CpetError(f"{p}: the task head does not fit ({str(e).splitlines()[0]})") from None
        return head.eval()

    @staticmethod
    def _check(p: Path, name: str, t: torch.Tensor, shape: tuple) -> None:
        if tuple(t.shape) != tuple(shape):
            raise CpetError(f"{p}: {name} has shape {tuple(t.shape)} but this backbone's layer needs {shape}; "
                            "was it trained on another backbone or compression plan?")

    def unload(self, name: str) -> None:
        with self.lock:
            task = self.tasks.pop(name, None)
            if task is None:
                raise CpetError(f"task {name!r} is not loaded (loaded: {sorted(self.tasks)})")
            last = self.slots - 1
            for br in self.branches.values():
                br.drop(task.slot)
            for other in self.tasks.values():
                if other.slot == last:
                    other.slot = task.slot
            self.slots = last

    # ------------------------------------------------------------ running
    @contextmanager
    def route(self, segments: list[tuple[int, int, int]]):
        """Run the backbone with rows [a, b) of the batch on the task in ``slot``, per segment."""
        with self.lock:
            self.routing.segments = segments
            try:
                yield
            finally:
                self.routing.segments = None

    @contextmanager
    def only(self, name: str):
        """Run the backbone with every row on task ``name`` (any batch shape: generation, formats)."""
        if name not in self.tasks:
            raise CpetError(f"task {name!r} is not loaded (loaded: {sorted(self.tasks)})")
        with self.lock:
            self.routing.single = self.tasks[name].slot
            try:
                yield
            finally:
                self.routing.single = None

    def segments(self, tasks: list[str]) -> list[tuple[int, int, int]]:
        """Contiguous runs of the same task in a batch's per-row task names -> (slot, start, end)."""
        unknown = sorted({t for t in tasks if t not in self.tasks})
        if unknown:
            raise CpetError(f"task(s) {unknown} not loaded (loaded: {sorted(self.tasks)})")
        out, start = [], 0
        for i in range(1, len(tasks) + 1):
            if i == len(tasks) or tasks[i] != tasks[start]:
                out.append((self.tasks[tasks[start]].slot, start, i))
                start = i
        return out

    @torch.no_grad()
    def hidden(self, tasks: list[str], **inputs) -> torch.Tensor:
        """Last hidden states (N, T, H) of a batch whose row i runs task ``tasks[i]``."""
        with self.route(self.segments(tasks)):
            return self.backbone(**inputs).last_hidden_state

    @torch.no_grad()
    def scores(self, tasks: list[str], input_ids, attention_mask, token_type_ids=None) -> list[torch.Tensor]:
        """Per row, its task head's output (classify: (C,) logits; span: (T, 2)), for task-head banks."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and get_arch(self.backbone).kind == "encoder":
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.hidden(tasks, **kwargs)
        out: list[torch.Tensor] = []
        for slot, a, b in self.segments(tasks):
            head = self.tasks[tasks[a]].head
            out += list(head(hidden[a:b], attention_mask[a:b]))
        return out

    def view(self, name: str) -> "BankTaskView":
        """One loaded task as a TaskModel-like module (formats' predict / evaluate run on it)."""
        if name not in self.tasks:
            raise CpetError(f"task {name!r} is not loaded (loaded: {sorted(self.tasks)})")
        return BankTaskView(self, name)

    @property
    def task_bytes(self) -> int:
        """Bytes of the loaded tasks' own tensors (as saved)."""
        return sum(t.bytes for t in self.tasks.values())

    @property
    def bank_bytes(self) -> int:
        """Bytes the slots take in the backbone's layers + the heads (= the tasks' own bytes: no padding)."""
        slots = sum(b.nbytes for b in self.branches.values())
        heads = sum(p.numel() * p.element_size() for t in self.tasks.values() if t.head is not None
                    for p in t.head.parameters())
        return slots + heads


class BankTaskView(nn.Module):
    """Every row on one task: what ``TaskModel`` / ``LMTaskModel`` return, read through the bank."""

    def __init__(self, bank: TaskBank, name: str):
        super().__init__()
        self._bank, self.name = bank, name
        task = bank.tasks[name]
        self.head_type = task.head_type
        self.backbone = bank.backbone
        self.head = task.head
        self.seq2seq = getattr(bank.backbone.config, "is_encoder_decoder", False)

    @property
    def config(self):
        return self.backbone.config

    # the task model's input handling (no virtual-token module here: the bank refuses such tasks on load)
    virtual_tokens = TaskModel.virtual_tokens
    backbone_inputs = TaskModel.backbone_inputs
    require_no_virtual_tokens = TaskModel.require_no_virtual_tokens

    def forward(self, input_ids, attention_mask, token_type_ids=None, num_choices=None, **kw):
        with self._bank.only(self.name):
            if self.head_type == "lm":
                return LMTaskModel.forward(self, input_ids, attention_mask, token_type_ids, num_choices, **kw)
            return TaskModel.forward(self, input_ids, attention_mask, token_type_ids, num_choices)
