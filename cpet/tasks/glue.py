"""GLUE tasks (this file: SST-2). Local layout: ../shared/data/glue/<TASK>/{train,dev}.tsv."""

from __future__ import annotations

import csv
from pathlib import Path

from cpet.tasks import Example, TaskSpec, register


def _read_sst2(path: Path) -> list[Example]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[1:]
    if header[:2] != ["sentence", "label"]:
        raise ValueError(f"{path}: expected a 'sentence<TAB>label' header, got {header}")
    return [Example(r[0].strip(), None, int(r[1])) for r in body]


def _sst2_local(root: Path):
    d = root / "glue" / "SST-2"
    return _read_sst2(d / "train.tsv"), _read_sst2(d / "dev.tsv")


SST2 = register(TaskSpec(
    name="sst2", labels=("negative", "positive"), metrics=("accuracy",),
    load_local=_sst2_local, hub=("glue", "sst2"), hub_fields=("sentence", None)))
