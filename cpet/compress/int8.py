"""Q: 8-bit weights, symmetric per output channel (and per row of the token embedding).

    W ~= scale[:, None] * Wq,   Wq = clamp(round(W / scale), -127, 127) in int8,   scale = max|W_row| / 127

Stored as int8 + fp32 scales (buffers ``weight_int8``, ``scale``), never as float. Optional
SmoothQuant-style smoothing (``smooth: alpha`` > 0, Xiao et al. 2023) moves activation outliers into the
weights before quantizing: per input channel s_j = max|X_j|^alpha / max|W_:j|^(1-alpha) from calibration
text, W' = W diag(s) is quantized, and the input is divided by s at run time (buffer ``smooth``); the
product is unchanged in exact arithmetic, but the per-tensor int8 activations lose far less. Applied to
the LayerNorm-fed q, k, v and ffn_in only. Two compute paths:
- training (autograd on): dequantize and run an fp32 matmul, so gradients reach the input (and every
  layer below) through the frozen weights;
- inference (autograd off, fp32 input): fbgemm's dynamic int8 linear (activations quantized per
  tensor on the fly, int8 GEMM); measured faster than fp32 on this CPU (see bench/).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpet.config import ALL_ROLES, EMBED_ROLE, _check_roles


# As SmoothQuant: only linears fed by a LayerNorm (whose outlier channels are systematic). Smoothing
# o / ffn_out measured worse on MiniLM (their inputs' calibration maxima do not transfer across text).
SMOOTH_ROLES = ("q", "k", "v", "ffn_in")


@dataclass(frozen=True)
class Config:
    targets: tuple[str, ...] = ALL_ROLES + (EMBED_ROLE,)
    kernel: str = "auto"  # auto: fbgemm when grad is off, else dequantize | dequant: always dequantize
    smooth: float = 0.0  # SmoothQuant alpha in (0, 1]; 0 = off. Needs calibration text.
    # roles computed weight-only (int8 storage, dequantized fp32 matmul) also at inference: the W8A8
    # kernel quantizes activations per tensor, which SwiGLU's down-projection inputs (outliers) do not
    # survive (SmolLM2 logit cosine: 0.835 with W8A8 on ffn_out alone, >= 0.971 on any other role;
    # bench/results/int8_fidelity_smollm2.md)
    weight_only: tuple[str, ...] = ()

    @property
    def calibrated(self) -> bool:
        return self.smooth > 0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "weight_only", tuple(self.weight_only))
        _check_roles(self.targets, "int8.targets", ALL_ROLES + (EMBED_ROLE,))
        if self.weight_only:
            _check_roles(self.weight_only, "int8.weight_only", ALL_ROLES)
        from cpet.errors import CpetError

        if self.kernel not in ("auto", "dequant"):
            raise CpetError(f"int8.kernel={self.kernel!r}: use auto or dequant")
        if not 0 <= self.smooth <= 1:
            raise CpetError(f"int8.smooth={self.smooth} must lie in [0, 1] (0 = off; SmoothQuant uses 0.5)")


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (int8 weights, fp32 scale per row)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed = None  # fbgemm packed weights, rebuilt when the int8 buffer changes
        self._packed_key = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "auto", smooth: torch.Tensor | None = None) -> "Int8Linear":
        """Quantize ``linear``; with ``smooth`` (in,) the stored weight is W diag(smooth) and inputs are
        divided by ``smooth`` at run time."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        w = linear.weight.detach().float()
        if smooth is not None:
            m.register_buffer("smooth", smooth.float().clone())
            w = w * m.smooth[None, :]
        q, s = quantize_per_channel(w)
        m.weight_int8.copy_(q)
        m.scale.copy_(s)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        for attr in ("kept_in", "kept_out"):  # traces of structured pruning travel with the layer
            if getattr(linear, attr, None) is not None:
                m.register_buffer(attr, getattr(linear, attr).clone())
        return m

    @property
    def weight(self) -> torch.Tensor:
        """The stored int8 weight (HF code such as T5's FFN inspects ``.weight.dtype``)."""
        return self.weight_int8

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale[:, None]  # (out, in)

    def _packed_params(self):
        key = (self.weight_int8.data_ptr(), self.weight_int8._version, self.scale._version,
               None if self.bias is None else self.bias._version)
        if self._packed is None or self._packed_key != key:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(
                    self.weight_int8, self.scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
                self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "smooth", None) is not None:
            x = x / self.smooth.to(x.dtype)
        fast = (self.kernel == "auto" and not torch.is_grad_enabled() and x.dtype == torch.float32
                and x.device.type == "cpu" and _fbgemm_available())
        if fast:
            # reduce_range: 7-bit activations avoid int16 saturation in fbgemm's AVX2 kernel
            return torch.ops.quantized.linear_dynamic(x, self._packed_params(), True)
        w = self.dequantize().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Embedding(nn.Module):
    """Token embedding stored as int8 rows + one fp32 scale per row; a lookup dequantizes only those rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx)
        q, s = quantize_per_channel(emb.weight)
        m.weight_int8.copy_(q)
        m.scale.copy_(s)
        return m

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_int8

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_int8).float() * self.scale[ids].unsqueeze(-1)  # (..., dim)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Swap ``old`` for ``new`` under every parent that holds it (tied modules, e.g. T5's shared embedding)."""
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)


def apply(model: nn.Module, cfg: Config, calib=None) -> nn.Module:
    """Replace every target nn.Linear / nn.Embedding by its int8 version (in place); returns the model."""
    from cpet.models import compressible_layers

    layers = compressible_layers(model, cfg.targets)
    smooth = {}
    if cfg.smooth > 0:
        from cpet.compress.calibration import input_stats
        from cpet.errors import CpetError

        if calib is None:
            raise CpetError("int8 smooth > 0 needs calibration text (pass a tokenizer to compress)")
        from cpet.models import target_modules

        roles = {n + (".base" if n + ".base" in layers else ""): r for n, r in target_modules(model, cfg.targets).items()}
        linears = [n for n, l in layers.items() if isinstance(l, nn.Linear) and roles.get(n) in SMOOTH_ROLES]
        stats = input_stats(model, linears, calib)
        for n in linears:
            w_max = layers[n].weight.detach().abs().amax(0).clamp(min=1e-5)  # (in,)
            x_max = stats[n]["max"].clamp(min=1e-5)
            smooth[n] = (x_max.pow(cfg.smooth) / w_max.pow(1 - cfg.smooth)).clamp(min=1e-5)
    kernels = _kernels(model, cfg)
    for name, layer in layers.items():
        if isinstance(layer, nn.Linear):
            _replace(model, layer, Int8Linear.from_linear(layer, kernels.get(name, cfg.kernel), smooth.get(name)))
        elif hasattr(layer, "quantize_"):  # a MoE FFN: its experts go int8 in place
            layer.quantize_()
        elif isinstance(layer, nn.Embedding):
            _quantize_embedding(model, layer, cfg.kernel)
    return model


def _kernels(model: nn.Module, cfg: Config) -> dict[str, str]:
    """Layer name (as compressible_layers names it) -> "dequant" for the weight-only roles."""
    if not cfg.weight_only:
        return {}
    from cpet.models import target_modules

    names = target_modules(model, cfg.weight_only)
    return {n + suffix: "dequant" for n in names for suffix in ("", ".base")}


def _quantize_embedding(model: nn.Module, layer: nn.Embedding, kernel: str = "auto", fp32_heads=()) -> None:
    """The embedding and everything tied to it go int8 on one copy: other embeddings (T5's ``shared``)
    and a tied output head (an LM's ``lm_head``, which becomes an Int8Linear on the same int8 rows and
    per-row scales, the embedding's rows being the head's output channels)."""
    new = Int8Embedding.from_embedding(layer)
    tied = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is layer.weight]
    heads = [m for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and m.weight is layer.weight and n not in fp32_heads]
    for m in tied:  # e.g. T5's `shared`, tied to the encoder's embed_tokens: one int8 copy for all
        _replace(model, m, new)
    for m in heads:
        head = Int8Linear(layer.embedding_dim, layer.num_embeddings, bias=m.bias is not None, kernel=kernel)
        head.weight_int8, head.scale = new.weight_int8, new.scale  # shared buffers, stored once
        if m.bias is not None:
            head.bias.copy_(m.bias.detach().float())
        _replace(model, m, head)


def skeleton(model: nn.Module, cfg: Config, state: dict) -> nn.Module:
    """Int8 layers of the right shapes (with a ``smooth`` slot where one was saved); values load after."""
    from cpet.models import compressible_layers

    kernels = _kernels(model, cfg)
    for name, layer in compressible_layers(model, cfg.targets).items():
        if isinstance(layer, nn.Linear):
            smooth = torch.ones(layer.in_features) if f"{name}.smooth" in state else None
            _replace(model, layer, Int8Linear.from_linear(layer, kernels.get(name, cfg.kernel), smooth))
        elif hasattr(layer, "quantize_"):
            layer.quantize_()
        elif isinstance(layer, nn.Embedding):
            # folders saved before tied heads went int8 hold the head in fp32: keep it so
            fp32_heads = {k[: -len(".weight")] for k in state if k.endswith(".weight")}
            _quantize_embedding(model, layer, cfg.kernel, fp32_heads)
    return model


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    reference, approx = reference.detach().float(), approx.detach().float()
    noise = (reference - approx).pow(2).sum()
    return float(10 * torch.log10(reference.pow(2).sum() / noise.clamp(min=1e-30)))
