"""UP: unstructured pruning by magnitude or Wanda, to an exact sparsity or an N:M pattern.

    magnitude: score_ij = |W_ij|                       (ranked per layer, or across all target layers)
    wanda:     score_ij = |W_ij| * ||X_j||_2           (ranked within each output row; Sun et al. 2023)
    N:M:       keep the N highest-scoring of every M consecutive inputs of a row ("2:4" = the paper's UP)

X_j is input feature j over task-agnostic calibration tokens (forward hooks, one pass over the model
as compressed so far). The zeros are written into the frozen weight (fp32 or int8), so the mask is
``weight != 0`` and composes with int8 in either order (symmetric quantization keeps zeros at zero).
Saved folders store such weights as non-zero values + a bitmask. Compute: ``kernel: auto`` times,
per fp32 layer, the dense matmul against a CSR sparse matmul at 128 tokens and keeps CSR only where
it measured faster; below 75% sparsity it is not even timed (PERF-NOTES saw CSR win only near 90%
on this CPU). int8 layers stay on the dense int8 kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from cpet.compress.calibration import input_stats
from cpet.compress.int8 import Int8Linear, float_weight
from cpet.errors import CpetError
from cpet.layers import set_module
from cpet.models import compressible_layers
from cpet.roles import ALL_ROLES, check_roles
from cpet.timing import median_latency
from cpet.typed import coerce_fields


@dataclass(frozen=True)
class Config:
    sparsity: float = 0.5
    pattern: str = "unstructured"  # unstructured | "N:M" such as "2:4"
    score: str = "magnitude"  # magnitude | wanda (needs calibration text)
    scope: str = "layer"  # layer | global (magnitude only: one threshold over all target layers)
    kernel: str = "auto"  # auto (CSR where measured faster) | dense | csr
    targets: tuple[str, ...] = ALL_ROLES

    def __post_init__(self):
        coerce_fields(self, "unstructured")
        check_roles(self.targets, "unstructured.targets")
        if self.score not in ("magnitude", "wanda"):
            raise CpetError(f"unstructured.score={self.score!r}: use magnitude or wanda")
        if self.kernel not in ("auto", "dense", "csr"):
            raise CpetError(f"unstructured.kernel={self.kernel!r}: use auto, dense or csr")
        if self.scope not in ("layer", "global"):
            raise CpetError(f"unstructured.scope={self.scope!r}: use layer or global")
        if self.scope == "global" and (self.score == "wanda" or self.pattern != "unstructured"):
            raise CpetError("unstructured.scope=global works with score=magnitude and pattern=unstructured only")
        if self.pattern == "unstructured":
            if not 0 <= self.sparsity < 1:
                raise CpetError(f"unstructured.sparsity={self.sparsity} must lie in [0, 1)")
        else:
            n, m = _parse_nm(self.pattern)
            object.__setattr__(self, "sparsity", 1 - n / m)

    @property
    def calibrated(self) -> bool:
        return self.score == "wanda"


def _parse_nm(pattern: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise CpetError(f"unstructured.pattern={pattern!r}: use 'unstructured' or N:M such as '2:4'") from None
    if not 0 < n < m:
        raise CpetError(f"unstructured.pattern={pattern!r}: need 0 < N < M")
    return n, m


def magnitude_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping exactly numel - round(sparsity * numel) entries of highest |score|."""
    n_prune = int(round(sparsity * score.numel()))
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if n_prune:
        idx = torch.topk(score.flatten().abs().float(), n_prune, largest=False).indices
        mask[idx] = False
    return mask.view_as(score)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the same number of highest-score entries in every output row (Wanda's comparison group)."""
    out_f, in_f = score.shape
    n_prune = int(round(sparsity * in_f))
    mask = torch.ones_like(score, dtype=torch.bool)
    if n_prune:
        idx = torch.topk(score.abs().float(), n_prune, dim=1, largest=False).indices
        mask.scatter_(1, idx, False)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive inputs (rows split into groups)."""
    out_f, in_f = score.shape
    if in_f % m:
        raise CpetError(f"{n}:{m} pruning needs in_features divisible by {m}, got {in_f}")
    groups = score.abs().float().reshape(out_f, in_f // m, m)  # (out, G, m)
    keep = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_f, in_f)


CSR_MIN_SPARSITY = 0.75  # below this CSR lost on every shape measured here (PERF-NOTES): not even timed


class CSRLinear(nn.Module):
    """A pruned fp32 linear computed as a CSR sparse matmul: y = (W_csr x^T)^T + b."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        csr = weight.detach().to_sparse_csr()
        self.register_buffer("crow", csr.crow_indices().to(torch.int32))
        self.register_buffer("col", csr.col_indices().to(torch.int32))
        self.register_buffer("values", csr.values().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def empty(cls, out_features: int, in_features: int, nnz: int, bias: bool) -> "CSRLinear":
        m = cls(torch.zeros(out_features, in_features), torch.zeros(out_features) if bias else None)
        m.col = torch.zeros(nnz, dtype=torch.int32)
        m.values = torch.zeros(nnz)
        return m

    def matrix(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, self.values, (self.out_features, self.in_features))

    @property
    def weight(self) -> torch.Tensor:
        return self.matrix().to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in)
        y = torch.sparse.mm(self.matrix(), flat.T).T  # (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def _csr_faster(layer: nn.Module, tokens: int = 128) -> bool:
    if not isinstance(layer, nn.Linear):
        return False

    x = torch.randn(tokens, layer.in_features)
    csr = CSRLinear(layer.weight, layer.bias)
    with torch.no_grad():
        return median_latency(lambda: csr(x), 7, 1) < 0.9 * median_latency(lambda: layer(x), 7, 1)


def _weight_and_float(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored weight to zero in place, and its float value (whose magnitude ranks entries)."""
    if isinstance(layer, nn.Linear):
        return layer.weight.data, layer.weight.data
    if isinstance(layer, Int8Linear):
        return layer.weight_int8, float_weight(layer)
    raise CpetError(f"unstructured pruning does not know layer type {type(layer).__name__}")


@torch.no_grad()
def apply(model: nn.Module, cfg: Config, calib=None) -> nn.Module:
    layers = compressible_layers(model, cfg.targets)
    stored = {name: _weight_and_float(layer) for name, layer in layers.items()}  # (stored weight, float value)
    scores = {name: f.abs() for name, (_, f) in stored.items()}
    if cfg.score == "wanda":
        if calib is None:
            raise CpetError("unstructured score=wanda needs calibration text (pass a tokenizer / calibration to compress)")
        stats = input_stats(model, list(layers), calib)
        for name in layers:
            scores[name] = scores[name] * stats[name]["sq"].sqrt()[None, :]  # |W_ij| * ||X_j||
    if cfg.scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        n_prune = int(round(cfg.sparsity * flat.numel()))
        threshold = torch.kthvalue(flat.float(), n_prune).values if n_prune else flat.min() - 1
    for name, layer in layers.items():
        w, s = stored[name][0], scores[name]
        if cfg.pattern != "unstructured":
            mask = nm_mask(s, *_parse_nm(cfg.pattern))
        elif cfg.scope == "global":
            mask = s > threshold
        elif cfg.score == "wanda":
            mask = row_mask(s, cfg.sparsity)
        else:
            mask = magnitude_mask(s, cfg.sparsity)
        w.mul_(mask.to(w.dtype))
        auto_csr = cfg.kernel == "auto" and cfg.sparsity >= CSR_MIN_SPARSITY and _csr_faster(layer)
        if isinstance(layer, nn.Linear) and (cfg.kernel == "csr" or auto_csr):
            set_module(model, name, CSRLinear(layer.weight, layer.bias))
    return model



def skeleton(model: nn.Module, cfg: Config, state: dict) -> nn.Module:
    """Shapes do not change; layers saved as CSR become empty CSRLinear slots of the saved size."""
    for name, layer in compressible_layers(model, cfg.targets).items():
        if f"{name}.crow" in state and isinstance(layer, nn.Linear):
            set_module(model, name, CSRLinear.empty(layer.out_features, layer.in_features, len(state[f"{name}.col"]),
                                              layer.bias is not None))
    return model
