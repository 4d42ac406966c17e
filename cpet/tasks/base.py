"""The task registry's base types (Example, TaskSpec, TaskData, register) and the helpers every task
family reads its data files with; ``cpet.tasks`` imports the families (``glue``, ``superglue``,
``squad``, ``alpaca``), which import this module only."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from cpet.errors import CpetError

SPLIT_SEED = 1234


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: int  # class id, or the index of the right choice
    choices: tuple[str, ...] | None = None  # multiple choice: text_a is paired with each
    answers: tuple[str, ...] = ()  # extractive QA (text_a = question, text_b = context): the gold answers
    answer_start: int = -1  # character offset of answers[0] in the context (the span trained on)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: tuple[str, ...]  # index = class id
    metrics: tuple[str, ...]  # first one selects the best checkpoint
    load_local: object  # (data_dir: Path) -> (train, test) lists of Example
    hub: tuple[str, str]  # (dataset, config) for datasets.load_dataset
    hub_row: object  # (hub row dict) -> Example
    hub_test_split: str = "validation"  # "" = the hub set has only train: hold out hub_test_size of it (seeded)
    hub_test_size: int = 0
    note: str = ""  # where the test set comes from when it is not the official validation set

    # classify | choice (one score per (text_a, choice) row) | span (extractive QA) | generate (free text,
    # text-to-text only: instruction tuning)
    format: str = "classify"
    # text-to-text (T5, decoder LMs): the prompt, formatted with {a} = text_a and {b} = text_b (or a
    # function of the Example), answered by the verbalizer of the label / the right choice / the answer
    template: str | object = "{a}\nAnswer:"
    verbalizers: tuple[str, ...] = ()  # one word per label; default: the label names
    answer_prefix: str = " "  # between the prompt and the answer (decoder LMs)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def head_size(self) -> int:
        """Outputs of the task head: one per class, one score per choice row, or start/end per token."""
        return {"choice": 1, "span": 2}.get(self.format, len(self.labels))

    @property
    def words(self) -> tuple[str, ...]:
        return self.verbalizers or tuple(lab.replace("_", " ") for lab in self.labels)

    def prompt(self, e: Example) -> str:
        """The text-to-text input for an example (without its answer)."""
        if callable(self.template):
            return self.template(e)
        return self.template.format(a=e.text_a, b=e.text_b)

    def target(self, e: Example) -> str:
        """The text-to-text answer an example is trained on."""
        if self.format in ("span", "generate"):
            return e.answers[0]
        if self.format == "choice":
            return e.choices[e.label]
        return self.words[e.label]


@dataclass
class TaskData:
    spec: TaskSpec
    train: list[Example]
    val: list[Example]
    test: list[Example]
    source: str
    test_set: str = "the official validation set"


TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    TASKS[spec.name] = spec
    return spec


# ---------------------------------------------------------------- reading data files
# Every local file is read through these, so a bad file stops with one message naming the file, the
# line (or row) and what was expected, never a traceback or a silently mis-scored example.
Row = tuple[str, object]  # (where: "file, line N", the parsed row)


def read_jsonl(path: Path) -> list[Row]:
    """One JSON object per line -> [(where, dict)]."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}, line {i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise CpetError(f"{path}, line {i}: not valid JSON ({e.msg}); expected one JSON object per line")
    return rows


def read_json(path: Path, key: str | None = None) -> list[Row]:
    """A JSON file holding a list of rows (or a mapping of id -> row; ``key`` picks a field first)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CpetError(f"{path}: not valid JSON at line {e.lineno} ({e.msg}); the file is damaged or truncated") from None
    except UnicodeDecodeError as e:
        raise CpetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise CpetError(f"{path}: expected a JSON object with a {key!r} field")
        data = data[key]
    if isinstance(data, dict):
        return [(f"{path}, row {k!r}", data[k]) for k in sorted(data, key=lambda k: (len(str(k)), str(k)))]
    if not isinstance(data, list):
        raise CpetError(f"{path}: expected a list of rows, got {type(data).__name__}")
    return [(f"{path}, row {i}", r) for i, r in enumerate(data)]


def read_tsv(path: Path, header: list[str] | None = None) -> list[Row]:
    """Tab-separated lines after a header -> [(where, list of fields)]; ``header``: the expected first
    columns of the header line."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # MRPC's header starts with a BOM
        lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not lines:
        raise CpetError(f"{path}: empty file")
    if header is not None and lines[0][: len(header)] != header:
        raise CpetError(f"{path}, line 1: expected a header starting {header}, got {lines[0][: len(header) + 1]}")
    return [(f"{path}, line {i}", r) for i, r in enumerate(lines[1:], 2)]


def to_examples(rows: list[Row], convert, labels: tuple[str, ...] | None = None) -> list[Example]:
    """``convert(row) -> Example`` for each row; a missing field, an unparsable value or a label outside
    ``labels`` (or a choice index outside the row's choices) names the row and what was expected."""
    out = []
    for where, r in rows:
        try:
            made = convert(r)  # one Example, or a list (a SQuAD article holds many questions)
        except KeyError as err:
            raise CpetError(f"{where}: missing field {err}") from None
        except (ValueError, TypeError, IndexError, AttributeError) as err:
            raise CpetError(f"{where}: cannot read the row ({err}): {str(r)[:120]}") from None
        for e in made if isinstance(made, list) else [made]:
            n = len(e.choices) if e.choices else len(labels) if labels else None
            if n is not None and not (isinstance(e.label, int) and 0 <= e.label < n):
                allowed = f"a choice index 0..{n - 1}" if e.choices else f"0..{n - 1} or one of {list(labels)}"
                raise CpetError(f"{where}: label {e.label!r} is outside the label set (expected {allowed})")
            out.append(e)
    return out


def label_id(value, labels: tuple[str, ...]) -> int:
    """A label given as its name or as its integer id (checked by ``to_examples``)."""
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"label {value!r} is neither one of {list(labels)} nor an integer id")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"label {value!r} is neither one of {list(labels)} nor an integer id") from None


def fields_row(a: str, b: str | None = None):
    """A hub-row converter reading text fields ``a`` (and ``b``) and an integer ``label``."""
    return lambda r: Example(r[a], r[b] if b else None, int(r["label"]))


def seeded_split(rows: list, n_test: int) -> tuple[list, list]:
    """(rest, test): a deterministic split for sets that have no separate test part."""
    order = list(range(len(rows)))
    random.Random(SPLIT_SEED).shuffle(order)
    return [rows[i] for i in order[n_test:]], [rows[i] for i in order[:n_test]]
