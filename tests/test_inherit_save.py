"""Inheritance, task-module save/load, PEFT import/export against the real peft package."""

import copy

import pytest
import torch

from cpet.compress import compress
from cpet.config import LoraConfig, RecoveryConfig
from cpet.errors import CpetError
from cpet.inherit import inherit
from cpet.task_modules import build_task_model, load_task_modules, save_task_modules


def _randomize(model, seed=3):
    """Give every task tensor non-trivial values (fresh B/U are zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and any(k in n.split(".") for k in ("lora", "recovery", "head")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_inheritance_into_uncompressed_model_is_identity(any_backbone, batch):
    teacher = build_task_model(any_backbone, 3, lora=LoraConfig(targets=("q", "v", "ffn_in")))
    _randomize(teacher)
    student = build_task_model(copy.deepcopy(any_backbone), 3, lora=LoraConfig(targets=("q", "v", "ffn_in")),
                               recovery=RecoveryConfig())
    names = inherit(student, teacher)
    assert names and all(".lora." in n or n.startswith("head.") for n in names)
    teacher.eval(), student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(**batch).logits, teacher(**batch).logits, rtol=0, atol=0)


def test_inheritance_errors(batch):
    from conftest import tiny_bert

    teacher = build_task_model(tiny_bert(), 2, lora=LoraConfig(targets=("q", "v")))
    other_rank = build_task_model(tiny_bert(), 2, lora=LoraConfig(r=4, targets=("q", "v")))
    with pytest.raises(CpetError, match="shape"):
        inherit(other_rank, teacher)
    fewer = build_task_model(tiny_bert(), 2, lora=LoraConfig(targets=("q",)))
    with pytest.raises(CpetError, match="no counterpart"):
        inherit(fewer, teacher)
    with pytest.raises(CpetError, match="no PET or head tensors"):
        inherit(fewer, {})


@pytest.mark.parametrize("plan", [[], [{"method": "unstructured", "sparsity": 0.5}, {"method": "int8"}]])
def test_task_modules_save_load_exact(tmp_path, any_backbone, batch, plan):
    backbone = compress(any_backbone, plan)
    model = build_task_model(copy.deepcopy(backbone), 2, lora=LoraConfig(), recovery=RecoveryConfig(r=4))
    _randomize(model)
    save_task_modules(model, tmp_path / "task")
    assert sorted(p.name for p in (tmp_path / "task").iterdir()) == ["task_config.json", "task_modules.safetensors"]
    loaded = load_task_modules(copy.deepcopy(backbone), tmp_path / "task")
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_load_task_modules_errors(tmp_path):
    from conftest import tiny_bert, tiny_llama

    with pytest.raises(CpetError, match="not a cpet task folder"):
        load_task_modules(tiny_bert(), tmp_path)
    model = build_task_model(tiny_bert(), 2, lora=LoraConfig())
    save_task_modules(model, tmp_path / "t")
    with pytest.raises(CpetError):  # modules named for BERT do not exist in LLaMA
        load_task_modules(tiny_llama(), tmp_path / "t")


# ---------------------------------------------------------------- PEFT interop (real peft)
peft = pytest.importorskip("peft")


def _peft_model(seed=0):
    from conftest import tiny_bert

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0)
    model = peft.get_peft_model(tiny_bert(seed), cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # as if trained
    return model.eval()


def test_import_peft_adapter_gives_peft_outputs(tmp_path, batch):
    from conftest import tiny_bert
    from cpet.models import TaskModel
    from cpet.pet.peft_io import import_peft

    pm = _peft_model()
    pm.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    model = TaskModel(tiny_bert(), 2)
    names = import_peft(model, tmp_path / "adapter")
    assert len(names) == 4  # 2 layers x (query, value)
    with torch.no_grad():
        ref = pm(**batch).last_hidden_state
        got = model.eval().backbone(**batch).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, tiny_bert()(**batch).last_hidden_state, atol=1e-3)  # the adapter matters


def test_import_peft_onto_compressed_backbone(tmp_path, batch):
    """The paper's inheritance from a community adapter: peft LoRA (on M) -> cpet LoRA on C."""
    from conftest import tiny_bert
    from cpet.models import TaskModel
    from cpet.pet.peft_io import import_peft

    _peft_model().save_pretrained(tmp_path / "adapter")
    student = TaskModel(compress(tiny_bert(), [{"method": "int8"}]), 2)
    import_peft(student, tmp_path / "adapter")
    assert isinstance(student.backbone.encoder.layer[0].attention.self.query.base,
                      __import__("cpet.compress.int8", fromlist=["Int8Linear"]).Int8Linear)


def test_export_peft_loads_in_peft_with_equal_outputs(tmp_path, batch):
    from conftest import tiny_bert
    from cpet.pet.peft_io import export_peft

    model = build_task_model(tiny_bert(), 2, lora=LoraConfig(r=4, alpha=8, targets=("q", "k", "v", "o")))
    _randomize(model)
    export_peft(model, tmp_path / "exp", base_model_name_or_path="tiny", pet_only=True)  # (the head stays behind)
    pm = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "exp").eval()
    with torch.no_grad():
        ref = model.eval().backbone(**batch).last_hidden_state
        got = pm(**batch).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_peft_refuses_pickle_and_unsupported(tmp_path):
    import json

    from conftest import tiny_bert
    from cpet.pet.peft_io import import_peft

    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (d / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(CpetError, match="pickled"):
        import_peft(tiny_bert(), d)
    (d / "adapter_model.safetensors").write_bytes(b"")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}))
    with pytest.raises(CpetError, match="DoRA"):
        import_peft(tiny_bert(), d)


def test_export_refuses_what_peft_cannot_hold(tmp_path):
    """Recovery modules and a task head have no PEFT LoRA form: export names them and stops, unless the
    LoRA alone is asked for."""
    from conftest import tiny_bert
    from cpet.cli import main
    from cpet.pet.peft_io import export_peft

    model = build_task_model(tiny_bert(), 2, lora=LoraConfig(r=4), recovery=RecoveryConfig(r=4))
    with pytest.raises(CpetError, match="recovery modules on 12 layers and the task head"):
        export_peft(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    export_peft(model, tmp_path / "a", pet_only=True)
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    task = save_task_modules(model, tmp_path / "task", extra={"task": "sst2", "labels": ["negative", "positive"]})
    assert main(["export-peft", str(task), "-o", str(tmp_path / "b")]) == 2  # a CpetError: exit code 2, one line
    assert not (tmp_path / "b").exists()
    assert main(["export-peft", str(task), "-o", str(tmp_path / "b"), "--pet-only"]) == 0
    assert main(["export-peft", str(task), "-o", str(tmp_path / "b"), "--pet-only"]) == 2  # never overwrites


def test_import_refuses_an_adapter_with_modules_to_save_unless_pet_only(tmp_path, batch):
    """PEFT's classification adapters save the trained classifier beside LoRA (modules_to_save); cpet's task
    head is its own, so importing the LoRA alone would silently drop the classifier: refused, naming it,
    before anything is attached; pet_only imports the LoRA on purpose (and it matches peft's backbone)."""
    from transformers import BertConfig, BertForSequenceClassification

    from cpet.models import TaskModel
    from cpet.pet.peft_io import import_peft
    from conftest import tiny_bert

    torch.manual_seed(0)
    cls = BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64,
                                                   max_position_embeddings=128, num_labels=2))
    pm = peft.get_peft_model(cls, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                  target_modules=["query", "value"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "cls")
    model = TaskModel(tiny_bert(), 2)
    with pytest.raises(CpetError, match="classifier.*modules_to_save.*--pet-only"):
        import_peft(model, tmp_path / "cls")
    assert not any("lora" in n for n, _ in model.named_parameters())  # nothing attached
    names = import_peft(model, tmp_path / "cls", pet_only=True)
    assert len(names) == 4
    with torch.no_grad():
        ref = pm.eval().base_model.model.bert(**batch).last_hidden_state
        got = model.eval().backbone(**batch).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_export_refuses_pet_trained_on_a_structurally_pruned_backbone(tmp_path):
    """Its tensors have the pruned widths, which no adapter of the dense model fits: a clear refusal, not a
    shape error inside peft later."""
    from conftest import tiny_bert
    from cpet.cli import main
    from cpet.pet.peft_io import export_peft

    for heads, refused in ((0.5, True), (0.0, False)):  # FFN neurons alone leave q and v at full width
        plan = [{"method": "structured", "heads": heads, "ffn": 0.5}]
        model = build_task_model(compress(tiny_bert(), plan), 2, lora=LoraConfig(r=4, targets=("q", "v")))
        _randomize(model)
        out = tmp_path / f"a{heads}"
        if refused:
            with pytest.raises(CpetError, match="structurally pruned"):
                export_peft(model, out, pet_only=True)
        else:
            export_peft(model, out, pet_only=True)
            pm = peft.PeftModel.from_pretrained(tiny_bert(), out)  # loads onto the dense model
            assert pm is not None
        task = save_task_modules(model, tmp_path / f"task{heads}", extra={
            "task": "sst2", "labels": ["negative", "positive"], "backbone": {"path": "x", "plan": plan}})
        rc = main(["export-peft", str(task), "-o", str(tmp_path / f"b{heads}"), "--pet-only"])
        assert rc == (2 if refused else 0) and (tmp_path / f"b{heads}").exists() != refused


def test_cli_export_peft_and_import_peft_round_trip_through_peft(tmp_path, tokenizer):
    """A text-to-text task of a causal LM: cpet export-peft -> the real peft package gives the same logits
    -> cpet import-peft brings back the same tensors as a task folder; an encoder backbone is refused."""
    from conftest import save_tiny, tiny_bert, tiny_llama_lm
    from cpet.cli import main
    from cpet.models import LMTaskModel
    from cpet.pet import lora as lora_mod
    from cpet.task_modules import read_task_folder

    path = save_tiny(tiny_llama_lm(), tokenizer, tmp_path / "lm")
    model = LMTaskModel(tiny_llama_lm())
    lora_mod.apply(model, LoraConfig(r=4, alpha=8, targets=("q", "v", "ffn_in")))
    _randomize(model)
    task = save_task_modules(model, tmp_path / "task", extra={"task": "sst2", "labels": ["negative", "positive"],
                                                               "backbone": {"path": path, "plan": []}})
    assert main(["export-peft", str(task), "-o", str(tmp_path / "peft")]) == 0
    pm = peft.PeftModel.from_pretrained(tiny_llama_lm(), tmp_path / "peft").eval()
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, model.eval().backbone(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    assert main(["import-peft", str(tmp_path / "peft"), "--backbone", path, "-o", str(tmp_path / "back"),
                 "--task", "sst2"]) == 0
    (d0, s0), (d1, s1) = read_task_folder(task), read_task_folder(tmp_path / "back")
    assert d1["lora"]["modules"] == d0["lora"]["modules"] and d1["task"] == "sst2" and d1["head"] == "lm"
    assert set(s1) == set(s0) and all(torch.equal(s0[k], s1[k]) for k in s0)
    bert = tmp_path / "bert"
    tiny_bert().save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    assert main(["import-peft", str(tmp_path / "peft"), "--backbone", str(bert), "-o", str(tmp_path / "x")]) == 2


def test_ia3_round_trips_through_the_real_peft_package(tmp_path, batch):
    """IA3 both ways: PEFT's IA3 (keys, values, and the FFN down-projection scaled on its input) imported
    into cpet gives PEFT's outputs; cpet's IA3 exported loads in PEFT with cpet's outputs; the task
    folder verb writes the same vectors."""
    from conftest import tiny_bert
    from cpet.cli import main
    from cpet.models import TaskModel
    from cpet.pet.ia3 import IA3Config
    from cpet.pet.peft_io import export_peft, import_peft

    pm = peft.get_peft_model(tiny_bert(), peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                                          feedforward_modules=["output.dense"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
    pm.eval().save_pretrained(tmp_path / "peft_ia3")
    model = TaskModel(tiny_bert(), 2)
    names = import_peft(model, tmp_path / "peft_ia3")
    assert len(names) == 8  # 2 layers x (key, value, attention.output.dense, output.dense)
    with torch.no_grad():
        ref = pm(**batch).last_hidden_state
        torch.testing.assert_close(model.eval().backbone(**batch).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ref, tiny_bert()(**batch).last_hidden_state, atol=1e-3)

    ours = build_task_model(tiny_bert(), 2, pet=IA3Config())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if ".ia3" in n:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
    with pytest.raises(CpetError, match="task head"):
        export_peft(ours, tmp_path / "x")
    export_peft(ours, tmp_path / "ours", pet_only=True)
    back = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).last_hidden_state, ours.eval().backbone(**batch).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
    task = save_task_modules(ours, tmp_path / "task", extra={"task": "sst2"})
    assert main(["export-peft", str(task), "-o", str(tmp_path / "cli"), "--pet-only"]) == 0
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "ours" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "cli" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
