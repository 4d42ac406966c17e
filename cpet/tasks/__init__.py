"""Tasks: loaders from a local data folder (the paper's split policy) with the HF hub as fallback.

Split policy (paper, section 4.1): the official validation set is the *test* set; a deterministic
part of the official train set (``val_size``) is held out for model selection; the rest trains.
The hold-out does not depend on the training seed, so every paradigm sees the same splits.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from cpet.config import TaskConfig
from cpet.errors import CpetError
from cpet.tasks.metrics import METRICS

DATA_ENV = "CPET_DATA"
DEFAULT_DATA_DIR = "../shared/data"
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


def resolve_data_dir(data_dir: str | None) -> Path | None:
    """Config/flag value, else $CPET_DATA, else ../shared/data if it exists; None means use the hub."""
    chosen = data_dir or os.environ.get(DATA_ENV)
    if chosen:
        p = Path(chosen)
        if not p.is_dir():
            raise CpetError(f"data folder {p} does not exist; pass task.data_dir=PATH or set ${DATA_ENV}")
        return p
    p = Path(DEFAULT_DATA_DIR)
    return p if p.is_dir() else None


def _from_hub(spec: TaskSpec) -> tuple[list[Example], list[Example]]:
    try:
        import datasets
    except ImportError:
        raise CpetError(f"no local data folder for {spec.name} (set task.data_dir or ${DATA_ENV}) and the "
                        "'datasets' package for the hub fallback is missing: pip install 'cpet[hub]'") from None
    try:
        ds = datasets.load_dataset(*spec.hub)
    except Exception as e:  # noqa: BLE001
        raise CpetError(f"could not load {spec.name} from the hub ({str(e).splitlines()[0]}); offline? "
                        f"set task.data_dir or ${DATA_ENV} to a local copy") from None
    train = [spec.hub_row(r) for r in ds["train"]]
    if not spec.hub_test_split:
        return seeded_split(train, spec.hub_test_size)
    return train, [spec.hub_row(r) for r in ds[spec.hub_test_split]]


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
    import csv

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


def load_task(cfg: TaskConfig) -> TaskData:
    """The task's train / val (held out of train) / test (official validation) splits."""
    from cpet.tasks import alpaca, glue, squad, superglue  # noqa: F401  (register the tasks)

    if cfg.name not in TASKS:
        raise CpetError(f"unknown task {cfg.name!r}; available: {sorted(TASKS)}")
    spec = TASKS[cfg.name]
    root = resolve_data_dir(cfg.data_dir)
    if root is not None:
        try:
            train_all, test = spec.load_local(root)
        except FileNotFoundError as e:
            raise CpetError(f"{spec.name}: data file missing in {root} ({e.filename}); "
                            f"point task.data_dir / ${DATA_ENV} at a folder laid out like ../shared/data") from None
        except UnicodeDecodeError as e:
            raise CpetError(f"{spec.name}: a data file in {root} is not UTF-8 text ({e.reason}); "
                            "is it damaged?") from None
        if not train_all or not test:
            raise CpetError(f"{spec.name}: no {'training' if not train_all else 'test'} examples in {root}; "
                            "is a data file empty?")
        source = str(root)
        test_set = spec.note or "the official validation set"
    else:
        train_all, test = _from_hub(spec)
        source = f"hub:{'/'.join(spec.hub)}"
        test_set = f"the official {spec.hub_test_split} split" if spec.hub_test_split else \
            f"{spec.hub_test_size} seeded examples of the hub's train split"
    order = list(range(len(train_all)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_val = cfg.val_size if isinstance(cfg.val_size, int) else int(round(cfg.val_size * len(train_all)))
    if not 0 < n_val < len(train_all):
        raise CpetError(f"task.val_size={cfg.val_size} leaves no train or no val examples ({len(train_all)} in train)")
    val = [train_all[i] for i in order[:n_val]]
    train = [train_all[i] for i in order[n_val:]]
    if cfg.max_train is not None:
        train = train[: cfg.max_train]
    if cfg.max_test is not None:
        test = test[: cfg.max_test]
    return TaskData(spec, train, val, test, source, test_set)


def evaluate_predictions(spec: TaskSpec, pred: list, gold: list) -> dict[str, float]:
    """The task's metrics. Classification: class ids; span tasks: answer strings vs lists of gold answers."""
    if spec.format == "generate":  # pred: (summed log-likelihood, answer tokens) per example
        total, n = sum(p[0] for p in pred), sum(p[1] for p in pred)
        return {"answer_logprob": total / max(1, n)}
    if spec.format == "span":
        from cpet.tasks.metrics import squad_scores

        scores = squad_scores(pred, gold)
        return {m: scores[m] for m in spec.metrics}
    return {m: METRICS[m](pred, gold, spec.num_labels) for m in spec.metrics}


def gold_of(spec: TaskSpec, examples: list[Example]) -> list:
    """What predictions are scored against: labels, or (span tasks) each example's gold answers."""
    return [list(e.answers) for e in examples] if spec.format == "span" else [e.label for e in examples]


def trivial_baseline(data: TaskData) -> dict[str, float]:
    """Test scores of a predictor that ignores the input: the training part's majority class (extractive
    QA: the paragraph's first three words; free-text generation: none). A tuned model that does not beat
    it has learnt nothing."""
    from collections import Counter

    if data.spec.format == "generate":
        return {}
    if data.spec.format == "span":
        trivial = [" ".join(e.text_b.split()[:3]) for e in data.test]
    else:
        trivial = [Counter(e.label for e in data.train).most_common(1)[0][0]] * len(data.test)
    return evaluate_predictions(data.spec, trivial, gold_of(data.spec, data.test))
