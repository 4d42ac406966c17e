"""PET methods beyond LoRA through the registry (IA3, BitFit, serial adapters): on every layer type they
start as the identity, train only their own tensors, save / load exactly, inherit onto a compressed
(structurally pruned) student by the axes their modules declare, and run through the paradigms."""

import copy
import json

import pytest
import torch

from cpet.compress import compress
from cpet.config import LoraConfig, RecoveryConfig, load_config
from cpet.errors import CpetError
from cpet.inherit import inherit
from cpet.layers import Adapted, freeze_backbone
from cpet.pet import METHODS, get
from cpet.pet.adapter import AdapterConfig, ParallelAdapterConfig
from cpet.pet.bitfit import BitFitConfig
from cpet.pet.ia3 import IA3Config
from cpet.task_modules import build_task_model, load_task_modules, save_task_modules
from tests.conftest import tiny_bert, train_steps

PLANS = {"none": [],
         "Q": [{"method": "int8"}],
         "UP+Q": [{"method": "unstructured", "pattern": "2:4"}, {"method": "int8"}],
         "CSR": [{"method": "unstructured", "sparsity": 0.8, "kernel": "csr"}],  # CSRLinear layers
         "SP+Q": [{"method": "structured", "ffn": 0.5, "heads": 0.5}, {"method": "int8"}],
         "M+Q": [{"method": "moefication", "experts": 4, "top": 0.5, "min_speedup": 0, "router_steps": 20},
                 {"method": "int8"}]}
CONFIGS = {"ia3": IA3Config(), "bitfit": BitFitConfig(), "adapter": AdapterConfig(r=4),
           "parallel_adapter": ParallelAdapterConfig(r=4)}


def _calib():
    from cpet.compress.calibration import Calibration

    return Calibration(torch.randint(1000, 30000, (16, 16), generator=torch.Generator().manual_seed(0)))


def _compressed(plan: str):
    bb = tiny_bert()
    return compress(bb, PLANS[plan], calibration=_calib()) if PLANS[plan] else bb


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and any(f".{k}." in n for k in ("ia3", "ia3_in", "bitfit", "adapter", "padapter")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("method", list(CONFIGS))
def test_each_method_on_each_layer_type(method, plan, batch, tmp_path):
    cfg = CONFIGS[method]
    bb = _compressed(plan)
    if plan == "CSR":
        from cpet.compress.unstructured import CSRLinear

        assert any(isinstance(m, CSRLinear) for m in bb.modules())
    with torch.no_grad():
        ref = bb(**batch).last_hidden_state
    model = build_task_model(copy.deepcopy(bb), 2, pet=cfg)
    kinds = set(get(method).kinds)
    assert any(set(m._modules) & kinds for m in model.modules() if isinstance(m, Adapted))
    with torch.no_grad():  # a fresh module is the identity: the backbone's function, exactly
        assert torch.equal(model.eval().backbone(**batch).last_hidden_state, ref)
    freeze_backbone(model)
    changed = train_steps(model, batch, torch.tensor([1, 0, 1]))
    assert changed and all(k.startswith("head.") or set(k.split(".")) & kinds for k in changed), changed
    assert any(set(k.split(".")) & kinds for k in changed)
    folder = save_task_modules(model, tmp_path / "task")
    desc = json.loads((folder / "task_config.json").read_text())
    assert method in desc and "lora" not in desc
    back = load_task_modules(copy.deepcopy(bb), folder)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_inheritance_slices_by_the_declared_axes(method, batch):
    """Teacher on M; student on SP+Q: every inherited tensor is the teacher's restricted to the student's
    kept rows / columns (the same update on the surviving neurons); on UP+Q, a copy."""
    cfg = CONFIGS[method]
    teacher = build_task_model(tiny_bert(), 2, pet=cfg)
    _perturb(teacher)
    t_state = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    for plan in ("UP+Q", "SP+Q"):
        student = build_task_model(_compressed(plan), 2, pet=cfg)
        names = inherit(student, teacher)
        assert names and all(n in t_state for n in names)
        sliced = 0
        for n in names:
            got = dict(student.named_parameters())[n].detach()
            want = t_state[n]
            if got.shape != want.shape:
                branch = student.get_submodule(n.rsplit(".", 1)[0])
                side, dim = branch.AXES[n.rsplit(".", 1)[1]]
                base = student.get_submodule(n.rsplit(".", 2)[0]).base
                kept = base.kept_in if side == "in" else base.kept_out
                want = want.index_select(dim, torch.as_tensor(kept))
                sliced += 1
            assert torch.equal(got, want), (plan, n)
        # structured pruning shrinks q/k/v/ffn_in outputs and o/ffn_out inputs; adapters read and write the
        # o / ffn_out outputs (the hidden size), which it keeps
        assert (sliced > 0) == (plan == "SP+Q" and method not in ("adapter", "parallel_adapter")), (plan, sliced)


def test_a_run_tunes_the_chosen_method_through_every_paradigm(tmp_path, data_dir, tiny_model_dir):
    """pet: {method: ia3}: base+PET, CLM+PET and CLM+CPET tune IA3 (CPET: inherited IA3 + recovery +
    distillation); results and fingerprints record the method; a LoRA run of the same config differs."""
    from cpet.experiments import run_experiment

    base = [f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2", f"task.data_dir={data_dir}",
            "task.val_size=16", "task.max_test=8", "train.epochs=1", "recovery.r=4", "compress=UP+Q",
            "paradigms=[base_pet, clm_pet, clm_cpet]"]
    ia3 = {r["paradigm"]: r for r in run_experiment(
        load_config(None, [*base, "pet={method: ia3}", f"output_dir={tmp_path / 'ia3'}"]), log=lambda s: None)}
    lora = {r["paradigm"]: r for r in run_experiment(
        load_config(None, [*base, f"output_dir={tmp_path / 'lora'}"]), log=lambda s: None)}
    folders = {p: json.loads((tmp_path / "ia3" / p / "task" / "task_config.json").read_text()) for p in ia3}
    for p in ("base_pet", "clm_pet", "clm_cpet"):
        assert ia3[p]["config"]["pet"]["method"] == "ia3" and "lora" not in ia3[p]["config"]
        assert ia3[p]["fingerprint"] != lora[p]["fingerprint"]
        assert "ia3" in folders[p] and "lora" not in folders[p] and ("recovery" in folders[p]) == (p == "clm_cpet")
    assert ia3["clm_pet"]["trainable_params"] < lora["clm_pet"]["trainable_params"]  # IA3: a few vectors
    assert folders["clm_cpet"]["ia3"]["modules"] == folders["base_pet"]["ia3"]["modules"]


@pytest.mark.parametrize("method", ["bitfit", "adapter", "parallel_adapter"])
def test_cpet_inherits_recovers_and_distills_with_each_method(method, tmp_path, data_dir, tiny_model_dir):
    """CLM+CPET with a method other than LoRA: the method's modules inherited from base+PET's (the same layers),
    recovery modules beside them, and the distillation term in its loss (recorded in its config)."""
    from cpet.experiments import run_experiment

    res = {r["paradigm"]: r for r in run_experiment(load_config(None, [
        f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2", f"task.data_dir={data_dir}",
        "task.val_size=16", "task.max_test=8", "train.epochs=1", "recovery.r=4", "compress=UP+Q",
        "paradigms=[base_pet, clm_cpet]", f"pet={{method: {method}}}", f"output_dir={tmp_path}"]), log=lambda s: None)}
    folders = {p: json.loads((tmp_path / p / "task" / "task_config.json").read_text()) for p in res}
    cpet = folders["clm_cpet"]
    assert method in cpet and "recovery" in cpet and "lora" not in cpet
    assert cpet[method] == folders["base_pet"][method]  # inherited: the same modules and hyper-parameters
    assert res["clm_cpet"]["config"]["distill"]["alpha"] > 0 and res["clm_cpet"]["config"]["pet"]["method"] == method
    assert res["clm_cpet"]["trainable_params"] > res["base_pet"]["trainable_params"]  # + the recovery modules


def test_refusals(tmp_path, batch):
    with pytest.raises(CpetError, match="unknown PET method 'p_tuning'"):
        load_config(None, ["pet=p_tuning"])
    with pytest.raises(CpetError, match=r"unknown option\(s\) \['rank'\] for adapter"):
        load_config(None, ["pet={method: adapter, rank: 4}"])
    with pytest.raises(CpetError, match="LoRA's options go in the lora section"):
        load_config(None, ["pet={method: lora, r: 4}"])
    bb = _compressed("Q")
    # the bank serves LoRA + recovery only: another method is refused with what to do instead
    from cpet.bank import TaskBank

    folder = save_task_modules(build_task_model(copy.deepcopy(bb), 2, pet=BitFitConfig()), tmp_path / "bitfit")
    with pytest.raises(CpetError, match=r"tunes bitfit; the bank serves tasks of low-rank additive PET \(lora\)"):
        TaskBank(copy.deepcopy(bb)).load("b", folder)
    assert set(METHODS) >= {"lora", "ia3", "bitfit", "adapter"}
    with pytest.raises(CpetError, match="Table 4"):
        from cpet.experiments import paradigm_modules

        paradigm_modules(load_config(None, ["pet=ia3", "paradigms=[clm_lora_lora]"]), "clm_lora_lora", bb)
    assert LoraConfig().r == 8


def test_parallel_adapter_reads_the_ffn_input_and_adds_to_its_output(batch, tmp_path):
    """y = FFN(x) + s U act(D x): checked against the plain FFN, block by block, with hooks on the plain
    model; a saved and reloaded model pairs each tap with its own adapter again."""
    plain = tiny_bert()
    model = build_task_model(copy.deepcopy(plain), 2, pet=ParallelAdapterConfig(r=4, alpha=8))
    _perturb(model, seed=1)
    seen = {}
    hooks = [plain.get_submodule(f"encoder.layer.{i}.intermediate.dense").register_forward_hook(
        lambda m, a, o, i=i: seen.__setitem__(("x", i), a[0])) for i in range(2)]
    hooks += [plain.get_submodule(f"encoder.layer.{i}.output.dense").register_forward_hook(
        lambda m, a, o, i=i: seen.__setitem__(("y", i), o)) for i in range(2)]
    got = {}
    for i in range(2):
        layer = model.get_submodule(f"backbone.encoder.layer.{i}.output.dense")
        layer.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, o))
    with torch.no_grad():
        plain(**batch)
        model.eval()(**batch)
    layer0 = model.get_submodule("backbone.encoder.layer.0.output.dense").padapter
    import torch.nn.functional as F
    want = seen[("y", 0)] + F.gelu(seen[("x", 0)] @ layer0.D.T) @ layer0.U.T * (8 / 4)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)  # layer 0: same input as the plain model
    folder = save_task_modules(model, tmp_path / "t")
    back = load_task_modules(copy.deepcopy(plain), folder)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    pairs = json.loads((folder / "task_config.json").read_text())["parallel_adapter"]["pairs"]
    assert pairs == [[f"backbone.encoder.layer.{i}.intermediate.dense", f"backbone.encoder.layer.{i}.output.dense"]
                     for i in range(2)]


@pytest.mark.parametrize("method", [*CONFIGS, "lora"])
def test_ffn_pet_inherits_onto_moe_experts(method, batch, tmp_path):
    """PET on FFN layers sits on a MoE FFN's inner projections (its ports) in the dense FFN's neuron order:
    with every expert selected (fp32), the MoE student with the inherited PET computes exactly the dense
    teacher with its PET; with top-k routing it trains, and saves / loads exactly with recovery on the
    MoE as a whole (the ports then sit under its wrapper)."""
    cfg = CONFIGS.get(method) or LoraConfig(r=4, targets=("q", "v", "ffn_in", "ffn_out"))
    teacher = build_task_model(tiny_bert(), 2, pet=cfg)
    _perturb(teacher)
    with torch.no_grad():
        for n, p in teacher.named_parameters():
            if ".lora.B" in n:
                p.normal_(0, 0.3)
    full = compress(tiny_bert(), [{"method": "moefication", "experts": 4, "top": 1.0, "min_speedup": 0,
                                   "router_steps": 5}], calibration=_calib())
    student = build_task_model(full, 2, pet=cfg)
    names = inherit(student, teacher)
    assert any(".in_ports." in n or ".out_port." in n for n in names), names
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(**batch).logits, teacher.eval()(**batch).logits, rtol=1e-5, atol=1e-5)

    moe = _compressed("M+Q")
    student = build_task_model(copy.deepcopy(moe), 2, pet=cfg, recovery=RecoveryConfig(r=4))
    inherit(student, teacher)
    freeze_backbone(student)
    changed = train_steps(student, batch, torch.tensor([1, 0, 1]))
    assert any(".base.in_ports." in k or ".base.out_port." in k for k in changed), changed
    folder = save_task_modules(student, tmp_path / "task")
    back = load_task_modules(copy.deepcopy(moe), folder)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(**batch).logits, student.eval()(**batch).logits, rtol=0, atol=0)


def test_review_fixes_lora_init_order_overrides_and_fit_reference(batch):
    """(1) LoRA through the registry draws each layer's init as cpet always has (sorted layer names, so a
    12-layer model's layer.10 before layer.2), whatever order the model lists them; (2) `pet: ia3` given
    beside `pet.*` keys keeps both; (3) a fit against the plain backbone turns off every PET kind of the
    teacher (its BitFit deltas too), not only LoRA."""
    from transformers import BertConfig, BertModel

    from cpet.experiments import fit_recovery_from
    from cpet.models import target_modules
    from cpet.pet.lora import add_lora_to
    from cpet.recovery import fit_recovery

    deep = BertModel(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=11, num_attention_heads=2,
                                intermediate_size=32))
    torch.manual_seed(0)
    a = build_task_model(copy.deepcopy(deep), 2, pet=LoraConfig(targets=("q", "k", "v")))
    torch.manual_seed(0)
    b = build_task_model(copy.deepcopy(deep), 2)
    add_lora_to(b, target_modules(b, ("q", "k", "v")), LoraConfig(targets=("q", "k", "v")))
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert all(torch.equal(sa[k], sb[k]) for k in sa if ".lora." in k)

    assert load_config(None, ["pet.targets=[k]", "pet=ia3"]).pet_config == IA3Config(targets=("k",))
    assert load_config(None, ["pet=ia3", "pet.targets=[k]"]).pet_config == IA3Config(targets=("k",))

    teacher = build_task_model(tiny_bert(), 2, pet=BitFitConfig())
    _perturb(teacher)
    student = build_task_model(_compressed("Q"), 2, pet=BitFitConfig(), recovery=RecoveryConfig(r=4, init="fit"))
    twin = copy.deepcopy(student)
    fit_recovery_from(student, teacher, False, _calib(), lambda s: None, RecoveryConfig(r=4, init="fit"))
    fit_recovery(twin, build_task_model(tiny_bert(), 2, pet=BitFitConfig()), _calib(), log=lambda s: None)
    s1, s2 = dict(student.named_parameters()), dict(twin.named_parameters())
    assert all(torch.allclose(s1[k], s2[k], atol=1e-6) for k in s1 if ".recovery." in k)
    from cpet.experiments import _mmlu_record  # fingerprints made before mmlu.lm_eval existed still match

    assert "lm_eval" not in _mmlu_record(load_config(None, ["mmlu.enabled=true"]))
    assert _mmlu_record(load_config(None, ["mmlu.enabled=true", "mmlu.lm_eval=true"]))["lm_eval"] is True
