"""Smoke tables: every task with a short budget beside a trivial baseline (the majority label of the
training part, predicted for every test example; for SQuAD, whose answers are spans, the first three
words of each paragraph). A task whose score is no better than its baseline is broken or starved.

    .venv/bin/python experiments/smoke/run.py [--suite minilm|smollm2] [--tasks sst2,rte,...]

- ``minilm`` (experiments/smoke/): base+PET on all-MiniLM-L6-v2, the encoder formats.
- ``smollm2`` (experiments/smoke_smollm2/): SmolLM2-135M-Instruct (after ``cpet convert-gguf``),
  text-to-text, base+PET, CLM+PET and CLM+CPET with a tiny budget: it shows that every task runs end
  to end on a decoder LM; at that budget the scores do not compare the paradigms. SmolLM2's weights
  were 4-bit quantized by their publisher, so its "uncompressed" base is a dequantized 4-bit model.

Each task writes its run folder under runs/; its row is merged into the suite's results.json and the
suite's results.md is regenerated from it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cpet.config import load_config
from cpet.experiments import run_experiment
from cpet.tasks import load_task, trivial_baseline

ROOT = Path(__file__).parent.parent
ENCODER_TASKS = ["sst2", "mrpc", "qqp", "mnli", "qnli", "boolq", "cb", "copa", "rte", "wic", "squad"]
SUITES = {
    "minilm": {"dir": ROOT / "smoke", "tasks": ENCODER_TASKS,
               "overrides": {"cb": ["task.val_size=50"], "copa": ["task.val_size=50"],  # 250 / 400 train in all
                             "squad": ["model.max_length=256"]}},  # question + paragraph; longer ones in windows
    "smollm2": {"dir": ROOT / "smoke_smollm2", "tasks": ENCODER_TASKS + ["alpaca"],
                "overrides": {"cb": ["task.val_size=16"], "copa": ["task.val_size=16"]}},
}
PARADIGMS = ("base_pet", "clm_pet", "clm_cpet")


def _config_note(folder: Path) -> str:
    lines = (folder / "config.yaml").read_text().split("\n")
    return " ".join(line.lstrip("# ") for line in lines if line.startswith("#"))


def _fmt(metric: str, value: float) -> str:
    return f"{value:.3f}" if metric == "answer_logprob" else f"{100 * value:.1f}"


def table(suite: str, rows: list[dict]) -> str:
    s = SUITES[suite]
    order = sorted(rows, key=lambda r: s["tasks"].index(r["task"]))
    if suite == "minilm":
        lines = ["# Smoke table: base+PET on all-MiniLM-L6-v2, short budget", "",
                 "LoRA r=8 on q,v + head; " + _config_note(s["dir"]).split(" lr 5e-3, not")[0]
                 + " SQuAD: 256 tokens (question + paragraph; longer ones in windows with a 64-token stride), "
                 "scored by F1 / exact match beside the first three words of each paragraph.", "",
                 "| task | train / val / test | metric | base+PET | majority class (SQuAD: first 3 words) | train s | test set |",
                 "|---|---|---|---|---|---|---|"]
        for r in order:
            for m in ("accuracy", "f1", "f1_macro", "exact_match"):
                if m in r["test"]:
                    lines.append(f"| {r['task']} | {r['sizes']} | {m} | {_fmt(m, r['test'][m])} | "
                                 f"{_fmt(m, r['majority'][m])} | {r['train_seconds']:.0f} | {r['test_set']} |")
        return "\n".join(lines) + "\n"
    lines = ["# SmolLM2-135M-Instruct, text-to-text, all paradigms (smoke budget)", "", _config_note(s["dir"]), "",
             "What this shows: every task runs end to end on a decoder LM in every paradigm. What it does not: "
             "a comparison of the paradigms. 64 test examples give about ±6 points at one standard error, the "
             "models saw 8 optimizer steps, and the CLM rows are evaluated through fbgemm's W8A8 kernel, which "
             "SmolLM2's down-projection inputs do not survive (logit cosine 0.79 to fp32, bench/results/int8_fidelity_smollm2.md; see "
             "experiments/alpaca_smollm2, where the same int8 weights evaluated weight-only lose nothing). "
             "SmolLM2's weights were 4-bit quantized by their publisher; 'uncompressed' is that model in fp32.", "",
             "| task | train / val / test | metric | base+PET | CLM+PET | CLM+CPET | majority (SQuAD: first 3 words) | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in order:
        for m in r["metrics"]:
            vals = " | ".join(_fmt(m, r["test"][p][m]) for p in PARADIGMS)
            base = _fmt(m, r["majority"][m]) if m in r["majority"] else "—"
            lines.append(f"| {r['task']} | {r['sizes']} | {m} | {vals} | {base} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="minilm", choices=sorted(SUITES))
    ap.add_argument("--tasks", default=None, help="comma-separated (default: all of the suite's tasks)")
    args = ap.parse_args()
    s = SUITES[args.suite]
    out_json = s["dir"] / "results.json"
    rows = {r["task"]: r for r in (json.loads(out_json.read_text()) if out_json.is_file() else [])}
    for task in (args.tasks.split(",") if args.tasks else s["tasks"]):
        cfg = load_config(s["dir"] / "config.yaml", [f"task.name={task}", f"output_dir=runs/{s['dir'].name}/{task}",
                                                     *s["overrides"].get(task, [])])
        data = load_task(cfg.task)
        t0 = time.perf_counter()
        records = run_experiment(cfg, log=lambda line: print(f"[{task}] {line}", flush=True))
        row = {"task": task, "majority": trivial_baseline(data), "test_set": data.test_set,
               "sizes": f"{len(data.train)} / {len(data.val)} / {len(data.test)}"}
        if args.suite == "minilm":
            row.update(test=records[0]["test"], train_seconds=records[0]["train_seconds"])
        else:
            row.update(metrics=list(data.spec.metrics), test={r["paradigm"]: r["test"] for r in records},
                       wall_s=time.perf_counter() - t0)
        rows[task] = row
        out_json.write_text(json.dumps(list(rows.values()), indent=2))
        (s["dir"] / "results.md").write_text(table(args.suite, list(rows.values())))
    print(table(args.suite, list(rows.values())))


if __name__ == "__main__":
    main()
