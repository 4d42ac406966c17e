"""Configs, tasks and the CLI: defaults, overrides, and one clear message per kind of bad input."""

import subprocess
import sys

import pytest

from cpet.cli import main
from cpet.config import ExperimentConfig, load_config, parse_overrides
from cpet.errors import CpetError
from cpet.tasks import load_task
from cpet.tasks.metrics import accuracy, f1_binary, f1_macro
from cpet.config import TaskConfig


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("task: {name: rte}\ntrain: {lr: 0.001}\ncompress:\n  - {method: unstructured, pattern: '2:4'}\n")
    cfg = load_config(p, ["train.epochs=5", "lora.targets=[q,k]"])
    assert cfg.task.name == "rte" and cfg.train.lr == 0.001 and cfg.train.epochs == 5
    assert cfg.lora.targets == ("q", "k") and cfg.compress[0]["pattern"] == "2:4"
    assert isinstance(load_config(), ExperimentConfig)
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize("text,overrides,match", [
    ("train: {lrr: 1}\n", [], "unknown config key train.lrr"),
    ("train: [1, 2\n", [], "not valid YAML"),
    ("- 1\n", [], "top level must be a mapping"),
    ("", ["task.nme=x"], "unknown config key task.nme"),
    ("", ["train.lr"], "not key=value"),
    ("", ["compress=[{method: magic}]"], "unknown method 'magic'"),
    ("", ["paradigms=[clm_cpet]"], "base_pet must run too"),
    ("", ["distill.outputs=[attention]"], "choose from"),
])
def test_config_errors(tmp_path, text, overrides, match):
    p = tmp_path / "e.yaml"
    p.write_text(text)
    with pytest.raises(CpetError, match=match):
        load_config(p, overrides)


def test_task_errors(tmp_path, data_dir):
    with pytest.raises(CpetError, match="unknown task 'sst3'"):
        load_task(TaskConfig(name="sst3", data_dir=str(data_dir)))
    with pytest.raises(CpetError, match="does not exist"):
        load_task(TaskConfig(name="sst2", data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(CpetError, match="data file missing"):
        load_task(TaskConfig(name="cb", data_dir=str(data_dir)))


def test_splits_deterministic_and_disjoint(data_dir):
    a = load_task(TaskConfig(name="sst2", data_dir=str(data_dir), val_size=0.25))
    b = load_task(TaskConfig(name="sst2", data_dir=str(data_dir), val_size=0.25))
    assert a.train == b.train and a.val == b.val
    assert len(a.val) == 16 and len(a.train) == 48 and len(a.test) == 16
    rte = load_task(TaskConfig(name="rte", data_dir=str(data_dir), val_size=4))
    assert rte.spec.num_labels == 2 and rte.train[0].text_b == "a cat sat"


def test_env_var_data_dir(monkeypatch, data_dir):
    monkeypatch.setenv("CPET_DATA", str(data_dir))
    assert load_task(TaskConfig(name="sst2", val_size=8)).source == str(data_dir)


def test_metrics_known_values():
    assert accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == 0.75
    # tp=2 fp=1 fn=1 -> 2*2/(4+1+1)
    assert f1_binary([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(4 / 6)
    # per class: c0: tp1 fp0 fn1 -> 2/3; c1: tp1 fp1 fn0 -> 2/3; c2: tp1 fp0 fn0 -> 1
    assert f1_macro([0, 1, 1, 2], [0, 1, 0, 2], 3) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_real_data_loaders():
    from pathlib import Path

    root = Path("../shared/data")
    if not root.is_dir():
        pytest.skip("../shared/data not present")
    sst = load_task(TaskConfig(name="sst2", data_dir=str(root), val_size=1000))
    assert len(sst.test) == 872 and len(sst.train) == 67349 - 1000
    cb = load_task(TaskConfig(name="cb", data_dir=str(root)))
    assert len(cb.test) == 56 and cb.spec.metrics == ("accuracy", "f1_macro")
    rte = load_task(TaskConfig(name="rte", data_dir=str(root)))
    assert len(rte.test) == 277 and {e.label for e in rte.test} == {0, 1}


def test_cli_bad_input_one_line(tmp_path, capsys):
    p = tmp_path / "e.yaml"
    p.write_text("model: {name: minilm}\nbogus: 1\n")
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unknown config key bogus" in err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2


def test_cli_unknown_architecture_subprocess(tmp_path, data_dir):
    """A real process: a model folder of an unmapped architecture -> one message, no traceback."""
    from transformers import GPT2Config

    d = tmp_path / "gpt2ish"
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(d)
    (tmp_path / "e.yaml").write_text("")
    r = subprocess.run([sys.executable, "-m", "cpet.cli", "run", str(tmp_path / "e.yaml"), f"model.name={d}",
                        f"output_dir={tmp_path / 'o'}", "task.name=sst2", f"task.data_dir={data_dir}",
                        "task.val_size=8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "architecture 'gpt2' has no cpet map" in r.stderr


def test_cli_run_tiny(tmp_path, data_dir, tiny_model_dir, capsys):
    p = tmp_path / "e.yaml"
    p.write_text(f"model: {{name: {tiny_model_dir}, max_length: 32}}\n"
                 f"task: {{name: sst2, data_dir: {data_dir}, val_size: 16}}\n"
                 "train: {epochs: 1, batch_size: 16}\nrecovery: {r: 4}\n")
    assert main(["run", str(p), "-o", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "| CLM+CPET |" in out and (tmp_path / "o" / "results.md").is_file()


def test_cli_compress_and_bench(tmp_path, tiny_model_dir, capsys):
    import json

    out = tmp_path / "upq"
    assert main(["compress", tiny_model_dir, "--plan", "UP+Q", "-o", str(out)]) == 0
    assert (out / "compression.json").is_file()
    assert main(["compress", tiny_model_dir, "--plan", "[{method: structured, ffn: 0.5}]", "-o", str(tmp_path / "sp")]) == 0
    capsys.readouterr()
    assert main(["bench", str(out), str(tmp_path / "sp"), "--shapes", "1x8", "--repeats", "2",
                 "--json", str(tmp_path / "b.json")]) == 0
    table = capsys.readouterr().out
    assert "| upq |" in table and "| sp |" in table and "| uncompressed fp32 |" in table
    records = json.loads((tmp_path / "b.json").read_text())
    assert [r["name"] for r in records] == ["uncompressed fp32", "upq", "sp"]
    for r in records:
        assert set(r) >= {"plan", "size_bytes", "ideal_speedup", "measured_speedup"} and "1x8" in r["measured_speedup"]
    assert records[1]["ideal_speedup"] == 4.0 and records[1]["size_bytes"] < records[0]["size_bytes"]


def test_cli_compress_bad_plan(tmp_path, tiny_model_dir, capsys):
    assert main(["compress", tiny_model_dir, "--plan", "Q+XX", "-o", str(tmp_path / "x")]) == 2
    assert "unknown preset 'XX'" in capsys.readouterr().err


@pytest.mark.parametrize("name,n_train,n_test,n_labels,text_b", [
    ("boolq", 2270 + 64, 1000, 2, True), ("wic", 5428, 638, 2, True), ("mrpc", 3668, 408, 2, True),
    ("qqp", 8999, 1000, 2, True), ("mnli", 8999, 1000, 3, True), ("qnli", 8999, 1000, 2, True),
    ("sst2", 67349, 872, 2, False), ("rte", 2490, 277, 2, True), ("cb", 250, 56, 3, True),
    ("copa", 400, 100, 2, False),
])
def test_real_task_loaders(name, n_train, n_test, n_labels, text_b):
    from pathlib import Path

    root = Path("../shared/data")
    if not root.is_dir():
        pytest.skip("../shared/data not present")
    d = load_task(TaskConfig(name=name, data_dir=str(root), val_size=100))
    assert len(d.train) + len(d.val) == n_train and len(d.test) == n_test
    assert d.spec.num_labels == n_labels
    labels = {e.label for e in d.test}
    assert labels == set(range(n_labels))  # every class occurs, ids are 0..C-1
    assert all((e.text_b is not None) == text_b for e in d.test[:20])
    train_texts = {(e.text_a, e.text_b) for e in d.train + d.val}
    overlap = sum((e.text_a, e.text_b) in train_texts for e in d.test)
    assert overlap <= 0.01 * n_test, f"{overlap} test examples also in train"


def test_mrpc_reports_f1():
    from cpet.tasks import TASKS, evaluate_predictions, glue  # noqa: F401  (importing registers the tasks)

    m = evaluate_predictions(TASKS["mrpc"], [1, 1, 0, 0], [1, 0, 0, 1])
    assert m == {"accuracy": 0.5, "f1": 0.5}
