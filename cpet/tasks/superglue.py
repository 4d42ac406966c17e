"""SuperGLUE tasks (this file: RTE, CB). Local layout: ../shared/data/superglue/<TASK>/{train,val}.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from cpet.tasks import Example, TaskSpec, register


def _read_pairs(path: Path, labels: tuple[str, ...]) -> list[Example]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out.append(Example(r["premise"], r["hypothesis"], labels.index(r["label"])))
    return out


def _local(folder: str, labels: tuple[str, ...]):
    def load(root: Path):
        d = root / "superglue" / folder
        return _read_pairs(d / "train.jsonl", labels), _read_pairs(d / "val.jsonl", labels)
    return load


RTE_LABELS = ("entailment", "not_entailment")
CB_LABELS = ("entailment", "contradiction", "neutral")

RTE = register(TaskSpec(
    name="rte", labels=RTE_LABELS, metrics=("accuracy",), load_local=_local("RTE", RTE_LABELS),
    hub=("super_glue", "rte"), hub_fields=("premise", "hypothesis")))
CB = register(TaskSpec(
    name="cb", labels=CB_LABELS, metrics=("accuracy", "f1_macro"), load_local=_local("CB", CB_LABELS),
    hub=("super_glue", "cb"), hub_fields=("premise", "hypothesis")))
