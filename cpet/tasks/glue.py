"""GLUE tasks: SST-2, MRPC, QQP, MNLI, QNLI. Local layout as ../shared/data/glue (see its README).

QQP, MNLI and QNLI have only a 10k sample of the official train set here, already split 90/10 into
train.json / dev.json (disjoint): dev.json is used as the *test* set (a held-out part of the
official train set, since the official dev sets are not available locally); the hub fallback uses
the official validation sets.
"""

from __future__ import annotations

from pathlib import Path

from cpet.tasks.base import Example, TaskSpec, fields_row, label_id, read_json, read_tsv, register, to_examples


def _sst2_local(root: Path):
    d = root / "glue" / "SST-2"
    read = lambda f: to_examples(read_tsv(d / f, ["sentence", "label"]),  # noqa: E731
                                 lambda r: Example(r[0].strip(), None, int(r[1])), SST2_LABELS)
    return read("train.tsv"), read("dev.tsv")


def _mrpc_local(root: Path):
    d = root / "glue" / "MRPC"
    rows = lambda f: [(w, r) for w, r in read_tsv(d / f, ["Quality"]) if r]  # noqa: E731
    read = lambda f: to_examples(rows(f), lambda r: Example(r[3], r[4], int(r[0])), MRPC_LABELS)  # noqa: E731
    return read("train.tsv"), read("dev.tsv")


def _pretrain_subset(folder: str, labels: tuple[str, ...]):
    def read(path: Path) -> list[Example]:
        return to_examples(read_json(path), lambda r: Example(r["text_a"], r["text_b"], label_id(r["label"], labels)),
                           labels)

    def load(root: Path):
        d = root / "glue" / folder / "glue_pretrain_subset"
        return read(d / "train.json"), read(d / "dev.json")
    return load


SST2_LABELS = ("negative", "positive")
MRPC_LABELS = ("not_equivalent", "equivalent")
HELD_OUT = "test = a 1,000-example held-out part of the official train set (official dev not available locally)"

SST2 = register(TaskSpec(
    name="sst2", labels=SST2_LABELS, metrics=("accuracy",),
    load_local=_sst2_local, hub=("glue", "sst2"), hub_row=fields_row("sentence"),
    template="{a}\nQuestion: Is this sentence positive or negative?\nAnswer:"))
MRPC = register(TaskSpec(
    name="mrpc", labels=MRPC_LABELS, metrics=("accuracy", "f1"),
    load_local=_mrpc_local, hub=("glue", "mrpc"), hub_row=fields_row("sentence1", "sentence2"),
    template="Sentence 1: {a}\nSentence 2: {b}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
    verbalizers=("no", "yes")))
QQP = register(TaskSpec(
    name="qqp", labels=("not_duplicate", "duplicate"), metrics=("accuracy", "f1"),
    load_local=_pretrain_subset("QQP", ("0", "1")), hub=("glue", "qqp"),
    hub_row=fields_row("question1", "question2"), note=HELD_OUT,
    template="Question 1: {a}\nQuestion 2: {b}\nQuestion: Do both questions ask the same thing?\nAnswer:",
    verbalizers=("no", "yes")))
MNLI = register(TaskSpec(
    name="mnli", labels=("entailment", "neutral", "contradiction"), metrics=("accuracy",),
    load_local=_pretrain_subset("MNLI", ("entailment", "neutral", "contradiction")), hub=("glue", "mnli"),
    hub_row=fields_row("premise", "hypothesis"), hub_test_split="validation_matched", note=HELD_OUT,
    template="{a}\nQuestion: {b} True, False or Neither?\nAnswer:", verbalizers=("true", "neither", "false")))
QNLI = register(TaskSpec(
    name="qnli", labels=("entailment", "not_entailment"), metrics=("accuracy",),
    load_local=_pretrain_subset("QNLI", ("entailment", "not_entailment")), hub=("glue", "qnli"),
    hub_row=fields_row("question", "sentence"), note=HELD_OUT,
    template="{a}\n{b}\nQuestion: Does this sentence answer the question?\nAnswer:", verbalizers=("yes", "no")))
