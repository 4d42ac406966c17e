"""5-shot MMLU (Hendrycks et al.) for causal LMs, scored as the original code and lm-eval's ``mmlu`` do.

Data: the hendrycks CSV files (no header; question, A, B, C, D, answer letter) under
``<data>/mmlu/{dev,val,test}/<subject>_<split>.csv``; ``dev`` holds the 5 exemplars per subject.

Prompt per question: ``The following are multiple choice questions (with answers) about <subject>.``
and a blank line, then the first k dev exemplars, each ``<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X``
and a blank line, then the question ending in ``Answer:``. The prediction is the letter among
`` A``/`` B``/`` C``/`` D`` whose token gets the highest next-token logit. When a prompt is longer than the
model's context, k decreases (the last exemplars go first) until it fits, as in the original code.
This follows lm-eval's template (subject words joined by one space, question stripped); the original
evaluate.py joins the subject with a leading space (two spaces after "about") and keeps the question as is.
"""

from __future__ import annotations

import csv
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cpet.errors import CpetError
from cpet.formats import pad_rows
from cpet.io import atomic_write, atomic_write_json, resolve_data_dir
from cpet.models import LMTaskModel, cache_arg, require_causal_lm

CHOICES = ("A", "B", "C", "D")
SPLITS = ("val", "test", "dev")
CATEGORIES = ("STEM", "humanities", "social sciences", "other")

# The subject -> category map of the MMLU paper (hendrycks/test categories.py, lm-eval's mmlu groups).
_BY_CATEGORY = {
    "STEM": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
SUBJECT_CATEGORY: dict[str, str] = {s: cat for cat, names in _BY_CATEGORY.items() for s in names.split()}


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # A, B, C or D


def mmlu_dir(data_dir: str | None = None) -> Path:
    """``<data>/mmlu`` for the data folder of ``cpet.tasks.resolve_data_dir`` (a folder holding
    ``dev/`` itself is accepted too)."""
    root = resolve_data_dir(data_dir)
    if root is None:
        raise CpetError("no data folder for MMLU: pass --data-dir PATH or set $CPET_DATA to a folder holding mmlu/")
    folder = root if (root / "dev").is_dir() else root / "mmlu"
    if not (folder / "dev").is_dir():
        raise CpetError(f"{folder}/dev not found: the data folder needs mmlu/dev/<subject>_dev.csv "
                        "(hendrycks CSV files); pass --data-dir PATH")
    return folder


def read_csv(path: Path) -> list[Question]:
    """The rows of one hendrycks CSV file."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f), 1):
            if len(row) != 6 or row[5].strip() not in CHOICES:
                raise CpetError(f"{path}:{line}: expected 6 columns (question, A, B, C, D, answer letter), got {row[:7]}")
            out.append(Question(row[0], (row[1], row[2], row[3], row[4]), row[5].strip()))
    return out


def subjects_of(folder: Path, split: str) -> list[str]:
    """Subjects with a ``<subject>_<split>.csv`` file, sorted."""
    split_dir = folder / split
    if not split_dir.is_dir():
        hint = " (the MMLU test split is not staged in ../shared/data; use --split val)" if split == "test" else ""
        raise CpetError(f"no MMLU {split} split: {split_dir} does not exist{hint}")
    return sorted(p.name[: -len(f"_{split}.csv")] for p in split_dir.glob(f"*_{split}.csv"))


def subject_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_example(q: Question, with_answer: bool = True) -> str:
    """One question block; with its answer (an exemplar) or ending in ``Answer:`` (the question asked)."""
    text = q.question.strip() + "".join(f"\n{c}. {t}" for c, t in zip(CHOICES, q.choices)) + "\nAnswer:"
    return text + f" {q.answer}\n\n" if with_answer else text


def format_prompt(subject: str, exemplars: list[Question], q: Question, k: int) -> str:
    """Header, the first ``k`` exemplars, then the question."""
    return subject_header(subject) + "".join(format_example(e) for e in exemplars[:k]) + format_example(q, False)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text``: a BOS first where the tokenizer adds one, never an EOS/SEP at the end."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos, *ids] if getattr(tokenizer, "add_bos_token", False) and bos is not None else list(ids)


def answer_token_ids(tokenizer) -> list[int]:
    """The id scored for each letter: the last token of `` A`` .. `` D`` (BPE: the one token ``ĠA``;
    WordPiece: ``a``, the space being dropped). They must be four different tokens."""
    ids = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"][-1] for c in CHOICES]
    if len(set(ids)) != len(CHOICES):
        raise CpetError(f"the tokenizer maps the answers ' A'..' D' to the ids {ids}, not four different tokens; "
                        "MMLU letter scoring needs a tokenizer that tells the letters apart")
    return ids


def fit_prompt(tokenizer, subject: str, exemplars: list[Question], q: Question, shots: int,
               max_length: int) -> tuple[list[int], int]:
    """(token ids, exemplars used): drop exemplars from the end of the list until the prompt fits in
    ``max_length``; with none left, keep the last ``max_length`` tokens (so it still ends in ``Answer:``)."""
    k = shots
    while True:
        ids = encode(tokenizer, format_prompt(subject, exemplars, q, k))
        if len(ids) <= max_length:
            return ids, k
        if k == 0:
            return ids[-max_length:], -1  # -1: cut even without exemplars
        k -= 1


def context_length(model, tokenizer) -> int:
    """The model's context (config ``max_position_embeddings``), else the tokenizer's, else 2048."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 1_000_000 else 2048


def _takes_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token rows, right-padded."""
    batch = pad_rows([{"input_ids": r} for r in rows], pad_id)
    return batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def next_token_logits(model, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """(B, V) logits after each row's last token. Rows are right-padded: causal attention never lets a
    real token see the padding, so each row scores as it would alone. HF models that accept
    ``logits_to_keep`` project only the needed positions onto the vocabulary."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    ids, mask = _right_padded(rows, pad_id)
    last = mask.sum(1) - 1  # (B,)
    ids, mask = ids.to(device), mask.to(device)
    if _takes_logits_to_keep(model):
        keep = torch.unique(last)  # sorted positions, shared by the batch
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep.to(device)).logits  # (B, K, V)
        col = torch.searchsorted(keep, last)
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        col = last
    return logits[torch.arange(len(rows), device=logits.device), col.to(logits.device)].float()


def _causal_lm(model):
    """The HF causal LM to call with a KV cache (an LMTaskModel's backbone carries its LoRA / recovery
    branches inside), or None when the model cannot take one."""
    lm = model.backbone if isinstance(model, LMTaskModel) else model
    if getattr(getattr(lm, "config", None), "is_encoder_decoder", False) or cache_arg(lm) is None:
        return None
    if isinstance(model, LMTaskModel) and model.virtual_tokens():  # the task model's forward puts them in front
        return None
    return lm


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the longest token prefix all rows share, leaving every row at least one token of its own."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


@torch.no_grad()
def prefix_cache(lm, prefix: list[int]):
    """The KV cache of ``prefix`` (batch 1): a subject's header and exemplars, computed once."""
    device = next(lm.parameters()).device
    out = lm(input_ids=torch.tensor([prefix], device=device), use_cache=True)
    return out[cache_arg(lm)]


@torch.no_grad()
def next_token_logits_after(lm, cache, prefix_len: int, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """(B, V) logits after each row's last token, the rows being continuations of a cached prefix
    (right-padded; positions continue from the prefix)."""
    import copy

    device = next(lm.parameters()).device
    ids, mask = _right_padded(rows, pad_id)
    last = mask.sum(1) - 1
    past = copy.deepcopy(cache)
    past.batch_repeat_interleave(len(rows))
    full = torch.cat([torch.ones(len(rows), prefix_len, dtype=torch.long), mask], 1)
    kw = {}
    if _takes_logits_to_keep(lm):
        keep = torch.unique(last)
        kw["logits_to_keep"] = keep.to(device)
    kw[cache_arg(lm)] = past
    logits = lm(input_ids=ids.to(device), attention_mask=full.to(device), use_cache=True, **kw).logits
    col = torch.searchsorted(keep, last) if kw else last
    return logits[torch.arange(len(rows), device=logits.device), col.to(logits.device)].float()


def _batches(lengths: list[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first, at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens each."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < batch_size and lengths[out[-1][0]] * (len(out[-1]) + 1) <= max_batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def evaluate_mmlu(model, tokenizer, data_dir: str | None = None, split: str = "val", shots: int = 5,
                  subjects: list[str] | None = None, batch_size: int = 8, max_length: int | None = None,
                  limit: int | None = None, max_batch_tokens: int = 16384, reuse_prefix: bool = True,
                  log=print) -> dict:
    """k-shot MMLU accuracy of a causal LM (``model(input_ids=, attention_mask=).logits`` is (B, T, V)).

    Returns per-subject accuracy and counts, the micro average (over questions, the usual headline),
    the macro average (over subjects), the four categories (micro within each), how many prompts
    needed fewer exemplars to fit, and the runtime. ``limit`` keeps the first N questions per subject.

    ``reuse_prefix``: the header and exemplars, the same tokens in every prompt of a subject (~80% of
    them on MMLU), run once per subject into a KV cache that each batch of questions continues from
    (the same logits up to float rounding; causal LMs whose forward takes ``past_key_values``).
    """
    if split not in SPLITS:
        raise CpetError(f"MMLU split must be one of {SPLITS}, got {split!r}")
    require_causal_lm(getattr(model, "config", None), "this model")
    folder = mmlu_dir(data_dir)
    available = subjects_of(folder, split)
    if not available:
        raise CpetError(f"no *_{split}.csv files in {folder / split}")
    chosen = list(subjects) if subjects else available
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise CpetError(f"unknown MMLU subjects {unknown} in {folder / split}; known: {', '.join(available)}")
    max_length = max_length or context_length(model, tokenizer)
    answer_ids = answer_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    was_training = getattr(model, "training", False)
    model.eval()

    start = time.perf_counter()
    per_subject: dict[str, dict] = {}
    fewer_shots = cut = 0
    for n_done, subject in enumerate(chosen, 1):
        dev_path = folder / "dev" / f"{subject}_dev.csv"
        if not dev_path.is_file():
            raise CpetError(f"{dev_path} not found: {shots}-shot prompts need the dev exemplars of every subject")
        exemplars = read_csv(dev_path)
        if len(exemplars) < shots:
            raise CpetError(f"{dev_path} has {len(exemplars)} exemplars, fewer than --shots {shots}")
        questions = read_csv(folder / split / f"{subject}_{split}.csv")[:limit]
        fitted = [fit_prompt(tokenizer, subject, exemplars, q, shots, max_length) for q in questions]
        rows = [ids for ids, _ in fitted]
        used = [k for _, k in fitted]
        fewer_shots += sum(k < shots for k in used)
        cut += sum(k < 0 for k in used)
        preds = [""] * len(rows)
        lm = _causal_lm(model) if reuse_prefix and len(rows) > 1 else None
        p = common_prefix(rows) if lm is not None else 0
        cache = prefix_cache(lm, rows[0][:p]) if p >= 16 else None
        for batch in _batches([len(r) - p for r in rows], batch_size, max_batch_tokens):
            if cache is not None:
                logits = next_token_logits_after(lm, cache, p, [rows[i][p:] for i in batch], pad_id)
            else:
                logits = next_token_logits(model, [rows[i] for i in batch], pad_id)
            scores = logits[:, answer_ids]  # (B, 4)
            for i, best in zip(batch, scores.argmax(1).tolist()):
                preds[i] = CHOICES[best]
        correct = sum(p == q.answer for p, q in zip(preds, questions))
        n = len(questions)
        per_subject[subject] = {"category": SUBJECT_CATEGORY.get(subject, "other"), "n": n, "correct": correct,
                                "acc": correct / n if n else 0.0, "min_shots": min(used, default=shots),
                                "predictions": "".join(preds)}
        log(f"[{n_done}/{len(chosen)}] {subject}: {correct}/{n} = {correct / max(n, 1):.3f} "
            f"({time.perf_counter() - start:.0f}s)")
    if was_training:
        model.train()

    total = sum(s["n"] for s in per_subject.values())
    right = sum(s["correct"] for s in per_subject.values())
    categories = {}
    for cat in CATEGORIES:
        members = [s for s in per_subject.values() if s["category"] == cat]
        if members:
            n = sum(s["n"] for s in members)
            categories[cat] = {"acc": sum(s["correct"] for s in members) / max(n, 1), "n": n,
                               "subjects": len(members)}
    return {
        "benchmark": "mmlu",
        "model": getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        "split": split,
        "shots": shots,
        "limit": limit,
        "n_questions": total,
        "correct": right,
        "micro_avg": right / max(total, 1),
        "macro_avg": sum(s["acc"] for s in per_subject.values()) / max(len(per_subject), 1),
        "categories": categories,
        "subjects": per_subject,
        "fewer_shots": fewer_shots,
        "cut_to_max_length": cut,
        "max_length": max_length,
        "batch_size": batch_size,
        "reuse_prefix": reuse_prefix,
        "answer_token_ids": dict(zip(CHOICES, answer_ids)),
        "data_dir": str(folder),
        "runtime_s": round(time.perf_counter() - start, 1),
    }


def results_markdown(result: dict) -> str:
    """The report: headline averages, the four categories, then every subject."""
    lines = [f"# MMLU, {result['shots']}-shot, {result['split']} split", "",
             f"model: `{result['model']}`" + (f" ({result['model_path']})" if result.get("model_path") else ""), ""]
    if result.get("note"):
        lines += [f"**Note:** {result['note']}", ""]
    lines += [f"{result['n_questions']} questions in {len(result['subjects'])} subjects"
              + (f" (first {result['limit']} per subject)" if result.get("limit") else "")
              + f"; runtime {result['runtime_s']:.0f} s; batch size {result['batch_size']}; "
              f"max length {result['max_length']} tokens; {result['fewer_shots']} prompts used fewer than "
              f"{result['shots']} exemplars to fit, {result['cut_to_max_length']} were cut.", "",
              "| | accuracy | n |", "|---|---:|---:|",
              f"| **average** (over questions) | **{result['micro_avg']:.4f}** | {result['n_questions']} |",
              f"| average over subjects | {result['macro_avg']:.4f} | {len(result['subjects'])} subjects |"]
    for cat, c in result["categories"].items():
        lines.append(f"| {cat} | {c['acc']:.4f} | {c['n']} ({c['subjects']} subjects) |")
    lines += ["", "Categories average over their questions. Chance is 0.25.", "",
              "| subject | category | accuracy | correct / n |", "|---|---|---:|---:|"]
    for name, s in result["subjects"].items():
        lines.append(f"| {name} | {s['category']} | {s['acc']:.4f} | {s['correct']} / {s['n']} |")
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir: str | Path) -> Path:
    """``results.json`` (everything, predictions included) and ``results.md``, each written atomically."""
    out = Path(out_dir)
    atomic_write_json(out / "results.json", result)
    atomic_write(out / "results.md", results_markdown(result).encode())
    return out


def lm_eval_tasks(folder: Path, split: str, subjects: list[str], out: Path) -> list[dict]:
    """lm-eval task configs for the local MMLU files: each subject's questions as cpet reads them, written
    to JSON lines under ``out``, asked with lm-eval's own ``mmlu`` template (the same as cpet's: header,
    ``question.strip()``, ``A. ..`` lines, ``Answer:``; first-n dev exemplars; accuracy of the likeliest
    letter), so the reference harness scores the very questions cpet does, offline."""
    tasks = []
    for subject in subjects:
        files = {}
        for name, sp in (("eval", split), ("dev", "dev")):
            rows = read_csv(folder / sp / f"{subject}_{sp}.csv")
            files[name] = str(out / f"{subject}_{name}.jsonl")
            atomic_write(Path(files[name]), "".join(json.dumps({"question": q.question, "choices": list(q.choices),
                                                                "answer": CHOICES.index(q.answer)}) + "\n"
                                                    for q in rows).encode())
        tasks.append({
            "task": f"cpet_mmlu_{subject}", "dataset_path": "json", "dataset_kwargs": {"data_files": files},
            "test_split": "eval", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice", "description": subject_header(subject),
            "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. "
                           "{{choices[3]}}\nAnswer:",
            "doc_to_choice": list(CHOICES), "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}})
    return tasks


def run_lm_eval(model, tokenizer=None, shots: int = 5, limit: int | None = None, batch_size: int = 8,
                data_dir: str | None = None, split: str = "val", subjects: list[str] | None = None,
                hub: bool = False, device: str = "cpu") -> dict:
    """MMLU through the reference harness (lm-eval). ``model``: a HF folder / id, or an in-memory model: a
    causal LM, or a cpet task model (``LMTaskModel``: the compressed backbone with its task's LoRA and
    recovery modules inside), so CLM+CPET is scored by lm-eval as it runs in cpet. By default on the local
    MMLU files (``lm_eval_tasks``: offline, the questions cpet's own evaluation reads); ``hub``: lm-eval's
    own ``mmlu`` task (reads cais/mmlu's test split from the hub). Returns accuracy per subject, the micro
    average and the per-question predictions (letters), comparable with ``evaluate_mmlu``'s."""
    import tempfile

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise CpetError("--lm-eval needs the lm-evaluation-harness package: pip install 'cpet[lm-eval]'") from None
    if isinstance(model, (str, Path)):
        lm = HFLM(pretrained=str(model), dtype="float32", batch_size=batch_size, device=device)
    else:
        if hasattr(model, "require_no_virtual_tokens"):
            model.require_no_virtual_tokens("lm-eval")
        hf = getattr(model, "backbone", model)  # a cpet task model: the HF model its modules sit in
        if tokenizer is None:
            raise CpetError("lm-eval on an in-memory model needs its tokenizer")
        hf.eval()
        # special tokens as cpet's encode adds them (a BOS where the tokenizer adds one; never a SEP/EOS)
        extra = {} if tokenizer.bos_token_id is not None or tokenizer.eos_token_id is not None else \
            {"prefix_token_id": tokenizer.pad_token_id or 0}  # (a tokenizer with neither: tests' WordPiece)
        # HFLM re-ties input / output embeddings of the model it is given; a compressed model's are already
        # set (an int8 embedding has no float weight to tie), so tying is skipped while it wraps the model
        hf.tie_weights = lambda *a, **k: None
        try:
            lm = HFLM(pretrained=hf, tokenizer=tokenizer, batch_size=batch_size,
                      add_bos_token=bool(getattr(tokenizer, "add_bos_token", False)), **extra)
        finally:
            del hf.tie_weights
    if hub:
        out = lm_eval.simple_evaluate(model=lm, tasks=["mmlu"], num_fewshot=shots, limit=limit)
        return json.loads(json.dumps(out.get("results", out), default=str))
    folder = mmlu_dir(data_dir)
    chosen = list(subjects) if subjects else subjects_of(folder, split)
    with tempfile.TemporaryDirectory(prefix="cpet-lm-eval-") as tmp:
        tasks = lm_eval_tasks(folder, split, chosen, Path(tmp))
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=limit, log_samples=True)
    per_subject = {}
    for subject in chosen:
        samples = sorted(out["samples"][f"cpet_mmlu_{subject}"], key=lambda x: x["doc_id"])
        preds = "".join(CHOICES[max(range(len(CHOICES)), key=lambda i: s["resps"][i][0][0])] for s in samples)
        correct = sum(CHOICES.index(p) == s["doc"]["answer"] for p, s in zip(preds, samples))
        per_subject[subject] = {"n": len(samples), "correct": correct, "acc": correct / max(len(samples), 1),
                                "predictions": preds}
    total = sum(s["n"] for s in per_subject.values())
    return {"harness": f"lm-eval {getattr(lm_eval, '__version__', '?')}", "split": split, "shots": shots,
            "limit": limit, "n_questions": total, "micro_avg": sum(s["correct"] for s in per_subject.values())
            / max(total, 1), "subjects": per_subject}
