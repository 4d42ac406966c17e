"""Tiny random backbones (BERT, LLaMA, T5 encoder) with the real MiniLM tokenizer, and a tiny data folder."""

from __future__ import annotations

import json
import random

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from cpet.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("minilm"))


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    return BertModel(cfg).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    return LlamaModel(cfg).eval()


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu")
    return T5EncoderModel(cfg).eval()


BACKBONES = {"bert": tiny_bert, "llama": tiny_llama, "t5": tiny_t5}


def tiny_llama_lm(seed: int = 0):
    """A tiny causal LM with tied input/output embeddings (as SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_t5_lm(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", pad_token_id=0, decoder_start_token_id=0, eos_token_id=102)
    return T5ForConditionalGeneration(cfg).eval()


LMS = {"llama": tiny_llama_lm, "t5": tiny_t5_lm}


def save_tiny(model, tokenizer, path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(params=sorted(BACKBONES))
def any_backbone(request):
    return BACKBONES[request.param]()


@pytest.fixture
def batch(tokenizer):
    enc = tokenizer(["a great and moving film", "dull , lifeless", "it is fine i guess , not much more"],
                    padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "token_type_ids": enc["token_type_ids"]}


POS = ["a great film", "wonderful and moving", "truly delightful", "brilliant acting", "i loved it",
       "a joy to watch", "superb", "charming and warm"]
NEG = ["a dull mess", "boring and long", "awful script", "i hated it", "lifeless", "a waste of time",
       "terrible", "painfully bad"]


@pytest.fixture
def data_dir(tmp_path):
    """A data folder laid out like ../shared/data with a small SST-2 and RTE (real-format files)."""
    rng = random.Random(0)
    d = tmp_path / "data"
    sst = d / "glue" / "SST-2"
    sst.mkdir(parents=True)
    for split, n in (("train", 64), ("dev", 16)):
        rows = [(rng.choice(POS), 1) if i % 2 else (rng.choice(NEG), 0) for i in range(n)]
        (sst / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s} \t{l}\n" for s, l in rows))
    rte = d / "superglue" / "RTE"
    rte.mkdir(parents=True)
    for split, n in (("train", 20), ("val", 6)):
        with open(rte / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"premise": f"the cat sat on mat {i}", "hypothesis": "a cat sat",
                                    "label": "entailment" if i % 2 else "not_entailment", "idx": i}) + "\n")
    copa = d / "superglue" / "COPA"
    copa.mkdir(parents=True)
    for split, n in (("train", 24), ("val", 8)):
        with open(copa / f"{split}.jsonl", "w") as f:
            for i in range(n):
                good, bad = rng.choice(POS), rng.choice(NEG)
                f.write(json.dumps({"premise": f"the audience cheered {i}", "question": "cause",
                                    "choice1": good if i % 2 == 0 else bad, "choice2": bad if i % 2 == 0 else good,
                                    "label": i % 2, "idx": i}) + "\n")
    squad = d / "squad"
    squad.mkdir(parents=True)
    (squad / "dev-v1.1.json").write_text(json.dumps({"version": "1.1", "data": _squad_articles(14)}))
    alpaca = d / "alpaca"
    alpaca.mkdir(parents=True)
    rows = [{"instruction": f"Say whether this review is positive: {rng.choice(POS + NEG)}", "input": "",
             "output": rng.choice(["Yes.", "No."])} if i % 2 else
            {"instruction": "Name the animal in the sentence.", "input": f"The {ANIMALS[i % 14]} ran away.",
             "output": f"The animal is a {ANIMALS[i % 14]}."} for i in range(120)]
    (alpaca / "alpaca_data_1k.json").write_text(json.dumps(rows))
    for split, n in (("dev", 5), ("val", 4)):
        (d / "mmlu" / split).mkdir(parents=True)
        for subject in ("astronomy", "virology"):
            lines = [f'"What is {i} plus {i} in {subject}?",{2 * i},{2 * i + 1},{i},{i + 3},A' for i in range(n)]
            (d / "mmlu" / split / f"{subject}_{split}.csv").write_text("\n".join(lines) + "\n")
    return d


ANIMALS = ["cat", "dog", "horse", "owl", "fox", "bear", "wolf", "hare", "seal", "crow", "frog", "mole", "swan",
           "lynx"]
PLACES = ["the old barn", "a quiet forest", "the river bank", "a tall oak tree", "the mountain cave"]
FOODS = ["fresh fish", "small seeds", "green grass", "wild berries", "tiny insects"]


def _squad_articles(n: int) -> list[dict]:
    """SQuAD-v1.1-format articles: one paragraph each, three questions with character-offset answers."""
    articles = []
    for i in range(n):
        animal, place, food = ANIMALS[i % len(ANIMALS)], PLACES[i % len(PLACES)], FOODS[(i * 2) % len(FOODS)]
        ctx = f"The {animal} lives in {place}. Every morning it eats {food}. It was first seen in {1900 + i}."
        qas = [(f"Where does the {animal} live?", place), (f"What does the {animal} eat?", food),
               (f"When was the {animal} first seen?", str(1900 + i))]
        articles.append({"title": f"A{i}", "paragraphs": [{"context": ctx, "qas": [
            {"id": f"{i}-{j}", "question": q, "answers": [{"answer_start": ctx.index(a), "text": a}] * 2}
            for j, (q, a) in enumerate(qas)]}]})
    return articles


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    """A tiny BERT saved as an HF folder (with tokenizer), loadable by name like any hub model."""
    path = tmp_path / "tiny-bert"
    tiny_bert().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def train_steps(model, batch, labels, steps: int = 2, lr: float = 1e-2) -> set[str]:
    """A few AdamW steps on the trainable parameters; returns the names of the state entries that changed.
    Two steps by default: after the first, B and U are non-zero, so A and D get gradients too."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(**batch).logits, labels).backward()
        opt.step()
        opt.zero_grad()
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


def train_on_shared_backbone(tmp_path, data_dir, model_dir, out, epochs: int = 1):
    """A tiny BERT compressed once (UP+Q, cpet compress), then base+PET, CLM+PET and CLM+CPET on SST-2
    trained on that folder (model.compressed); returns (compressed folder, run folder, records)."""
    from cpet.cli import main
    from cpet.config import load_config
    from cpet.experiments import run_experiment

    cdir = tmp_path / "c"
    assert main(["compress", model_dir, "--plan", "UP+Q", "-o", str(cdir), "--data-dir", str(data_dir)]) == 0
    args = [f"model.name={model_dir}", "model.max_length=32", "task.name=sst2", f"task.data_dir={data_dir}",
            "task.val_size=16", f"train.epochs={epochs}", "train.lr=0.01", "recovery.r=4",
            f"model.compressed={cdir}", "paradigms=[base_pet, clm_pet, clm_cpet]", f"output_dir={out}"]
    records = {r["paradigm"]: r for r in run_experiment(load_config(None, args), log=lambda s: None)}
    return cdir, out, records

