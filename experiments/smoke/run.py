"""Smoke table: each task's base+PET score on MiniLM with a short budget, beside the majority-class
baseline (the majority label of the training part, predicted for every test example; for SQuAD, whose
answers are spans, the first three words of each context). A task whose score is no better than its
baseline is broken or starved.

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
from cpet.tasks import evaluate_predictions, gold_of, load_task

HERE = Path(__file__).parent
TASKS = ["sst2", "mrpc", "qqp", "mnli", "qnli", "boolq", "cb", "copa", "rte", "wic", "squad"]
OVERRIDES = {"cb": ["task.val_size=50"], "copa": ["task.val_size=50"],  # 250 and 400 training examples in all
             "squad": ["model.max_length=256"]}  # question + paragraph; longer ones split into windows


def table(rows: list[dict]) -> str:
    lines = ["# Smoke table: base+PET on all-MiniLM-L6-v2, short budget", "",
             "LoRA r=8 on q,v + head; " + (HERE / "config.yaml").read_text().split("\n")[0].lstrip("# ")
             + " SQuAD: 256 tokens (question + paragraph; longer ones in windows with a 64-token stride), "
             "scored by F1 / exact match beside the first three words of each paragraph.", "",
             "| task | train / val / test | metric | base+PET | majority class (SQuAD: first 3 words) | train s | test set |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: TASKS.index(r["task"]) if r["task"] in TASKS else 99):
        for m in ("accuracy", "f1", "f1_macro", "exact_match"):
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
        cfg = load_config(HERE / "config.yaml", [f"task.name={task}", f"output_dir=runs/smoke/{task}",
                                                 *OVERRIDES.get(task, [])])
        data = load_task(cfg.task)
        if data.spec.format == "span":
            trivial = [" ".join(e.text_b.split()[:3]) for e in data.test]
        else:
            trivial = [Counter(e.label for e in data.train).most_common(1)[0][0]] * len(data.test)
        base = evaluate_predictions(data.spec, trivial, gold_of(data.spec, data.test))
        rec = run_experiment(cfg, log=lambda s: print(f"[{task}] {s}", flush=True))[0]
        rows[task] = {"task": task, "test": rec["test"], "majority": base, "train_seconds": rec["train_seconds"],
                      "sizes": f"{len(data.train)} / {len(data.val)} / {len(data.test)}", "test_set": data.test_set}
        out_json.write_text(json.dumps(list(rows.values()), indent=2))
        (HERE / "results.md").write_text(table(list(rows.values())))
    print(table(list(rows.values())))


if __name__ == "__main__":
    main()
