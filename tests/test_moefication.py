"""MoEfication: all experts = dense FFN, balanced experts, top-k routing, int8 experts in either order,
bit-exact save/load, measured fallback, LoRA + recovery over the MoE block."""

import copy

import pytest
import torch

from cpet.compress import compress, load_compressed, save_compressed
from cpet.compress.calibration import Calibration
from cpet.compress.moefication import MoEFFN, balanced_kmeans
from cpet.config import LoraConfig, RecoveryConfig
from cpet.errors import CpetError
from cpet.task_modules import build_task_model

CALIB = Calibration(torch.randint(1000, 5000, (8, 32), generator=torch.Generator().manual_seed(0)), 4)


def M(**kw):
    return {"method": "moefication", "experts": 4, "top": 0.5, "min_speedup": 0, "router_steps": 30, **kw}


def _run(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


IDS = torch.randint(1000, 5000, (2, 9), generator=torch.Generator().manual_seed(1))


def test_all_experts_equals_dense(any_backbone):
    ref = _run(any_backbone, IDS)
    moe = compress(copy.deepcopy(any_backbone), [M(top=1.0)], calibration=CALIB)
    assert sum(isinstance(m, MoEFFN) for m in moe.modules()) == 2
    torch.testing.assert_close(_run(moe, IDS), ref, rtol=1e-5, atol=1e-5)


def test_topk_computes_only_selected_experts(any_backbone):
    moe = compress(copy.deepcopy(any_backbone), [M()], calibration=CALIB)
    layer = next(m for m in moe.modules() if isinstance(m, MoEFFN))
    x = torch.randn(5, layer.in_features)
    idx = layer.route(x)  # (5, 2)
    with torch.no_grad():
        y = layer(x)
        # reference: per token, the sum of its selected experts' terms
        ref = torch.stack([sum(layer._expert(x[t:t + 1], int(e), False)[0] for e in idx[t]) for t in range(5)])
        if layer.b_out is not None:
            ref = ref + layer.b_out
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert layer.moe_rel_error.item() > 0  # top-2 of 4 on random weights is lossy, and it is recorded


def test_balanced_kmeans_equal_sizes():
    x = torch.randn(64, 8)
    labels = balanced_kmeans(x, 4)
    assert torch.bincount(labels, minlength=4).tolist() == [16, 16, 16, 16]
    with pytest.raises(CpetError, match="divisible"):
        balanced_kmeans(torch.randn(10, 3), 4)


def test_int8_experts_same_in_either_order(any_backbone):
    qm = compress(copy.deepcopy(any_backbone), [{"method": "int8"}, M(top=1.0)], calibration=CALIB)
    mq = compress(copy.deepcopy(any_backbone), [M(top=1.0), {"method": "int8"}], calibration=CALIB)
    a = next(m for m in qm.modules() if isinstance(m, MoEFFN))
    b = next(m for m in mq.modules() if isinstance(m, MoEFFN))
    assert a.int8 and b.int8 and a.w_in.dtype == torch.int8
    assert torch.equal(a.w_in, b.w_in) and torch.equal(a.w_out, b.w_out)
    torch.testing.assert_close(a.s_out, b.s_out)


@pytest.mark.parametrize("plan", [[M()], [M(), {"method": "int8"}], [{"method": "unstructured", "pattern": "2:4"},
                                                                     {"method": "int8"}, M()],
                                  [{"method": "structured", "ffn": 0.5, "heads": 0.5}, {"method": "int8"}, M()]])
def test_moe_save_load_bit_exact(tmp_path, tokenizer, plan):
    from conftest import tiny_bert

    model = compress(tiny_bert(), plan, calibration=CALIB)
    save_compressed(model, tokenizer, tmp_path / "c", plan, source="tiny")
    loaded, _, _ = load_compressed(tmp_path / "c")
    assert torch.equal(_run(model, IDS), _run(loaded, IDS))


def test_fallback_keeps_dense_when_slower():
    from conftest import tiny_bert

    logs = []
    from cpet.compress import moefication

    model = moefication.apply(tiny_bert(), moefication.Config(experts=4, top=0.5, min_speedup=1000.0, router_steps=5),
                              CALIB, log=logs.append)
    assert not any(isinstance(m, MoEFFN) for m in model.modules())
    assert all("kept dense" in line for line in logs) and len(logs) == 2


def test_pet_and_recovery_wrap_moe(batch):
    from conftest import tiny_bert
    from cpet.layers import Adapted, freeze_backbone, kind_of

    backbone = compress(tiny_bert(), [M(), {"method": "int8"}], calibration=CALIB)
    plain = copy.deepcopy(backbone)
    model = build_task_model(backbone, 2, lora=LoraConfig(targets=("q", "v")), recovery=RecoveryConfig(r=4))
    wrapped = [m for m in model.modules() if isinstance(m, Adapted) and isinstance(m.base, MoEFFN)]
    assert len(wrapped) == 2
    with torch.no_grad():
        torch.testing.assert_close(model.eval().backbone(**batch).last_hidden_state,
                                   plain(**batch).last_hidden_state, rtol=0, atol=0)
    from conftest import train_steps

    freeze_backbone(model)
    changed = train_steps(model, batch, torch.tensor([1, 0, 1]))
    assert changed and all(kind_of(k) for k in changed)
    assert any(".intermediate.recovery." in k for k in changed)


def test_moe_errors():
    from conftest import tiny_bert

    with pytest.raises(CpetError, match="calibration"):
        compress(tiny_bert(), [M()])
    with pytest.raises(CpetError, match="before moefication"):
        compress(tiny_bert(), [M(), {"method": "structured"}], calibration=CALIB)
    with pytest.raises(CpetError, match="must lie in"):
        compress(tiny_bert(), [M(top=0)], calibration=CALIB)
