"""LoRA and recovery branches: no-op at init, only prefixed parameters train, any base layer type."""

import copy

import pytest
import torch

from cpet.compress import compress
from cpet.config import LoraConfig, RecoveryConfig
from cpet.layers import Adapted, freeze_backbone, kind_of
from cpet.models import TaskModel, target_modules
from cpet.task_modules import build_task_model

PLANS = {
    "fp32": [],
    "int8": [{"method": "int8"}],
    "pruned": [{"method": "unstructured", "sparsity": 0.5}],
    "pruned+int8": [{"method": "unstructured", "sparsity": 0.5}, {"method": "int8"}],
    "2:4": [{"method": "unstructured", "pattern": "2:4"}],
    "sp+int8": [{"method": "structured", "ffn": 0.5}, {"method": "int8"}],
    "csr": [{"method": "unstructured", "sparsity": 0.9, "kernel": "csr"}],
}


def _inputs(batch, model):
    return {k: v for k, v in batch.items()}


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_fresh_branches_are_noop(any_backbone, batch, plan):
    backbone = compress(any_backbone, PLANS[plan])
    torch.manual_seed(1)
    plain = TaskModel(copy.deepcopy(backbone), 2).eval()
    torch.manual_seed(1)
    adapted = build_task_model(backbone, 2, lora=LoraConfig(targets=("q", "k", "v", "o")),
                               recovery=RecoveryConfig()).eval()
    n_wrapped = sum(isinstance(m, Adapted) for m in adapted.modules())
    assert n_wrapped == len(target_modules(adapted, ("q", "k", "v", "o", "ffn_in", "ffn_out")))
    with torch.no_grad():
        a, b = plain(**batch), adapted(**batch)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=0)


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_training_step_changes_only_task_modules(any_backbone, batch, plan):
    backbone = compress(any_backbone, PLANS[plan])
    model = build_task_model(backbone, 2, lora=LoraConfig(), recovery=RecoveryConfig())
    names = freeze_backbone(model)
    assert names and all(kind_of(n) for n in names)
    from conftest import train_steps

    changed = train_steps(model, batch, torch.tensor([1, 0, 1]))
    assert changed, "nothing trained"
    assert all(kind_of(k) for k in changed), sorted(k for k in changed if not kind_of(k))
    for kind in ("lora", "recovery", "head"):
        assert any(kind_of(k) == kind for k in changed), f"{kind} did not train"


def test_int8_layers_pass_gradient_to_input(batch):
    from conftest import tiny_bert

    backbone = compress(tiny_bert(), [{"method": "int8"}])
    model = build_task_model(backbone, 2, lora=LoraConfig(targets=("q",)))
    freeze_backbone(model)
    model.train()
    model(**batch).logits.sum().backward()
    # the LoRA of layer 0 sits below 1 full int8 layer: its gradient must have come through int8 weights
    assert model.backbone.encoder.layer[0].attention.self.query.lora.B.grad.abs().sum() > 0


def test_unknown_roles_rejected():
    from cpet.errors import CpetError

    with pytest.raises(CpetError, match="unknown target roles"):
        LoraConfig(targets=("query",))
