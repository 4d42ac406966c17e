"""M: MoEfication (Zhang et al., 2022): split each FFN's neurons into E experts, route each token to
the top-k, and compute only those experts' neurons.

    FFN(x) = W_out act(W_in x + b_in) + b_out  =  sum_e W_out[:, S_e] act(W_in[S_e] x + b_in[S_e]) + b_out
    MoE(x) = sum_{e in topk(router(x))} (same expert term)          router(x) = W_2 tanh(W_1 x)

Experts: balanced k-means over the (normalized) rows of W_in (or, ``clustering: coactivation``, over
each neuron's activation pattern on calibration text), E clusters of exactly d_ff / E neurons.
Router: a small MLP trained on calibration tokens to match each token's distribution of activation
mass over experts (MoEfication trains its MLP router on the same signal). Compute: tokens are grouped
by expert and each expert runs one dense (fp32) or fbgemm int8 matmul pair on its tokens only.

The backbones here use GELU/SiLU, not T5's ReLU, so activations are not exactly sparse: the top-k
output error is measured and logged per layer (``moe_rel_error`` buffer). ``activation: relu``
swaps in ReLU ("ReLUfication"); that changes the function and wants recovery training.
``min_speedup``: each MoE FFN is timed against its dense FFN at compression time, on 16 tokens (one
short request) and on up to 4096 (a batch); the dense FFN is kept where MoE is slower in either (so a
plan never ships a slower model); 0 forces MoE everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpet.compress.calibration import record_inputs, run
from cpet.compress.int8 import (fake_quant_tokens, float_weight, prepack, quantize_per_channel, use_int8_kernel,
                               w8a8_linear)
from cpet.errors import CpetError
from cpet.layers import Adapted, set_module
from cpet.models import target_modules
from cpet.timing import median_latency
from cpet.typed import coerce_fields, require


@dataclass(frozen=True)
class Config:
    experts: int = 16
    top: float = 0.25  # fraction of experts per token (rounded up to >= 1 expert)
    clustering: str = "kmeans"  # kmeans (on W_in rows) | coactivation (on calibration activations)
    activation: str = "keep"  # keep | relu
    router_hidden: int = 128
    router_steps: int = 300
    min_speedup: float = 1.0  # keep the dense FFN where MoE measured slower than this

    def __post_init__(self):
        coerce_fields(self, "moefication")
        if self.experts < 2:
            raise CpetError(f"moefication.experts={self.experts} must be >= 2")
        if not 0 < self.top <= 1:
            raise CpetError(f"moefication.top={self.top} must lie in (0, 1]")
        if self.clustering not in ("kmeans", "coactivation"):
            raise CpetError(f"moefication.clustering={self.clustering!r}: use kmeans or coactivation")
        if self.activation not in ("keep", "relu"):
            raise CpetError(f"moefication.activation={self.activation!r}: use keep or relu")
        require(self.router_hidden >= 1, "moefication.router_hidden", self.router_hidden, ">= 1")
        require(self.router_steps >= 1, "moefication.router_steps", self.router_steps, ">= 1")
        require(self.min_speedup >= 0, "moefication.min_speedup", self.min_speedup, ">= 0 (0 = always MoE)")

    @property
    def calibrated(self) -> bool:
        return True  # the router is trained on calibration activations

    @property
    def k(self) -> int:
        return max(1, math.ceil(self.top * self.experts))


# ---------------------------------------------------------------- the FFN blocks of each architecture
@dataclass
class FFNBlock:
    block: str  # module replaced by the MoE
    ins: list[str]  # [W_in] or [W_gate, W_up] (gated: act(gate) * up)
    out: str  # W_out
    act: nn.Module
    identity: str | None = None  # a module to turn into Identity (BERT's output.dense)


def ffn_blocks(model: nn.Module) -> list[FFNBlock]:
    mt = model.config.model_type
    outs = [n for n, r in target_modules(model, ("ffn_out",)).items()]
    blocks = []
    for out in sorted(outs):
        if mt in ("bert", "roberta", "xlm-roberta", "electra"):
            layer = out[: -len(".output.dense")]
            block = layer + ".intermediate"
            blocks.append(FFNBlock(block, [block + ".dense"], out, model.get_submodule(block).intermediate_act_fn,
                                   identity=out))
        elif mt in ("llama", "mistral", "qwen2"):
            block = out[: -len(".down_proj")]
            blocks.append(FFNBlock(block, [block + ".gate_proj", block + ".up_proj"], out,
                                   model.get_submodule(block).act_fn))
        elif mt in ("t5", "mt5"):
            block = out[: -len(".wo")]
            mod = model.get_submodule(block)
            ins = [block + ".wi_0", block + ".wi_1"] if hasattr(mod, "wi_0") else [block + ".wi"]
            blocks.append(FFNBlock(block, ins, out, mod.act))
        else:
            raise CpetError(f"moefication: no FFN block map for {mt!r}")
    return blocks


# ---------------------------------------------------------------- the MoE FFN
def _b(layer: nn.Module) -> torch.Tensor | None:
    b = getattr(layer, "bias", None)
    return None if b is None else b.detach().float()


class Port(nn.Module):
    """An inner projection of the MoE FFN as PET sees it: a layer of the dense FFN's shape (``ffn_in``:
    d -> d_ff per input linear; ``ffn_out``: d_ff -> d) that the MoE computes expert by expert. PET
    branches hang on it (through ``Adapted``) as on the dense layer, in the original neuron order, so a
    teacher's FFN modules move onto it unchanged; the MoE applies them to its selected experts only."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise CpetError("a MoE port is computed by its MoE FFN, not called")


class MoEFFN(nn.Module):
    """Experts stored stacked: ``w_in`` (n_in, E, m, d), ``w_out`` (E, d, m); int8 experts keep the
    dense layers' per-row scales (exact: a neuron's row/column scale does not depend on its expert).

    ``in_ports`` / ``out_port``: the dense FFN's first linear(s) and last linear as PET sees them (see
    ``Port``). With PET on them the MoE computes in the original neuron order: pre-activations of the
    selected experts (zero elsewhere) + the ports' branches, the activation masked to the selected
    experts' neurons, then the last linear expert by expert + its branches. A teacher's FFN PET so
    inherits as it is: with every expert selected the ported MoE is the dense FFN with that PET."""

    roles = ("ffn_in", "ffn_out")  # what PET / recovery targeting sees this module as

    def __init__(self, d: int, d_ff: int, experts: int, k: int, n_in: int, act: nn.Module, router_hidden: int,
                 bias_in: bool, bias_out: bool, int8: bool):
        super().__init__()
        m = d_ff // experts
        self.in_features = self.out_features = d
        self.experts, self.k, self.m, self.int8 = experts, k, m, int8
        self.act = act
        wdt = torch.int8 if int8 else torch.float32
        self.register_buffer("w_in", torch.zeros(n_in, experts, m, d, dtype=wdt))
        self.register_buffer("w_out", torch.zeros(experts, d, m, dtype=wdt))
        self.register_buffer("s_in", torch.ones(n_in, experts, m) if int8 else None)
        self.register_buffer("s_out", torch.ones(d) if int8 else None)
        self.register_buffer("b_in", torch.zeros(n_in, experts, m) if bias_in else None)
        self.register_buffer("b_out", torch.zeros(d) if bias_out else None)
        self.register_buffer("perm", torch.arange(d_ff))  # expert-ordered position -> original neuron
        self.register_buffer("moe_rel_error", torch.zeros(()))  # measured top-k output error (calibration)
        self.router = nn.Sequential(nn.Linear(d, router_hidden), nn.Tanh(), nn.Linear(router_hidden, experts))
        for p in self.router.parameters():
            p.requires_grad_(False)
        self._packed: dict = {}
        self.in_ports = nn.ModuleList(Port(d, d_ff) for _ in range(n_in))  # no tensors: state dicts unchanged
        self.out_port = Port(d_ff, d)

    def ports(self, role: str) -> list[str]:
        """The names (under this module) of the ports playing ``role``."""
        return [f"in_ports.{i}" for i in range(len(self.in_ports))] if role == "ffn_in" else \
            ["out_port"] if role == "ffn_out" else []

    def _ported(self) -> bool:
        return any(isinstance(p, Adapted) and p.has_branches() for p in (*self.in_ports, self.out_port))

    @property
    def flops_per_token(self) -> int:
        n_in = self.w_in.shape[0]
        d = self.in_features
        return self.k * self.m * d * (n_in + 1) + d * self.router[0].out_features + self.router[2].in_features * self.experts

    # -- expert weights, dequantized (training path / reference) or packed for fbgemm (inference)
    def _deq_in(self, i: int, e: int) -> torch.Tensor:
        w = self.w_in[i, e]
        return w.float() * self.s_in[i, e][:, None] if self.int8 else w

    def _deq_out(self, e: int) -> torch.Tensor:
        w = self.w_out[e]
        return w.float() * self.s_out[:, None] if self.int8 else w

    def _pack(self, key, w_int8, scale):
        if key not in self._packed:
            self._packed[key] = prepack(w_int8, scale)
        return self._packed[key]

    def _pre(self, x: torch.Tensor, i: int, e: int, fast: bool) -> torch.Tensor:
        """Expert e's pre-activations of input linear i on its tokens x (n, d) -> (n, m). int8 experts
        quantize activations per token, as Int8Linear (fbgemm when ``fast``, else simulated in float)."""
        b = None if self.b_in is None else self.b_in[i, e]
        if fast:
            return w8a8_linear(x, self._pack(("in", i, e), self.w_in[i, e], self.s_in[i, e]), b)
        return F.linear(fake_quant_tokens(x) if self.int8 else x, self._deq_in(i, e), b)

    def _post(self, h: torch.Tensor, e: int, fast: bool) -> torch.Tensor:
        """Expert e's last linear on its activations h (n, m) -> (n, d), without b_out."""
        if fast:
            return w8a8_linear(h, self._pack(("out", e), self.w_out[e], self.s_out), None)
        return F.linear(fake_quant_tokens(h) if self.int8 else h, self._deq_out(e))

    def _expert(self, x: torch.Tensor, e: int, fast: bool) -> torch.Tensor:
        """One expert on its tokens x (n, d) -> (n, d), without b_out."""
        hs = [self._pre(x, i, e, fast) for i in range(self.w_in.shape[0])]
        return self._post(self.act(hs[0]) * hs[1] if len(hs) == 2 else self.act(hs[0]), e, fast)

    @torch.no_grad()
    def quantize_(self) -> None:
        """fp32 experts -> int8 with the dense layers' scales (per neuron for W_in, per output for W_out)."""
        if self.int8:
            return
        n_in, E, m, d = self.w_in.shape
        q, s = quantize_per_channel(self.w_in.reshape(-1, d))  # one row per neuron
        self.w_in, self.s_in = q.reshape(n_in, E, m, d), s.reshape(n_in, E, m)
        full = self.w_out.permute(1, 0, 2).reshape(d, E * m)  # (d, d_ff) in expert order
        q, s = quantize_per_channel(full)
        self.w_out, self.s_out = q.reshape(d, E, m).permute(1, 0, 2).contiguous(), s
        self.int8 = True
        self._packed = {}

    def route(self, x: torch.Tensor) -> torch.Tensor:
        return self.router(x).topk(self.k, dim=-1).indices  # (N, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, d)
        fast = self.int8 and use_int8_kernel(flat)
        if self.k == self.experts:
            idx = None
        else:
            idx = self.route(flat)  # (N, k)
        if self._ported():
            return self._forward_ported(flat, idx, fast).reshape(*shape[:-1], self.out_features)
        out = flat.new_zeros(flat.shape[0], self.out_features)
        for e in range(self.experts):
            if idx is None:
                tokens = None
            else:
                tokens = (idx == e).any(-1).nonzero().squeeze(-1)  # (n_e,)
                if tokens.numel() == 0:
                    continue
            xe = flat if tokens is None else flat.index_select(0, tokens)
            ye = self._expert(xe, e, fast)
            out = out + ye if tokens is None else out.index_add(0, tokens, ye)
        if self.b_out is not None:
            out = out + self.b_out
        return out.reshape(*shape[:-1], self.out_features)


    def _forward_ported(self, flat: torch.Tensor, idx: torch.Tensor | None, fast: bool) -> torch.Tensor:
        """The MoE with PET on its ports, in the original neuron order (see the class docstring)."""
        n, m = flat.shape[0], self.m
        groups = []  # per expert: (its tokens or None for all, its neurons in the original order)
        for e in range(self.experts):
            tokens = None if idx is None else (idx == e).any(-1).nonzero().squeeze(-1)
            if tokens is None or tokens.numel():
                groups.append((e, tokens, self.perm[e * m: (e + 1) * m]))
        d_ff = self.experts * m

        def first(i: int):
            def base(x: torch.Tensor) -> torch.Tensor:
                full = x.new_zeros(n, d_ff)
                for e, tokens, neurons in groups:
                    xe = x if tokens is None else x.index_select(0, tokens)
                    pe = self._pre(xe, i, e, fast)
                    if tokens is None:
                        full[:, neurons] = pe
                    else:
                        full[tokens[:, None], neurons[None, :]] = pe
                return full
            return base

        def last(h: torch.Tensor) -> torch.Tensor:
            out = h.new_zeros(n, self.out_features)
            for e, tokens, neurons in groups:
                he = h[:, neurons] if tokens is None else h[tokens[:, None], neurons[None, :]]
                ye = self._post(he, e, fast)
                out = out + ye if tokens is None else out.index_add(0, tokens, ye)
            return out if self.b_out is None else out + self.b_out

        run = lambda port, x, base: port.forward_with(x, base) if isinstance(port, Adapted) else base(x)  # noqa: E731
        pre = [run(p, flat, first(i)) for i, p in enumerate(self.in_ports)]
        h = self.act(pre[0]) * pre[1] if len(pre) == 2 else self.act(pre[0])
        if idx is not None:  # the neurons of experts a token did not select stay silent
            selected = torch.zeros(n, d_ff, dtype=torch.bool, device=h.device)
            for e, tokens, neurons in groups:
                selected[tokens[:, None], neurons[None, :]] = True
            h = h * selected
        return run(self.out_port, h, last)


def in_experts(name: str) -> bool:
    """Whether a layer name is a MoE FFN's port (PET there sits inside the experts)."""
    return ".in_ports." in name or name.endswith(".out_port")


def port_sources(model_type: str, block: str, n_in: int) -> tuple[list[str], str]:
    """The dense FFN's (first linear(s), last linear) names for the MoE that replaced ``block``: the layers
    whose PET its ports take. (``ffn_blocks`` reads the same names off a dense model; the BERT test that a MoE
    student with every expert equals its dense teacher holds the two together.)"""
    if model_type in ("bert", "roberta", "xlm-roberta", "electra"):
        return [block + ".dense"], block[: -len("intermediate")] + "output.dense"
    if model_type in ("llama", "mistral", "qwen2"):
        return [block + ".gate_proj", block + ".up_proj"], block + ".down_proj"
    if model_type in ("t5", "mt5"):
        return ([block + ".wi_0", block + ".wi_1"] if n_in == 2 else [block + ".wi"]), block + ".wo"
    raise CpetError(f"moefication: no FFN block map for {model_type!r}")


# ---------------------------------------------------------------- building experts
def balanced_kmeans(x: torch.Tensor, k: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Assign each row of x (n, f) to one of k clusters of exactly n/k rows; returns labels (n,).

    Lloyd iterations whose assignment step is greedy and capacity-constrained: (row, centre) pairs are
    taken nearest first, a row joins a centre while the centre has room.
    """
    n = x.shape[0]
    if n % k:
        raise CpetError(f"moefication: d_ff={n} is not divisible by experts={k}")
    cap = n // k
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(n, generator=g)[:k]].clone()
    labels: list[int] = []
    for _ in range(iters):
        order = torch.argsort(torch.cdist(x, centers).flatten()).tolist()
        labels, count, left = [-1] * n, [0] * k, n
        for flat in order:
            i, c = divmod(flat, k)
            if labels[i] < 0 and count[c] < cap:
                labels[i] = c
                count[c] += 1
                left -= 1
                if not left:
                    break
        lab = torch.tensor(labels)
        new = torch.stack([x[lab == c].mean(0) for c in range(k)])
        if torch.allclose(new, centers, atol=1e-6):
            break
        centers = new
    return torch.tensor(labels)


def _train_router(moe: MoEFFN, xs: torch.Tensor, mass: torch.Tensor, steps: int, seed: int = 0) -> None:
    """Fit router logits to each token's distribution of activation mass over experts (KL)."""
    target = mass / mass.sum(-1, keepdim=True).clamp(min=1e-9)  # (N, E)
    params = list(moe.router.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, xs.shape[0], (min(1024, xs.shape[0]),), generator=g)
            logp = F.log_softmax(moe.router(xs[idx]), -1)
            loss = F.kl_div(logp, target[idx], reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in params:
        p.requires_grad_(False)



def dense_ffn(blk: FFNBlock, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    hs = [model.get_submodule(n)(x) for n in blk.ins]
    h = blk.act(hs[0]) * hs[1] if len(hs) == 2 else blk.act(hs[0])
    return model.get_submodule(blk.out)(h)


def build_moe(model: nn.Module, blk: FFNBlock, cfg: Config, act_override: nn.Module | None = None) -> MoEFFN:
    """An (untrained-router) MoEFFN with the block's neurons in expert order (see ``apply``)."""
    ins = [model.get_submodule(n) for n in blk.ins]
    out = model.get_submodule(blk.out)
    d, d_ff = ins[0].in_features, ins[0].out_features
    int8 = all(hasattr(layer, "weight_int8") for layer in ins + [out])
    return MoEFFN(d, d_ff, cfg.experts, cfg.k, len(ins), act_override or blk.act, cfg.router_hidden,
                  _b(ins[0]) is not None, _b(out) is not None, int8)


@torch.no_grad()
def _fill(moe: MoEFFN, model: nn.Module, blk: FFNBlock, perm: torch.Tensor) -> None:
    ins = [model.get_submodule(n) for n in blk.ins]
    out = model.get_submodule(blk.out)
    E, m = moe.experts, moe.m
    moe.perm.copy_(perm)
    for i, layer in enumerate(ins):
        w = layer.weight_int8 if moe.int8 else float_weight(layer)
        moe.w_in[i].copy_(w[perm].reshape(E, m, -1))
        if moe.int8:
            moe.s_in[i].copy_(layer.scale[perm].reshape(E, m))
        if moe.b_in is not None:
            moe.b_in[i].copy_(_b(layer)[perm].reshape(E, m))
    w = out.weight_int8 if moe.int8 else float_weight(out)  # (d, d_ff)
    moe.w_out.copy_(w[:, perm].reshape(w.shape[0], E, m).permute(1, 0, 2))
    if moe.int8:
        moe.s_out.copy_(out.scale)
    if moe.b_out is not None:
        moe.b_out.copy_(_b(out))


def _time(fn, x) -> float:

    return median_latency(lambda: fn(x), repeats=7, warmup=1)


@torch.no_grad()
def apply(model: nn.Module, cfg: Config, calib=None, log=print) -> nn.Module:
    if calib is None:
        raise CpetError("moefication needs calibration text to train its routers (pass a tokenizer to compress)")
    if any(isinstance(m, Adapted) for m in model.modules()):
        raise CpetError("moefication must run before PET / recovery modules are added")
    blocks = ffn_blocks(model)
    # 1. record each FFN's input tokens (the calibration windows have no padding)
    inputs: dict[str, list[torch.Tensor]] = {}
    with record_inputs(model, [b.ins[0] for b in blocks], lambda n, x: inputs.setdefault(n, []).append(x.reshape(-1, x.shape[-1]))):
        run(model, calib)
    for blk in blocks:
        xs = torch.cat(inputs.pop(blk.ins[0]))  # (N, d)
        act = nn.ReLU() if cfg.activation == "relu" else None
        moe = build_moe(model, blk, cfg, act)
        ins = [model.get_submodule(n) for n in blk.ins]
        hs = [layer(xs) for layer in ins]
        h = (moe.act(hs[0]) * hs[1] if len(hs) == 2 else moe.act(hs[0]))  # (N, d_ff) activations
        if cfg.clustering == "kmeans":
            feats = torch.cat([float_weight(layer) for layer in ins], dim=1)
            feats = feats / feats.norm(dim=1, keepdim=True).clamp(min=1e-9)
        else:
            feats = (h > h.abs().mean()).float().T  # (d_ff, N) neuron co-activation patterns
        labels = balanced_kmeans(feats, cfg.experts)
        perm = torch.argsort(labels, stable=True)
        _fill(moe, model, blk, perm)
        mass = h[:, perm].abs().reshape(h.shape[0], cfg.experts, -1).sum(-1)  # (N, E)
        _train_router(moe, xs, mass, cfg.router_steps)
        dense_y = dense_ffn(blk, model, xs) if act is None else None
        moe_y = moe(xs)
        ref = dense_y if dense_y is not None else _all_experts(moe)(xs)
        err = ((moe_y - ref).norm() / ref.norm()).item()
        moe.moe_rel_error.fill_(err)
        keep_frac = mass.topk(moe.k, -1).values.sum(-1).div(mass.sum(-1)).mean().item()
        speed = None
        if cfg.min_speedup > 0:  # the worse of a single short request (16 tokens) and a full batch (<= 4096)
            speed = min(_time(lambda x: dense_ffn(blk, model, x), xs[:n]) / _time(moe, xs[:n])
                        for n in (min(16, len(xs)), min(4096, len(xs))))
        msg = (f"  moe {blk.block}: {cfg.experts} experts, top {moe.k}; top-k holds {keep_frac:.0%} of activation mass; "
               f"output rel. error {err:.3f}" + (f"; {speed:.2f}x vs dense" if speed is not None else ""))
        if speed is not None and speed < cfg.min_speedup:
            log(msg + f" -> kept dense (below min_speedup {cfg.min_speedup})")
            continue
        log(msg)
        set_module(model, blk.block, moe)
        if blk.identity:
            set_module(model, blk.identity, nn.Identity())
    return model


def _all_experts(moe: MoEFFN) -> MoEFFN:
    """A view of ``moe`` computing every expert (the dense FFN, in expert order)."""
    import copy

    full = copy.copy(moe)
    full.k = moe.experts
    return full


def skeleton(model: nn.Module, cfg: Config, state: dict) -> nn.Module:
    """Put an empty MoEFFN wherever the saved model has one (layers that fell back stay dense), sized
    from the saved tensors (an earlier structured-pruning step may have shrunk d_ff)."""
    for blk in ffn_blocks(model):
        if f"{blk.block}.perm" in state:
            n_in, E, m, d = state[f"{blk.block}.w_in"].shape
            moe = MoEFFN(d, E * m, E, cfg.k, n_in, nn.ReLU() if cfg.activation == "relu" else blk.act,
                         cfg.router_hidden, f"{blk.block}.b_in" in state, f"{blk.block}.b_out" in state,
                         state[f"{blk.block}.w_in"].dtype == torch.int8)
            set_module(model, blk.block, moe)
            if blk.identity:
                set_module(model, blk.identity, nn.Identity())
    return model
