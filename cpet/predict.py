"""Predictions of trained tasks on new text, many tasks on one backbone (``cpet predict``).

    inputs (text, or text pairs)  x  tasks (folders loaded into one TaskBank)
      -> one JSON object per (input, task): label + probabilities for classification heads (mixed-task
         batches through the bank), the predicted label / choice / answer for the other formats

A row's prediction does not depend on the rest of its batch (per-token int8, per-segment add-ons), so
the batching here is free to mix tasks and lengths.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from cpet.bank import TaskBank
from cpet.errors import CpetError
from cpet.formats import TextFormat, get_format, pad_rows
from cpet.io import atomic_write
from cpet.tasks import TASKS, Example


@dataclass(frozen=True)
class Item:
    """One input: text (and the pair's second text), the tasks to run it on (None = every loaded task)."""

    text: str
    text_b: str | None = None
    tasks: tuple[str, ...] | None = None
    choices: tuple[str, ...] | None = None


def read_inputs(path: str | Path) -> list[Item]:
    """JSONL (objects with ``text`` or ``text_a``, optional ``text_b``, ``task``, ``choices``) or CSV with
    a header (the same column names)."""
    p = Path(path)
    if not p.is_file():
        raise CpetError(f"input file {p} does not exist")
    rows: list[dict] = []
    if p.suffix.lower() == ".csv":
        with p.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CpetError(f"{p}, line {n}: not JSON ({e.msg}); one object per line, e.g. "
                                '{"text": "a fine film"}') from None
            if not isinstance(row, dict):
                raise CpetError(f"{p}, line {n}: expected an object like {{\"text\": ...}}, got {type(row).__name__}")
            rows.append(row)
    items = []
    for n, row in enumerate(rows, 1):
        text = row.get("text", row.get("text_a"))
        if not isinstance(text, str) or not text.strip():
            raise CpetError(f"{p}, row {n}: needs a non-empty 'text' (or 'text_a') field")
        task = row.get("task")
        choices = row.get("choices")
        items.append(Item(text, row.get("text_b") or None, (task,) if isinstance(task, str) and task else None,
                          tuple(choices) if isinstance(choices, list) else None))
    if not items:
        raise CpetError(f"{p} holds no inputs")
    return items


def encode_inputs(tokenizer, texts: list[tuple[str, str | None]], max_length: int) -> list[tuple[dict, bool]]:
    """Per (text, text_b): its model rows' token ids (cut to ``max_length``) and whether it was cut. Texts
    that fit are tokenized once; only over-long ones a second time, truncated."""
    out = []
    for a, b in texts:
        enc = tokenizer(a, b, truncation=False)
        cut = len(enc["input_ids"]) > max_length
        if cut:
            enc = tokenizer(a, b, truncation=True, max_length=max_length)
        out.append(({k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc}, cut))
    return out


def label_record(scores: torch.Tensor, labels: list[str], truncated: bool) -> dict:
    """A classifier row's answer: the best label and every label's probability (softmax of the head)."""
    probs = torch.softmax(scores.float(), -1).tolist()
    labels = labels or [str(k) for k in range(len(probs))]
    best = max(range(len(probs)), key=probs.__getitem__)
    return {"label": labels[best], "probabilities": dict(zip(labels, (round(p, 6) for p in probs))),
            **({"truncated": True} if truncated else {})}


def spec_of(bank: TaskBank, name: str):
    task = bank.tasks[name]
    key = task.config.get("task")
    return TASKS.get(key) if isinstance(key, str) else None


def predict(bank: TaskBank, tokenizer, items: list[Item], max_length: int = 128, batch_size: int = 32,
            log: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Yield one record per (input, task) in input order: classification heads go through mixed-task
    batches of the bank; other formats through their task's own format, one task at a time."""
    pairs = [(i, t) for i, item in enumerate(items) for t in (item.tasks or tuple(sorted(bank.tasks)))]
    unknown = sorted({t for _, t in pairs if t not in bank.tasks})
    if unknown:
        raise CpetError(f"task(s) {unknown} not loaded (loaded: {sorted(bank.tasks)})")
    head = [(i, t) for i, t in pairs if bank.tasks[t].head_type == "classify" and items[i].choices is None]
    other = [(i, t) for i, t in pairs if (i, t) not in set(head)]
    results: dict[tuple[int, str], dict] = {}
    results.update(_classify(bank, tokenizer, items, head, max_length, batch_size, log))
    for t in sorted({t for _, t in other}):
        results.update(predict_by_format(bank, tokenizer, items, [i for i, u in other if u == t], t, max_length, batch_size))
    for i, t in pairs:
        yield {"id": i, "task": t, **results[(i, t)]}


def _classify(bank, tokenizer, items, pairs, max_length, batch_size, log) -> dict:
    """Label + probabilities per (input, task), rows sorted by task then length so each batch is a few
    contiguous task segments with little padding."""
    if not pairs:
        return {}
    used = sorted({i for i, _ in pairs})
    enc = dict(zip(used, encode_inputs(tokenizer, [(items[i].text, items[i].text_b) for i in used], max_length)))
    order = sorted(pairs, key=lambda p: (p[1], len(enc[p[0]][0]["input_ids"])))
    out, t0 = {}, time.perf_counter()
    n_batches = (len(order) + batch_size - 1) // batch_size
    for b, s in enumerate(range(0, len(order), batch_size), 1):
        chunk = order[s: s + batch_size]
        batch = pad_rows([enc[i][0] for i, _ in chunk], tokenizer.pad_token_id)
        scores = bank.scores([t for _, t in chunk], **batch)
        for (i, t), z in zip(chunk, scores):
            out[(i, t)] = label_record(z, bank.tasks[t].labels, enc[i][1])
        if log and (b % 10 == 0 or b == n_batches):
            el = time.perf_counter() - t0
            log(f"  {b}/{n_batches} batches, {el:.0f}s, ETA {el / b * (n_batches - b):.0f}s")
    return out


def predict_by_format(bank, tokenizer, items, idx, name, max_length, batch_size, generate: bool = False,
                      max_new_tokens: int | None = None) -> dict:
    """Predictions of one task through its format (choice, span, text-to-text); labels, no probabilities.
    ``generate``: free text greedily generated from the task's prompt (language models), whatever its format."""
    spec = spec_of(bank, name)
    if spec is None:
        raise CpetError(f"task {name}: its folder does not name a known task ('task' in task_config.json), "
                        "so its input format (choices, spans, prompts) is unknown")
    view = bank.view(name)
    examples = [Example(items[i].text, items[i].text_b, 0, items[i].choices) for i in idx]
    if spec.format == "choice" and any(e.choices is None for e in examples):
        raise CpetError(f"task {name} is multiple choice: give each input its 'choices'")
    if spec.format == "span" and any(e.text_b is None for e in examples):
        raise CpetError(f"task {name} is extractive QA: give each input a question as 'text' and the "
                        "context as 'text_b'")
    fmt = TextFormat(spec, view.seq2seq) if view.head_type == "lm" else get_format(spec, view)
    generate = generate or spec.format == "generate"
    if generate and view.head_type != "lm":
        raise CpetError(f"task {name} has a task head: generation needs a text-to-text task on a language model")
    if max_new_tokens is not None:
        fmt.max_new_tokens = max_new_tokens
    with bank.only(name):
        if generate:  # free text: greedy generation from the task's prompt
            preds = fmt.generate(view, tokenizer, examples, max_length, batch_size)
        else:
            preds = fmt.predict(view, tokenizer, examples, max_length, batch_size)
    out = {}
    for i, e, p in zip(idx, examples, preds):
        if generate:
            out[(i, name)] = {"text": p}
        elif spec.format == "span":
            out[(i, name)] = {"answer": p}
        elif spec.format == "choice":
            out[(i, name)] = {"choice": int(p), "answer": e.choices[int(p)]}
        else:
            out[(i, name)] = {"label": spec.labels[int(p)]}
    return out


def write_jsonl(records: Iterator[dict], out: str | Path | None) -> int:
    """Records as JSON lines to a file (written whole, atomically) or stdout; returns how many."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if out is None:
        sys.stdout.write("".join(line + "\n" for line in lines))
    else:
        atomic_write(Path(out), "".join(line + "\n" for line in lines).encode())
    return len(lines)
