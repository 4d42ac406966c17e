"""5-shot MMLU: prompt text, category map, truncation, letter scoring, batching, report and CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cpet.errors import CpetError
from cpet.evals import mmlu

DATA = Path(os.environ.get("CPET_DATA", "../shared/data"))
needs_data = pytest.mark.skipif(not (DATA / "mmlu" / "dev").is_dir(), reason="needs ../shared/data/mmlu")
SUBJECTS = ["abstract_algebra", "anatomy"]


def tiny_causal_lm(seed: int = 0):
    """A random 2-layer LlamaForCausalLM over the MiniLM vocabulary, long enough for 5-shot prompts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


class NoLogitsToKeep(nn.Module):
    """The same LM behind a plain forward(input_ids, attention_mask): the evaluator's full-logits path."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.config = lm.config

    def forward(self, input_ids, attention_mask):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask)


class GoldLetterOracle(nn.Module):
    """Test double for the scorer only: knows each prompt's gold letter and puts it on top of the logits at
    the row's last real token; every other position (padding included) favours a wrong letter."""

    def __init__(self, gold: dict[tuple[int, ...], int], wrong: int, vocab: int):
        super().__init__()
        self.gold, self.wrong, self.vocab = gold, wrong, vocab
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the evaluator a device to read
        self.config = type("Config", (), {"model_type": "llama"})()  # a decoder-only LM, as MMLU requires

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.wrong] = 5.0
        for i, n in enumerate(attention_mask.sum(1).tolist()):
            logits[i, n - 1, self.gold[tuple(input_ids[i, :n].tolist())]] = 10.0
        return type("Out", (), {"logits": logits})()


def _exemplars(subject: str) -> list[mmlu.Question]:
    return mmlu.read_csv(DATA / "mmlu" / "dev" / f"{subject}_dev.csv")


@needs_data
def test_prompt_text_matches_the_mmlu_template():
    dev = _exemplars("abstract_algebra")
    assert mmlu.format_prompt("abstract_algebra", dev, dev[4], k=1) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer:")
    five = mmlu.format_prompt("abstract_algebra", dev, dev[0], k=5)
    assert five.count("\nAnswer: ") == 5 and five.endswith("D. 3\nAnswer:")


@needs_data
def test_category_map_covers_every_subject_in_the_data():
    for split in ("dev", "val"):
        assert set(mmlu.subjects_of(DATA / "mmlu", split)) == set(mmlu.SUBJECT_CATEGORY)
    assert len(mmlu.SUBJECT_CATEGORY) == 57
    counts = {c: list(mmlu.SUBJECT_CATEGORY.values()).count(c) for c in mmlu.CATEGORIES}
    assert counts == {"STEM": 19, "humanities": 13, "social sciences": 12, "other": 13}


@needs_data
def test_long_prompts_drop_exemplars_from_the_end(tokenizer):
    dev = _exemplars("high_school_european_history")
    q = mmlu.read_csv(DATA / "mmlu" / "val" / "high_school_european_history_val.csv")[0]
    two = mmlu.encode(tokenizer, mmlu.format_prompt("high_school_european_history", dev, q, 2))
    ids, k = mmlu.fit_prompt(tokenizer, "high_school_european_history", dev, q, 5, max_length=len(two))
    assert (ids, k) == (two, 2)  # the first two exemplars kept, as the original evaluate.py does
    ids, k = mmlu.fit_prompt(tokenizer, "high_school_european_history", dev, q, 5, max_length=40)
    assert k == -1 and len(ids) == 40
    assert tokenizer.decode(ids[-2:]) == "answer :"  # still ends where the letter comes next


def test_answer_tokens_are_the_letters(tokenizer):
    # WordPiece drops the space: " A" -> "a"; BPE tokenizers give the single token "ĠA"
    assert mmlu.answer_token_ids(tokenizer) == tokenizer.convert_tokens_to_ids(["a", "b", "c", "d"])


@needs_data
def test_tiny_llama_end_to_end_and_batching_is_exact(tokenizer):
    lm = tiny_causal_lm()
    run = dict(data_dir=str(DATA), subjects=SUBJECTS, limit=3, log=lambda s: None)
    result = mmlu.evaluate_mmlu(lm, tokenizer, batch_size=4, **run)
    assert result["n_questions"] == 6 and set(result["subjects"]) == set(SUBJECTS)
    for s in result["subjects"].values():
        assert s["n"] == 3 and 0 <= s["acc"] <= 1 and len(s["predictions"]) == 3 and s["min_shots"] == 5
    assert set(result["categories"]) == {"STEM"} and result["categories"]["STEM"]["n"] == 6
    assert 0 <= result["micro_avg"] <= 1 and result["fewer_shots"] == 0
    one = mmlu.evaluate_mmlu(lm, tokenizer, batch_size=1, **run)
    full = mmlu.evaluate_mmlu(NoLogitsToKeep(lm), tokenizer, batch_size=3, **run)
    preds = {s: v["predictions"] for s, v in result["subjects"].items()}
    assert preds == {s: v["predictions"] for s, v in one["subjects"].items()}
    assert preds == {s: v["predictions"] for s, v in full["subjects"].items()}


@needs_data
def test_a_model_that_knows_the_answers_scores_one(tokenizer):
    letters = dict(zip(mmlu.CHOICES, mmlu.answer_token_ids(tokenizer)))
    gold = {}
    for subject in SUBJECTS:
        dev = _exemplars(subject)
        for q in mmlu.read_csv(DATA / "mmlu" / "val" / f"{subject}_val.csv")[:5]:
            ids, _ = mmlu.fit_prompt(tokenizer, subject, dev, q, 5, 2048)
            gold[tuple(ids)] = letters[q.answer]
    oracle = GoldLetterOracle(gold, wrong=letters["A"], vocab=tokenizer.vocab_size)
    result = mmlu.evaluate_mmlu(oracle, tokenizer, data_dir=str(DATA), subjects=SUBJECTS, limit=5, batch_size=4,
                                max_length=2048, log=lambda s: None)
    assert result["micro_avg"] == result["macro_avg"] == 1.0 and result["n_questions"] == 10


@needs_data
def test_bad_subject_and_missing_test_split_are_clear(tokenizer, tmp_path):
    with pytest.raises(CpetError, match="unknown MMLU subjects"):
        mmlu.evaluate_mmlu(tiny_causal_lm(), tokenizer, data_dir=str(DATA), subjects=["astrology"])
    (tmp_path / "mmlu" / "dev").mkdir(parents=True)
    with pytest.raises(CpetError, match="no MMLU test split"):
        mmlu.evaluate_mmlu(tiny_causal_lm(), tokenizer, data_dir=str(tmp_path), split="test")


def test_lm_eval_handoff_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(CpetError, match="pip install 'cpet\\[lm-eval\\]'"):
        mmlu.run_lm_eval("some/model")


@needs_data
def test_lm_eval_scores_the_in_memory_compressed_model_with_its_task_modules_as_cpet_does(tokenizer):
    """The reference harness on a CLM+CPET-shaped model held in memory (int8 backbone + LoRA + recovery,
    none of it savable as a plain HF folder): the same letter for every question as cpet's own MMLU."""
    pytest.importorskip("lm_eval")
    from cpet.compress import compress
    from cpet.config import LoraConfig, RecoveryConfig
    from cpet.recovery import branches_off
    from cpet.task_modules import build_task_model

    lm = tiny_causal_lm(1)
    compress(lm, [{"method": "int8"}])
    model = build_task_model(lm, 0, lora=LoraConfig(r=4), recovery=RecoveryConfig(r=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora.B", "recovery.U")):
                p.normal_(0, 0.5)  # modules that change the answers
    ours = mmlu.evaluate_mmlu(model, tokenizer, data_dir=str(DATA), subjects=SUBJECTS, limit=4, log=lambda s: None)
    ref = mmlu.run_lm_eval(model, tokenizer, data_dir=str(DATA), subjects=SUBJECTS, limit=4, batch_size=4)
    assert ref["n_questions"] == ours["n_questions"] == 8
    assert {s: v["predictions"] for s, v in ref["subjects"].items()} == \
        {s: v["predictions"] for s, v in ours["subjects"].items()}
    assert ref["micro_avg"] == pytest.approx(ours["micro_avg"])
    assert len(set("".join(v["predictions"] for v in ours["subjects"].values()))) > 1  # not one letter throughout
    with branches_off(model, "lora"), branches_off(model, "recovery"):  # the modules change what is scored
        bare = mmlu.evaluate_mmlu(model, tokenizer, data_dir=str(DATA), subjects=SUBJECTS, limit=4, log=lambda s: None)
    assert {s: v["predictions"] for s, v in bare["subjects"].items()} != \
        {s: v["predictions"] for s, v in ours["subjects"].items()}


@needs_data
def test_cli_writes_report(tmp_path, tokenizer, capsys):
    from cpet.cli import main

    model_dir = tmp_path / "tiny-llama"
    tiny_causal_lm().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    assert main(["mmlu", str(model_dir), "--subjects", "abstract_algebra", "--limit", "2", "--data-dir", str(DATA),
                 "-o", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["n_questions"] == 2 and result["model"] == str(model_dir)
    md = (out / "results.md").read_text()
    assert "| **average** (over questions) |" in md and "| abstract_algebra | STEM |" in md
    assert "MMLU 5-shot val" in capsys.readouterr().out


@needs_data
def test_shared_prefix_cache_gives_the_same_logits(tokenizer):
    """Header + exemplars run once into a KV cache: each question's next-token logits equal the full prompt's,
    also through an LMTaskModel carrying LoRA (the cache runs on its backbone, branches included)."""
    from cpet.config import LoraConfig
    from cpet.task_modules import build_task_model

    model = build_task_model(tiny_causal_lm(), 0, lora=LoraConfig())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora.B"):
                p.normal_(0, 0.2)
    dev = _exemplars("anatomy")
    qs = mmlu.read_csv(DATA / "mmlu" / "val" / "anatomy_val.csv")[:4]
    rows = [mmlu.fit_prompt(tokenizer, "anatomy", dev, q, 5, 2048)[0] for q in qs]
    p = mmlu.common_prefix(rows)
    assert p > 0.6 * min(len(r) for r in rows)  # the exemplars dominate the prompt
    lm = mmlu._causal_lm(model)
    assert lm is model.backbone
    cache = mmlu.prefix_cache(lm, rows[0][:p])
    cached = mmlu.next_token_logits_after(lm, cache, p, [r[p:] for r in rows], 0)
    full = mmlu.next_token_logits(model, rows, 0)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    run = dict(data_dir=str(DATA), subjects=["anatomy"], limit=6, log=lambda s: None)
    a = mmlu.evaluate_mmlu(model, tokenizer, reuse_prefix=True, **run)
    b = mmlu.evaluate_mmlu(model, tokenizer, reuse_prefix=False, **run)
    assert a["subjects"]["anatomy"]["predictions"] == b["subjects"]["anatomy"]["predictions"]


@needs_data
def test_compress_keeps_a_decoders_lm_head_and_mmlu_refuses_a_headless_folder(tmp_path, tokenizer, capsys):
    """cpet compress keeps the LM head where tasks go text-to-text (decoders under auto), as cpet run does;
    cpet mmlu on a folder compressed without it stops with the fix instead of a traceback."""
    from conftest import save_tiny
    from cpet.cli import main
    from cpet.compress import load_compressed
    from cpet.task_modules import is_language_model
    from transformers import LlamaForCausalLM

    path = save_tiny(LlamaForCausalLM(tiny_causal_lm().config), tokenizer, tmp_path / "lm")
    assert main(["compress", path, "--plan", "Q", "-o", str(tmp_path / "c")]) == 0
    assert is_language_model(load_compressed(tmp_path / "c")[0])
    assert main(["mmlu", str(tmp_path / "c"), "--data-dir", str(DATA), "--subjects", "anatomy", "--limit", "2"]) == 0
    assert main(["compress", path, "--plan", "Q", "-o", str(tmp_path / "h"), "--formulation", "head"]) == 0
    assert not is_language_model(load_compressed(tmp_path / "h")[0])
    capsys.readouterr()
    assert main(["mmlu", str(tmp_path / "h"), "--data-dir", str(DATA), "--subjects", "anatomy"]) == 2
    assert "--formulation text" in capsys.readouterr().err
