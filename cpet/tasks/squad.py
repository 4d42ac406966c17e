"""SQuAD v1.1 (extractive QA). Locally only the official dev set exists (../shared/data/squad/dev-v1.1.json,
48 articles, 10,570 questions): it is split *by article* (seeded), so no test paragraph or question
was seen in training: ``TEST_ARTICLES`` articles are the test set, the rest train (and val, held out
of it). The hub fallback uses the official train / validation splits.

Training uses each question's first gold answer; evaluation scores against all gold answers
(exact match and F1 as the official evaluate-v1.1.py).
"""

from __future__ import annotations

from pathlib import Path

from cpet.tasks.base import Example, TaskSpec, read_json, register, seeded_split, to_examples

TEST_ARTICLES = 10


def _article_examples(article: dict) -> list[Example]:
    out = []
    for par in article["paragraphs"]:
        for qa in par["qas"]:
            texts = tuple(a["text"] for a in qa["answers"])
            out.append(Example(qa["question"], par["context"], 0, answers=texts,
                               answer_start=int(qa["answers"][0]["answer_start"])))
    return out


def _squad_local(root: Path):
    articles = read_json(root / "squad" / "dev-v1.1.json", key="data")
    train_articles, test_articles = seeded_split(articles, TEST_ARTICLES)
    return to_examples(train_articles, _article_examples), to_examples(test_articles, _article_examples)


def _hub_row(r: dict) -> Example:
    return Example(r["question"], r["context"], 0, answers=tuple(r["answers"]["text"]),
                   answer_start=int(r["answers"]["answer_start"][0]))


SQUAD = register(TaskSpec(
    name="squad", labels=("answer",), metrics=("f1", "exact_match"), load_local=_squad_local,
    hub=("rajpurkar/squad", "plain_text"), hub_row=_hub_row, format="span",
    template="{b}\nQuestion: {a}\nAnswer:",
    note=f"test = the questions of {TEST_ARTICLES} of the 48 official dev articles (seeded, by article); "
         "train/val = the other articles' questions (no train split available locally)"))
