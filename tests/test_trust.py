"""What cpet promises, as a table of bad inputs: each case runs the real CLI and asserts the exit code,
that the one-line message names the problem, and that no file the user had changed.

Classes: config types and ranges; stale folders (another config in the output folder); changed-config
resume (an interrupted run continued with another config); corrupt files; wrong backbone; writes into
the source model. Batch independence has its own file (test_batch_invariance.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from cpet.cli import main


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def refused(args: list[str], capsys, watch: Path, *needles: str) -> str:
    """The CLI exits 2 with one line naming every needle, and nothing under ``watch`` changed."""
    before = snapshot(watch)
    code, err = run_cli(args, capsys)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("cpet: error: ")]
    assert "Traceback" not in err and len(errors) == 1, err  # one line (progress bars may precede it)
    for n in needles:
        assert n in errors[0], f"{n!r} not in {errors[0]!r}"
    assert snapshot(watch) == before, "a refused command changed files"
    return err


@pytest.fixture
def tiny_run(tmp_path, data_dir, tiny_model_dir):
    """Arguments of a small real run (tiny BERT, SST-2 sample, 1 epoch) into tmp_path / run."""
    def args(*overrides: str) -> list[str]:
        return ["run", "-", f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2",
                f"task.data_dir={data_dir}", "task.val_size=16", "train.epochs=1", "train.batch_size=16",
                "recovery.r=4", *overrides, "-o", str(tmp_path / "run")]
    return args


# ---------------------------------------------------------------- config types and ranges
@pytest.mark.parametrize("override,needles", [
    ("train.lr=fast", ["train.lr='fast'", "expected a number"]),
    ("train.lr=-1e-3", ["train.lr=-0.001", "> 0"]),
    ("train.lr=0", ["train.lr=0.0", "> 0"]),
    ("lora.dropout=1.5", ["lora.dropout=1.5", "[0, 1)"]),
    ("recovery.r=0", ["recovery.r=0", ">= 1"]),
    ("task.max_test=0", ["task.max_test=0", ">= 1"]),
    ("task.max_train=-1", ["task.max_train=-1", ">= 1"]),
    ("train.epochs=1.5", ["train.epochs=1.5", "integer"]),
    ("train.batch_size=true", ["train.batch_size=True", "integer"]),
    ("task.val_size=1.5", ["task.val_size=1.5", "fraction"]),
    ("distill.alpha=-0.1", ["distill.alpha=-0.1", ">= 0"]),
    ("compress=[{method: int8, smooth: 2}]", ["compress[0] (int8)", "int8.smooth=2.0"]),
    ("compress=[{method: unstructured, sparsity: lots}]", ["unstructured.sparsity='lots'", "expected a number"]),
    ("lora.targets=[q, z]", ["lora.targets", "'z'"]),
])
def test_bad_config_value_is_refused_before_anything_runs(override, needles, tiny_run, tmp_path, capsys):
    refused(tiny_run(override), capsys, tmp_path, *needles)
    assert not (tmp_path / "run").exists(), "an invalid config created the output folder"


def test_yaml_1_1_numbers_arrive_as_numbers(tmp_path):
    """YAML 1.1 reads 5e-4 as text; the typed config makes it a float (file and override alike)."""
    from cpet.config import load_config

    p = tmp_path / "e.yaml"
    p.write_text("train: {lr: 1e-3, weight_decay: 1e-2}\ntask: {max_train: 1e3}\n")
    cfg = load_config(p, ["distill.alpha=5e-2"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float) and cfg.train.weight_decay == 0.01
    assert cfg.task.max_train == 1000 and isinstance(cfg.task.max_train, int) and cfg.distill.alpha == 0.05
    assert load_config(None, ["lora.targets=q"]).lora.targets == ("q",)


# ---------------------------------------------------------------- stale folders and changed-config resume
@pytest.mark.parametrize("override,needle", [
    ("train.lr=0.01", "train.lr: 0.0005 -> 0.01"),
    ("task.name=rte", "task.name: 'sst2' -> 'rte'"),
    ("task.max_train=20", "task.max_train: None -> 20"),
    ("compress=[{method: unstructured, sparsity: 0.5}]", "compressed"),
    ("lora.r=4", "lora.r: 8 -> 4"),
    ("train.group_by_length=true", "train.group_by_length"),
])
def test_rerun_with_another_config_is_refused_then_fresh_reruns(override, needle, tiny_run, tmp_path, capsys):
    assert run_cli(tiny_run(), capsys)[0] == 0
    first = json.loads((tmp_path / "run" / "clm_pet" / "result.json").read_text())
    refused(tiny_run(override), capsys, tmp_path, needle, "--fresh", "-o DIR")
    code, _ = run_cli(tiny_run(override, "--fresh"), capsys)
    assert code == 0
    again = json.loads((tmp_path / "run" / "clm_pet" / "result.json").read_text())
    assert again["fingerprint"] != first["fingerprint"]
    code, _ = run_cli(tiny_run(override), capsys)  # the same config again: continues (all done)
    assert code == 0 and json.loads((tmp_path / "run" / "clm_pet" / "result.json").read_text()) == again


def test_same_config_continues_and_output_only_keys_do_not_count(tiny_run, tmp_path, capsys):
    assert run_cli(tiny_run("paradigms=[base_pet]"), capsys)[0] == 0
    base = (tmp_path / "run" / "base_pet" / "result.json").read_bytes()
    # group_by_length=false is how every run before the key existed trained: the same fingerprint
    assert run_cli(tiny_run("train.eval_batch_size=7", "train.checkpoint_every=3", "train.group_by_length=false"),
                   capsys)[0] == 0
    assert (tmp_path / "run" / "base_pet" / "result.json").read_bytes() == base  # reused, not retrained


def test_interrupted_run_resumed_with_another_config_is_refused(tiny_run, tmp_path, capsys, monkeypatch):
    """A kill after training (checkpoint on disk, no result) then a rerun with another lr: refused, the
    checkpoint is kept; the original config resumes it."""
    import cpet.experiments

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cpet.experiments, "evaluate", killed)
    assert run_cli(tiny_run("paradigms=[base_pet]"), capsys)[0] == 130
    ckpt = tmp_path / "run" / "base_pet" / "checkpoint"
    assert (ckpt / "state.safetensors").is_file() and not (tmp_path / "run" / "base_pet" / "result.json").exists()
    monkeypatch.undo()
    refused(tiny_run("paradigms=[base_pet]", "train.lr=0.002"), capsys, tmp_path, "train.lr: 0.0005 -> 0.002")
    assert run_cli(tiny_run("paradigms=[base_pet]"), capsys)[0] == 0


def test_checkpoint_of_another_config_is_refused_by_the_trainer(tmp_path, data_dir, tokenizer):
    """The trainer's own guard (library users calling train directly with an old out_dir)."""
    from conftest import tiny_bert
    from cpet.config import LoraConfig, TaskConfig, TrainConfig
    from cpet.errors import CpetError
    from cpet.task_modules import build_task_model
    from cpet.tasks import load_task
    from cpet.train import train

    data = load_task(TaskConfig(name="sst2", data_dir=str(data_dir), val_size=16))
    cfg = TrainConfig(epochs=1, batch_size=16)
    model = build_task_model(tiny_bert(), 2, lora=LoraConfig())
    train(model, tokenizer, data.spec, data.train, data.val, cfg, 32, out_dir=tmp_path, log=lambda s: None,
          fingerprint="aaaa")
    with pytest.raises(CpetError, match="another config"):
        train(model, tokenizer, data.spec, data.train, data.val, cfg, 32, out_dir=tmp_path, log=lambda s: None,
              fingerprint="bbbb")


# ---------------------------------------------------------------- corrupt files
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])


def _bad_label(data_dir: Path) -> None:
    f = data_dir / "glue" / "SST-2" / "train.tsv"
    lines = f.read_text().splitlines()
    lines[5] = "a fine film \t7"
    f.write_text("\n".join(lines) + "\n")


def _bad_json_line(data_dir: Path) -> None:
    f = data_dir / "superglue" / "RTE" / "train.jsonl"
    lines = f.read_text().splitlines()
    lines[3] = lines[3][:20]
    f.write_text("\n".join(lines) + "\n")


def _unknown_label(data_dir: Path) -> None:
    f = data_dir / "superglue" / "RTE" / "val.jsonl"
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    rows[2]["label"] = "maybe"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("damage,task,needles", [
    (_bad_label, "sst2", ["SST-2/train.tsv, line 6", "label 7 is outside the label set"]),
    (_bad_json_line, "rte", ["RTE/train.jsonl, line 4", "not valid JSON"]),
    (_unknown_label, "rte", ["RTE/val.jsonl, line 3", "'maybe'"]),
])
def test_bad_data_file_names_file_and_line(damage, task, needles, tiny_run, tmp_path, data_dir, capsys):
    damage(data_dir)
    refused(tiny_run(f"task.name={task}"), capsys, tmp_path, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("victim,needles", [
    ("base_pet/result.json", ["base_pet/result.json", "corrupt or truncated", "--fresh"]),
    ("base_pet/task/task_modules.safetensors", ["task_modules.safetensors", "corrupt or truncated"]),
    ("base_pet/task/task_config.json", ["task_config.json", "corrupt or truncated"]),
    ("backbone_compressed/compression.json", ["compression.json", "corrupt or truncated"]),
    ("backbone_compressed/model.safetensors", ["model.safetensors", "corrupt or truncated", "cpet compress"]),
    ("clm_pet/fingerprint.json", ["fingerprint.json", "corrupt or truncated"]),
])
def test_corrupt_result_files_name_the_file_and_the_fix(victim, needles, tiny_run, tmp_path, capsys):
    assert run_cli(tiny_run("paradigms=[base_pet, clm_pet]"), capsys)[0] == 0
    if victim.startswith("clm_pet/"):
        (tmp_path / "run" / "clm_pet" / "result.json").unlink()  # clm_pet must load its backbone again
    if victim.startswith("backbone_compressed/"):
        shutil.rmtree(tmp_path / "run" / "clm_pet")
    _truncate(tmp_path / "run" / victim)
    refused(tiny_run("paradigms=[base_pet, clm_pet, clm_cpet]"), capsys, tmp_path, *needles)


def test_unfinished_compressed_save_is_redone(tiny_run, tmp_path, capsys):
    """A crash between the weights and compression.json (written last) leaves a folder cpet recognises as
    its own and unfinished: the next run compresses again instead of refusing or loading it."""
    assert run_cli(tiny_run("paradigms=[clm_pet]"), capsys)[0] == 0
    (tmp_path / "run" / "backbone_compressed" / "compression.json").unlink()
    shutil.rmtree(tmp_path / "run" / "clm_pet")
    code, _ = run_cli(tiny_run("paradigms=[clm_pet]"), capsys)
    assert code == 0 and (tmp_path / "run" / "backbone_compressed" / "compression.json").is_file()


def test_corrupt_checkpoint_says_which_folder_to_delete(tiny_run, tmp_path, capsys, monkeypatch):
    import cpet.experiments

    monkeypatch.setattr(cpet.experiments, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run_cli(tiny_run("paradigms=[base_pet]"), capsys)[0] == 130
    monkeypatch.undo()
    _truncate(tmp_path / "run" / "base_pet" / "checkpoint" / "state.safetensors")
    refused(tiny_run("paradigms=[base_pet]"), capsys, tmp_path, "state.safetensors", "delete", "checkpoint")


# ---------------------------------------------------------------- wrong backbone
def test_compressed_folder_as_model_name_is_refused(tmp_path, tiny_model_dir, tiny_run, capsys):
    assert run_cli(["compress", tiny_model_dir, "--plan", "Q", "-o", tmp_path / "q"], capsys)[0] == 0
    refused(tiny_run(f"model.name={tmp_path / 'q'}"), capsys, tmp_path, "compressed backbone", "load_compressed")


def test_backbone_with_missing_weights_is_refused(tmp_path, tiny_model_dir, tiny_run, capsys):
    """A checkpoint lacking a layer's weights would load with that layer random (HF only warns)."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["encoder.layer.0.attention.self.query.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    refused(tiny_run(f"model.name={broken}"), capsys, tmp_path, "missing", "attention.self.query.weight")


def test_mmlu_on_an_encoder_is_refused(tmp_path, tiny_model_dir, data_dir, capsys):
    refused(["mmlu", tiny_model_dir, "--data-dir", data_dir], capsys, tmp_path, "causal LM", "bert")


def test_task_folder_on_another_backbone_is_refused(tmp_path, tiny_run, capsys):
    from conftest import tiny_bert
    from transformers import BertConfig, BertModel

    from cpet.errors import CpetError
    from cpet.task_modules import load_task_modules

    assert run_cli(tiny_run("paradigms=[base_pet]"), capsys)[0] == 0
    other = BertModel(BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64))
    with pytest.raises(CpetError, match="has shape .* but the model expects"):
        load_task_modules(other, tmp_path / "run" / "base_pet" / "task")
    load_task_modules(tiny_bert(), tmp_path / "run" / "base_pet" / "task")  # the right shape loads


# ---------------------------------------------------------------- writes into the source model
@pytest.mark.parametrize("where", ["source", "inside", "file", "foreign"])
def test_compress_never_overwrites_the_source_or_foreign_files(where, tmp_path, tiny_model_dir, capsys):
    src = Path(tiny_model_dir)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.bin").write_bytes(b"precious")
    out = {"source": src, "inside": src / "compressed", "file": tmp_path / "notes.txt",
           "foreign": tmp_path / "foreign"}[where]
    needle = {"source": "source model", "inside": "source model", "file": "is a file", "foreign": "not empty"}[where]
    refused(["compress", src, "--plan", "Q", "-o", out], capsys, tmp_path, needle)


def test_recompressing_a_cpet_folder_replaces_it_completely(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "c"
    assert run_cli(["compress", tiny_model_dir, "--plan", "Q", "-o", out], capsys)[0] == 0
    assert run_cli(["compress", tiny_model_dir, "--plan", "UP", "-o", out], capsys)[0] == 0
    meta = json.loads((out / "compression.json").read_text())
    assert [s["method"] for s in meta["plan"]] == ["unstructured"] and meta["fingerprint"]["hash"]


def test_output_path_that_is_a_file_is_refused(tmp_path, tiny_run, capsys):
    (tmp_path / "run").write_text("not a folder")
    refused(tiny_run(), capsys, tmp_path, "is a file")


def test_eval_metrics_do_not_depend_on_the_eval_batch_size(tmp_path, data_dir, tokenizer):
    """On an int8 + pruned backbone, the test metrics are the same at eval batch 1, 5 and 64."""
    from conftest import tiny_bert
    from cpet.compress import compress
    from cpet.config import LoraConfig, TaskConfig
    from cpet.task_modules import build_task_model
    from cpet.tasks import load_task
    from cpet.train import evaluate

    data = load_task(TaskConfig(name="sst2", data_dir=str(data_dir), val_size=16))
    torch.manual_seed(0)
    model = build_task_model(compress(tiny_bert(), "UP+Q"), 2, lora=LoraConfig())
    torch.nn.init.normal_(model.head.out.weight, std=2.0)  # a head whose decisions are not all one class
    model.eval()
    with torch.no_grad():
        scores = [evaluate(model, tokenizer, data.spec, data.train, 32, bs) for bs in (1, 5, 64)]
    assert scores[0] == scores[1] == scores[2]
