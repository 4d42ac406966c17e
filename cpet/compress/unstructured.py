"""UP: unstructured magnitude pruning, per layer, to an exact sparsity or an N:M pattern.

    keep W_ij iff |W_ij| is among the largest (1 - sparsity) of its layer      (pattern "unstructured")
    keep the N largest |W| of every M consecutive inputs of a row               (pattern "2:4" etc.)

The zeros are written into the frozen weight (fp32 or int8), so the pruning mask is ``weight != 0``
and composes with int8 in either order (symmetric quantization keeps zeros exactly zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from cpet.config import ALL_ROLES, _check_roles
from cpet.errors import CpetError


@dataclass(frozen=True)
class Config:
    sparsity: float = 0.5
    pattern: str = "unstructured"  # unstructured | "N:M" such as "2:4"
    targets: tuple[str, ...] = ALL_ROLES

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        _check_roles(self.targets, "unstructured.targets")
        if self.pattern == "unstructured":
            if not 0 <= self.sparsity < 1:
                raise CpetError(f"unstructured.sparsity={self.sparsity} must lie in [0, 1)")
        else:
            n, m = _parse_nm(self.pattern)
            object.__setattr__(self, "sparsity", 1 - n / m)


def _parse_nm(pattern: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise CpetError(f"unstructured.pattern={pattern!r}: use 'unstructured' or N:M such as '2:4'") from None
    if not 0 < n < m:
        raise CpetError(f"unstructured.pattern={pattern!r}: need 0 < N < M")
    return n, m


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping exactly round((1 - sparsity) * numel) largest-magnitude entries."""
    n_prune = int(round(sparsity * w.numel()))
    mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    if n_prune:
        idx = torch.topk(w.abs().flatten().float(), n_prune, largest=False).indices
        mask[idx] = False
    return mask.view_as(w)


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest |w| in every group of m consecutive inputs (rows split into groups)."""
    out_f, in_f = w.shape
    if in_f % m:
        raise CpetError(f"{n}:{m} pruning needs in_features divisible by {m}, got {in_f}")
    groups = w.abs().float().reshape(out_f, in_f // m, m)  # (out, G, m)
    keep = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_f, in_f)


def _weight_and_score(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored weight to zero in place, and the float weight whose magnitude ranks entries."""
    if isinstance(layer, nn.Linear):
        return layer.weight.data, layer.weight.data
    if hasattr(layer, "weight_int8"):
        return layer.weight_int8, layer.dequantize()
    raise CpetError(f"unstructured pruning does not know layer type {type(layer).__name__}")


@torch.no_grad()
def apply(model: nn.Module, cfg: Config) -> nn.Module:
    from cpet.models import compressible_layers

    for layer in compressible_layers(model, cfg.targets).values():
        w, score = _weight_and_score(layer)
        if cfg.pattern == "unstructured":
            mask = magnitude_mask(score, cfg.sparsity)
        else:
            mask = nm_mask(score, *_parse_nm(cfg.pattern))
        w.mul_(mask.to(w.dtype))
    return model
