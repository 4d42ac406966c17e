"""cpet predict: trained task folders on new text, through the shared-backbone bank."""

import json

import pytest

from cpet.cli import main
from cpet.config import TaskConfig
from cpet.tasks import load_task
from tests.conftest import train_on_shared_backbone


@pytest.fixture
def trained(tmp_path, data_dir, tiny_model_dir):
    return train_on_shared_backbone(tmp_path, data_dir, tiny_model_dir, tmp_path / "run", epochs=2)


def test_predictions_match_the_runs_own_test_evaluation(trained, tmp_path, data_dir, capsys):
    cdir, run, records = trained
    test = load_task(TaskConfig(name="sst2", data_dir=str(data_dir), val_size=16)).test
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": e.text_a}) + "\n" for e in test))
    out = tmp_path / "pred.jsonl"
    assert main(["predict", f"pet={run / 'clm_pet' / 'task'}", f"cpet={run / 'clm_cpet' / 'task'}",
                 "--backbone", str(cdir), "--input", str(inp), "-o", str(out), "--max-length", "32",
                 "--batch-size", "5"]) == 0
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds) == 2 * len(test)
    labels = json.loads((run / "clm_pet" / "task" / "task_config.json").read_text())["labels"]
    for task, paradigm in (("pet", "clm_pet"), ("cpet", "clm_cpet")):
        mine = [p for p in preds if p["task"] == task]
        assert [p["id"] for p in mine] == list(range(len(test)))
        acc = sum(labels.index(p["label"]) == e.label for p, e in zip(mine, test)) / len(test)
        assert acc == pytest.approx(records[paradigm]["test"]["accuracy"])
        assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in mine)

    capsys.readouterr()
    assert main(["predict", str(run / "clm_cpet" / "task"), "--backbone", str(cdir),
                 "--text", "a truly great and moving film " * 5, "--max-length", "8"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["task"] == "sst2" and line["truncated"] is True and line["label"] in labels


def test_predict_refusals(trained, tmp_path, tiny_model_dir):
    cdir, run, _ = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    assert main(["predict", str(run / "clm_pet" / "task"), "--backbone", str(cdir), "--input", str(bad)]) == 2
    assert main(["predict", str(run / "clm_pet" / "task"), "--backbone", str(cdir)]) == 2  # no input
    # a base+PET task was trained on the uncompressed model: not on this backbone
    assert main(["predict", str(run / "base_pet" / "task"), "--backbone", str(cdir), "--text", "x"]) == 2
    assert main(["predict", str(run / "base_pet" / "task"), "--backbone", tiny_model_dir, "--text", "x"]) == 0


def test_extractive_qa_answers_through_the_bank_equal_the_plain_model(tmp_path, data_dir, tiny_model_dir):
    from cpet.cli import main as cli
    from cpet.compress import load_compressed
    from cpet.config import load_config
    from cpet.experiments import run_experiment
    from cpet.formats import get_format
    from cpet.task_modules import load_task_modules

    cdir = tmp_path / "c"
    assert cli(["compress", tiny_model_dir, "--plan", "Q", "-o", str(cdir), "--data-dir", str(data_dir)]) == 0

    run_experiment(load_config(None, [f"model.name={tiny_model_dir}", "model.max_length=64", "task.name=squad",
                                      f"task.data_dir={data_dir}", "task.val_size=6", "task.max_test=6",
                                      "train.epochs=1", f"model.compressed={cdir}", "paradigms=[clm_pet]",
                                      f"output_dir={tmp_path / 'run'}"]), log=lambda s: None)
    task = tmp_path / "run" / "clm_pet" / "task"
    data = load_task(TaskConfig(name="squad", data_dir=str(data_dir), val_size=6, max_test=6))
    test = data.test
    inp = tmp_path / "q.jsonl"
    inp.write_text("".join(json.dumps({"text": e.text_a, "text_b": e.text_b}) + "\n" for e in test))
    out = tmp_path / "a.jsonl"
    assert cli(["predict", str(task), "--backbone", str(cdir), "--input", str(inp), "-o", str(out),
                "--max-length", "64"]) == 0
    got = [json.loads(line)["answer"] for line in out.read_text().splitlines()]
    plain = load_task_modules(load_compressed(cdir)[0], task)
    fmt = get_format(data.spec, plain)
    assert got == fmt.predict(plain, load_compressed(cdir)[1], test, 64)


def test_an_encoder_decoder_lm_serves_through_the_bank(tmp_path, data_dir, tokenizer):
    """A tiny T5 trained text-to-text (CLM+PET and CLM+CPET, recovery on encoder and decoder linears,
    cross-attention included): the bank reproduces each run's test accuracy, and greedy generation
    through the bank equals the plain model's (each task on its own copy of the backbone)."""
    from cpet.bank import TaskBank
    from cpet.compress import load_compressed
    from cpet.config import load_config
    from cpet.experiments import run_experiment
    from cpet.formats import TextFormat
    from cpet.predict import Item, predict, predict_by_format
    from cpet.task_modules import load_task_modules
    from cpet.tasks import TASKS
    from tests.conftest import save_tiny, tiny_t5_lm

    path = save_tiny(tiny_t5_lm(), tokenizer, tmp_path / "t5")
    out = tmp_path / "run"
    records = {r["paradigm"]: r for r in run_experiment(load_config(None, [
        f"model.name={path}", "model.max_length=48", "task.name=sst2", f"task.data_dir={data_dir}",
        "task.val_size=16", "task.max_test=24", "train.epochs=1", "train.batch_size=8", "recovery.r=4",
        "compress=[{method: int8}]", "paradigms=[base_pet, clm_pet, clm_cpet]", f"output_dir={out}"]),
        log=lambda s: None)}
    cdir = out / "backbone_compressed"
    bank, _ = TaskBank.open(cdir)
    for name in ("clm_pet", "clm_cpet"):
        bank.load(name, out / name / "task")
    assert any("decoder" in n and "EncDecAttention" in n for n in bank.branches)  # cross-attention served too
    test = load_task(TaskConfig(name="sst2", data_dir=str(data_dir), val_size=16, max_test=24)).test
    items = [Item(e.text_a) for e in test]
    preds = list(predict(bank, tokenizer, items, max_length=48, batch_size=5))
    labels = TASKS["sst2"].labels
    for name in ("clm_pet", "clm_cpet"):
        mine = [p for p in preds if p["task"] == name]
        acc = sum(labels.index(p["label"]) == e.label for p, e in zip(mine, test)) / len(test)
        assert acc == pytest.approx(records[name]["test"]["accuracy"])

    got = predict_by_format(bank, tokenizer, items[:4], range(4), "clm_cpet", 48, 2, generate=True, max_new_tokens=3)
    plain = load_task_modules(load_compressed(cdir)[0], out / "clm_cpet" / "task").eval()
    fmt = TextFormat(TASKS["sst2"], True)
    fmt.max_new_tokens = 3
    ref = fmt.generate(plain, tokenizer, test[:4], 48, 2)
    assert [got[(i, "clm_cpet")]["text"] for i in range(4)] == ref
