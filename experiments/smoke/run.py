"""Smoke table: each task's base+PET score on MiniLM with a short budget, beside the majority-class
baseline (the majority label of the training part, predicted for every test example). A task whose
score is no better than its majority baseline is broken or starved.

    .venv/bin/python experiments/smoke/run.py [--tasks sst2,rte,...]

Writes one run folder per task under runs/smoke/; merges its rows into experiments/smoke/results.json
and regenerates experiments/smoke/results.md from it.
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
TASKS = ["sst2", "mrpc", "qqp", "mnli", "qnli", "boolq", "cb", "copa", "rte", "wic"]


def table(rows: list[dict]) -> str:
    lines = ["# Smoke table: base+PET on all-MiniLM-L6-v2, short budget", "",
             "LoRA r=8 on q,v + head; " + (HERE / "config.yaml").read_text().split("\n")[0].lstrip("# "), "",
             "| task | train / val / test | metric | base+PET | majority class | train s | test set |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: TASKS.index(r["task"]) if r["task"] in TASKS else 99):
        for m in ("accuracy", "f1", "f1_macro"):
            if m in r["test"]:
                lines.append(f"| {r['task']} | {r['sizes']} | {m} | {100 * r['test'][m]:.1f} | "
                             f"{100 * r['majority'][m]:.1f} | {r['train_seconds']:.0f} | {r['test_set']} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=",".join(TASKS))
    args = ap.parse_args()
    out_json = HERE / "results.json"
    rows = {r["task"]: r for r in (json.loads(out_json.read_text()) if out_json.is_file() else [])}
    for task in args.tasks.split(","):
        small = ["task.val_size=50"] if task in ("cb", "copa") else []  # 250 and 400 training examples in all
        cfg = load_config(HERE / "config.yaml", [f"task.name={task}", f"output_dir=runs/smoke/{task}", *small])
        data = load_task(cfg.task)
        majority = Counter(e.label for e in data.train).most_common(1)[0][0]
        base = evaluate_predictions(data.spec, [majority] * len(data.test), [e.label for e in data.test])
        rec = run_experiment(cfg, log=lambda s: print(f"[{task}] {s}", flush=True))[0]
        rows[task] = {"task": task, "test": rec["test"], "majority": base, "train_seconds": rec["train_seconds"],
                      "sizes": f"{len(data.train)} / {len(data.val)} / {len(data.test)}", "test_set": data.test_set}
        out_json.write_text(json.dumps(list(rows.values()), indent=2))
        (HERE / "results.md").write_text(table(list(rows.values())))
    print(table(list(rows.values())))


if __name__ == "__main__":
    main()
