"""Recovery modules that start by undoing compression (recovery.init=fit, EoRA's fit generalised)."""

import copy
import json
import re

import pytest
import torch

from cpet.compress import compress
from cpet.compress.calibration import Calibration
from cpet.config import LoraConfig, RecoveryConfig, load_config
from cpet.errors import CpetError
from cpet.inherit import inherit
from cpet.layers import Adapted, kind_of
from cpet.recovery import branches_off, fit_recovery
from cpet.task_modules import build_task_model
from tests.conftest import tiny_bert, tiny_llama_lm, tiny_t5_lm


def _calib(n: int = 24, seq: int = 16, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randint(1000, 30000, (n, seq), generator=g), batch_size=8)


def _hidden(model, ids):
    model.eval()
    with torch.no_grad():
        return model.backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _perturb_low_rank(model, rank: int, scale: float = 0.3, seed: int = 1) -> None:
    """Subtract a random rank-``rank`` matrix from every target linear's weight (a 'compression' whose
    error a rank-``rank`` map can undo exactly)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ("attention" in name or "intermediate" in name or "output" in name):
                out_f, in_f = m.weight.shape
                e = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g) / in_f ** 0.5
                m.weight -= scale * e


@pytest.mark.parametrize("activation,r", [("identity", 2), ("gelu", 4), ("relu", 4), ("silu", 4)])
def test_fit_undoes_a_low_rank_error_exactly(activation, r):
    """Each layer's error is rank 2: the fitted modules (rank 2, or 2 +/- pairs for a nonlinear one) put
    the whole network back on the reference, on tokens the fit never saw."""
    reference = build_task_model(tiny_bert(), 2)
    student_bb = tiny_bert()
    _perturb_low_rank(student_bb, rank=2)
    student = build_task_model(student_bb, 2, recovery=RecoveryConfig(r=r, activation=activation))
    held = _calib(4, 16, seed=7).input_ids
    before = _rel(_hidden(student, held), _hidden(reference, held))
    removed = fit_recovery(student, reference, _calib(), damp=1e-7, log=lambda s: None)  # exact: no damping
    after = _rel(_hidden(student, held), _hidden(reference, held))
    assert before > 0.05
    assert after < 1e-3 * before, (before, after)
    assert min(removed.values()) > 0.999


@pytest.mark.parametrize("pet", ["ia3", "adapter", "parallel_adapter", "bitfit", "lora"])
def test_fit_is_exact_beside_every_pet_method(pet):
    """The fit acts where the recovery module does: after a layer's input transforms (IA3 scaling an FFN's
    inner activations) and before its output ones (a serial adapter). With the teacher's PET inherited
    (non-trivial values), a rank-2 error per layer is still undone exactly on tokens the fit never saw."""
    from cpet.pet import get

    cfg = get(pet).Config() if pet != "lora" else None
    kw = {"pet": cfg} if cfg is not None else {"lora": LoraConfig(r=2)}
    reference = build_task_model(tiny_bert(), 2, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if kind_of(n) not in (None, "head"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))  # the teacher's PET, off its no-op start
    student_bb = tiny_bert()
    _perturb_low_rank(student_bb, rank=2)
    student = build_task_model(student_bb, 2, recovery=RecoveryConfig(r=2, activation="identity"), **kw)
    assert inherit(student, reference)
    held = _calib(4, 16, seed=7).input_ids
    before = _rel(_hidden(student, held), _hidden(reference, held))
    fit_recovery(student, reference, _calib(), damp=1e-7, log=lambda s: None)
    after = _rel(_hidden(student, held), _hidden(reference, held))
    assert before > 0.05
    assert after < 1e-3 * before, (pet, before, after)


def test_nonlinear_start_is_the_linear_fit_and_still_trains():
    """GELU modules of rank 2k start as exactly the rank-k linear fit, and both halves get gradients."""
    reference = build_task_model(tiny_bert(), 2)
    bb = tiny_bert()
    compress(bb, [{"method": "unstructured", "pattern": "2:4"}, {"method": "int8"}])
    lin = build_task_model(copy.deepcopy(bb), 2, recovery=RecoveryConfig(r=3, activation="identity"))
    gelu = build_task_model(copy.deepcopy(bb), 2, recovery=RecoveryConfig(r=7, activation="gelu"))  # odd: 1 spare
    for m in (lin, gelu):
        fit_recovery(m, reference, _calib(), log=lambda s: None)
    held = _calib(4, 16, seed=3).input_ids
    assert torch.allclose(_hidden(lin, held), _hidden(gelu, held), atol=1e-4)
    rec = next(m for m in gelu.modules() if isinstance(m, Adapted)).recovery
    assert torch.equal(rec.U[:, 6], torch.zeros_like(rec.U[:, 6]))  # the spare unit stays a no-op
    gelu.train()
    gelu(input_ids=held, attention_mask=torch.ones_like(held)).logits.sum().backward()
    assert rec.D.grad[:6].abs().sum() > 0 and rec.U.grad[:, :6].abs().sum() > 0


@pytest.mark.parametrize("plan", [[{"method": "int8"}],
                                  [{"method": "unstructured", "pattern": "2:4"}, {"method": "int8"}],
                                  [{"method": "moefication", "experts": 4, "top": 0.5, "min_speedup": 0,
                                    "router_steps": 20}, {"method": "int8"}],
                                  [{"method": "structured", "ffn": 0.5, "heads": 0.5}, {"method": "int8"}]],
                         ids=["Q", "UP+Q", "M+Q", "SP+Q"])
def test_fit_on_real_compression_reduces_the_error_it_can_see(plan, tokenizer):
    """On every compression method (MoE: one module over the whole FFN; structured: the kept rows and
    columns) the fit removes part of each layer's error on calibration text and none of it grows the
    network's error on held-out text; the modes the models were in are kept."""
    teacher = build_task_model(tiny_bert(), 2, lora=LoraConfig(r=2))
    with torch.no_grad():
        for n, p in teacher.named_parameters():
            if n.endswith("lora.B"):
                p.normal_(0, 0.05)  # an inherited, trained-looking LoRA
    bb = tiny_bert()
    calib = _calib(32, 16)
    compress(bb, plan, calibration=calib)
    student = build_task_model(bb, 2, lora=LoraConfig(r=2), recovery=RecoveryConfig(r=8))
    inherit(student, teacher, kinds=("lora",))
    held = _calib(6, 16, seed=9).input_ids
    before = _rel(_hidden(student, held), _hidden(teacher, held))
    student.train()
    teacher.eval()
    removed = fit_recovery(student, teacher, calib, log=lambda s: None)
    assert student.training and not teacher.training
    assert all(-1e-6 <= v <= 1 for v in removed.values())
    assert max(removed.values()) > 0.01
    after = _rel(_hidden(student, held), _hidden(teacher, held))
    assert after <= before * 1.01, (before, after)


@pytest.mark.parametrize("make", [tiny_llama_lm, tiny_t5_lm], ids=["llama", "t5"])
def test_fit_on_language_models(make):
    from cpet.models import LMTaskModel

    reference = LMTaskModel(make())
    bb = make()
    compress(bb, [{"method": "unstructured", "pattern": "2:4"}, {"method": "int8"}])
    student = build_task_model(bb, 0, recovery=RecoveryConfig(r=4))
    removed = fit_recovery(student, reference, _calib(8, 12), log=lambda s: None)
    assert len(removed) == sum(isinstance(m, Adapted) for m in student.modules())
    assert sum(removed.values()) / len(removed) > 0.05


def test_branches_off_is_temporary():
    m = build_task_model(tiny_bert(), 2, lora=LoraConfig(r=2))
    n = sum(isinstance(x, Adapted) and x._modules.get("lora") is not None for x in m.modules())
    with branches_off(m, "lora"):
        assert not any(isinstance(x, Adapted) and x._modules.get("lora") is not None for x in m.modules())
    assert sum(isinstance(x, Adapted) and x._modules.get("lora") is not None for x in m.modules()) == n


def test_config_rules():
    with pytest.raises(CpetError, match="recovery.init"):
        load_config(None, ["recovery.init=eora"])
    with pytest.raises(CpetError, match="recovery.r"):
        load_config(None, ["recovery.init=fit", "recovery.r=1"])
    load_config(None, ["recovery.init=fit", "recovery.r=1", "recovery.activation=identity"])
    with pytest.raises(CpetError, match="clm_cpet_zero"):
        load_config(None, ["paradigms=[base_pet, clm_cpet_zero]"])
    assert load_config(None, ["recovery.lr=1e-2"]).recovery.lr == 0.01
    with pytest.raises(CpetError, match="no-op"):
        load_config(None, ["recovery.lr=0"])  # kept at U = 0: nothing
    with pytest.raises(CpetError, match="recovery.lr"):
        load_config(None, ["recovery.lr=-1e-3"])
    assert load_config(None, ["recovery.init=fit", "recovery.lr=0"]).recovery.lr == 0
    paper = load_config(None, ["recovery=paper", "recovery.r=16"]).recovery
    assert (paper.init, paper.lr, paper.r) == ("zero", None, 16)
    fitted = load_config(None, ["recovery.r=8", "recovery=fitted"]).recovery
    assert (fitted.init, fitted.lr, fitted.r) == ("fit", 0, 8)
    with pytest.raises(CpetError, match="recovery preset"):
        load_config(None, ["recovery=eora"])
    from_base = load_config(None, ["recovery.r=8"], base={"recovery": "auto", "pet": "ia3"})  # a grid's base
    assert (from_base.recovery.init, from_base.recovery.r, from_base.pet.method) == ("auto", 8, "ia3")


def test_recovery_kept_at_its_fit_while_the_task_modules_train(tmp_path, data_dir, tiny_model_dir):
    """recovery.lr=0: CLM+CPET trains LoRA + head on top of the fitted recovery modules, which stay exactly
    as fitted (the same tensors as the no-data assembly's) and are saved with the task."""
    from safetensors.torch import load_file

    from cpet.experiments import run_experiment

    run_experiment(load_config(None, [
        f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2", f"task.data_dir={data_dir}",
        "task.val_size=16", "task.max_test=8", "train.epochs=1", "compress=UP+Q", "recovery.init=fit",
        "recovery.r=4", "recovery.init_samples=4", "recovery.lr=0",
        "paradigms=[base_pet, clm_cpet, clm_cpet_zero]", f"output_dir={tmp_path}"]), log=lambda s: None)
    trained, assembled = (load_file(next((tmp_path / p / "task").glob("*.safetensors")))
                          for p in ("clm_cpet", "clm_cpet_zero"))
    rec = [k for k in trained if ".recovery." in k]
    assert rec and set(rec) == {k for k in assembled if ".recovery." in k}
    assert any(assembled[k].abs().max() > 0 for k in rec)  # fitted, not zero
    assert all(torch.equal(trained[k], assembled[k]) for k in rec)
    assert any(not torch.equal(trained[k], assembled[k]) for k in trained if ".lora." in k)  # LoRA trained


def test_auto_fits_and_keeps_shape_kept_layers_and_trains_the_rest_from_zero(tmp_path, data_dir, tiny_model_dir):
    """recovery: auto under int8 + 2:4 + MoE: the attention linears (shape kept: a weight error) start
    fitted and stay so through training; the MoE FFN's module (experts skipped: nothing a fit can undo)
    starts at U = 0 and trains, as the paper's."""
    from safetensors.torch import load_file

    from cpet.experiments import run_experiment

    plan = ("[{method: int8}, {method: unstructured, pattern: '2:4'}, "
            "{method: moefication, experts: 4, top: 0.5, min_speedup: 0, router_steps: 5}]")
    run_experiment(load_config(None, [
        f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2", f"task.data_dir={data_dir}",
        "task.val_size=16", "task.max_test=8", "train.epochs=1", f"compress={plan}", "recovery=auto",
        "recovery.r=4", "recovery.init_samples=4", "paradigms=[base_pet, clm_cpet, clm_cpet_zero]",
        f"output_dir={tmp_path}"]), log=lambda s: None)
    trained, start = (load_file(next((tmp_path / p / "task").glob("*.safetensors")))
                      for p in ("clm_cpet", "clm_cpet_zero"))
    attn = [k for k in start if ".recovery.U" in k and ".attention." in k]
    ffn = [k for k in start if ".recovery.U" in k and ".attention." not in k]
    assert attn and ffn
    assert all(start[k].abs().max() > 0 and torch.equal(trained[k], start[k]) for k in attn)  # fitted, kept
    assert all(start[k].abs().max() == 0 for k in ffn)  # the MoE FFN's starts at zero ...
    assert any(trained[k].abs().max() > 0 for k in ffn)  # ... and trains
    with pytest.raises(CpetError, match="init=auto"):
        load_config(None, ["recovery=auto", "recovery.lr=0"])


def test_auto_leaves_uncompressed_layers_to_train():
    """MoE alone leaves the attention linears as they were: no error to fit, so auto neither fits nor
    keeps their modules (they train from U = 0); a fit over int8 layers fits and keeps every one."""
    from cpet.recovery import Recovery

    reference = build_task_model(tiny_bert(), 2)
    for plan, kept in (([{"method": "moefication", "experts": 4, "top": 0.5, "min_speedup": 0, "router_steps": 5}],
                        False), ([{"method": "int8"}], True)):
        bb = tiny_bert()
        compress(bb, plan, calibration=_calib())
        student = build_task_model(bb, 2, recovery=RecoveryConfig(r=4, init="auto"))
        removed = fit_recovery(student, reference, _calib(), log=lambda s: None, only_kept_shape=True, keep=True)
        attn = [m for n, m in student.named_modules() if isinstance(m, Recovery) and ".attention." in n]
        assert attn and all(m.kept == kept for m in attn)
        assert all((m.U.abs().max() > 0) == kept for m in attn)
        assert bool(removed) == kept


def test_cpet_adapt_moves_a_task_to_a_compressed_backbone_without_task_data(tmp_path, data_dir, tiny_model_dir,
                                                                            tokenizer):
    from cpet.cli import main
    from cpet.compress import load_compressed
    from cpet.experiments import run_experiment
    from cpet.models import load_backbone
    from cpet.task_modules import load_task_modules

    run_experiment(load_config(None, [f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2",
                                      f"task.data_dir={data_dir}", "task.val_size=16", "task.max_test=8",
                                      "train.epochs=1", "paradigms=[base_pet]", f"output_dir={tmp_path / 'run'}"]),
                   log=lambda s: None)
    task = tmp_path / "run" / "base_pet" / "task"
    cdir, out = tmp_path / "c", tmp_path / "adapted"
    assert main(["compress", tiny_model_dir, "--plan", "UP+Q", "-o", str(cdir), "--data-dir", str(data_dir)]) == 0
    args = ["adapt", str(task), "--compressed", str(cdir), "-o", str(out), "--recovery-r", "8", "--samples", "16",
            "--max-length", "32", "--data-dir", str(data_dir)]
    assert main(args) == 0
    cfg = json.loads((out / "task_config.json").read_text())
    assert cfg["recovery"]["r"] == 8 and cfg["labels"] == json.loads((task / "task_config.json").read_text())["labels"]
    assert cfg["backbone"]["plan"][0]["method"] == "unstructured"

    enc = tokenizer(["a great film", "a dull mess", "i loved it"], padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    teacher = load_task_modules(load_backbone(tiny_model_dir)[0], task).eval()
    adapted = load_task_modules(load_compressed(cdir)[0], out).eval()
    inherited = load_task_modules(load_compressed(cdir)[0], task).eval()  # the same modules, no recovery
    with torch.no_grad():
        t, a, i = (m(**inputs).hidden for m in (teacher, adapted, inherited))
    assert _rel(a, t) < _rel(i, t)
    with torch.no_grad():
        assert torch.equal(adapted.head.out.weight, teacher.head.out.weight)

    assert main(args) == 2  # never overwrites
    assert main(["adapt", str(out), "--compressed", str(cdir), "-o", str(tmp_path / "again")]) == 2  # already CPET


def test_cpet_adapt_moves_ffn_pet_onto_moe_experts(tmp_path, data_dir, tiny_model_dir, tokenizer):
    """A base+PET task with BitFit on every linear, adapted onto a MoE backbone: the FFN's bias deltas go
    onto the MoE's ports as they are; the adapted folder loads and runs."""
    from cpet.cli import main
    from cpet.compress import load_compressed
    from cpet.experiments import run_experiment
    from cpet.task_modules import load_task_modules, read_task_folder

    run_experiment(load_config(None, [f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2",
                                      f"task.data_dir={data_dir}", "task.val_size=16", "task.max_test=8",
                                      "train.epochs=1", "paradigms=[base_pet]", "pet=bitfit", f"output_dir={tmp_path / 'run'}"]),
                   log=lambda s: None)
    task, cdir, out = tmp_path / "run" / "base_pet" / "task", tmp_path / "c", tmp_path / "adapted"
    plan = "[{method: moefication, experts: 4, top: 0.5, min_speedup: 0, router_steps: 5}]"
    assert main(["compress", tiny_model_dir, "--plan", plan, "-o", str(cdir), "--data-dir", str(data_dir)]) == 0
    assert main(["adapt", str(task), "--compressed", str(cdir), "-o", str(out), "--recovery-r", "4", "--samples",
                 "8", "--max-length", "32", "--data-dir", str(data_dir)]) == 0
    (d0, s0), (d1, s1) = read_task_folder(task), read_task_folder(out)
    dense = [k for k in s0 if re.search(r"layer\.\d+\.(output|intermediate)\.dense\.bitfit", k)]
    ported = [k for k in s1 if ".out_port.bitfit" in k or ".in_ports.0.bitfit" in k]
    assert dense and len(ported) == len(dense)
    assert all(torch.equal(s0[k], s1[p]) for k, p in zip(sorted(dense), sorted(ported)))
    enc = tokenizer(["a great film", "a dull mess"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out_logits = load_task_modules(load_compressed(cdir)[0], out).eval()(enc["input_ids"], enc["attention_mask"]).logits
    assert out_logits.shape == (2, 2) and torch.isfinite(out_logits).all()
