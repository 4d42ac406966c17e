"""Q: 8-bit weights, symmetric per output channel (and per row of the token embedding).

    W ~= scale[:, None] * Wq,   Wq = clamp(round(W / scale), -127, 127) in int8,   scale = max|W_row| / 127

Stored as int8 + fp32 scales (buffers ``weight_int8``, ``scale``), never as float. Optional
SmoothQuant-style smoothing (``smooth: alpha`` > 0, Xiao et al. 2023) moves activation outliers into the
weights before quantizing: per input channel s_j = max|X_j|^alpha / max|W_:j|^(1-alpha) from calibration
text, W' = W diag(s) is quantized, and the input is divided by s at run time (buffer ``smooth``); the
product is unchanged in exact arithmetic, but the int8 activations lose less. Applied to
the LayerNorm-fed q, k, v and ffn_in only.

Activations (``kernel: auto``, W8A8) are quantized **per token** (per row of the input), symmetric,
8-bit: x_t ~= m_t * STEP * round(x_t / (m_t * STEP)), m_t = max|x_t|, STEP = 2/127. A token's output
therefore depends only on that token: not on its batch-mates, its padding, or the batch size (fbgemm's
own dynamic kernel takes one scale over the whole input, which made outputs batch-dependent). The
same function is computed two ways:
- inference (autograd off, fp32 on CPU): fbgemm's int8 GEMM on the row-normalised input x_t / m_t,
  with two guard rows (-1, +1) so the kernel's dynamic range is always exactly [-1, 1] (its step is
  then STEP and its zero point 64), then y_t = m_t * K(x_t / m_t) + b;
- training (autograd on) and any other device: the same quantization simulated in fp32 (fake-quant)
  with a straight-through gradient, then a matmul with the dequantized weight. Training therefore sees
  the function that serves (equal to fp32 rounding: within 1e-5 on a layer, tested), and recovery modules learn to
  correct the activation quantization error too.
``kernel: dequant`` (and the ``weight_only`` roles) skip activation quantization: int8 storage,
dequantized fp32 matmul, in both modes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpet.compress.calibration import input_stats
from cpet.errors import CpetError
from cpet.models import compressible_layers, target_modules
from cpet.roles import ALL_ROLES, EMBED_ROLE, check_roles
from cpet.typed import coerce_fields


# As SmoothQuant: only linears fed by a LayerNorm (whose outlier channels are systematic). Smoothing
# o / ffn_out measured worse on MiniLM (their inputs' calibration maxima do not transfer across text).
SMOOTH_ROLES = ("q", "k", "v", "ffn_in")


@dataclass(frozen=True)
class Config:
    targets: tuple[str, ...] = ALL_ROLES + (EMBED_ROLE,)
    kernel: str = "auto"  # auto: W8A8, per-token activations (fbgemm when grad is off) | dequant: weight-only
    smooth: float = 0.0  # SmoothQuant alpha in (0, 1]; 0 = off. Needs calibration text.
    # roles computed weight-only (int8 storage, dequantized fp32 matmul) also at inference, for roles whose
    # activations int8 does not survive (per-token scales made this unnecessary on SmolLM2's down-projection:
    # logit cosine 0.993 with W8A8 on ffn_out alone; bench/results/int8_fidelity_smollm2.md)
    weight_only: tuple[str, ...] = ()

    @property
    def calibrated(self) -> bool:
        return self.smooth > 0

    def __post_init__(self):
        coerce_fields(self, "int8")
        check_roles(self.targets, "int8.targets", ALL_ROLES + (EMBED_ROLE,))
        if self.weight_only:
            check_roles(self.weight_only, "int8.weight_only", ALL_ROLES)
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


STEP = 2.0 / 127  # the activation quantization step on the row-normalised input (range [-1, 1], 7-bit)


def use_int8_kernel(x: torch.Tensor) -> bool:
    """fbgemm's int8 GEMM applies: no autograd, fp32 input on a CPU with fbgemm."""
    return (not torch.is_grad_enabled() and x.dtype == torch.float32 and x.device.type == "cpu"
            and _FBGEMM)


def prepack(weight_int8: torch.Tensor, scale: torch.Tensor):
    """fbgemm packed weights (per-output-channel int8 + scales, no bias: w8a8_linear adds it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(
            weight_int8.contiguous(), scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None)


def _token_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| per row (..., 1), at least the smallest normal float (an all-zero row quantizes to zeros)."""
    return x.abs().amax(-1, keepdim=True).clamp_(min=torch.finfo(x.dtype).tiny)


_GUARDS: dict[int, torch.Tensor] = {}


def _guard(width: int) -> torch.Tensor:
    """Two rows holding -1 and +1: appended to a row-normalised input they fix the kernel's range."""
    if width not in _GUARDS:
        g = torch.zeros(2, width)
        g[0, 0], g[1, 0] = -1.0, 1.0
        _GUARDS[width] = g
    return _GUARDS[width]


CHUNK_ROWS = 512  # tokens per kernel call, so the normalised copy and the output stay cache-sized
                  # (bench/results/int8.md compares it with one call over 4096 tokens)
SMALL_ROWS = 256  # up to here one kernel call without chunk bookkeeping (fewer ops for short inputs)


def w8a8_linear(x: torch.Tensor, packed, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b with per-token int8 activations through fbgemm (see the module docstring)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (N, in)
    n = x2.shape[0]
    if n <= SMALL_ROWS:
        m = _token_max(x2)  # (N, 1)
        k = torch.ops.quantized.linear_dynamic(torch.cat([x2 / m, _guard(shape[-1])]), packed, True)[:-2]
        y = k.mul_(m) if bias is None else k.mul_(m).add_(bias)  # (N, out); the same two roundings as below
        return y.view(*shape[:-1], y.shape[-1])
    out = None
    for i in range(0, n, CHUNK_ROWS):
        xc = x2[i: i + CHUNK_ROWS]  # (n_c, in)
        m = _token_max(xc)  # (n_c, 1)
        buf = torch.cat([xc / m, _guard(shape[-1])])  # (n_c + 2, in): rows in [-1, 1] + the guard rows
        k = torch.ops.quantized.linear_dynamic(buf, packed, True)[:-2]  # (n_c, out)
        out = torch.empty(n, k.shape[1]) if out is None else out
        torch.mul(k, m, out=out[i: i + CHUNK_ROWS])
    if bias is not None:
        out.add_(bias)
    return out.view(*shape[:-1], out.shape[-1])


_CONSTANTS: dict = {}


def _fake_quant_constants(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero point 64, 1 / STEP computed in ``dtype`` as fbgemm does) as 0-d tensors, made once."""
    key = (dtype, device)
    if key not in _CONSTANTS:
        inv = torch.ones((), dtype=dtype, device=device) / torch.tensor(STEP, dtype=dtype, device=device)
        _CONSTANTS[key] = (torch.full((), 64.0, dtype=dtype, device=device), inv)
    return _CONSTANTS[key]


def fake_quant_tokens(x: torch.Tensor) -> torch.Tensor:
    """The per-token activation quantization of ``w8a8_linear`` in float, with a straight-through
    gradient (d out / d x = 1). Rounds as fbgemm does: nearbyint(fma(x / m, 1 / step, 64)) - 64 in fp32
    (a separate multiply and add rounds some near-tie values to the neighbouring level; equality with the
    kernel on near-tie values is tests/test_compress.py::test_int8_rounding_matches_fbgemm_at_ties)."""
    with torch.no_grad():
        m = _token_max(x)
        zp, inv = _fake_quant_constants(x.dtype, x.device)
        q = (torch.round(torch.addcmul(zp, x / m, inv)) - 64) * (STEP * m)
    return x + (q - x).detach() if x.requires_grad else q


_FBGEMM = _fbgemm_available()


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
        key = (self.weight_int8.data_ptr(), self.weight_int8._version, self.scale._version)
        if self._packed is None or self._packed_key != key:
            self._packed = prepack(self.weight_int8, self.scale)
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "smooth", None) is not None:
            x = x / self.smooth.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.kernel == "dequant":
            return F.linear(x, self.dequantize().to(x.dtype), bias)
        if use_int8_kernel(x):
            return w8a8_linear(x, self._packed_params(), bias)
        return F.linear(fake_quant_tokens(x), self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def float_weight(layer: nn.Module) -> torch.Tensor:
    """The float weight (out, in) a possibly compressed linear computes with: an int8 layer's dequantized
    weight, else its ``weight`` (nn.Linear's, or the dense view of a CSR / shrunk layer), detached."""
    return layer.dequantize() if isinstance(layer, Int8Linear) else layer.weight.detach()


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
    layers = compressible_layers(model, cfg.targets)
    smooth = {}
    if cfg.smooth > 0:
        if calib is None:
            raise CpetError("int8 smooth > 0 needs calibration text (pass a tokenizer to compress)")

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
        elif not isinstance(layer, (Int8Linear, Int8Embedding)):  # already int8: nothing to do
            hint = (" (unstructured pruning made it a CSR sparse layer: put int8 before unstructured in the plan, "
                    "or give unstructured kernel: dense)" if type(layer).__name__ == "CSRLinear" else "")
            raise CpetError(f"int8: cannot quantize {name}, a {type(layer).__name__}{hint}; the saved plan would "
                            "claim int8 for a layer that is not")
    return model


def _kernels(model: nn.Module, cfg: Config) -> dict[str, str]:
    """Layer name (as compressible_layers names it) -> "dequant" for the weight-only roles."""
    if not cfg.weight_only:
        return {}

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
