"""Trainer: exact resume after an interruption, teacher cache, distillation, the whole pipeline."""

import copy
import json

import pytest
import torch

from cpet.config import LoraConfig, TaskConfig, TrainConfig, load_config
from cpet.distill import Teacher, distill_loss
from cpet.experiments import run_experiment
from cpet.layers import task_state_dict
from cpet.task_modules import build_task_model
from cpet.tasks import load_task
from cpet.formats import HeadFormat
from cpet.train import GROUP_BATCHES, epoch_batches, train


class Interrupt(Exception):
    pass


def _setup(data_dir, tokenizer):
    from conftest import tiny_bert

    data = load_task(TaskConfig(name="sst2", data_dir=str(data_dir), val_size=16))
    torch.manual_seed(0)
    model = build_task_model(tiny_bert(), 2, lora=LoraConfig(dropout=0.1))  # dropout: RNG must resume too
    return data, model


def test_length_grouped_batches_cover_each_epoch_with_less_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 120, (1000,), generator=gen).tolist()
    features = [{"rows": [{"input_ids": [1] * n}]} for n in lengths]
    plain, grouped = TrainConfig(batch_size=32, seed=3), TrainConfig(batch_size=32, seed=3, group_by_length=True)

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    for epoch in (0, 1):
        rand, grp = epoch_batches(features, plain, epoch), epoch_batches(features, grouped, epoch)
        assert len(grp) == len(rand) == 32  # ceil(1000 / 32): the lr schedule's step count holds
        assert sorted(i for b in grp for i in b) == list(range(1000))  # every example once
        assert padded(grp) < 0.75 * padded(rand)
        # within a chunk the batches are length-sorted: each batch's spread is small
        spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grp]
        assert sorted(spread)[len(spread) // 2] < 20
        assert grp == epoch_batches(features, grouped, epoch)  # a function of (seed, epoch): resume replays it
    assert epoch_batches(features, grouped, 0) != epoch_batches(features, grouped, 1)
    # off: exactly the batches every earlier run trained on (the permutation cut in order)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(3 * 1000)).tolist()
    assert epoch_batches(features, plain, 0) == [perm[s: s + 32] for s in range(0, 1000, 32)]
    # two processes split each epoch's permutation, every example on one of them
    halves = [epoch_batches(features, grouped, 0, shard, 2) for shard in (0, 1)]
    assert sorted(i for h in halves for b in h for i in b) == list(range(1000))
    assert GROUP_BATCHES * 32 < 1000  # the test spans more than one chunk


@pytest.mark.parametrize("grouped", [False, True])
def test_resume_after_interruption_is_exact(tmp_path, data_dir, tokenizer, grouped):
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, checkpoint_every=3, seed=7, group_by_length=grouped)
    data, model = _setup(data_dir, tokenizer)
    ref_model = copy.deepcopy(model)
    ref = train(ref_model, tokenizer, data.spec, data.train, data.val, cfg, 32, out_dir=tmp_path / "ref", log=lambda s: None)

    def boom(step):
        if step == 8:  # after the checkpoint at step 6, mid epoch 2 (6 batches per epoch)
            raise Interrupt

    with pytest.raises(Interrupt):
        train(model, tokenizer, data.spec, data.train, data.val, cfg, 32, out_dir=tmp_path / "run",
              on_step=boom, log=lambda s: None)
    meta = json.loads((tmp_path / "run" / "checkpoint" / "trainer.json").read_text())
    assert meta["step"] == 6 and meta["epoch"] == 1
    _, fresh = _setup(data_dir, tokenizer)  # a new process would start from a fresh model
    logs = []
    res = train(fresh, tokenizer, data.spec, data.train, data.val, cfg, 32, out_dir=tmp_path / "run", log=logs.append)
    assert any("resumed" in line for line in logs)
    assert res.steps == ref.steps == 12
    assert res.history == ref.history and res.best_val == ref.best_val
    a, b = task_state_dict(fresh), task_state_dict(ref_model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_cache_equals_fresh_teacher(data_dir, tokenizer):
    from conftest import tiny_bert

    data = load_task(TaskConfig(name="sst2", data_dir=str(data_dir), val_size=16))
    fmt = HeadFormat(data.spec)
    enc = fmt.encode(tokenizer, data.train, 32)
    teacher = build_task_model(tiny_bert(), 2, lora=LoraConfig())
    every = ("hidden", "layers", "logits")
    cached, fresh = Teacher(teacher, cache=True, outputs=every), Teacher(teacher, cache=False, outputs=every)
    b1 = fmt.collate(enc, [0, 1, 2, 3], 0)
    b2 = fmt.collate(enc, [3, 9, 1, 20], 0)  # overlaps b1, different padding
    cached(b1)
    for b in (b1, b2):
        (h1, z1, l1), (h2, z2, l2) = cached(b), fresh(b)
        torch.testing.assert_close(h1, h2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z1, z2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
        assert l1.shape[:2] == (4, 2) and torch.equal(l1[:, -1], h1)  # 2 layers; the last is the hidden state
    assert len(cached._hidden) == 6


def test_teachers_sharing_a_store_run_the_teacher_once_per_row(data_dir, tokenizer):
    """The distilling paradigms of one experiment share the teacher's outputs per row: a second Teacher on the
    same store returns the same tensors without running the model; other distilled outputs get their own."""
    from conftest import tiny_bert

    data = load_task(TaskConfig(name="sst2", data_dir=str(data_dir), val_size=16))
    fmt = HeadFormat(data.spec)
    enc = fmt.encode(tokenizer, data.train, 32)
    teacher = build_task_model(tiny_bert(), 2, lora=LoraConfig())
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    store: dict = {}
    b = fmt.collate(enc, [0, 5, 7], 0)
    first = Teacher(teacher, outputs=("hidden",), store=store)(b)
    assert len(calls) == 1
    again = Teacher(teacher, outputs=("hidden",), store=store)(b)
    assert len(calls) == 1 and torch.equal(first[0], again[0])
    Teacher(teacher, outputs=("hidden", "logits"), store=store)(b)  # needs the logits too: its own entry
    assert len(calls) == 2
    Teacher(teacher, outputs=("hidden",), cache=False, store=store)(b)  # no cache: always runs
    assert len(calls) == 3


def test_distill_loss_zero_for_identical_models(data_dir, tokenizer):
    from conftest import tiny_bert

    data = load_task(TaskConfig(name="sst2", data_dir=str(data_dir), val_size=16))
    fmt = HeadFormat(data.spec)
    batch = fmt.collate(fmt.encode(tokenizer, data.train, 32), [0, 1, 2], 0)
    model = build_task_model(tiny_bert(), 2, lora=LoraConfig()).eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    every = ("hidden", "layers", "logits")
    t = Teacher(copy.deepcopy(model), outputs=every)(batch)
    assert distill_loss(t, model(**inputs, output_layers=True), every).item() < 1e-10
    other = build_task_model(tiny_bert(seed=1), 2, lora=LoraConfig()).eval()
    assert distill_loss(t, other(**inputs), ("hidden",)).item() > 1e-3
    assert distill_loss(t, other(**inputs, output_layers=True), ("layers",)).item() > 1e-3
    with pytest.raises(ValueError, match="output_layers"):
        distill_loss(t, other(**inputs), ("layers",))


def test_pipeline_end_to_end_tiny(tmp_path, data_dir, tiny_model_dir):
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2",
                             f"task.data_dir={data_dir}", "task.val_size=16", "train.epochs=2",
                             "train.batch_size=16", "recovery.r=4", f"output_dir={tmp_path / 'out'}",
                             "compress=[{method: unstructured, sparsity: 0.5}, {method: int8}]"])
    logs = []
    records = run_experiment(cfg, log=logs.append)
    assert [r["paradigm"] for r in records] == ["base_pet", "clm_pet", "clm_cpet"]
    out = tmp_path / "out"
    for r in records:
        saved = json.loads((out / r["paradigm"] / "result.json").read_text())
        assert 0.0 <= saved["test"]["accuracy"] <= 1.0 and saved["steps"] == 6
        assert (out / r["paradigm"] / "task" / "task_modules.safetensors").is_file()
        assert not (out / r["paradigm"] / "checkpoint").exists()
    assert records[2]["trainable_params"] > records[1]["trainable_params"]  # recovery modules added
    assert (out / "backbone_compressed" / "compression.json").is_file()
    table = (out / "results.md").read_text()
    for label in ("base+PET", "CLM+PET", "CLM+CPET"):
        assert f"| {label} |" in table
    # a rerun continues: every finished paradigm is skipped, results are unchanged
    logs2 = []
    again = run_experiment(cfg, log=logs2.append)
    assert sum("already done" in l for l in logs2) == 3
    assert [r["test"] for r in again] == [r["test"] for r in records]


@pytest.mark.slow
def test_two_process_launch(tmp_path, data_dir, tiny_model_dir):
    """The same CLI under a 2-process distributed launch (gloo on CPU): each trains half of every epoch,
    only rank 0 writes files, and the results are complete."""
    import subprocess
    import sys

    p = tmp_path / "e.yaml"
    p.write_text(f"model: {{name: {tiny_model_dir}, max_length: 32}}\n"
                 f"task: {{name: sst2, data_dir: {data_dir}, val_size: 16}}\n"
                 "train: {epochs: 1, batch_size: 8}\nrecovery: {r: 4}\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cpet.cli",
                        "run", str(p), "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("| CLM+CPET |") == 1
    assert "batch 3/3" in r.stdout  # 48 train examples / (2 processes x batch 8)
    for paradigm in ("base_pet", "clm_pet", "clm_cpet"):
        assert json.loads((tmp_path / "o" / paradigm / "result.json").read_text())["steps"] == 3


def test_multiple_choice_rows_and_logits(data_dir, tokenizer):
    from conftest import tiny_bert

    data = load_task(TaskConfig(name="copa", data_dir=str(data_dir), val_size=4))
    assert data.spec.format == "choice" and data.spec.head_size == 1 and data.test[0].choices
    fmt = HeadFormat(data.spec)
    enc = fmt.encode(tokenizer, data.train, 32)
    assert all(len(f["rows"]) == 2 for f in enc)
    batch = fmt.collate(enc, [0, 5, 2], 0)
    assert batch["input_ids"].shape[0] == 6 and batch["num_choices"] == 2
    assert batch["index"].tolist() == [0, 1, 10, 11, 4, 5]  # example * choices + choice
    model = build_task_model(tiny_bert(), data.spec.head_size, lora=LoraConfig()).eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "num_choices")}
    out = model(**inputs)
    assert out.logits.shape == (3, 2) and out.scores.shape == (6, 1) and out.hidden.shape[0] == 6
    # the teacher caches per row and reassembles scores for the distillation loss
    teacher = Teacher(copy.deepcopy(model), outputs=("hidden", "logits"))
    h, z, _ = teacher(batch)
    assert z.shape == (6, 1) and distill_loss((h, z, None), out, ("hidden", "logits")) < 1e-10


def test_multiple_choice_pipeline_tiny(tmp_path, data_dir, tiny_model_dir):
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=copa",
                             f"task.data_dir={data_dir}", "task.val_size=4", "train.epochs=1",
                             "train.batch_size=8", "recovery.r=4", "distill.outputs=[hidden, logits]",
                             f"output_dir={tmp_path / 'out'}"])
    records = run_experiment(cfg, log=lambda s: None)
    assert [r["paradigm"] for r in records] == ["base_pet", "clm_pet", "clm_cpet"]
    assert all(0 <= r["test"]["accuracy"] <= 1 for r in records)


def test_layerwise_distillation_trains_end_to_end(tmp_path, data_dir, tiny_model_dir, tokenizer):
    from conftest import tiny_llama_lm

    from cpet.models import LMTaskModel

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2",
                             f"task.data_dir={data_dir}", "task.val_size=16", "train.epochs=1", "recovery.r=4",
                             "distill.outputs=[layers]", "paradigms=[base_pet, clm_cpet]", "compress=Q",
                             f"output_dir={tmp_path / 'out'}"])
    records = run_experiment(cfg, log=lambda s: None)
    assert tuple(records[-1]["config"]["distill"]["outputs"]) == ("layers",)
    lm = LMTaskModel(tiny_llama_lm())
    ids = tokenizer(["a fine film"], return_tensors="pt")["input_ids"]
    out = lm(input_ids=ids, attention_mask=torch.ones_like(ids), output_layers=True)
    assert len(out.layers) == 2 and torch.equal(out.layers[-1], out.hidden)
