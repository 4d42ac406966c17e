"""The paper's Table 1, measured: size, ideal speedup, measured speedup, memory, fidelity.

    measured speedup = median latency(uncompressed fp32) / median latency(compressed), same process
    ideal speedup    = the paper's accounting: int8 2x (8 vs 16 bit), unstructured 1/(1-sparsity),
                       structured and MoE = linear-layer FLOPs before / after; steps multiply
    fidelity         = cosine and MSE of last hidden states to the uncompressed model on held-out
                       calibration text (windows not used for calibration)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from cpet.compress import load_compressed, parse_plan
from cpet.models import compressible_layers, load_backbone
from cpet.timing import median_latency

SHAPES = ((1, 16), (8, 128), (32, 128))


def linear_flops(model: nn.Module) -> int:
    """Multiply-adds per token of the target linears (attention + FFN), as stored (after shrinking)."""
    total = 0
    for layer in compressible_layers(model, ("q", "k", "v", "o", "ffn_in", "ffn_out")).values():
        total += getattr(layer, "flops_per_token", None) or layer.in_features * layer.out_features
    return total


def ideal_speedup(plan, dense_flops: int, compressed_flops: int) -> float:
    """Product over steps: int8 2x; unstructured 1/(1-s); shape-changing steps by the FLOPs ratio."""
    x = 1.0
    for name, cfg in parse_plan(plan):
        if name == "int8":
            x *= 2.0
        elif name == "unstructured":
            x *= 1.0 / (1.0 - cfg.sparsity)
    if compressed_flops and compressed_flops != dense_flops:
        x *= dense_flops / compressed_flops
    return x


def state_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def peak_memory_mb(path: str, batch: int, seq: int, threads: int = 2) -> float | None:
    """Peak resident memory of serving ``path`` (a cpet compressed folder or a model name/folder):
    a fresh process loads it, returns freed load-time memory to the OS, then runs one forward; the
    peak (VmHWM, reset after loading) minus the RSS after imports (Linux)."""
    import json
    import subprocess
    import sys

    if not Path("/proc/self/status").is_file():
        return None
    r = subprocess.run([sys.executable, "-m", "cpet.benchmark", str(path), str(batch), str(seq), str(threads)],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]


def _peak_main(path: str, batch: int, seq: int, threads: int) -> None:
    import json

    import transformers  # noqa: F401  (imports count as the baseline, not the model)

    torch.set_num_threads(threads)
    base = _status_kb("VmRSS")
    if (Path(path) / "compression.json").is_file():
        model = load_compressed(path)[0]
    else:
        model = load_backbone(path)[0]
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what loading freed (e.g. the fp32 skeleton)
    except OSError:
        pass
    loaded = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    with torch.no_grad():
        model(**_inputs(model.config.vocab_size, batch, seq))
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - base) / 1024, "loaded_mb": (loaded - base) / 1024,
                      "weights_mb": state_bytes(model) / 2**20}))


@dataclass
class BenchRecord:
    name: str
    plan: list
    size_bytes: int
    size_pct_of_fp32: float
    ideal_speedup: float
    measured_speedup: dict = field(default_factory=dict)  # "BxT" -> ratio
    latency_ms: dict = field(default_factory=dict)
    weights_mb: float = 0.0  # parameters + buffers resident in memory
    peak_memory_mb: float | None = None  # fresh process: load + one forward at the largest shape
    hidden_cosine: float = 1.0
    hidden_mse: float = 0.0


def _inputs(vocab_size: int, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(1000, min(vocab_size, 20000), (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def bench_models(dense: nn.Module, compressed: dict[str, tuple[nn.Module, list, int]],
                 shapes=SHAPES, repeats: int = 10, fidelity_ids: torch.Tensor | None = None,
                 log=print, paths: dict[str, str] | None = None) -> list[BenchRecord]:
    """``compressed``: name -> (model, plan, size on disk in bytes). The dense model is the baseline row.
    ``paths`` (row name -> folder or model name) adds each row's peak memory, measured in a fresh process."""
    dense.eval()
    fp32_bytes = state_bytes(dense)
    d_flops = linear_flops(dense)
    vocab = dense.config.vocab_size
    rows = {"uncompressed fp32": BenchRecord("uncompressed fp32", [], fp32_bytes, 100.0, 1.0)}
    for name, (m, plan, size) in compressed.items():
        m.eval()
        rows[name] = BenchRecord(name, plan, size, 100.0 * size / fp32_bytes, ideal_speedup(plan, d_flops, linear_flops(m)))
    models = {"uncompressed fp32": dense, **{k: v[0] for k, v in compressed.items()}}
    for name, m in models.items():
        rows[name].weights_mb = state_bytes(m) / 2**20
    for b, t in shapes:
        key = f"{b}x{t}"
        inputs = _inputs(vocab, b, t)
        base = None
        for name, m in models.items():
            lat = median_latency(lambda: m(**inputs), repeats)
            base = base or lat
            r = rows[name]
            r.latency_ms[key] = round(1e3 * lat, 3)
            r.measured_speedup[key] = round(base / lat, 3)
            log(f"  {name:<28} {key:>7}: {1e3 * lat:9.1f} ms  {base / lat:5.2f}x")
    if paths:
        b, t = shapes[-1]
        for name, path in paths.items():
            rows[name].peak_memory_mb = peak_memory_mb(path, b, t, torch.get_num_threads())
    if fidelity_ids is not None:
        batch = {"input_ids": fidelity_ids, "attention_mask": torch.ones_like(fidelity_ids)}
        ref = dense(**batch).last_hidden_state
        for name, m in models.items():
            h = m(**batch).last_hidden_state
            rows[name].hidden_cosine = torch.nn.functional.cosine_similarity(h, ref, dim=-1).mean().item()
            rows[name].hidden_mse = torch.nn.functional.mse_loss(h, ref).item()
    return list(rows.values())


def table(records: list[BenchRecord]) -> str:
    shapes = list(records[0].measured_speedup)
    head = ["model", "size MB", "% of fp32", "ideal x", *[f"measured x {s}" for s in shapes],
            "weights MB in memory", f"peak MB (load + fwd {shapes[-1]})", "hidden cos", "hidden MSE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        peak = r.peak_memory_mb
        lines.append("| " + " | ".join([
            r.name, f"{r.size_bytes / 2**20:.1f}", f"{r.size_pct_of_fp32:.1f}%", f"{r.ideal_speedup:.2f}",
            *[f"{r.measured_speedup[s]:.2f}" for s in shapes], f"{r.weights_mb:.1f}",
            "n/a" if peak is None else f"{peak:.0f}", f"{r.hidden_cosine:.4f}", f"{r.hidden_mse:.2e}"]) + " |")
    return "\n".join(lines)


def dir_size(path: str | os.PathLike) -> int:
    return (Path(path) / "model.safetensors").stat().st_size


if __name__ == "__main__":
    import sys

    _peak_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
