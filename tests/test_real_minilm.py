"""Checks on the real all-MiniLM-L6-v2 weights (slow-marked; they still run in CI, in seconds)."""

import copy

import pytest
import torch

from cpet.compress import compress
from cpet.config import LoraConfig, RecoveryConfig
from cpet.models import load_backbone
from cpet.task_modules import build_task_model

pytestmark = pytest.mark.slow

SENTENCES = ["a gripping, beautifully acted film", "the plot never comes together", "it rained all day in paris",
             "quantum computers use qubits instead of bits"]


@pytest.fixture(scope="module")
def minilm():
    return load_backbone("minilm")


def _hidden(model, enc):
    with torch.no_grad():
        return model(**enc).last_hidden_state


def _cos(a, b, mask):
    m = mask.bool()
    return torch.nn.functional.cosine_similarity(a[m], b[m], dim=-1).mean().item()


def test_int8_kernel_keeps_real_model_close(minilm):
    base, tok = minilm
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    ref = _hidden(base, enc)
    weight_only = compress(copy.deepcopy(base), [{"method": "int8", "kernel": "dequant"}])
    assert _cos(ref, _hidden(weight_only, enc), enc["attention_mask"]) > 0.998  # int8 weights alone: ~0.9995
    q = compress(copy.deepcopy(base), [{"method": "int8"}])
    # W8A8 with per-token activation scales measured 0.992 here (per-tensor scales, before: 0.966)
    cos_q = _cos(ref, _hidden(q, enc), enc["attention_mask"])
    assert cos_q > 0.985
    smoothed = compress(copy.deepcopy(base), [{"method": "int8", "smooth": 0.5}], tokenizer=tok)
    cos_smooth = _cos(ref, _hidden(smoothed, enc), enc["attention_mask"])
    # smoothing q/k/v/ffn_in still helps W8A8 (measured 0.9923 -> 0.9969 token cosine on these sentences)
    assert cos_smooth > cos_q + 0.002
    pruned = compress(copy.deepcopy(base), [{"method": "unstructured", "sparsity": 0.5}, {"method": "int8"}])
    cos_pruned = _cos(ref, _hidden(pruned, enc), enc["attention_mask"])
    assert 0.3 < cos_pruned < 0.99  # real damage, which is what recovery is for


def test_modules_noop_on_real_compressed_model(minilm):
    base, tok = minilm
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    c = compress(copy.deepcopy(base), [{"method": "unstructured", "sparsity": 0.5}, {"method": "int8"}])
    ref = _hidden(c, enc)
    model = build_task_model(c, 2, lora=LoraConfig(), recovery=RecoveryConfig()).eval()
    with torch.no_grad():
        assert torch.equal(model(**enc).hidden, ref)
