"""Prefix tuning through the registry: per-layer key / value prefixes fed as a KV cache on every layer
type, masks right under padding, save / load exactly, inheritance sliced to the heads structured pruning
kept, the real PEFT package computing the same function both ways, a run through the paradigms, and
refusals (T5, bare backbones, reparameterized PEFT prefixes)."""

import copy
import json

import pytest
import torch

from cpet.config import load_config
from cpet.errors import CpetError
from cpet.inherit import inherit
from cpet.layers import freeze_backbone
from cpet.pet.prefix import PrefixConfig
from cpet.task_modules import build_task_model, load_task_modules, save_task_modules
from tests.conftest import tiny_bert, tiny_llama_lm, tiny_t5_lm, train_steps
from tests.test_pet_methods import PLANS, _compressed


@pytest.mark.parametrize("plan", list(PLANS))
def test_prefixes_on_each_layer_type(plan, batch, tmp_path):
    bb = _compressed(plan)
    model = build_task_model(copy.deepcopy(bb), 2, pet=PrefixConfig(tokens=3)).eval()
    with torch.no_grad():
        out = model(**batch)
        assert out.hidden.shape == (*batch["input_ids"].shape, bb.config.hidden_size)
        assert not torch.allclose(out.hidden, bb(**batch).last_hidden_state, atol=1e-4)  # the prefixes act
        # padding: the same sentence alone and padded by two more positions gives the same real-token states
        one = {k: v[1:2, :4] for k, v in batch.items()}
        padded = {k: torch.cat([v, v.new_zeros(1, 2)], 1) for k, v in one.items()}
        torch.testing.assert_close(model(**padded).hidden[:, :4], model(**one).hidden, rtol=1e-5, atol=1e-5)
    trainable = set(freeze_backbone(model))
    assert trainable - {"head.out.weight", "head.out.bias"} and all(
        n.startswith("head.") or n.endswith(".prefix_kv.p") for n in trainable)
    changed = train_steps(model.train(), batch, torch.tensor([1, 0, 1]))
    assert any(k.endswith("prefix_kv.p") for k in changed) and all(
        k.startswith("head.") or k.endswith("prefix_kv.p") for k in changed)
    folder = save_task_modules(model, tmp_path / "task")
    desc = json.loads((folder / "task_config.json").read_text())
    assert desc["prefix"]["tokens"] == 3 and len(desc["prefix"]["modules"]["prefix_kv"]) == 4  # 2 layers x k, v
    back = load_task_modules(copy.deepcopy(bb), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)


def test_inheritance_keeps_the_prefixes_of_the_heads_structured_pruning_kept(batch):
    teacher = build_task_model(tiny_bert(), 2, pet=PrefixConfig(tokens=3))
    with torch.no_grad():
        for n, p in teacher.named_parameters():
            if n.endswith("prefix_kv.p"):
                p.add_(torch.randn(p.shape))
    student = build_task_model(_compressed("SP+Q"), 2, pet=PrefixConfig(tokens=3))
    names = inherit(student, teacher)
    t = dict(teacher.named_parameters())
    sliced = 0
    for n in (n for n in names if n.endswith("prefix_kv.p")):
        got = dict(student.named_parameters())[n]
        kept = student.get_submodule(n.rsplit(".", 2)[0]).base.kept_out
        want = t[n] if kept is None else t[n][:, torch.as_tensor(kept)]
        sliced += got.shape != t[n].shape
        assert torch.equal(got, want)
    assert sliced == 4  # half the heads of every key / value projection are gone
    with torch.no_grad():
        assert student.eval()(**batch).hidden.shape[-1] == 32


def test_prefix_tuning_round_trips_through_the_real_peft_package(tmp_path, batch, tokenizer):
    peft = pytest.importorskip("peft")
    from cpet.cli import main
    from cpet.models import TaskModel
    from cpet.pet.peft_io import export_peft, import_peft
    from tests.conftest import save_tiny

    ours = build_task_model(tiny_bert(), 2, pet=PrefixConfig(tokens=3))
    export_peft(ours, tmp_path / "enc", pet_only=True)
    pm = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "enc").eval()
    with torch.no_grad():  # (PEFT ignores token type ids under prefix tuning: single sentences have none set)
        torch.testing.assert_close(pm(**batch).last_hidden_state, ours.eval()(**batch).hidden, rtol=1e-5, atol=1e-5)

    path = save_tiny(tiny_llama_lm(), tokenizer, tmp_path / "lm")  # grouped-query attention: 2 kv heads of 4
    lm_task = build_task_model(tiny_llama_lm(), 0, pet=PrefixConfig(tokens=2))
    folder = save_task_modules(lm_task, tmp_path / "task", extra={"task": "sst2", "backbone": {"path": path, "plan": []}})
    assert main(["export-peft", str(folder), "-o", str(tmp_path / "peft")]) == 0
    pm = peft.PeftModel.from_pretrained(tiny_llama_lm(), tmp_path / "peft").eval()
    ids = torch.tensor([[5, 17, 300, 42, 7], [0, 0, 9, 8, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        want = lm_task.eval()(ids, mask).logits
        torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask).logits, want, rtol=1e-5, atol=1e-5)
    assert main(["import-peft", str(tmp_path / "peft"), "--backbone", path, "-o", str(tmp_path / "back")]) == 0
    back = load_task_modules(tiny_llama_lm(), tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask).logits, want, rtol=0, atol=0)

    theirs = peft.get_peft_model(tiny_bert(), peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION",
                                                                      num_virtual_tokens=4))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "prompt" in n:
                p.normal_()
    theirs.eval().save_pretrained(tmp_path / "theirs")
    model = TaskModel(tiny_bert(), 2)
    assert len(import_peft(model, tmp_path / "theirs")) == 4
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).hidden, theirs(**batch).last_hidden_state, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    (tmp_path / "theirs" / "adapter_config.json").write_text(json.dumps({**cfg, "prefix_projection": True}))
    with pytest.raises(CpetError, match="prefix_projection"):
        import_peft(TaskModel(tiny_bert(), 2), tmp_path / "theirs")


def test_refusals():
    with pytest.raises(CpetError, match="encoder-decoder"):
        build_task_model(tiny_t5_lm(), 0, pet=PrefixConfig(tokens=2))
    from cpet.pet import get

    with pytest.raises(CpetError, match="not a bare backbone"):
        get("prefix").apply(tiny_bert(), PrefixConfig())
    with pytest.raises(CpetError, match="pet.tokens"):
        load_config(None, ["pet={method: prefix, tokens: 0}"])


def test_a_run_tunes_prefixes_through_every_paradigm(tmp_path, data_dir, tiny_model_dir):
    """pet: {method: prefix} under structured pruning + int8: base+PET, CLM+PET and CLM+CPET (inherited
    prefixes sliced to the kept heads + recovery + distillation) run and save prefixes."""
    from cpet.experiments import run_experiment

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2",
                             f"task.data_dir={data_dir}", "task.val_size=16", "task.max_test=8", "train.epochs=1",
                             "recovery.r=4", "compress=SP+Q", "paradigms=[base_pet, clm_pet, clm_cpet]",
                             "pet={method: prefix, tokens: 4}", f"output_dir={tmp_path / 'r'}"])
    res = {r["paradigm"]: r for r in run_experiment(cfg, log=lambda s: None)}
    widths = {}
    for p in ("base_pet", "clm_pet", "clm_cpet"):
        desc = json.loads((tmp_path / "r" / p / "task" / "task_config.json").read_text())
        assert desc["prefix"]["tokens"] == 4 and ("recovery" in desc) == (p == "clm_cpet")
        widths[p] = res[p]["trainable_params"]
    assert widths["clm_pet"] < widths["base_pet"]  # the kept heads' prefixes only
