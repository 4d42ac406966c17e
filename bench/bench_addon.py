"""What the CPET add-on costs at inference, by recovery rank: CLM+CPET over CLM+PET latency on one
compressed MiniLM, served through the bank (fused: one down / up GEMM pair per layer and task) and
through the plain per-branch modules (unfused), in-process, same batches.

CLM+PET = LoRA r8 on q, v (+ head). CLM+CPET = the same LoRA + a GELU recovery module of rank r on
every linear (36 on MiniLM). The add-on's share of the backbone's multiply-adds is computed from the
shapes (dense-equivalent: what the linears would cost uncompressed), so the measured latency ratio can
be read against it: ratio(r) ~ 1 + a + b r, where a is per-op overhead (independent of r) and b r the
add-on GEMMs' work. Tasks are same-shape random modules (compute does not depend on the values).
Writes bench/results/addon.{md,json}. Run on an idle machine:

    .venv/bin/python bench/bench_addon.py [--plan UP+Q] [--repeats 15]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from cpet.timing import interleaved

OUT = Path(__file__).parent / "results"
RANKS = (8, 16, 32)
SENTENCES = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés from start to finish",
             "it 's a charming and often affecting journey .", "unflinchingly bleak and desperate",
             "a thoughtful , provocative , insistently humanizing film .", "the film is strictly routine ."]


def task_folder(bb, root: Path, name: str, rec_r: int | None, fp: dict) -> Path:
    from cpet.config import LoraConfig, RecoveryConfig
    from cpet.task_modules import build_task_model, save_task_modules

    torch.manual_seed(rec_r or 0)
    m = build_task_model(copy.deepcopy(bb), 2, lora=LoraConfig(r=8),
                         recovery=RecoveryConfig(r=rec_r) if rec_r else None)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("lora.B", "recovery.U")) or n.startswith("head."):
                p.normal_(0, 0.02)
    return save_task_modules(m, root / name, extra={"task": "sst2", "labels": ["negative", "positive"], "backbone": fp})


def addon_share(model) -> float:
    """The task modules' multiply-adds per token over the wrapped linears' (dense-equivalent)."""
    from cpet.layers import Adapted

    base = addon = 0
    for m in model.modules():
        if isinstance(m, Adapted):
            i, o = m.in_features, m.out_features
            base += i * o
            addon += sum(getattr(m, k).A.shape[0] if k == "lora" else getattr(m, k).D.shape[0]
                         for k in ("lora", "recovery") if getattr(m, k, None) is not None) * (i + o)
    return addon / base


def main() -> None:
    from cpet.bank import TaskBank
    from cpet.cli import main as cli
    from cpet.compress import load_compressed
    from cpet.formats import pad_rows
    from cpet.task_modules import load_task_modules

    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", default="UP+Q")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = Path(args.work or tempfile.mkdtemp(prefix="cpet-bench-addon-"))
    cdir = root / "backbone"
    if not (cdir / "compression.json").is_file():
        assert cli(["compress", "minilm", "--plan", args.plan, "-o", str(cdir)]) == 0
    bb, tok, meta = load_compressed(cdir)
    fp = {"fingerprint": meta["fingerprint"]["hash"], "path": str(cdir)}
    folders = {"pet": task_folder(bb, root / "tasks", "pet", None, fp)}
    folders.update({f"r{r}": task_folder(bb, root / "tasks", f"r{r}", r, fp) for r in RANKS})
    bank, _ = TaskBank.open(cdir)
    for name, f in folders.items():
        bank.load(name, f)
    plain = {name: load_task_modules(load_compressed(cdir)[0], f).eval() for name, f in folders.items()}

    records = []
    for rows in (1, 8, 32):
        texts = [SENTENCES[i % len(SENTENCES)] for i in range(rows)]
        batch = pad_rows([{k: v for k, v in tok(t, truncation=True, max_length=128).items() if k != "attention_mask"}
                          for t in texts], tok.pad_token_id)
        fns = {}
        for name in folders:
            fns[f"{name}/fused"] = (lambda n=name: bank.scores([n] * rows, **batch))
            fns[f"{name}/unfused"] = (lambda n=name: _no_grad(plain[n], batch))
        print(f"batch {rows} x {len(batch['input_ids'][0])} ...", flush=True)
        t = interleaved(fns, args.repeats)
        shape = f"{rows}x{len(batch['input_ids'][0])}"
        for r in RANKS:
            for path in ("fused", "unfused"):
                records.append({"batch": shape, "recovery_r": r, "path": path,
                                "clm_pet_ms": round(t[f"pet/{path}"] * 1e3, 3),
                                "clm_cpet_ms": round(t[f"r{r}/{path}"] * 1e3, 3),
                                "ratio": round(t[f"r{r}/{path}"] / t[f"pet/{path}"], 3),
                                "addon_macs_share": round(addon_share(plain[f"r{r}"]), 4)})
    fits = {}
    for shape in sorted({r["batch"] for r in records}, key=lambda s: int(s.split("x")[0])):
        pts = [(r["recovery_r"], r["ratio"] - 1) for r in records if r["batch"] == shape and r["path"] == "fused"]
        xm, ym = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
        b = sum((x - xm) * (y - ym) for x, y in pts) / sum((x - xm) ** 2 for x, _ in pts)
        fits[shape] = {"overhead": round(ym - b * xm, 3), "per_rank": round(b, 5)}
    env = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "plan": args.plan, "repeats": args.repeats}
    OUT.mkdir(exist_ok=True)
    (OUT / "addon.json").write_text(json.dumps({"records": records, "fits": fits, "env": env}, indent=1))
    lines = ["| batch | recovery r | add-on MACs | CLM+PET ms | CLM+CPET fused ms | fused ratio | unfused ratio |",
             "|---|---|---|---|---|---|---|"]
    for rec in records:
        if rec["path"] != "fused":
            continue
        unf = next(u for u in records if u["path"] == "unfused" and u["batch"] == rec["batch"]
                   and u["recovery_r"] == rec["recovery_r"])
        lines.append(f"| {rec['batch']} | {rec['recovery_r']} | {rec['addon_macs_share']:.1%} | {rec['clm_pet_ms']} | "
                     f"{rec['clm_cpet_ms']} | {rec['ratio']:.2f}x | {unf['ratio']:.2f}x |")
    text = (f"# What the CPET add-on costs at inference, by recovery rank (MiniLM, {args.plan})\n\n"
            f"Measured {env['date']} on {env['cpu']}, torch {env['torch']}, {env['threads']} threads, median of "
            f"{args.repeats} interleaved rounds. CLM+PET: LoRA r8 on q, v. CLM+CPET: the same + GELU recovery of "
            "rank r on all 36 linears. Add-on MACs: LoRA + recovery multiply-adds per token over the dense linears'.\n\n"
            + "\n".join(lines) + "\n\nLeast-squares fit of the fused ratio, ratio - 1 = overhead + per_rank x r:\n\n"
            + "\n".join(f"- {k}: overhead {v['overhead']:+.3f}, per rank {v['per_rank']:.4f} "
                        f"(r=32 -> {v['overhead'] + 32 * v['per_rank']:+.3f})" for k, v in fits.items()) + "\n")
    (OUT / "addon.md").write_text(text)
    print(text)


def _no_grad(model, batch):
    with torch.no_grad():
        return model(**batch)


if __name__ == "__main__":
    sys.exit(main())
