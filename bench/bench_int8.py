"""int8 speed on this CPU: one linear layer and the whole MiniLM-L6 forward, against fp32 in the same run.

Reports median latencies over repeats and their ratio to fp32 (x > 1 = faster). Writes
bench/results/int8.json and bench/results/int8.md. Run on an idle machine:

    .venv/bin/python bench/bench_int8.py [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from cpet.compress import compress
from cpet.compress.int8 import Int8Linear
from cpet.models import load_backbone

OUT = Path(__file__).parent / "results"


def median_time(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def bench_linears(repeats: int) -> list[dict]:
    rows = []
    for (fin, fout) in [(384, 1536), (1536, 384), (768, 3072), (3072, 768), (1024, 4096)]:
        lin = nn.Linear(fin, fout)
        q = Int8Linear.from_linear(lin)
        for tokens in (16, 4096):
            x = torch.randn(tokens, fin)
            t_fp = median_time(lambda: lin(x), repeats)
            t_q = median_time(lambda: q(x), repeats)
            with torch.enable_grad():  # the training path: dequantize + fp32 matmul
                t_dq = median_time(lambda: q(x), repeats)
            rows.append({"shape": f"{fin}x{fout}", "tokens": tokens, "fp32_ms": 1e3 * t_fp,
                         "int8_fbgemm_ms": 1e3 * t_q, "int8_dequant_ms": 1e3 * t_dq,
                         "speedup_fbgemm": t_fp / t_q, "speedup_dequant": t_fp / t_dq})
            print(f"linear {fin}x{fout} tokens {tokens}: fbgemm {t_fp / t_q:.2f}x, dequant {t_fp / t_dq:.2f}x", flush=True)
    return rows


@torch.no_grad()
def bench_backbone(repeats: int) -> list[dict]:
    base, tok = load_backbone("minilm")
    models = {
        "fp32": base,
        "int8": compress(copy.deepcopy(base), [{"method": "int8"}]),
        "int8 weight-only (dequant kernel)": compress(copy.deepcopy(base), [{"method": "int8", "kernel": "dequant"}]),
        "unstructured 50% + int8": compress(copy.deepcopy(base), [{"method": "unstructured", "sparsity": 0.5},
                                                                  {"method": "int8"}]),
    }
    text = "the quick brown fox jumps over the lazy dog " * 40
    rows = []
    for batch, seq in ((1, 16), (32, 128)):
        enc = tok([text] * batch, truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
        ref = None
        times = {}
        for name, m in models.items():
            times[name] = median_time(lambda: m(**enc), repeats)
            h = m(**enc).last_hidden_state
            if ref is None:
                ref = h
            cos = torch.nn.functional.cosine_similarity(h.flatten(1), ref.flatten(1)).mean().item()
            rows.append({"model": name, "batch": batch, "seq": seq, "ms": 1e3 * times[name],
                         "speedup": times["fp32"] / times[name], "cosine_to_fp32": cos})
            print(f"MiniLM {name} {batch}x{seq}: {1e3 * times[name]:.1f} ms, {times['fp32'] / times[name]:.2f}x, "
                  f"cos {cos:.4f}", flush=True)
    return rows


def to_markdown(result: dict) -> str:
    lines = [f"# int8 on this CPU ({result['machine']}, {result['threads']} threads, torch {result['torch']})", "",
             f"Median of {result['repeats']} runs; ratio to fp32 timed in the same run (x > 1 is faster).", "",
             "## One linear layer (y = x W^T + b)", "",
             "| in x out | tokens | fp32 ms | int8 fbgemm ms | speedup | int8 dequant (training path) speedup |",
             "|---|---|---|---|---|---|"]
    for r in result["linears"]:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['fp32_ms']:.3f} | {r['int8_fbgemm_ms']:.3f} | "
                     f"{r['speedup_fbgemm']:.2f}x | {r['speedup_dequant']:.2f}x |")
    lines += ["", "## Whole all-MiniLM-L6-v2 forward (real weights)", "",
              "| model | batch x seq | ms | speedup | hidden-state cosine to fp32 |", "|---|---|---|---|---|"]
    for r in result["backbone"]:
        lines.append(f"| {r['model']} | {r['batch']}x{r['seq']} | {r['ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['cosine_to_fp32']:.4f} |")
    lines += ["", "Notes:",
              "- The fbgemm kernel is W8A8: activations are quantized per tensor (7-bit range) on the fly. Most of",
              "  int8's fidelity loss comes from that, not from the int8 weights (compare the weight-only row, which",
              "  dequantizes and runs fp32). Measured per role on SST-2 sentences: quantizing only ffn_in or only",
              "  ffn_out costs the most (token cosine 0.98 each), q/k/v 0.997, o 0.999.",
              "- Unstructured pruning runs on the same dense int8 kernel (zeros are stored, not skipped): its speed",
              "  equals int8's; sparse kernels only pay off at ~90% sparsity on this CPU (PERF-NOTES).", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": args.threads,
              "torch": torch.__version__, "repeats": args.repeats,
              "linears": bench_linears(args.repeats), "backbone": bench_backbone(args.repeats)}
    OUT.mkdir(exist_ok=True)
    (OUT / "int8.json").write_text(json.dumps(result, indent=2))
    (OUT / "int8.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
