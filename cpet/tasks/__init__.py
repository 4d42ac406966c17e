"""Tasks: loaders from a local data folder (the paper's split policy) with the HF hub as fallback.

Split policy (paper, section 4.1): the official validation set is the *test* set; a deterministic
part of the official train set (``val_size``) is held out for model selection; the rest trains.
The hold-out does not depend on the training seed, so every paradigm sees the same splits.
"""

from __future__ import annotations

import random

from cpet.config import TaskConfig
from cpet.errors import CpetError
from cpet.io import DATA_ENV, resolve_data_dir  # noqa: F401 (resolve_data_dir: cpet.tasks' public name)
from cpet.tasks.base import SPLIT_SEED, TASKS, Example, TaskData, TaskSpec, seeded_split  # noqa: F401
from cpet.tasks import alpaca, glue, squad, superglue  # noqa: F401,E402  (the families register their tasks)
from cpet.tasks.metrics import METRICS, squad_scores



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


def load_task(cfg: TaskConfig) -> TaskData:
    """The task's train / val (held out of train) / test (official validation) splits."""
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
