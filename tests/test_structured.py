"""Structured pruning: physically smaller layers equal the input-masked unpruned model; save/load;
PET inheritance sliced by the kept indices; LoRA + recovery on shrunk layers."""

import copy
from contextlib import contextmanager

import pytest
import torch

from cpet.compress import compress, load_compressed, save_compressed
from cpet.compress.calibration import Calibration
from cpet.config import LoraConfig, RecoveryConfig
from cpet.errors import CpetError
from cpet.inherit import inherit
from cpet.models import target_modules
from cpet.task_modules import build_task_model

SP = {"bert": {"ffn": 0.5, "heads": 0.5}, "llama": {"ffn": 0.5, "heads": 0.5}, "t5": {"ffn": 0.5, "heads": 0.0}}


def _calib(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randint(1000, 5000, (4, 16), generator=g), batch_size=2)


@contextmanager
def _masked(dense: torch.nn.Module, pruned: torch.nn.Module):
    """Within the block, the dense model's o / ffn_out see zeros on the input features the pruned model
    dropped (pre-hooks; removed on exit)."""
    handles = []
    for name in target_modules(dense, ("o", "ffn_out")):
        layer = pruned.get_submodule(name)
        kept = getattr(getattr(layer, "base", layer), "kept_in", None)
        if kept is not None:
            mask = torch.zeros(dense.get_submodule(name).in_features)
            mask[kept] = 1
            handles.append(dense.get_submodule(name).register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask,)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _inputs(batch, family):
    return batch if family == "bert" else {k: v for k, v in batch.items() if k != "token_type_ids"}


@pytest.mark.parametrize("score", ["magnitude", "activation"])
def test_structured_equals_masked_dense(any_backbone, batch, score):
    fam = any_backbone.config.model_type
    pruned = compress(copy.deepcopy(any_backbone), [{"method": "structured", "score": score, **SP[fam]}],
                      calibration=_calib())
    for name, role in target_modules(pruned, ("q", "ffn_in")).items():
        before = any_backbone.get_submodule(name).out_features
        after = pruned.get_submodule(name).out_features
        if role == "ffn_in" or SP[fam]["heads"]:
            assert after == before // 2, (name, before, after)
    with torch.no_grad(), _masked(any_backbone, pruned):
        ref = any_backbone(**_inputs(batch, fam)).last_hidden_state
        got = pruned(**_inputs(batch, fam)).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("order", [["structured", "int8"], ["int8", "structured"]])
def test_structured_save_load_bit_exact(tmp_path, batch, tokenizer, order):
    from conftest import tiny_bert

    plan = [{"method": m, **({"ffn": 0.5, "heads": 0.25} if m == "structured" else {})} for m in order]
    model = compress(tiny_bert(), plan)
    save_compressed(model, tokenizer, tmp_path / "c", plan, source="tiny")
    loaded, _, _ = load_compressed(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, loaded(**batch).last_hidden_state)
    q = loaded.encoder.layer[0].attention.self.query
    assert type(q).__name__ == "Int8Linear" and q.out_features == 24 and len(q.kept_out) == 24


def test_sliced_inheritance_equals_masked_teacher(any_backbone, batch):
    """The teacher's LoRA, sliced to the kept neurons/heads, gives the input-masked teacher's outputs."""
    from test_inherit_save import _randomize

    fam = any_backbone.config.model_type
    lora = LoraConfig(r=4, targets=("q", "k", "v", "o", "ffn_in", "ffn_out"))
    teacher = build_task_model(copy.deepcopy(any_backbone), 2, lora=lora)
    _randomize(teacher)
    pruned = compress(copy.deepcopy(any_backbone), [{"method": "structured", **SP[fam]}])
    student = build_task_model(pruned, 2, lora=lora, recovery=RecoveryConfig(r=4))
    inherit(student, teacher)
    teacher.eval(), student.eval()
    with torch.no_grad(), _masked(teacher, student):
        ref = teacher(**_inputs(batch, fam)).logits
        got = student(**_inputs(batch, fam)).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_structured_errors():
    from conftest import tiny_bert, tiny_t5

    with pytest.raises(CpetError, match="T5 shares"):
        compress(tiny_t5(), [{"method": "structured", "heads": 0.5}])
    with pytest.raises(CpetError, match="calibration"):
        compress(tiny_bert(), [{"method": "structured", "score": "activation"}])
    with pytest.raises(CpetError, match="before PET"):
        compress(build_task_model(tiny_bert(), 2, lora=LoraConfig()), [{"method": "structured"}])
    with pytest.raises(CpetError, match="must lie in"):
        compress(tiny_bert(), [{"method": "structured", "ffn": 1.0}])


def test_training_on_shrunk_layers_changes_only_task_modules(batch):
    from conftest import tiny_bert
    from cpet.layers import freeze_backbone, kind_of

    model = build_task_model(compress(tiny_bert(), [{"method": "structured", "ffn": 0.5, "heads": 0.5},
                                                    {"method": "int8"}]), 2,
                             lora=LoraConfig(targets=("q", "v", "ffn_in")), recovery=RecoveryConfig(r=4))
    from conftest import train_steps

    freeze_backbone(model)
    changed = train_steps(model, batch, torch.tensor([1, 0, 1]))
    assert changed and all(kind_of(k) for k in changed)
