"""Official metrics as pure functions over label lists."""

from __future__ import annotations


def accuracy(pred: list[int], gold: list[int]) -> float:
    if not gold:
        raise ValueError("accuracy of an empty set")
    return sum(int(p == g) for p, g in zip(pred, gold)) / len(gold)


def f1_binary(pred: list[int], gold: list[int], positive: int = 1) -> float:
    tp = sum(1 for p, g in zip(pred, gold) if p == positive and g == positive)
    fp = sum(1 for p, g in zip(pred, gold) if p == positive and g != positive)
    fn = sum(1 for p, g in zip(pred, gold) if p != positive and g == positive)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def f1_macro(pred: list[int], gold: list[int], num_labels: int) -> float:
    return sum(f1_binary(pred, gold, c) for c in range(num_labels)) / num_labels


METRICS = {
    "accuracy": lambda p, g, n: accuracy(p, g),
    "f1": lambda p, g, n: f1_binary(p, g),
    "f1_macro": lambda p, g, n: f1_macro(p, g, n),
}
