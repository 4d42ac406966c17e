"""Many tasks in one bank on a shared compressed backbone, held to the plain one-task-per-copy reference."""

import copy
import json

import pytest
import torch

from cpet.bank import TaskBank
from cpet.compress import compress
from cpet.config import LoraConfig, RecoveryConfig
from cpet.errors import CpetError
from cpet.task_modules import build_task_model, load_task_modules, save_task_modules
from tests.conftest import tiny_bert

PLANS = {"UP+Q": [{"method": "unstructured", "pattern": "2:4"}, {"method": "int8"}],
         "M+Q": [{"method": "moefication", "experts": 4, "top": 0.5, "min_speedup": 0, "router_steps": 20},
                 {"method": "int8"}],
         "SP+Q": [{"method": "structured", "ffn": 0.5, "heads": 0.5}, {"method": "int8"}]}


def _calib():
    from cpet.compress.calibration import Calibration

    return Calibration(torch.randint(1000, 30000, (16, 16), generator=torch.Generator().manual_seed(0)))


def _task(backbone, folder, seed, num_labels, lora=None, recovery=None, backbone_fp=None):
    """A task with random (trained-looking) modules on its own copy of the backbone, saved to ``folder``."""
    torch.manual_seed(seed)
    m = build_task_model(copy.deepcopy(backbone), num_labels, lora=lora, recovery=recovery)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("lora.B", "recovery.U")) or n.startswith("head."):
                p.normal_(0, 0.1)
    extra = {"task": f"t{seed}", "labels": [str(i) for i in range(num_labels)]}
    if backbone_fp:
        extra["backbone"] = {"fingerprint": backbone_fp, "path": "elsewhere"}
    save_task_modules(m, folder, extra=extra)
    return folder


@pytest.fixture(params=sorted(PLANS))
def setup(request, tmp_path, batch):
    bb = tiny_bert()
    compress(bb, PLANS[request.param], calibration=_calib())
    tasks = {
        "a": _task(bb, tmp_path / "a", 1, 2, LoraConfig(r=2, targets=("q", "v")), RecoveryConfig(r=4)),
        "b": _task(bb, tmp_path / "b", 2, 3, LoraConfig(r=4, targets=("q", "k", "v", "o"))),  # no recovery
        "c": _task(bb, tmp_path / "c", 3, 2, None, RecoveryConfig(r=8, targets=("o", "ffn_in", "ffn_out"))),
    }
    return bb, tasks


def _reference(bb, folder, inputs):
    model = load_task_modules(copy.deepcopy(bb), folder).eval()
    with torch.no_grad():
        return model(**inputs).logits


def _rows(batch, idx):
    return {k: v[idx] for k, v in batch.items()}


def test_mixed_batch_equals_each_task_alone_on_its_own_copy(setup, batch):
    bb, tasks = setup
    bank = TaskBank(copy.deepcopy(bb))
    for name, folder in tasks.items():
        bank.load(name, folder)
    # 6 rows: the 3 sentences under task a, one under b, two under c (contiguous runs)
    idx = torch.tensor([0, 1, 2, 1, 0, 2])
    names = ["a", "a", "a", "b", "c", "c"]
    mixed = bank.scores(names, **_rows(batch, idx))
    for i, (row, task) in enumerate(zip(idx.tolist(), names)):
        ref = _reference(bb, tasks[task], _rows(batch, torch.tensor([row])))[0]
        assert torch.allclose(mixed[i], ref, atol=1e-5), (task, mixed[i], ref)
        alone = bank.scores([task], **_rows(batch, torch.tensor([row])))[0]
        assert torch.allclose(mixed[i], alone, atol=1e-5)  # batch-mates and padding do not matter


def test_unload_frees_the_slot_and_leaves_the_others(setup, batch, tmp_path):
    bb, tasks = setup
    bank = TaskBank(copy.deepcopy(bb))
    for name, folder in tasks.items():
        bank.load(name, folder)
    before = {t: bank.scores([t] * 3, **batch) for t in ("a", "c")}
    sizes = {t: bank.tasks[t].bytes - sum(p.numel() * 4 for p in bank.tasks[t].head.parameters()) for t in "abc"}
    assert bank.bank_bytes == bank.task_bytes  # no padding: the slots hold exactly the tasks' tensors
    bank.unload("a")  # the first slot: c's moves into it
    assert "a" not in bank.tasks and bank.slots == 2 and sorted(t.slot for t in bank.tasks.values()) == [0, 1]
    assert sum(br.nbytes for br in bank.branches.values()) == sizes["b"] + sizes["c"]  # a's memory is freed
    assert all(len(br.pairs) == 2 for br in bank.branches.values())
    assert all(torch.equal(x, y) for x, y in zip(before["c"], bank.scores(["c"] * 3, **batch)))
    bank.load("a2", tasks["a"])
    assert bank.slots == 3
    assert all(torch.equal(x, y) for x, y in zip(before["a"], bank.scores(["a2"] * 3, **batch)))
    with pytest.raises(CpetError, match="not loaded"):
        bank.scores(["a"], **_rows(batch, torch.tensor([0])))


def test_view_is_a_task_model(setup, batch):
    bb, tasks = setup
    bank = TaskBank(copy.deepcopy(bb))
    bank.load("c", tasks["c"])
    with torch.no_grad():
        got = bank.view("c")(**batch).logits
    assert torch.allclose(got, _reference(bb, tasks["c"], batch), atol=1e-5)


def test_refusals(tmp_path, batch):
    bb = tiny_bert()
    compress(bb, PLANS["UP+Q"], calibration=_calib())
    other = _task(bb, tmp_path / "o", 1, 2, LoraConfig(r=2), backbone_fp="0123456789abcdef")
    bank = TaskBank(copy.deepcopy(bb), fingerprint="fedcba9876543210")
    with pytest.raises(CpetError, match="0123456789abcdef.*fedcba9876543210"):
        bank.load("o", other)
    relu = _task(bb, tmp_path / "r", 2, 2, None, RecoveryConfig(r=2, activation="relu"))
    with pytest.raises(CpetError, match="one activation per bank"):
        bank.load("r", relu)
    with pytest.raises(CpetError, match="not a cpet task folder"):
        bank.load("x", tmp_path)
    big = tiny_bert()  # another architecture size: shapes do not fit
    from transformers import BertConfig, BertModel

    big = BertModel(BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=128))
    wrong = _task(big, tmp_path / "w", 3, 2, LoraConfig(r=2))
    with pytest.raises(CpetError, match="shape"):
        bank.load("w", wrong)
    edited = _task(bb, tmp_path / "e", 4, 2, LoraConfig(r=2))  # a folder whose recorded rank is not its tensors'
    cfg = json.loads((edited / "task_config.json").read_text())
    cfg["lora"]["r"] = 4
    (edited / "task_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CpetError, match="records r=4"):
        bank.load("e", edited)
    assert set(bank.tasks) == set() and bank.slots == 0  # failed loads leave no slot behind
    assert all(not br.pairs for br in bank.branches.values())
    with pytest.raises(CpetError, match="bare backbone"):
        TaskBank(build_task_model(copy.deepcopy(bb), 2, lora=LoraConfig()).backbone)


def test_tasks_trained_on_a_shared_compressed_folder_serve_from_it(tmp_path, data_dir, tiny_model_dir, batch):
    """model.compressed trains on an existing cpet compress folder (never written), gives the same results
    as compressing in the run, and its task folders record that backbone: a bank on it loads them, a bank
    on another refuses them."""
    from cpet.cli import main
    from cpet.config import load_config
    from cpet.experiments import run_experiment

    cdir = tmp_path / "c"
    assert main(["compress", tiny_model_dir, "--plan", "UP+Q", "-o", str(cdir), "--data-dir", str(data_dir)]) == 0
    before = {f.name: f.stat().st_mtime_ns for f in cdir.iterdir()}
    args = [f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2", f"task.data_dir={data_dir}",
            "task.val_size=16", "task.max_test=8", "train.epochs=1", "recovery.r=4", "compress=UP+Q",
            "paradigms=[base_pet, clm_pet, clm_cpet]"]
    own = {r["paradigm"]: r for r in run_experiment(load_config(None, [*args, f"output_dir={tmp_path / 'own'}"]),
                                                     log=lambda s: None)}
    shared = {r["paradigm"]: r for r in run_experiment(load_config(None, [
        *args, f"model.compressed={cdir}", f"output_dir={tmp_path / 'shared'}"]), log=lambda s: None)}
    assert {f.name: f.stat().st_mtime_ns for f in cdir.iterdir()} == before
    assert not (tmp_path / "shared" / "backbone_compressed").exists()
    for p in ("clm_pet", "clm_cpet"):
        assert shared[p]["fingerprint"] == own[p]["fingerprint"] and shared[p]["test"] == own[p]["test"]

    bank, tok = TaskBank.open(cdir)
    bank.load("sst2", tmp_path / "shared" / "clm_cpet" / "task")
    with pytest.raises(CpetError, match="trained on backbone"):
        bank.load("teacher", tmp_path / "shared" / "base_pet" / "task")  # trained on the uncompressed model
    plain, _ = TaskBank.open(tiny_model_dir)
    plain.load("teacher", tmp_path / "shared" / "base_pet" / "task")
    with pytest.raises(CpetError, match="trained on backbone"):
        plain.load("sst2", tmp_path / "shared" / "clm_cpet" / "task")

    other = tmp_path / "other-model"
    from tests.conftest import save_tiny

    save_tiny(tiny_bert(seed=5), tok, other)
    with pytest.raises(CpetError, match="was made from"):
        run_experiment(load_config(None, [*args, f"model.name={other}", f"model.compressed={cdir}",
                                          f"output_dir={tmp_path / 'x'}"]), log=lambda s: None)


def test_engine_lru_evicts_idle_unpinned_tasks_by_bytes(tmp_path, batch, tokenizer):
    from cpet.serve.engine import Engine, UnknownTask

    bb = tiny_bert()
    compress(bb, PLANS["UP+Q"], calibration=_calib())
    folders = [_task(bb, tmp_path / n, i, 2, LoraConfig(r=2), RecoveryConfig(r=4)) for i, n in enumerate("abcd")]
    bank = TaskBank(copy.deepcopy(bb))
    engine = Engine(bank, tokenizer, max_length=16, max_batch=4, max_wait_ms=1, task_root=str(tmp_path))
    try:
        one = engine.load("a", str(folders[0]), pin=True).result(timeout=30)["bytes"]
        engine.max_task_bytes = 2 * one  # room for two tasks
        engine.load("b", str(folders[1])).result(timeout=30)
        engine.classify(["b"], [("a fine film", None)]).result(timeout=30)  # b used last
        assert engine.load("c", str(folders[2])).result(timeout=30)["evicted"] == ["b"]  # a is pinned
        assert set(bank.tasks) == {"a", "c"}
        with pytest.raises(UnknownTask):
            engine.classify(["b"], [("x", None)])
        assert engine.load("d", str(folders[3])).result(timeout=30)["evicted"] == ["c"]
        assert engine.unload("d").result(timeout=30) == {"name": "d", "unloaded": True}
        assert set(bank.tasks) == {"a"} and bank.slots == 1
    finally:
        engine.close()
