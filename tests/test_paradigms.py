"""The ablation paradigms (paper Table 3): each on/off combination of inheritance, recovery and
distillation trains what its name says, on a tiny BERT."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from cpet.config import PARADIGM_SPECS, load_config
from cpet.errors import CpetError
from cpet.experiments import run_experiment

ALL = ["base_pet", *[p for p in PARADIGM_SPECS if p != "base_pet" and not PARADIGM_SPECS[p].small]]


def test_every_ablation_starts_and_trains_as_its_name_says(tmp_path, data_dir, tiny_model_dir, monkeypatch):
    """base+PET trains for real; then every CLM paradigm is assembled with the trainer replaced by one that
    keeps the starting point, so the saved modules show what each paradigm starts from."""
    import cpet.experiments
    from cpet.train import TrainResult

    args = [f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2", f"task.data_dir={data_dir}",
            "task.val_size=16", "task.max_test=8", "train.epochs=1", "train.batch_size=32", "recovery.r=4",
            "recovery.init=fit",
            f"output_dir={tmp_path / 'o'}"]
    run_experiment(load_config(None, [*args, "paradigms=[base_pet]"]), log=lambda s: None)
    seen = {}

    def start_only(model, *a, teacher=None, distill=None, **k):
        seen[k["out_dir"].name] = teacher is not None and distill is not None
        return TrainResult({"accuracy": 0.5}, 0)

    monkeypatch.setattr(cpet.experiments, "train", start_only)
    records = {r["paradigm"]: r for r in run_experiment(
        load_config(None, [*args, f"paradigms=[{', '.join(ALL)}]"]), log=lambda s: None)}
    assert set(records) == set(ALL)
    assert len({r["fingerprint"] for r in records.values()}) == len(ALL)
    teacher = load_file(str(tmp_path / "o" / "base_pet" / "task" / "task_modules.safetensors"))
    b_key = next(k for k in teacher if k.endswith("lora.B"))
    assert teacher[b_key].abs().sum() > 0
    for name, spec in PARADIGM_SPECS.items():
        if name == "base_pet" or spec.small:  # (small_pet: its own test below)
            continue
        saved = load_file(str(tmp_path / "o" / name / "task" / "task_modules.safetensors"))
        assert any(".recovery." in k for k in saved) == spec.recover, name
        if b_key in saved and saved[b_key].shape == teacher[b_key].shape:  # (Table 4's may resize or drop LoRA)
            assert bool((saved[b_key] - teacher[b_key]).abs().max() < 1e-7) == spec.inherit, name
        assert seen.get(name, False) == spec.distill and (name in seen) == spec.trains, name
        result = json.loads((tmp_path / "o" / name / "result.json").read_text())
        assert ("distill" in result["config"]) == spec.distill and ("recovery" in result["config"]) == spec.recover


def test_paradigms_needing_a_teacher_need_base_pet():
    with pytest.raises(CpetError, match="clm_inherit inherits from or distils base_pet"):
        load_config(None, ["paradigms=[clm_pet, clm_inherit]"])
    load_config(None, ["paradigms=[clm_pet, clm_recover]"])  # no teacher needed


def test_clm_lr_trains_the_compressed_paradigms_and_leaves_the_teacher_shared(tmp_path, data_dir, tiny_model_dir,
                                                                              monkeypatch):
    import cpet.experiments
    from cpet.train import TrainResult

    lrs = {}

    def record_lr(model, tok, spec, tr, va, cfg, *a, recovery_lr=None, **k):
        lrs[k["out_dir"].name] = (cfg.lr, recovery_lr)
        return TrainResult({"accuracy": 0.5}, 0)

    monkeypatch.setattr(cpet.experiments, "train", record_lr)
    args = [f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2", f"task.data_dir={data_dir}",
            "task.val_size=16", "task.max_test=8", "train.epochs=1", "recovery.r=4", "train.lr=0.01",
            "paradigms=[base_pet, clm_pet, clm_cpet, clm_inherit_zero, clm_rec_rec]", f"output_dir={tmp_path / 'a'}"]
    plain = {r["paradigm"]: r["fingerprint"] for r in run_experiment(load_config(None, args), log=lambda s: None)}
    assert lrs == {"base_pet": (0.01, None), "clm_pet": (0.01, None), "clm_cpet": (0.01, None),
                   "clm_rec_rec": (0.01, None)}
    swept = {r["paradigm"]: r["fingerprint"] for r in run_experiment(load_config(None, [
        *args, "train.clm_lr=0.002", "recovery.lr=0.03", f"output_dir={tmp_path / 'b'}"]), log=lambda s: None)}
    assert lrs == {"base_pet": (0.01, None), "clm_pet": (0.002, None), "clm_cpet": (0.002, 0.03),
                   "clm_rec_rec": (0.002, 0.03)}
    assert swept["base_pet"] == plain["base_pet"]  # one teacher for every clm_lr
    assert swept["clm_pet"] != plain["clm_pet"] and swept["clm_cpet"] != plain["clm_cpet"]
    assert swept["clm_inherit_zero"] == plain["clm_inherit_zero"]  # no training: clm_lr plays no part


def test_table4_sets_take_cpets_task_parameters_and_spend_them_as_named(tmp_path, data_dir, tiny_model_dir):
    """LoRA+LoRA, Large LoRA, Rec+Rec and Large Rec train fresh modules (task loss only) of CLM+CPET's
    size (to the rounding of one rank), built as their names say; under structured pruning too."""
    from cpet.compress import load_compressed
    from cpet.task_modules import load_task_modules, read_task_folder

    table4 = ["clm_lora_lora", "clm_large_lora", "clm_rec_rec", "clm_large_rec"]
    for plan in ("UP+Q", "SP+Q"):
        out = tmp_path / plan
        records = {r["paradigm"]: r for r in run_experiment(load_config(None, [
            f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2", f"task.data_dir={data_dir}",
            "task.val_size=16", "task.max_test=8", "train.epochs=1", "recovery.r=4", f"compress={plan}",
            f"paradigms=[base_pet, clm_pet, clm_cpet, {', '.join(table4)}]", f"output_dir={out}"]),
            log=lambda s: None)}
        cpet = records["clm_cpet"]["trainable_params"]
        head = records["clm_pet"]["trainable_params"] - sum(
            v.numel() for k, v in read_task_folder(out / "clm_pet" / "task")[1].items() if ".lora." in k)
        for name in table4:
            desc, state = read_task_folder(out / name / "task")
            widths = {}  # per unit of rank: sum of (in + out) of the layers carrying each kind
            for k, v in state.items():
                if k.endswith((".lora.A", ".recovery.D")):
                    widths.setdefault(k.split(".")[-2], 0)
                    widths[k.split(".")[-2]] += v.shape[1]
                elif k.endswith((".lora.B", ".recovery.U")):
                    widths.setdefault(k.split(".")[-2], 0)
                    widths[k.split(".")[-2]] += v.shape[0]
            slack = max(widths.values())  # one rank more or less
            assert abs(records[name]["trainable_params"] - cpet) <= slack, (plan, name)
            assert records[name]["trainable_params"] > records["clm_pet"]["trainable_params"]
            assert ("lora" in desc) == (name in ("clm_lora_lora", "clm_large_lora")), name
            assert ("recovery" in desc) == (name != "clm_large_lora"), name
            cfg = records[name]["config"]
            assert "distill" not in cfg and (cfg.get("recovery") or {}).get("init", "zero") == "zero"
            if name == "clm_lora_lora":
                assert desc["recovery"]["activation"] == "identity" and desc["lora"]["r"] == 8
            if name == "clm_large_lora":
                assert desc["lora"]["r"] > 8 and desc["lora"]["alpha"] / desc["lora"]["r"] == 2.0
            if name == "clm_large_rec":
                assert len(desc["recovery"]["modules"]) == len(read_task_folder(out / "clm_pet" / "task")[0]["lora"]["modules"])
            assert head > 0
            # a saved variant loads back like any task, on the backbone it was trained on
            load_task_modules(load_compressed(out / "backbone_compressed")[0], out / name / "task")


def test_small_pet_tunes_the_smaller_sibling_and_reports_beside_base_pet(tmp_path, data_dir, tiny_model_dir, tokenizer):
    """small+PET (the paper's T5-base + PET row): PET on model.small, uncompressed, with its own tokenizer;
    its task folder names that backbone; the report lists it beside base+PET; without model.small it is
    refused before anything runs."""
    from transformers import BertConfig, BertModel

    from cpet.cli import main
    from cpet.task_modules import load_task_modules, read_task_folder
    from cpet.models import load_backbone

    small = tmp_path / "smaller"
    BertModel(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=128)).save_pretrained(small)
    tokenizer.save_pretrained(small)
    with pytest.raises(CpetError, match="set model.small"):
        load_config(None, ["paradigms=[base_pet, small_pet]"])
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"base:\n  model: {{name: {tiny_model_dir}, small: {small}, max_length: 32}}\n"
                    f"  task: {{name: sst2, data_dir: {data_dir}, val_size: 16, max_test: 16}}\n"
                    "  train: {epochs: 1, batch_size: 16}\n  recovery: {r: 4}\n  compress: Q\n"
                    f"axes:\n  paradigms: [[base_pet, small_pet, clm_pet]]\noutput_dir: {tmp_path / 'g'}\n")
    assert main(["grid", str(grid)]) == 0
    (folder,) = (tmp_path / "g" / "paradigms").glob("small_pet-*")
    result = json.loads((folder / "result.json").read_text())
    (base,) = (tmp_path / "g" / "paradigms").glob("base_pet-*")
    assert result["plan"] == [] and result["trainable_params"] < json.loads((base / "result.json").read_text())[
        "trainable_params"]
    desc, _ = read_task_folder(folder / "task")
    assert desc["backbone"]["path"] == str(small) and desc["backbone"]["plan"] == []
    load_task_modules(load_backbone(str(small))[0], folder / "task")
    assert main(["report", str(tmp_path / "g")]) == 0
    md = (tmp_path / "g" / "results.md").read_text()
    assert "| — | base+PET |" in md and "| — | small+PET |" in md and "| Q | CLM+PET |" in md


def test_a_teacher_whose_task_modules_are_gone_is_trained_again_only_when_needed(tmp_path, data_dir, tiny_model_dir):
    """A store kept without its task folders (a git checkout keeps result.json only): paradigms that do not
    learn from base+PET run without it; one that inherits trains the teacher again, with the same result."""
    args = [f"model.name={tiny_model_dir}", "model.max_length=32", "task.name=sst2", f"task.data_dir={data_dir}",
            "task.val_size=16", "task.max_test=8", "train.epochs=1", "recovery.r=4", "train.lr=0.01",
            f"output_dir={tmp_path / 'o'}"]
    run_experiment(load_config(None, [*args, "paradigms=[base_pet, clm_pet]"]), log=lambda s: None)
    first = {p: json.loads((tmp_path / "o" / p / "result.json").read_text()) for p in ("base_pet", "clm_pet")}
    tdir = tmp_path / "o" / "base_pet" / "task"
    shutil.rmtree(tdir)
    again = {r["paradigm"]: r for r in run_experiment(load_config(None, [*args, "paradigms=[base_pet, clm_pet]"]),
                                                       log=lambda s: None)}
    assert again == first and not tdir.exists()  # nothing needed the teacher: nothing trained again
    lines = []
    records = {r["paradigm"]: r for r in run_experiment(
        load_config(None, [*args, "paradigms=[base_pet, clm_pet, clm_cpet]"]), log=lines.append)}
    assert any("task modules" in s and "missing" in s and "training it again" in s for s in lines)
    assert (tdir / "task_modules.safetensors").is_file() and "clm_cpet" in records
    redo = records["base_pet"]["retrained"]
    assert redo["previous_test"] == first["base_pet"]["test"] and redo["same_test"], redo
    assert records["base_pet"]["fingerprint"] == first["base_pet"]["fingerprint"]
    assert records["clm_pet"] == first["clm_pet"]
