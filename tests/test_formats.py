"""Task formats: SQuAD span extraction (encoders) and text-to-text (decoder LMs, T5) on tiny models,
with the real MiniLM tokenizer; the real SQuAD file's by-article split when it is present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cpet.config import LoraConfig, TaskConfig, load_config
from cpet.experiments import run_experiment
from cpet.formats import SpanFormat, TextFormat, get_format
from cpet.task_modules import build_task_model, load_task_modules, save_task_modules
from cpet.tasks import load_task
from cpet.tasks.metrics import normalize_answer

REAL_SQUAD = Path("../shared/data/squad/dev-v1.1.json")


# ---------------------------------------------------------------- SQuAD data
@pytest.mark.skipif(not REAL_SQUAD.is_file(), reason="needs ../shared/data")
def test_real_squad_split_by_article():
    data = load_task(TaskConfig(name="squad", data_dir="../shared/data", val_size=500))
    assert len(data.train) + len(data.val) + len(data.test) == 10570
    train_ctx = {e.text_b for e in data.train + data.val}
    assert not train_ctx & {e.text_b for e in data.test}  # no test paragraph was seen in training
    for e in data.train[:200] + data.test[:200]:
        assert e.text_b[e.answer_start: e.answer_start + len(e.answers[0])] == e.answers[0]
    assert max(len(e.answers) for e in data.test) >= 3  # all gold answers kept for evaluation
    assert "by article" in data.test_set


def test_span_features_cover_the_answer_and_decode_back(data_dir, tokenizer):
    data = load_task(TaskConfig(name="squad", data_dir=str(data_dir), val_size=3))
    assert len(data.test) == 30 and data.spec.head_size == 2
    fmt = SpanFormat(data.spec, doc_stride=8)
    examples = data.train
    feats = fmt.encode(tokenizer, examples, max_length=24)  # short windows: contexts overflow into several
    assert len(feats) > len(examples)
    for f in feats:
        e = examples[f["example"]]
        if f["start"] == 0:  # this window does not hold the whole answer
            continue
        n = len(f["offsets"])
        start, end = [-10.0] * n, [-10.0] * n
        start[f["start"]], end[f["end"]] = 10.0, 10.0
        _, s, t = fmt.best_span(start, end, f["offsets"])
        assert e.text_b[f["offsets"][s][0]: f["offsets"][t][1]] == e.answers[0]
    assert all(any(f["start"] > 0 for f in feats if f["example"] == i) for i in range(len(examples)))


def test_span_pipeline_tiny(tmp_path, data_dir, tiny_model_dir):
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.max_length=48", "task.name=squad",
                             f"task.data_dir={data_dir}", "task.val_size=3", "task.doc_stride=8", "train.epochs=1",
                             "train.batch_size=8", "recovery.r=4", f"output_dir={tmp_path / 'out'}",
                             "compress=[{method: int8}]"])
    records = run_experiment(cfg, log=lambda s: None)
    assert [r["paradigm"] for r in records] == ["base_pet", "clm_pet", "clm_cpet"]
    for r in records:
        assert set(r["test"]) == {"f1", "exact_match"} and 0 <= r["test"]["exact_match"] <= r["test"]["f1"] <= 1
    # the saved span task reloads onto the backbone and predicts the same answers
    from cpet.models import load_backbone

    backbone, tok = load_backbone(tiny_model_dir)
    model = load_task_modules(backbone, tmp_path / "out" / "base_pet" / "task")
    assert model.head_type == "span"
    data = load_task(cfg.task)
    preds = get_format(data.spec, model).predict(model, tok, data.test, 48)
    assert all(p == "" or normalize_answer(p) is not None and p in e.text_b for p, e in zip(preds, data.test))


# ---------------------------------------------------------------- text-to-text
@pytest.fixture(params=["llama", "t5"])
def lm_kind(request):
    return request.param


def _lm(kind):
    from conftest import LMS

    return LMS[kind]()


def test_text_rows_label_exactly_the_answer(lm_kind, data_dir, tokenizer):
    data = load_task(TaskConfig(name="sst2", data_dir=str(data_dir), val_size=4))
    model = build_task_model(_lm(lm_kind), 0, lora=LoraConfig())
    fmt = get_format(data.spec, model)
    assert isinstance(fmt, TextFormat) and fmt.seq2seq == (lm_kind == "t5")
    e = data.train[0]
    row = fmt.encode(tokenizer, [e], 64, train=True)[0]["rows"][0]
    answer = [t for t in row["labels"] if t != -100]
    assert tokenizer.decode(answer[:-1]).strip() == data.spec.words[e.label]
    assert answer[-1] == tokenizer.sep_token_id  # the end of the answer (this tokenizer has no eos)
    if lm_kind == "llama":  # prompt + answer in one sequence, loss only on the answer
        assert row["input_ids"][-len(answer):] == answer and len(row["labels"]) == len(row["input_ids"])
        assert "question : is this sentence positive or negative? answer : " in tokenizer.decode(row["input_ids"])  # uncased
    else:  # decoder teacher-forced: starts from pad, shifted by one
        assert row["decoder_input_ids"] == [0] + answer[:-1]
    eval_rows = fmt.encode(tokenizer, [e], 64, train=False)[0]["rows"]
    assert len(eval_rows) == 2  # one per verbalizer


def test_rank_classification_is_padding_invariant(lm_kind, data_dir, tokenizer):
    """Batched candidate scores (padded with other examples) equal each row scored alone."""
    data = load_task(TaskConfig(name="rte", data_dir=str(data_dir), val_size=4))
    model = build_task_model(_lm(lm_kind), 0, lora=LoraConfig()).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora.B"):
                p.normal_(0, 0.1)  # a trained-looking LoRA, so the scores depend on it
    fmt = get_format(data.spec, model)
    feats = fmt.encode(tokenizer, data.train[:5], 64, train=False)
    batch = fmt.collate(feats, list(range(5)), tokenizer.pad_token_id)
    together = fmt.sequence_logprobs(model, batch, "cpu")
    alone = torch.cat([fmt.sequence_logprobs(model, fmt.collate(feats, [i], 0), "cpu") for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    preds = fmt.predict(model, tokenizer, data.train[:5], 64)
    assert preds == together.view(5, 2).argmax(-1).tolist()


def test_text_training_learns_the_verbalizer(lm_kind, data_dir, tokenizer):
    """A few steps of LoRA on the text-to-text loss raise the right answer's likelihood."""
    from cpet.config import TrainConfig
    from cpet.train import train

    data = load_task(TaskConfig(name="sst2", data_dir=str(data_dir), val_size=8))
    model = build_task_model(_lm(lm_kind), 0, lora=LoraConfig(r=4, targets=("q", "v", "ffn_in", "ffn_out")))
    fmt = get_format(data.spec, model)
    feats = fmt.encode(tokenizer, data.train, 64, train=True)
    batch = fmt.collate(feats, list(range(16)), 0)
    before = fmt.sequence_logprobs(model, batch, "cpu").mean()
    res = train(model, tokenizer, data.spec, data.train, data.val, TrainConfig(epochs=3, batch_size=8, lr=1e-2),
                64, log=lambda s: None)
    assert set(res.best_val) == {"accuracy"}
    after = fmt.sequence_logprobs(model, batch, "cpu").mean()
    assert after > before + 0.5


def test_text_pipeline_all_paradigms(lm_kind, tmp_path, data_dir, tokenizer):
    """sst2 (verbalizers), copa (choices) and squad (generation) through base+PET, CLM+PET, CLM+CPET on a
    tiny LM, compressed (2:4 + int8, tied embeddings) and reloaded from disk."""
    from conftest import save_tiny

    path = save_tiny(_lm(lm_kind), tokenizer, tmp_path / "lm")
    for task in ("sst2", "copa", "squad"):
        out = tmp_path / task
        cfg = load_config(None, [f"model.name={path}", "model.max_length=96", f"task.name={task}",
                                 f"task.data_dir={data_dir}", "task.val_size=4", "task.max_test=6", "train.epochs=1",
                                 "train.batch_size=8", "recovery.r=4", f"output_dir={out}",
                                 "compress=[{method: unstructured, pattern: '2:4'}, {method: int8}]"])
        records = run_experiment(cfg, log=lambda s: None)
        assert [r["paradigm"] for r in records] == ["base_pet", "clm_pet", "clm_cpet"]
        assert all(r["formulation"] == "text" for r in records)
        key = "f1" if task == "squad" else "accuracy"
        assert all(0 <= r["test"][key] <= 1 for r in records)
        desc = json.loads((out / "clm_cpet" / "task" / "task_config.json").read_text())
        assert desc["head"] == "lm" and "recovery" in desc and "num_labels" not in desc


def test_generation_returns_first_line_strings(lm_kind, data_dir, tokenizer):
    data = load_task(TaskConfig(name="squad", data_dir=str(data_dir), val_size=3))
    model = build_task_model(_lm(lm_kind), 0, lora=LoraConfig())
    answers = get_format(data.spec, model).predict(model, tokenizer, data.test[:4], 96)
    assert len(answers) == 4 and all(isinstance(a, str) and "\n" not in a for a in answers)


def test_text_task_modules_refuse_a_headless_backbone(tmp_path, tokenizer):
    from conftest import tiny_llama, tiny_llama_lm

    from cpet.errors import CpetError

    save_task_modules(build_task_model(tiny_llama_lm(), 0, lora=LoraConfig()), tmp_path / "t")
    with pytest.raises(CpetError, match="formulation=text"):
        load_task_modules(tiny_llama(), tmp_path / "t")
    again = load_task_modules(tiny_llama_lm(), tmp_path / "t")
    assert again.head_type == "lm"


def test_encoder_has_no_text_formulation(tiny_model_dir):
    from cpet.errors import CpetError
    from cpet.models import load_backbone

    with pytest.raises(CpetError, match="formulation=head"):
        load_backbone(tiny_model_dir, lm=True)


def test_compressed_lm_round_trips_with_its_tied_head(lm_kind, tmp_path, tokenizer):
    """A causal LM / T5 with tied embeddings: compressed (2:4 + int8, embedding included), saved, and
    reloaded as the same class with bit-identical token logits."""
    from cpet.compress import compress, load_compressed, save_compressed

    lm = _lm(lm_kind)
    plan = [{"method": "unstructured", "pattern": "2:4"}, {"method": "int8"}]
    c = compress(lm, plan)
    save_compressed(c, tokenizer, tmp_path / "c", plan, "tiny")
    again, _, meta = load_compressed(tmp_path / "c")
    assert type(again) is type(lm) and meta["model_class"] == type(lm).__name__
    for m in (c, again):  # the tied LM head is int8 on the embedding's own rows: one copy, none in fp32
        head, emb = m.get_output_embeddings(), m.get_input_embeddings()
        assert head.weight_int8 is emb.weight_int8 and head.scale is emb.scale
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lm_head" in k or k == "shared.weight"]
    ids = tokenizer(["the cat sat on the mat"], return_tensors="pt")["input_ids"]
    kw = {"decoder_input_ids": ids[:, :3]} if lm_kind == "t5" else {}
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, **kw).logits, c(input_ids=ids, **kw).logits, rtol=0, atol=0)


def test_alpaca_prompt_and_instruction_tuning_with_mmlu(tmp_path, data_dir, tokenizer):
    """Alpaca rows use the Stanford template (with and without input); the experiment tunes a tiny causal
    LM through all paradigms, scores held-out answers by log-likelihood and runs k-shot MMLU per paradigm."""
    from conftest import save_tiny, tiny_llama_lm

    from cpet.tasks.alpaca import alpaca_prompt

    data = load_task(TaskConfig(name="alpaca", data_dir=str(data_dir), val_size=8))
    assert len(data.test) == 100 and len(data.train) == 12
    with_input = next(e for e in data.train if e.text_b)
    p = alpaca_prompt(with_input)
    assert p.startswith("Below is an instruction that describes a task, paired with an input")
    assert p.endswith(f"### Input:\n{with_input.text_b}\n\n### Response:\n")
    assert "### Input" not in alpaca_prompt(next(e for e in data.train if not e.text_b))

    path = save_tiny(tiny_llama_lm(), tokenizer, tmp_path / "lm")
    cfg = load_config(None, [f"model.name={path}", "model.max_length=128", "task.name=alpaca",
                             f"task.data_dir={data_dir}", "task.val_size=8", "task.max_test=10", "train.epochs=1",
                             "train.batch_size=4", "recovery.r=4", f"output_dir={tmp_path / 'out'}",
                             "mmlu.enabled=true", "mmlu.shots=2", "compress=[{method: int8}]", "mmlu.lm_eval=true"])
    records = run_experiment(cfg, log=lambda s: None)
    assert [r["paradigm"] for r in records] == ["base_pet", "clm_pet", "clm_cpet"]
    for r in records:
        assert r["test"]["answer_logprob"] < 0
        assert r["mmlu"]["n_questions"] == 8 and 0 <= r["mmlu"]["micro_avg"] <= 1
        # every paradigm, CLM+CPET's in-memory compressed model included, through the reference harness too
        ref = r["mmlu"]["lm_eval"]
        assert ref["n_questions"] == 8 and ref["same_answer"] == 1.0
        assert ref["micro_avg"] == pytest.approx(r["mmlu"]["micro_avg"])


def test_generate_task_needs_a_language_model(data_dir, tokenizer):
    from conftest import tiny_bert

    from cpet.errors import CpetError

    data = load_task(TaskConfig(name="alpaca", data_dir=str(data_dir), val_size=8))
    with pytest.raises(CpetError, match="language model"):
        get_format(data.spec, build_task_model(tiny_bert(), 1, lora=LoraConfig()))


ALL_TASKS = ["sst2", "mrpc", "qqp", "mnli", "qnli", "boolq", "cb", "copa", "rte", "wic", "squad", "alpaca"]


@pytest.mark.skipif(not Path("../shared/data").is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("task", ALL_TASKS)
def test_every_real_task_formats_for_heads_and_text(task, tokenizer):
    """Each task's real data becomes rows in both formulations: a head format on an encoder (except
    free-text Alpaca) and text-to-text on a decoder LM whose answer tokens are the gold target."""
    from conftest import tiny_bert, tiny_llama_lm

    data = load_task(TaskConfig(name=task, data_dir="../shared/data", val_size=20, max_test=20))
    spec, examples = data.spec, data.train[:6]
    lm = build_task_model(tiny_llama_lm(), 0)
    text = get_format(spec, lm)
    for e, f in zip(examples, text.encode(tokenizer, examples, 256, train=True)):
        (row,) = f["rows"]
        answer = [t for t in row["labels"] if t != -100][:-1]
        assert tokenizer.decode(answer) == tokenizer.decode(tokenizer(spec.target(e), add_special_tokens=False)["input_ids"])
        assert len(row["input_ids"]) <= 256
    if spec.format == "generate":
        return
    head = get_format(spec, build_task_model(tiny_bert(), spec.head_size, head="span" if spec.format == "span" else "classify"))
    feats = head.encode(tokenizer, examples, 128)
    assert len(feats) >= len(examples) and all(len(f["rows"]) == (2 if spec.format == "choice" else 1) for f in feats)
    if spec.format in ("classify", "choice"):
        assert [f["label"] for f in feats] == [e.label for e in examples]
        assert all(0 <= e.label < (len(e.choices) if e.choices else spec.num_labels) for e in data.test)


def test_long_answers_and_prompts_fit_the_window(lm_kind, tokenizer):
    """A prompt and an answer each longer than the window: the row fits, keeps the prompt's end and the
    answer's beginning."""
    from cpet.tasks import Example, TASKS
    from cpet.tasks import alpaca  # noqa: F401  (registers the task)

    model = build_task_model(_lm(lm_kind), 0)
    fmt = get_format(TASKS["alpaca"], model)
    e = Example("describe " * 100, None, 0, answers=("word " * 100,))
    (row,) = fmt.encode(tokenizer, [e], 64, train=True)[0]["rows"]
    answer = [t for t in row["labels"] if t != -100]
    assert len(row["input_ids"]) <= 64 and answer and tokenizer.decode(answer).startswith("word word")
    if lm_kind == "llama":
        assert len(row["input_ids"]) == 64 and tokenizer.decode(row["input_ids"][:len(row["input_ids"]) - len(answer)]).endswith("response :")


HEAD_TASKS = [t for t in ALL_TASKS if t != "alpaca"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("../shared/data").is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("kind,task", [("bert", t) for t in HEAD_TASKS] + [("llama", t) for t in ALL_TASKS])
def test_cpet_run_every_real_task_all_paradigms(kind, task, tmp_path, tokenizer):
    """``cpet run`` on the real data of every task, every paradigm, on a tiny encoder (heads) and a tiny
    decoder LM (text-to-text), with a plan that prunes and quantizes."""
    from conftest import save_tiny, tiny_bert, tiny_llama_lm

    from cpet.cli import main

    path = save_tiny(tiny_bert() if kind == "bert" else tiny_llama_lm(), tokenizer, tmp_path / kind)
    out = tmp_path / "run"
    rc = main(["run", "-", f"model.name={path}", "model.max_length=96", f"task.name={task}",
               "task.data_dir=../shared/data", "task.max_train=16", "task.val_size=8", "task.max_test=8",
               "train.epochs=1", "train.batch_size=8", "recovery.r=4", "compress=UP+Q", "-o", str(out)])
    assert rc == 0
    for paradigm in ("base_pet", "clm_pet", "clm_cpet"):
        rec = json.loads((out / paradigm / "result.json").read_text())
        assert rec["formulation"] == ("head" if kind == "bert" else "text")
        key = rec["test"][next(iter(rec["test"]))]
        assert key <= 0 if task == "alpaca" else 0 <= key <= 1


def test_folders_with_an_fp32_tied_head_still_load(tmp_path, tokenizer):
    """Compressed folders written before tied heads went int8 (int8 embedding, fp32 lm_head) reload as saved."""
    from conftest import tiny_llama_lm

    from cpet.compress import compress, load_compressed, save_compressed

    lm = compress(tiny_llama_lm(), [{"method": "int8"}])
    old_head = torch.nn.Linear(32, 30522, bias=False)
    with torch.no_grad():
        old_head.weight.copy_(lm.lm_head.dequantize())
    lm.lm_head = old_head
    save_compressed(lm, tokenizer, tmp_path / "c", [{"method": "int8"}], "tiny")
    again, _, _ = load_compressed(tmp_path / "c")
    assert type(again.lm_head) is torch.nn.Linear
    ids = torch.tensor([[101, 2023, 2003, 102]])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, lm(input_ids=ids).logits, rtol=0, atol=0)
