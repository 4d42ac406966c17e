"""A sequence's output does not depend on its batch-mates or on padding, and training computes the
function that serves (int8 W8A8 with per-token activation scales; MoE experts too)."""

import pytest
import torch

from conftest import tiny_bert, tiny_llama_lm
from cpet.compress import compress

SENTENCES = ["a great and moving film", "dull , lifeless", "ok",
             "it is fine i guess , not much more than that , really , and the ending drags on and on",
             "brilliant acting", "a waste of time", "superb", "charming and warm but a little long"]

PLANS = {"Q": [{"method": "int8"}],
         "UP+Q": [{"method": "unstructured", "pattern": "2:4"}, {"method": "int8"}],
         "M+Q": [{"method": "moefication", "experts": 4, "top": 0.5, "min_speedup": 0.0}, {"method": "int8"}]}


def _alone_vs_batch(model, tokenizer, lm: bool = False):
    """max |alone - in batch| over the real tokens of every sentence, and the largest hidden value."""
    kw = {"return_token_type_ids": False} if lm else {}
    batch = tokenizer(SENTENCES, padding="max_length", max_length=40, return_tensors="pt", **kw)
    with torch.no_grad():
        hb = model(**batch, output_hidden_states=True).hidden_states[-1] if lm else model(**batch).last_hidden_state
        worst = 0.0
        for i, s in enumerate(SENTENCES):
            one = tokenizer([s], return_tensors="pt", **kw)
            h1 = model(**one, output_hidden_states=True).hidden_states[-1] if lm else model(**one).last_hidden_state
            n = one["input_ids"].shape[1]
            worst = max(worst, (hb[i, :n] - h1[0]).abs().max().item())
    return worst, hb.abs().max().item()


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_encoder_output_independent_of_batch_and_padding(plan, tokenizer, data_dir):
    from cpet.compress.calibration import make_calibration

    calib = make_calibration(tokenizer, samples=8, seq_len=32, data_dir=str(data_dir))
    model = compress(tiny_bert(), PLANS[plan], calibration=calib)
    worst, scale = _alone_vs_batch(model, tokenizer)
    assert worst <= 1e-4 * max(1.0, scale), f"{plan}: alone vs padded batch differ by {worst}"


def test_decoder_lm_output_independent_of_batch_and_padding(tokenizer):
    model = compress(tiny_llama_lm(), PLANS["Q"])
    worst, scale = _alone_vs_batch(model, tokenizer, lm=True)
    assert worst <= 1e-4 * max(1.0, scale), f"alone vs padded batch differ by {worst}"


@pytest.mark.parametrize("plan", ["Q", "M+Q"])
def test_training_forward_equals_served_forward(plan, tokenizer, data_dir):
    """Grad on (the training path) vs grad off (the int8 kernels) on a whole model: equal up to fp32
    rounding, which can tip an activation that sits on a rounding tie to the next int8 level; the
    tolerance allows that (a per-tensor or float-activation training path misses it by far)."""
    from cpet.compress.calibration import make_calibration

    calib = make_calibration(tokenizer, samples=8, seq_len=32, data_dir=str(data_dir))
    model = compress(tiny_bert(), PLANS[plan], calibration=calib)
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        served = model(**enc).last_hidden_state
    trained = model(**enc).last_hidden_state
    real = enc["attention_mask"].bool()
    diff = (served[real] - trained[real]).abs().amax(-1)  # per real token
    off = (diff > 1e-4 * max(1.0, served.abs().max().item())).float().mean().item()
    assert off <= 0.05, f"{off:.0%} of tokens differ between the training and the served forward"
