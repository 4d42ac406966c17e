"""Q: 8-bit weights, symmetric per output channel (and per row of the token embedding).

    W ~= scale[:, None] * Wq,   Wq = clamp(round(W / scale), -127, 127) in int8,   scale = max|W_row| / 127

Stored as int8 + fp32 scales (buffers ``weight_int8``, ``scale``), never as float. Two compute paths:
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


@dataclass(frozen=True)
class Config:
    targets: tuple[str, ...] = ALL_ROLES + (EMBED_ROLE,)
    kernel: str = "auto"  # auto: fbgemm when grad is off, else dequantize | dequant: always dequantize

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        _check_roles(self.targets, "int8.targets", ALL_ROLES + (EMBED_ROLE,))
        if self.kernel not in ("auto", "dequant"):
            from cpet.errors import CpetError

            raise CpetError(f"int8.kernel={self.kernel!r}: use auto or dequant")


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
    def from_linear(cls, linear: nn.Linear, kernel: str = "auto") -> "Int8Linear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        q, s = quantize_per_channel(linear.weight)
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

    for name, layer in compressible_layers(model, cfg.targets).items():
        if isinstance(layer, nn.Linear):
            _replace(model, layer, Int8Linear.from_linear(layer, cfg.kernel))
        elif hasattr(layer, "quantize_"):  # a MoE FFN: its experts go int8 in place
            layer.quantize_()
        elif isinstance(layer, nn.Embedding):
            new = Int8Embedding.from_embedding(layer)
            tied = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is layer.weight]
            for m in tied:  # e.g. T5's `shared`, tied to the encoder's embed_tokens: one int8 copy for all
                _replace(model, m, new)
    return model


def skeleton(model: nn.Module, cfg: Config, state: dict) -> nn.Module:
    """Int8 layers of the right shapes; their values are then loaded from the saved tensors."""
    return apply(model, cfg)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    reference, approx = reference.detach().float(), approx.detach().float()
    noise = (reference - approx).pow(2).sum()
    return float(10 * torch.log10(reference.pow(2).sum() / noise.clamp(min=1e-30)))
