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


# ---------------------------------------------------------------- SQuAD v1.1 (the official evaluate-v1.1.py)
def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, the articles a/an/the, and extra whitespace (official script)."""
    import re
    import string

    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_exact_match(prediction: str, ground_truths: list[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(g)) for g in ground_truths)


def _token_f1(prediction: str, ground_truth: str) -> float:
    from collections import Counter

    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, ground_truths: list[str]) -> float:
    """Token-overlap F1 against the best-matching of the gold answers."""
    return max(_token_f1(prediction, g) for g in ground_truths)


def squad_scores(predictions: list[str], answers: list[list[str]]) -> dict[str, float]:
    """Corpus EM and F1 (as fractions; the official script reports them x100)."""
    n = len(predictions)
    return {"exact_match": sum(squad_exact_match(p, a) for p, a in zip(predictions, answers)) / n,
            "f1": sum(squad_f1(p, a) for p, a in zip(predictions, answers)) / n}
