"""Smoke table: each task's base+PET score on MiniLM with a short budget, beside the majority-class
baseline (the majority label of the training part, predicted for every test example). A task whose
score is no better than its majority baseline is broken or starved.

    .venv/bin/python experiments/smoke/run.py [--tasks sst2,rte,...]

Writes one run folder per task under runs/smoke/ and experiments/smoke/results.md.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from cpet.config import load_config
from cpet.experiments import run_experiment
from cpet.tasks import evaluate_predictions, load_task

HERE = Path(__file__).parent
TASKS = ["sst2", "mrpc", "qqp", "mnli", "qnli", "boolq", "cb", "rte", "wic"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=",".join(TASKS))
    args = ap.parse_args()
    rows = []
    for task in args.tasks.split(","):
        small = ["task.val_size=50"] if task == "cb" else []  # CB has 250 training examples in all
        cfg = load_config(HERE / "config.yaml", [f"task.name={task}", f"output_dir=runs/smoke/{task}", *small])
        data = load_task(cfg.task)
        majority = Counter(e.label for e in data.train).most_common(1)[0][0]
        base = evaluate_predictions(data.spec, [majority] * len(data.test), [e.label for e in data.test])
        rec = run_experiment(cfg, log=lambda s: print(f"[{task}] {s}", flush=True))[0]
        rows.append((task, rec, base, data))
    metric_names = ["accuracy", "f1", "f1_macro"]
    lines = ["# Smoke table: base+PET on all-MiniLM-L6-v2, short budget", "",
             "LoRA r=8 on q,v + head; " + Path(HERE / "config.yaml").read_text().split("\n")[0].lstrip("# "), "",
             "| task | train / val / test | metric | base+PET | majority class | train s | test set |",
             "|---|---|---|---|---|---|---|"]
    for task, rec, base, data in rows:
        for m in metric_names:
            if m in rec["test"]:
                lines.append(f"| {task} | {len(data.train)} / {len(data.val)} / {len(data.test)} | {m} | "
                             f"{100 * rec['test'][m]:.1f} | {100 * base[m]:.1f} | {rec['train_seconds']:.0f} | "
                             f"{data.test_set} |")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    (HERE / "results.json").write_text(json.dumps([{"task": t, "test": r["test"], "majority": b,
                                                    "train_seconds": r["train_seconds"]} for t, r, b, _ in rows], indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
