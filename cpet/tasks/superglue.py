"""SuperGLUE tasks: BoolQ, CB, COPA, RTE, WiC. Local layout: ../shared/data/superglue/<TASK>/{train,val}.jsonl.

BoolQ has no train split here: its official validation set is split deterministically into a
1,000-example test set and the rest, which joins the 64 FewGLUE train examples as training data.
"""

from __future__ import annotations

from pathlib import Path

from cpet.tasks.base import Example, TaskSpec, fields_row, label_id, read_jsonl, register, seeded_split, to_examples


def _read(path: Path, convert, labels: tuple[str, ...] | None = ("0", "1")) -> list[Example]:
    return to_examples(read_jsonl(path), convert, labels)


def _pairs(folder: str, labels: tuple[str, ...], a: str = "premise", b: str = "hypothesis"):
    def conv(r):
        return Example(r[a], r[b], label_id(r["label"], labels))

    def load(root: Path):
        d = root / "superglue" / folder
        return _read(d / "train.jsonl", conv, labels), _read(d / "val.jsonl", conv, labels)
    return load


def _flag(value) -> int:
    """A boolean label (true / false, 1 / 0) as 1 / 0."""
    if isinstance(value, bool) or value in (0, 1):
        return int(value)
    raise ValueError(f"label {value!r} is not true / false")


def _wic_example(r: dict) -> Example:
    return Example(f"{r['word']} : {r['sentence1']}", r["sentence2"], _flag(r["label"]))


def _wic_prompt(e: Example) -> str:
    word, _, first = e.text_a.partition(" : ")
    return (f"Sentence 1: {first}\nSentence 2: {e.text_b}\n"
            f"Question: Is the word '{word}' used in the same way in the two sentences above?\nAnswer:")


def _wic_local(root: Path):
    d = root / "superglue" / "WiC"
    return _read(d / "train.jsonl", _wic_example), _read(d / "val.jsonl", _wic_example)


def _boolq_example(r: dict) -> Example:
    return Example(r["question"], r["passage"], _flag(r["label"]))


BOOLQ_TEST = 1000


def _boolq_local(root: Path):
    d = root / "superglue" / "BoolQ"
    rest, test = seeded_split(_read(d / "val.jsonl", _boolq_example), BOOLQ_TEST)
    few = [e for f in ("train.jsonl", "dev32.jsonl") for e in _read(d / "fewglue_32dev" / f, _boolq_example)]
    return few + rest, test


def _copa_example(r: dict) -> Example:
    ask = "What was the cause?" if r["question"] == "cause" else "What happened as a result?"
    if r["question"] not in ("cause", "effect"):
        raise ValueError(f"question {r['question']!r} is neither cause nor effect")
    return Example(f"{r['premise']} {ask}", None, int(r["label"]), choices=(r["choice1"], r["choice2"]))


def _copa_local(root: Path):
    d = root / "superglue" / "COPA"
    return _read(d / "train.jsonl", _copa_example, None), _read(d / "val.jsonl", _copa_example, None)


RTE_LABELS = ("entailment", "not_entailment")
CB_LABELS = ("entailment", "contradiction", "neutral")

RTE = register(TaskSpec(
    name="rte", labels=RTE_LABELS, metrics=("accuracy",), load_local=_pairs("RTE", RTE_LABELS),
    hub=("super_glue", "rte"), hub_row=fields_row("premise", "hypothesis"),
    template="{a}\nQuestion: {b} True or False?\nAnswer:", verbalizers=("true", "false")))
CB = register(TaskSpec(
    name="cb", labels=CB_LABELS, metrics=("accuracy", "f1_macro"), load_local=_pairs("CB", CB_LABELS),
    hub=("super_glue", "cb"), hub_row=fields_row("premise", "hypothesis"),
    template="{a}\nQuestion: {b} True, False or Neither?\nAnswer:", verbalizers=("true", "false", "neither")))
WIC = register(TaskSpec(
    name="wic", labels=("different", "same"), metrics=("accuracy",), load_local=_wic_local,
    hub=("super_glue", "wic"), hub_row=_wic_example, template=_wic_prompt, verbalizers=("no", "yes")))
BOOLQ = register(TaskSpec(
    name="boolq", labels=("false", "true"), metrics=("accuracy",), load_local=_boolq_local,
    hub=("super_glue", "boolq"), hub_row=_boolq_example,
    template="{b}\nQuestion: {a}?\nAnswer:", verbalizers=("no", "yes"),
    note=f"test = {BOOLQ_TEST} examples of the official validation set (seeded); train = the other validation "
         "examples + the 64 FewGLUE train examples (no full train split available locally)"))
COPA = register(TaskSpec(
    name="copa", labels=("choice1", "choice2"), metrics=("accuracy",), load_local=_copa_local,
    hub=("super_glue", "copa"), hub_row=_copa_example, format="choice"))
