"""Knowledge-recovery modules (CPET section 3.4): a bottleneck bypass beside each compressed linear.

    y = base(x) + act(dropout(x) D^T) U^T      D: (r, in), U: (out, r), U starts at 0

Frozen: the (compressed) base. Trained: D and U, jointly with the task's PET module, under
``task + alpha * MSE(teacher, student)`` (see ``distill``). A fresh module is a no-op.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn as nn

from cpet.config import RecoveryConfig
from cpet.compress.moefication import dense_ffn, ffn_blocks
from cpet.errors import CpetError
from cpet.layers import Adapted, attach, branch_layers, register_kind
from cpet.models import target_modules

register_kind("recovery", "add", rank=20)

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity}


class Recovery(nn.Module):
    kept = False  # set by a fit whose start training must keep (recovery.init=auto, or recovery.lr=0)

    def __init__(self, in_features: int, out_features: int, r: int, activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.D = nn.Parameter(torch.empty(r, in_features))
        self.U = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.D, a=math.sqrt(5))
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dropout(x) @ self.D.T) @ self.U.T  # (..., r) -> (..., out)


def add_recovery_to(model: nn.Module, names, cfg: RecoveryConfig) -> list[str]:
    """Attach a fresh recovery bypass to each named linear (wrapping it); returns the names."""
    return attach(model, names, "recovery", lambda i, o: Recovery(i, o, cfg.r, cfg.activation, cfg.dropout))


def apply(model: nn.Module, cfg: RecoveryConfig) -> nn.Module:
    """Add a recovery bypass on every linear whose role is in ``cfg.targets``."""
    add_recovery_to(model, target_modules(model, cfg.targets), cfg)
    return model


# ---------------------------------------------------------------- starting by undoing compression
@contextmanager
def branches_off(model: nn.Module, kind: str):
    """Temporarily detach every ``kind`` branch (e.g. the teacher's LoRA, to read the plain backbone)."""
    taken = []
    for m in model.modules():
        if isinstance(m, Adapted) and m._modules.get(kind) is not None:
            taken.append((m, m._modules.pop(kind)))
    try:
        yield model
    finally:
        for m, branch in taken:
            m._modules[kind] = branch


def _backbone_forward(model: nn.Module, batch: dict) -> None:
    bb = getattr(model, "backbone", model)
    if getattr(bb.config, "is_encoder_decoder", False):  # T5: the decoder reads the same text (teacher forcing)
        bb(**batch, decoder_input_ids=batch["input_ids"])
    else:
        bb(**batch)


def _reference_fns(student: nn.Module, reference: nn.Module, names: list[str]) -> dict[str, Callable]:
    """Student recovery module -> a function giving, for the student layer's input, what the reference
    (uncompressed) layer outputs on that same input: the layer of the same name (its LoRA included), or
    for a MoE FFN the reference's dense FFN. After structured pruning the input is placed in the kept
    columns of the reference's (the pruned ones read 0: their loss is the designed one, not an error a
    linear map of the kept inputs could undo) and the output cut to the kept rows."""
    bb = getattr(reference, "backbone", reference)
    blocks = None
    fns = {}
    for n in names:
        base = student.get_submodule(n).base
        if getattr(base, "roles", None):
            if blocks is None:
                blocks = ffn_blocks(bb)
            blk = next((b for b in blocks if n.endswith(b.block)), None)
            if blk is None:
                raise CpetError(f"recovery fit: no dense FFN in the reference model matches {n}")
            fns[n] = lambda x, blk=blk: dense_ffn(blk, bb, x)
            continue
        ref = _submodule(reference, n)
        kept_in, kept_out = getattr(base, "kept_in", None), getattr(base, "kept_out", None)

        def fn(x, ref=ref, kept_in=kept_in, kept_out=kept_out):
            if kept_in is not None and x.shape[-1] != ref.in_features:
                full = x.new_zeros(*x.shape[:-1], ref.in_features)
                full[..., kept_in] = x
                x = full
            y = ref.added(x) if isinstance(ref, Adapted) else ref(x)  # x is past the (shared) input transforms
            return y[..., kept_out] if kept_out is not None and y.shape[-1] != kept_out.numel() else y
        fns[n] = fn
    return fns


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.<name>``; a bare backbone also answers for a task model's ``backbone.<name>``."""
    if name.startswith("backbone.") and not hasattr(model, "backbone"):
        name = name[len("backbone."):]
    return model.get_submodule(name)


def keeps_shape(layer: nn.Module) -> bool:
    """Whether compression left this (wrapped) layer's shape: its error is then a weight error a fit can
    undo (int8, unstructured, 2:4); not after structured pruning (rows / columns gone) or for a MoE FFN
    (experts skipped), where what is lost depends on computation the student no longer does."""
    base = getattr(layer, "base", layer)
    return not getattr(base, "roles", None) and all(getattr(base, a, None) is None for a in ("kept_in", "kept_out"))


@torch.no_grad()
def fit_recovery(student: nn.Module, reference: nn.Module, calib, damp: float = 0.01,
                 log: Callable[[str], None] = print, only_kept_shape: bool = False,
                 keep: bool = False) -> dict[str, float]:
    """Start every recovery module of ``student`` as the best rank-r linear map that undoes its layer's
    compression error, fitted on calibration text (no task data, no training): EoRA's fit, generalised.

    For each wrapped layer, over calibration tokens: X = the student layer's input, R = what the
    reference (uncompressed) layer outputs on X - what the student layer outputs on X (LoRA on both
    sides; for a MoE FFN the reference's dense FFN). Each layer so fixes its own error only (fitting
    the error carried in from earlier layers as well, all layers at once, corrects it twice: on MiniLM
    it made the last hidden state's error 1.08 -> 1.15 under 2:4 + int8, where this fit gives 0.67).
    The rank-r M minimising ||R - M X||: with C = X^T X = Q L Q^T
    (damped by ``damp`` x its mean diagonal) and G = R^T X, M = trunc_r(G Q L^-1/2) L^-1/2 Q^T; when
    R = (W - W')X this is EoRA's eigenspace projection. A linear module (``activation: identity``) gets
    M = U D; a nonlinear one spends its rank on pairs, act(xA^T)B^T - act(-xA^T)B^T = (xA^T)B^T exactly
    for GELU / ReLU / SiLU, so it starts at the same function with rank r // 2 and training can bend it.
    Returns per module the share of ||R||^2 the fit removes on the calibration tokens.

    ``only_kept_shape``: fit only the layers whose shape compression kept (``keeps_shape``) and that it
    changed at all (an uncompressed layer's error is zero); the rest keep their start. ``keep``: mark the
    fitted modules ``kept``, so training leaves them as fitted.
    """
    names = branch_layers(student, "recovery")
    if only_kept_shape:
        names = [n for n in names if keeps_shape(student.get_submodule(n))]
    if not names:
        log("recovery fit: no layer to fit (every recovery module sits on a structurally pruned or MoE layer)")
        return {}
    ref_fn = _reference_fns(student, reference, names)
    stats: dict[str, dict] = {}

    def accumulate(name):
        def hook(module, args, output):
            # where the recovery module acts: after the layer's input transforms (IA3 on an FFN's inner
            # activations, say), before its output ones (a serial adapter); both sides share those transforms
            # (inherited, or fresh ones that start as the identity), so the error to undo is the add stage's
            x = module.transform_in(args[0].detach())
            y = module.added(x, skip=("recovery",))
            ref_y = ref_fn[name](x).double()
            r = (ref_y - y.double()).reshape(-1, y.shape[-1])
            x = x.reshape(-1, x.shape[-1]).double()
            s = stats.setdefault(name, {"C": x.new_zeros(x.shape[1], x.shape[1]),
                                        "G": x.new_zeros(r.shape[1], x.shape[1]), "rr": 0.0, "yy": 0.0, "n": 0})
            s["C"] += x.T @ x
            s["G"] += r.T @ x
            s["rr"] += float(r.pow(2).sum())
            s["yy"] += float(ref_y.pow(2).sum())
            s["n"] += x.shape[0]
        return hook

    was_training = (student.training, reference.training)
    student.eval()
    reference.eval()
    handles = [student.get_submodule(n).register_forward_hook(accumulate(n)) for n in names]
    try:
        for batch in calib.batches():
            _backbone_forward(student, batch)
    finally:
        for h in handles:
            h.remove()
        student.train(was_training[0])
        reference.train(was_training[1])
    removed = {}
    for n in names:
        module, s = student.get_submodule(n), stats[n]
        rec = module.recovery
        if only_kept_shape and s["rr"] <= 1e-10 * s["yy"]:  # not compressed (M alone leaves attention as it was):
            continue  # no error to undo, so it keeps its start and trains
        C, G = s["C"], s["G"]
        eps = damp * float(C.diagonal().mean()) + 1e-12
        lam, Q = torch.linalg.eigh(C + eps * torch.eye(C.shape[0], dtype=C.dtype))
        lam = lam.clamp(min=eps)
        inv_sqrt = lam.rsqrt()
        Uk, S, Vh = torch.linalg.svd((G @ Q) * inv_sqrt, full_matrices=False)
        linear = isinstance(rec.act, nn.Identity)
        k = min(rec.D.shape[0] if linear else rec.D.shape[0] // 2, S.shape[0])
        root = S[:k].sqrt()
        B = Uk[:, :k] * root  # (out, k)
        A = ((root[:, None] * Vh[:k]) * inv_sqrt) @ Q.T  # (k, in)
        M = B @ A
        after = s["rr"] - 2 * float((M * G).sum()) + float(((M @ C) * M).sum())
        removed[n] = 1.0 - after / s["rr"] if s["rr"] > 0 else 0.0
        D, U = rec.D, rec.U
        U.zero_()
        if linear:
            D[:k] = A.to(D)
            U[:, :k] = B.to(U)
        else:
            D[:k], D[k: 2 * k] = A.to(D), -A.to(D)
            U[:, :k], U[:, k: 2 * k] = B.to(U), -B.to(U)
        rec.kept = keep
    if not removed:
        log("recovery fit: no compressed layer to fit")
        return removed
    share = sum(removed.values()) / len(removed)
    log(f"recovery fit on {calib.input_ids.numel():,} calibration tokens: {len(removed)} modules, "
        f"on average {100 * share:.0f}% of each layer's output error removed")
    return removed
