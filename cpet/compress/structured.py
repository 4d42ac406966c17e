"""SP: structured pruning of FFN neurons and attention heads; the linears become physically smaller.

    FFN neuron j (row j of every ffn_in, column j of ffn_out):
        magnitude:  s_j = (sum_in ||W_in[j, :]||) * ||W_out[:, j]||
        activation: s_j = E|h_j| * ||W_out[:, j]||              (h = ffn_out's input on calibration text)
    attention unit u (one KV head and the query heads that share it; one head without GQA):
        magnitude:  s_u = ||W_v[rows_u]||_F * ||W_o[:, cols_u]||_F
        activation: s_u = E||z_u|| * ||W_o[:, cols_u]||_F       (z = o's input, the heads' outputs)

Per layer the lowest-scoring fraction is removed: rows of q/k/v/ffn_in, columns of o/ffn_out. The kept
original indices are stored as buffers ``kept_out`` / ``kept_in`` on the shrunk layers, which is what
loading (``skeleton``) and PET inheritance (slicing the teacher's LoRA) read. The hidden size is kept.
Apply it before adding PET / recovery modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from cpet.compress.calibration import input_stats, record_inputs, run
from cpet.compress.int8 import Int8Linear, float_weight
from cpet.errors import CpetError
from cpet.layers import Adapted, set_module
from cpet.models import target_modules
from cpet.roles import ALL_ROLES
from cpet.typed import coerce_fields


@dataclass(frozen=True)
class Config:
    ffn: float = 0.5  # fraction of FFN neurons removed in each layer
    heads: float = 0.0  # fraction of attention heads (KV groups under GQA) removed in each layer
    score: str = "magnitude"  # magnitude | activation (needs calibration text)

    def __post_init__(self):
        coerce_fields(self, "structured")
        for field, v in (("ffn", self.ffn), ("heads", self.heads)):
            if not 0 <= v < 1:
                raise CpetError(f"structured.{field}={v} must lie in [0, 1)")
        if self.score not in ("magnitude", "activation"):
            raise CpetError(f"structured.score={self.score!r}: use magnitude or activation")

    @property
    def calibrated(self) -> bool:
        return self.score == "activation"


# ---------------------------------------------------------------- slicing layers
def slice_linear(layer: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Module:
    """A smaller copy of ``layer`` (nn.Linear or Int8Linear) keeping ``rows`` (outputs) / ``cols`` (inputs),
    with ``kept_out`` / ``kept_in`` buffers holding the kept indices of the original layer."""
    out_idx = torch.arange(layer.out_features) if rows is None else rows
    in_idx = torch.arange(layer.in_features) if cols is None else cols
    has_bias = getattr(layer, "bias", None) is not None
    if isinstance(layer, Int8Linear):
        new = Int8Linear(len(in_idx), len(out_idx), has_bias, layer.kernel)
        new.weight_int8.copy_(layer.weight_int8[out_idx][:, in_idx])
        new.scale.copy_(layer.scale[out_idx])
    elif isinstance(layer, nn.Linear):
        new = nn.Linear(len(in_idx), len(out_idx), bias=has_bias)
        new.weight.data.copy_(layer.weight.data[out_idx][:, in_idx])
        new.weight.requires_grad_(layer.weight.requires_grad)
    else:
        raise CpetError(f"structured pruning cannot shrink {type(layer).__name__} layers; "
                        "apply it before methods that change layer types (e.g. MoE)")
    if has_bias:
        new.bias.data.copy_(layer.bias.data[out_idx])
    for attr, idx, given in (("kept_out", out_idx, rows), ("kept_in", in_idx, cols)):
        old = getattr(layer, attr, None)
        if given is not None or old is not None:
            new.register_buffer(attr, (old[idx] if old is not None else idx).clone().long())
    return new



# ---------------------------------------------------------------- grouping by transformer layer
def _groups(model: nn.Module) -> dict[str, dict[str, list[str]]]:
    if any(isinstance(m, Adapted) for m in model.modules()):
        raise CpetError("structured pruning must run before PET / recovery modules are added (it reshapes layers)")
    if any(getattr(m, "roles", None) for m in model.modules()):
        raise CpetError("structured pruning must run before moefication in a plan")
    groups: dict[str, dict[str, list[str]]] = {}
    for name, role in target_modules(model, ALL_ROLES).items():
        m = re.match(r"^(.*?\.\d+)\.", name)
        key = m.group(1) if m else ""
        groups.setdefault(key, {}).setdefault(role, []).append(name)
    return groups


def _head_dim(model: nn.Module) -> int:
    c = model.config
    hd = getattr(c, "head_dim", None) or getattr(c, "d_kv", None)
    return int(hd) if hd else c.hidden_size // c.num_attention_heads


# ---------------------------------------------------------------- apply
@torch.no_grad()
def apply(model: nn.Module, cfg: Config, calib=None) -> nn.Module:
    groups = _groups(model)
    if cfg.heads > 0 and model.config.model_type in ("t5", "mt5"):
        raise CpetError("structured.heads: T5 shares one relative-position bias across layers, so its heads "
                        "cannot be pruned per layer; prune ffn only (heads: 0)")
    ffn_act, head_act = {}, {}
    if cfg.calibrated:
        if calib is None:
            raise CpetError("structured score=activation needs calibration text (pass a tokenizer to compress)")
        outs = [g["ffn_out"][0] for g in groups.values() if "ffn_out" in g]
        st = input_stats(model, outs, calib)
        ffn_act = {n: st[n]["abs"] / st[n]["n"] for n in outs}
        if cfg.heads > 0:
            hd = _head_dim(model)
            os_ = [g["o"][0] for g in groups.values() if "o" in g]
            sums: dict[str, torch.Tensor] = {}

            def acc(name, x):
                z = x.reshape(-1, x.shape[-1] // hd, hd).float().norm(dim=-1)  # (N, heads)
                sums[name] = sums.get(name, 0) + z.sum(0)

            with record_inputs(model, os_, acc):
                run(model, calib)
            n_tok = next(iter(st.values()))["n"]
            head_act = {n: s / n_tok for n, s in sums.items()}
    for g in groups.values():
        if cfg.ffn > 0 and "ffn_out" in g:
            _prune_ffn(model, g["ffn_in"], g["ffn_out"][0], cfg.ffn, ffn_act.get(g["ffn_out"][0]))
        if cfg.heads > 0 and "o" in g:
            _prune_heads(model, g, cfg.heads, head_act.get(g["o"][0]))
    return model


def _prune_ffn(model, ins: list[str], out: str, ratio: float, act: torch.Tensor | None) -> None:
    w_out = float_weight(model.get_submodule(out))  # (hidden, d_ff)
    d_ff = w_out.shape[1]
    n_keep = max(1, d_ff - int(round(ratio * d_ff)))
    col = w_out.norm(dim=0)  # (d_ff,)
    if act is not None:
        score = act * col
    else:
        score = sum(float_weight(model.get_submodule(n)).norm(dim=1) for n in ins) * col
    keep = torch.topk(score, n_keep).indices.sort().values
    for n in ins:
        set_module(model, n, slice_linear(model.get_submodule(n), rows=keep))
    set_module(model, out, slice_linear(model.get_submodule(out), cols=keep))


def _prune_heads(model, g: dict[str, list[str]], ratio: float, act: torch.Tensor | None) -> None:
    hd = _head_dim(model)
    q, k, v, o = (model.get_submodule(g[r][0]) for r in ("q", "k", "v", "o"))
    n_heads, n_kv = q.out_features // hd, k.out_features // hd
    per = n_heads // n_kv  # query heads per KV head (1 without GQA)
    w_o, w_v = float_weight(o), float_weight(v)
    o_cols = w_o.reshape(w_o.shape[0], n_kv, per * hd).norm(dim=(0, 2))  # (n_kv,)
    if act is not None:
        score = act.reshape(n_kv, per).sum(1) * o_cols
    else:
        score = w_v.reshape(n_kv, hd, -1).norm(dim=(1, 2)) * o_cols
    n_keep = max(1, n_kv - int(round(ratio * n_kv)))
    units = torch.topk(score, n_keep).indices.sort().values  # kept KV heads
    kv_rows = (units[:, None] * hd + torch.arange(hd)).flatten()
    q_heads = (units[:, None] * per + torch.arange(per)).flatten()
    q_rows = (q_heads[:, None] * hd + torch.arange(hd)).flatten()
    set_module(model, g["q"][0], slice_linear(q, rows=q_rows))
    set_module(model, g["k"][0], slice_linear(k, rows=kv_rows))
    set_module(model, g["v"][0], slice_linear(v, rows=kv_rows))
    set_module(model, g["o"][0], slice_linear(o, cols=q_rows))


def skeleton(model: nn.Module, cfg: Config, state: dict) -> nn.Module:
    """Shrink each target layer to the kept indices recorded in the saved tensors."""
    for name in target_modules(model, ALL_ROLES):
        rows, cols = state.get(f"{name}.kept_out"), state.get(f"{name}.kept_in")
        if rows is not None or cols is not None:
            set_module(model, name, slice_linear(model.get_submodule(name), rows=rows, cols=cols))
    return model
