"""Task formats: how examples become model rows, the training loss, and predictions.

    HeadFormat  a task head on the backbone: one row per example (classify) or per choice (choice)
    SpanFormat  encoder + start/end head for extractive QA (SQuAD): question + context windows with a
                doc stride; answers from n-best start/end pairs mapped back through the offsets
    TextFormat  a language model (decoder or T5) casts every task as text-to-text: prompt -> answer.
                Classification and multiple choice rank the candidates (verbalizers / choices) by their
                log-likelihood given the prompt; SQuAD answers are generated greedily.

Each format turns a split into *features* once (a feature is a training unit: a list of rows, all
features of a split having the same number of rows, plus its targets); ``collate`` pads the rows of
some features into a batch whose ``index`` names each row uniquely in that split, so the teacher's
per-row cache works for every format.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpet.errors import CpetError
from cpet.models import LMTaskModel, TaskOutput
from cpet.tasks import Example, TaskSpec, evaluate_predictions, gold_of

MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "decoder_input_ids", "decoder_attention_mask")
PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "labels": -100, "decoder_attention_mask": 0}


def feature_length(feature: dict) -> int:
    """Tokens of a feature's longest row: what padding a batch to its longest costs per row."""
    return max(len(r["input_ids"]) for r in feature["rows"])


def pad_rows(rows: list[dict], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad each key of the row dicts to the longest row: ids with ``pad_id``, labels with -100, masks with 0.
    ``attention_mask`` (and ``decoder_attention_mask`` where decoder ids exist) are derived from lengths."""
    out = {}
    keys = list(rows[0])
    for k in keys + ["attention_mask"] + (["decoder_attention_mask"] if "decoder_input_ids" in keys else []):
        src = "input_ids" if k == "attention_mask" else "decoder_input_ids" if k == "decoder_attention_mask" else k
        t = max(len(r[src]) for r in rows)
        pad = PAD_VALUES.get(k, pad_id if k == "input_ids" else 0)
        x = torch.full((len(rows), t), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            v = [1] * len(r[src]) if k.endswith("attention_mask") else r[k]
            if left:
                x[i, t - len(v):] = torch.tensor(v, dtype=torch.long)
            else:
                x[i, : len(v)] = torch.tensor(v, dtype=torch.long)
        out[k] = x
    return out


def model_inputs(batch: dict, device) -> dict:
    inputs = {k: batch[k].to(device) for k in MODEL_KEYS if k in batch}
    if "num_choices" in batch:
        inputs["num_choices"] = batch["num_choices"]
    return inputs


class Format:
    """Interface (see the module docstring)."""

    def __init__(self, spec: TaskSpec):
        self.spec = spec

    def encode(self, tokenizer, examples: list[Example], max_length: int, train: bool = True) -> list[dict]:
        raise NotImplementedError

    def collate(self, features: list[dict], indices: list[int], pad_id: int) -> dict:
        per = len(features[indices[0]]["rows"])
        rows = [row for i in indices for row in features[i]["rows"]]
        if len(rows) != per * len(indices):
            raise ValueError("all features of a split must have the same number of rows")
        batch = pad_rows(rows, pad_id)
        batch["index"] = torch.tensor([i * per + r for i in indices for r in range(per)])
        return batch

    def loss(self, out: TaskOutput, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, model: nn.Module, tokenizer, examples: list[Example], max_length: int,
                batch_size: int = 64, features: list[dict] | None = None) -> list:
        raise NotImplementedError

    def evaluate(self, model, tokenizer, examples, max_length, batch_size=64, features=None) -> dict[str, float]:
        preds = self.predict(model, tokenizer, examples, max_length, batch_size, features)
        return evaluate_predictions(self.spec, preds, gold_of(self.spec, examples))

    @staticmethod
    def _batches(features: list[dict], batch_size: int):
        """Feature indices in batches of similar length (less padding)."""
        order = sorted(range(len(features)), key=lambda i: feature_length(features[i]))
        return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]


# ---------------------------------------------------------------- task head: classify / choice
class HeadFormat(Format):
    def encode(self, tokenizer, examples, max_length, train=True):
        """Per example its rows ({input_ids, token_type_ids?}): one, or one per choice (text_a + choice)."""
        if examples and examples[0].choices is not None:
            a = [e.text_a for e in examples for _ in e.choices]
            b = [c for e in examples for c in e.choices]
        else:
            a = [e.text_a for e in examples]
            b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        rows = [{k: enc[k][i] for k in keys} for i in range(len(a))]
        per = len(rows) // max(1, len(examples))
        return [{"rows": rows[i * per: (i + 1) * per], "label": e.label} for i, e in enumerate(examples)]

    def collate(self, features, indices, pad_id):
        batch = super().collate(features, indices, pad_id)
        batch["labels"] = torch.tensor([features[i]["label"] for i in indices])
        if self.spec.format == "choice":
            batch["num_choices"] = len(features[indices[0]]["rows"])
        return batch

    def loss(self, out, batch):
        return F.cross_entropy(out.logits, batch["labels"].to(out.logits.device))

    @torch.no_grad()
    def predict(self, model, tokenizer, examples, max_length, batch_size=64, features=None):
        model.eval()
        features = features or self.encode(tokenizer, examples, max_length, train=False)
        device = next(model.parameters()).device
        preds = [0] * len(examples)
        for idx in self._batches(features, batch_size):
            batch = self.collate(features, idx, tokenizer.pad_token_id)
            logits = model(**model_inputs(batch, device)).logits
            for i, p in zip(idx, logits.argmax(-1).tolist()):
                preds[i] = p
        return preds


# ---------------------------------------------------------------- extractive QA
class SpanFormat(Format):
    """Question + context windows (``doc_stride`` tokens of overlap); the answer span is trained as a
    start and an end token (the [CLS] position where the window does not contain the answer)."""

    def __init__(self, spec: TaskSpec, doc_stride: int = 64, n_best: int = 20, max_answer_tokens: int = 30):
        super().__init__(spec)
        self.doc_stride, self.n_best, self.max_answer_tokens = doc_stride, n_best, max_answer_tokens

    def encode(self, tokenizer, examples, max_length, train=True):
        if not getattr(tokenizer, "is_fast", False):
            raise CpetError("span extraction needs a fast tokenizer (offset mappings); load it with use_fast=True")
        stride = min(self.doc_stride, max_length // 4)
        enc = tokenizer([e.text_a for e in examples], [e.text_b for e in examples], truncation="only_second",
                        max_length=max_length, stride=stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        features = []
        for j, ex_i in enumerate(enc["overflow_to_sample_mapping"]):
            e, seq = examples[ex_i], enc.sequence_ids(j)
            offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][j], seq)]
            ctx = [k for k, s in enumerate(seq) if s == 1]
            start = end = 0
            if e.answers and ctx:
                a0, a1 = e.answer_start, e.answer_start + len(e.answers[0])
                if offsets[ctx[0]][0] <= a0 and offsets[ctx[-1]][1] >= a1:
                    start = next(k for k in reversed(ctx) if offsets[k][0] <= a0)
                    end = next(k for k in ctx if offsets[k][1] >= a1)
            features.append({"rows": [{k: enc[k][j] for k in keys}], "start": start, "end": end,
                             "example": ex_i, "offsets": offsets})
        return features

    def collate(self, features, indices, pad_id):
        batch = super().collate(features, indices, pad_id)
        batch["start"] = torch.tensor([features[i]["start"] for i in indices])
        batch["end"] = torch.tensor([features[i]["end"] for i in indices])
        return batch

    def loss(self, out, batch):
        logits = out.logits  # (N, T, 2)
        start, end = batch["start"].to(logits.device), batch["end"].to(logits.device)
        return (F.cross_entropy(logits[..., 0], start) + F.cross_entropy(logits[..., 1], end)) / 2

    def best_span(self, start_logits: list[float], end_logits: list[float], offsets: list) -> tuple[float, int, int] | None:
        """(score, start token, end token) of the best valid span among the n-best starts and ends."""
        n = len(offsets)
        starts = sorted(range(n), key=lambda k: -start_logits[k])[: self.n_best]
        ends = sorted(range(n), key=lambda k: -end_logits[k])[: self.n_best]
        best = None
        for s in starts:
            for t in ends:
                if offsets[s] is None or offsets[t] is None or t < s or t - s + 1 > self.max_answer_tokens:
                    continue
                score = start_logits[s] + end_logits[t]
                if best is None or score > best[0]:
                    best = (score, s, t)
        return best

    @torch.no_grad()
    def predict(self, model, tokenizer, examples, max_length, batch_size=64, features=None):
        """Answer strings: the best-scoring span over all of an example's windows ("" if none is valid)."""
        model.eval()
        features = features or self.encode(tokenizer, examples, max_length, train=False)
        device = next(model.parameters()).device
        best: dict[int, tuple[float, str]] = {}
        for idx in self._batches(features, batch_size):
            batch = self.collate(features, idx, tokenizer.pad_token_id)
            logits = model(**model_inputs(batch, device)).logits.float().cpu()
            for row, i in enumerate(idx):
                f = features[i]
                n = len(f["offsets"])
                span = self.best_span(logits[row, :n, 0].tolist(), logits[row, :n, 1].tolist(), f["offsets"])
                if span is None:
                    continue
                score, s, t = span
                if f["example"] not in best or score > best[f["example"]][0]:
                    context = examples[f["example"]].text_b
                    best[f["example"]] = (score, context[f["offsets"][s][0]: f["offsets"][t][1]])
        return [best[i][1] if i in best else "" for i in range(len(examples))]


# ---------------------------------------------------------------- text-to-text (decoder LMs and T5)
class TextFormat(Format):
    """Rows of (prompt, answer) token ids with ``labels`` = the answer tokens (-100 elsewhere).

    Decoder: input = prompt + " " + answer + eos, next-token loss on the answer.
    T5: encoder input = prompt, decoder = the answer (+ </s>), teacher-forced.
    """

    def __init__(self, spec: TaskSpec, seq2seq: bool, max_new_tokens: int = 32):
        super().__init__(spec)
        self.seq2seq, self.max_new_tokens = seq2seq, max_new_tokens

    # -- rows
    def _row(self, tokenizer, prompt: str, answer: str | None, max_length: int) -> dict:
        eos = _end_token(tokenizer)
        if self.seq2seq:
            src = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
            if answer is None:
                return {"input_ids": src}
            tgt = (tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos])[:max_length]
            start = _decoder_start(tokenizer)
            return {"input_ids": src, "decoder_input_ids": [start] + tgt[:-1], "labels": tgt}
        p = tokenizer(prompt)["input_ids"]
        if p and p[-1] == eos:  # tokenizers that close every text (e.g. BERT's [SEP]) must not end the prompt
            p = p[:-1]
        t = [] if answer is None else \
            tokenizer(self.spec.answer_prefix + answer, add_special_tokens=False)["input_ids"] + [eos]
        room = max_length - min(len(p), max_length // 2)
        t = t[:room]  # a long answer (instruction tuning) is cut, leaving at least half the window to the prompt
        p = p[-(max_length - len(t)):]  # long prompts lose their beginning; the question and "Answer:" stay
        return {"input_ids": p + t, "labels": [-100] * len(p) + t}

    def candidates(self, e: Example) -> list[str]:
        return list(e.choices) if self.spec.format == "choice" else list(self.spec.words)

    def encode(self, tokenizer, examples, max_length, train=True):
        """Training: one row (prompt + the right answer). Evaluation: one row per candidate answer
        (classification / choice), the prompt alone (span tasks: generated), or as in training (generate
        tasks: scored by the answer's likelihood)."""
        feats = []
        for e in examples:
            prompt = self.spec.prompt(e)
            if train or self.spec.format == "generate":
                rows = [self._row(tokenizer, prompt, self.spec.target(e), max_length)]
            elif self.spec.format == "span":
                rows = [self._row(tokenizer, prompt, None, max_length)]
            else:
                rows = [self._row(tokenizer, prompt, c, max_length) for c in self.candidates(e)]
            feats.append({"rows": rows, "label": e.label})
        return feats

    def _aligned(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the labels they predict: a decoder's position t predicts token t+1; T5's decoder
        is already teacher-forced one step behind its labels."""
        return (logits, labels) if self.seq2seq else (logits[:, :-1], labels[:, 1:])

    def _token_logprobs(self, out: TaskOutput, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p of each label token, mask of label tokens)."""
        logits, labels = self._aligned(out.logits, labels)
        mask = labels != -100
        logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return logp * mask, mask

    def loss(self, out, batch):
        logits, labels = self._aligned(out.logits, batch["labels"].to(out.logits.device))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def sequence_logprobs(self, model, batch: dict, device) -> torch.Tensor:
        """Summed log-likelihood of each row's answer tokens given its prompt: (N,)."""
        out = model(**model_inputs(batch, device))
        logp, _ = self._token_logprobs(out, batch["labels"].to(device))
        return logp.sum(-1)

    @torch.no_grad()
    def predict(self, model, tokenizer, examples, max_length, batch_size=64, features=None):
        """Class ids / choice ids by the most likely candidate; answer strings (span tasks) by greedy
        generation; (log-likelihood, tokens) of the reference answer (generate tasks)."""
        model.eval()
        if self.spec.format == "span":
            return self.generate(model, tokenizer, examples, max_length, batch_size)
        features = features or self.encode(tokenizer, examples, max_length, train=False)
        device = next(model.parameters()).device
        if self.spec.format == "generate":  # (summed log-likelihood, tokens) of each reference answer
            preds = [(0.0, 0)] * len(examples)
            for idx in self._batches(features, batch_size):
                batch = self.collate(features, idx, tokenizer.pad_token_id)
                out = model(**model_inputs(batch, device))
                logp, mask = self._token_logprobs(out, batch["labels"].to(device))
                for i, lp, n in zip(idx, logp.sum(-1).tolist(), mask.sum(-1).tolist()):
                    preds[i] = (lp, n)
            return preds
        preds = [0] * len(examples)
        per = len(features[0]["rows"])
        for idx in self._batches(features, max(1, batch_size // per)):
            batch = self.collate(features, idx, tokenizer.pad_token_id)
            scores = self.sequence_logprobs(model, batch, device).view(len(idx), per)
            for i, p in zip(idx, scores.argmax(-1).tolist()):
                preds[i] = p
        return preds

    @torch.no_grad()
    def generate(self, model: LMTaskModel, tokenizer, examples, max_length, batch_size=16) -> list[str]:
        """Greedy answers (the first line of the continuation), batched; decoders pad on the left. A
        prompt-tuned task generates from its virtual tokens + the input's embeddings, a prefix-tuned one
        continues its prefix cache."""
        lm = model.backbone
        device = next(model.parameters()).device
        eos = _end_token(tokenizer)
        rows = [self._row(tokenizer, self.spec.prompt(e), None, max_length - self.max_new_tokens) for e in examples]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        answers = [""] * len(rows)
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            batch = pad_rows([rows[i] for i in idx], tokenizer.pad_token_id, left=not self.seq2seq)
            ids = batch["input_ids"].to(device)
            # a prompt goes in as embeddings (generate then returns the new tokens only); a prefix cache is
            # continued by the ids, the mask covering both (generate's restart form)
            inputs, added = model.backbone_inputs(ids, batch["attention_mask"].to(device))
            out = lm.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
            new = out if self.seq2seq or added else out[:, ids.shape[1]:]
            for i, seq in zip(idx, new.tolist()):
                text = tokenizer.decode(seq, skip_special_tokens=True)
                answers[i] = text.strip().split("\n")[0].strip()
        return answers


def _end_token(tokenizer) -> int:
    """What ends an answer: eos, else (tokenizers without one, e.g. BERT's) sep."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def _decoder_start(tokenizer) -> int:
    """T5's decoder starts from the pad token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def get_format(spec: TaskSpec, model: nn.Module, doc_stride: int = 64) -> Format:
    """The format for this task on this model: text-to-text on an LM, else by the task's own format."""
    if isinstance(model, LMTaskModel):
        return TextFormat(spec, model.seq2seq)
    if spec.format == "generate":
        raise CpetError(f"{spec.name} is free-text generation: it needs a language model (a decoder LM or T5 "
                        "with model.formulation=text), not a task head")
    if spec.format == "span":
        if getattr(model, "head_type", None) != "span":
            raise CpetError(f"{spec.name} is extractive QA: build the task model with head='span'")
        return SpanFormat(spec, doc_stride)
    return HeadFormat(spec)
