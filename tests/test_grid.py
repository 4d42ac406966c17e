"""cpet grid / cpet report on a tiny BERT: shared work done once, resumable, failures recorded, tables."""

import csv
import json
from pathlib import Path

import pytest

from cpet.cli import main
from cpet.errors import CpetError
from cpet.grid import load_grid
from cpet.report import plan_name


def _grid_file(tmp_path, data_dir, tiny_model_dir, axes: str) -> str:
    p = tmp_path / "grid.yaml"
    p.write_text(f"base:\n  model: {{name: {tiny_model_dir}, max_length: 32}}\n"
                 f"  task: {{data_dir: {data_dir}, val_size: 16, max_test: 16}}\n"
                 "  train: {epochs: 1, batch_size: 16}\n  recovery: {r: 4}\n"
                 f"axes:\n{axes}output_dir: {tmp_path / 'g'}\n")
    return str(p)


AXES = "  task.name: [sst2, rte]\n  compress: [Q, UP]\n  train.seed: [1, 2]\n"


def test_grid_shares_work_resumes_and_reports(tmp_path, data_dir, tiny_model_dir, capsys):
    g = _grid_file(tmp_path, data_dir, tiny_model_dir, AXES)
    assert main(["grid", g, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 cells, 0 done, 8 to run" in out and "compress=UP" in out and "ETA ~" in out and "\n...\n" not in out
    assert not (tmp_path / "g").exists()  # a dry run writes nothing

    assert main(["grid", g]) == 0
    root = tmp_path / "g"
    cells = [json.loads(f.read_text()) for f in (root / "cells").glob("*.json")]
    assert len(cells) == 8 and all(c["status"] == "done" for c in cells)
    folders = sorted(p.name.split("-")[0] for p in (root / "paradigms").iterdir())
    # one teacher per (task, seed), not per plan; one CLM run per cell and paradigm
    assert folders.count("base_pet") == 4 and folders.count("clm_pet") == 8 and folders.count("clm_cpet") == 8
    assert len(list((root / "backbones").iterdir())) == 2  # one compressed backbone per plan
    capsys.readouterr()

    assert main(["grid", g]) == 0  # a rerun runs nothing
    assert "8 already recorded" in capsys.readouterr().out

    assert main(["report", str(root)]) == 0
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert {r["plan"] for r in rows} == {"none", "Q", "UP"}
    acc = [r for r in rows if r["metric"] == "accuracy"]
    assert len(acc) == 4 + 8 + 8 and {r["seed"] for r in acc} == {"1", "2"}
    md = (root / "results.md").read_text()
    assert "| Q | CLM+CPET |" in md and "± " in md and "recovered" in md and "CPET > PET" in md
    assert "| — | trivial (majority class; SQuAD: first words) |" in md  # beside base+PET, from the runs' data
    bench = Path(__file__).resolve().parent.parent / "bench" / "results" / "compress_minilm.json"
    assert main(["report", str(root), "--bench", str(bench), "-o", str(tmp_path / "with_bench")]) == 0
    table = (tmp_path / "with_bench" / "results.md").read_text()
    q_row = next(line for line in table.splitlines() if line.startswith("| Q |") and "%" not in line
                 and "x |" in line)
    assert "26.5" in q_row and q_row.count("x |") == 3  # size and a speedup per benchmarked shape
    pytest.importorskip("matplotlib")
    assert sorted(p.name for p in root.glob("plot_*.png")) == ["plot_Q.png", "plot_UP.png"]
    assert "![plot_Q](plot_Q.png)" in md


def test_report_refuses_two_runs_for_one_entry_and_reports_one_grids_cells(tmp_path, data_dir, tiny_model_dir,
                                                                          capsys):
    """A grid rerun after its base changed (here the recovery recipe) leaves the old cells beside the new:
    the report stops rather than show one of two CLM+CPET runs for one entry; --grid reports the grid's
    current cells."""
    axes = "  task.name: [sst2]\n  compress: [UP]\n  paradigms: [[base_pet, clm_cpet]]\n"
    g = _grid_file(tmp_path, data_dir, tiny_model_dir, axes)
    assert main(["grid", g]) == 0
    text = Path(g).read_text().replace("recovery: {r: 4}", "recovery: {r: 4, init: fit, lr: 0}")
    Path(g).write_text(text)
    assert main(["grid", g]) == 0
    out = capsys.readouterr().out
    assert "already done" in out  # the teacher is shared: only CLM+CPET ran again
    root = tmp_path / "g"
    assert main(["report", str(root)]) != 0
    err = capsys.readouterr()
    assert "two different clm_cpet runs" in err.out + err.err and "recovery.init: '" in err.err
    assert main(["report", str(root), "--grid", g]) == 0
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert sorted({r["paradigm"] for r in rows if r["metric"] == "accuracy"}) == ["base_pet", "clm_cpet"]
    assert len([r for r in rows if r["metric"] == "accuracy"]) == 2


def test_failed_cell_is_recorded_and_the_rest_go_on(tmp_path, data_dir, tiny_model_dir, capsys):
    g = _grid_file(tmp_path, data_dir, tiny_model_dir, "  task.name: [cb, sst2]\n  paradigms: [[base_pet]]\n")
    assert main(["grid", g]) == 1  # cb's data is not in the tiny data folder
    cells = {json.loads(f.read_text())["labels"]["task.name"]: json.loads(f.read_text())
             for f in (tmp_path / "g" / "cells").glob("*.json")}
    assert cells["cb"]["status"] == "failed" and "data file missing" in cells["cb"]["error"]
    assert cells["sst2"]["status"] == "done"
    capsys.readouterr()
    assert main(["grid", g]) == 1 and "1 cells failed" in capsys.readouterr().out  # not retried by default


def test_grid_validates_every_cell_before_running(tmp_path, data_dir, tiny_model_dir):
    g = _grid_file(tmp_path, data_dir, tiny_model_dir, "  train.lr: [0.001, -1]\n")
    with pytest.raises(CpetError, match="train.lr=-1.0"):
        load_grid(g)
    with pytest.raises(CpetError, match="axes must map"):
        load_grid(_grid_file(tmp_path, data_dir, tiny_model_dir, "  train.lr: 0.001\n"))


def test_plan_names():
    from cpet.compress import plan_to_json

    assert plan_name(plan_to_json("Q+UP+M")) == "Q+UP+M"
    assert plan_name(plan_to_json([{"method": "unstructured", "sparsity": 0.7}, {"method": "int8"}])) \
        == "unstructured(sparsity=0.7)+int8"
    assert plan_name([]) == "none"
    forced = [{"method": "int8"}, {"method": "unstructured", "pattern": "2:4"},
              {"method": "moefication", "experts": 16, "top": 0.25, "min_speedup": 0}]
    assert plan_name(plan_to_json(forced)) == "Q+UP+M(min_speedup=0.0)"


def test_curves_and_zero_data_point(tmp_path, data_dir, tiny_model_dir, capsys):
    """train.eval_every records validation from step 0 on; the zero-data paradigm trains nothing; the
    report draws the curves."""
    g = _grid_file(tmp_path, data_dir, tiny_model_dir,
                   "  task.name: [sst2]\n  train.eval_every: [1]\n"
                   "  paradigms: [[base_pet, clm_pet, clm_inherit_zero, clm_cpet]]\n")
    assert main(["grid", g]) == 0
    from cpet.grid import results_of

    results = {r["paradigm"]: r for r in results_of(tmp_path / "g")}
    steps = [pt["step"] for pt in results["clm_cpet"]["curve"]]
    assert steps == list(range(results["clm_cpet"]["steps"] + 1))  # step 0, then every step
    zero = results["clm_inherit_zero"]
    assert zero["steps"] == 0 and zero["curve"] == [] and zero["history"] == []
    assert main(["report", str(tmp_path / "g")]) == 0
    md = (tmp_path / "g" / "results.md").read_text()
    conv = md.split("## Convergence (Figure 3)")[1].split("\n\n![")[0]
    row = next(line for line in conv.splitlines() if line.startswith("| sst2 | Q | CLM+CPET |"))
    assert row.split(" | ")[3] == f"{100 * results['clm_cpet']['curve'][0]['val_accuracy']:.2f}"  # its step 0
    assert any(line.startswith("| sst2 | Q | CLM+I, no data |") for line in conv.splitlines())
    pytest.importorskip("matplotlib")
    assert (tmp_path / "g" / "curve_sst2_Q.png").is_file()


def test_convergence_table_reads_start_quarter_half_end_and_the_step_that_comes_within_a_point_of_best():
    from cpet.report import curve_table

    pts = [(0, 0.30), (8, 0.40), (16, 0.455), (24, 0.47), (32, 0.46)]
    table = curve_table({("mnli", "M"): {"metric": "accuracy", "curves": {"clm_pet": pts},
                                          "levels": {"clm_inherit_zero": 0.42}}})
    cells = next(line for line in table.splitlines() if "CLM+PET" in line).strip("| ").split(" | ")
    assert cells[3:] == ["30.00", "40.00 (8)", "45.50 (16)", "46.00 (32)", "47.00", "24"]
    zero = next(line for line in table.splitlines() if line.startswith("| mnli | M | CLM+I, no data")).strip("| ").split(" | ")
    assert zero[3] == zero[7] == "42.00" and zero[8] == "0"
    assert curve_table({}) == ""


def test_curves_show_the_chosen_runs_and_steps_are_timed_apart_from_validation(tmp_path, data_dir, tiny_model_dir):
    """With a searched learning rate the convergence curves average the runs validation chose, not every
    candidate (they mixed both rates of the search seed before); a run times its training steps apart from
    its validation passes (Table 5's s/step), and the report's cost table reads that."""
    from dataclasses import replace

    from cpet.grid import Cell, load_grid, prior_seconds, results_of
    from cpet.report import chosen_runs, curve_series, long_rows, select_on_validation

    g = _grid_file(tmp_path, data_dir, tiny_model_dir,
                   "  task.name: [sst2]\n  train.eval_every: [1]\n  train.clm_lr: [0.001, 0.05]\n"
                   "  paradigms: [[base_pet, clm_pet, clm_inherit_zero]]\n")
    assert main(["grid", g]) == 0
    results = results_of(tmp_path / "g")
    pets = [r for r in results if r["paradigm"] == "clm_pet"]
    assert len(pets) == 2 and pets[0]["curve"] != pets[1]["curve"]
    for r in pets:  # a validation pass after every step: the steps alone take a part of the training time
        assert 0 < r["step_seconds"] < r["train_seconds"]
    rows, _ = select_on_validation(long_rows(results), ("train.clm_lr",))
    chosen = chosen_runs(results, rows)
    picked = [r for r in chosen if r["paradigm"] == "clm_pet"]
    assert len(picked) == 1 and len(chosen) == len(results) - 1
    series = curve_series(chosen)[("sst2", "Q")]
    metric = series["metric"]
    assert series["curves"]["clm_pet"] == [(pt["step"], pt[f"val_{metric}"]) for pt in picked[0]["curve"]]
    assert set(series["levels"]) == {"clm_inherit_zero"}
    assert main(["report", str(tmp_path / "g")]) == 0
    md = (tmp_path / "g" / "results.md").read_text()
    assert "## Costs per paradigm (Table 5)" in md and "; cpu " in md
    cost_rows = [line for line in md.splitlines() if line.startswith("| Q | CLM+PET")]
    assert cost_rows and not any("*" in line for line in cost_rows)  # steps timed apart: no fallback mark
    assert any(line.startswith("| Q | CLM+I, no data") and "| - |" in line for line in md.splitlines())  # no steps
    # the dry run's estimate counts the curve's validation passes
    cell = load_grid(g).cells[0]
    flat = Cell(cell.values, replace(cell.config, train=replace(cell.config.train, eval_every=0)))
    assert prior_seconds(cell, set()) > prior_seconds(flat, set())


def test_hyper_parameters_are_chosen_on_validation_never_on_test():
    from cpet.report import depends_on, select_on_validation

    rows = []
    # lr 1e-3: better validation, worse test; lr 5e-3: the reverse. Two seeds each.
    for lr, val, test in (("0.001", (0.70, 0.72), (0.60, 0.61)), ("0.005", (0.65, 0.66), (0.80, 0.81))):
        for seed, v, t in zip((1, 2), val, test):
            base = {"task": "mnli", "plan": "Q", "paradigm": "clm_pet", "seed": seed,
                    "variant": f"recovery.init=fit, train.lr={lr}", "cell": "c", "fingerprint": "f"}
            rows += [{**base, "metric": "val_accuracy", "value": v}, {**base, "metric": "accuracy", "value": t}]
    chosen, table = select_on_validation(rows, ("train.lr",))
    assert {r["value"] for r in chosen if r["metric"] == "accuracy"} == {0.60, 0.61}
    assert all(r["variant"] == "recovery.init=fit" for r in chosen)
    assert "train.lr=0.001: 71.00; train.lr=0.005: 65.50 (on seeds 1, 2) | train.lr=0.001 | 60.50 ± 0.71 (2)" in table
    # a candidate with more seeds (the chosen one, run on the other seeds too) is compared on the seeds both have
    more = [{**r, "seed": 3, "value": 0.40} for r in rows if "train.lr=0.001" in r["variant"] and r["seed"] == 1]
    chosen, table = select_on_validation(rows + more, ("train.lr",))
    assert {r["seed"] for r in chosen} == {1, 2, 3} and "71.00; train.lr=0.005: 65.50 (on seeds 1, 2)" in table
    assert depends_on("clm_cpet", "recovery.init") and not depends_on("clm_pet", "recovery.init")
    assert not depends_on("base_pet", "compress") and not depends_on("clm_cpet", "paradigms")
    assert depends_on("base_pet", "train.lr") and depends_on("clm_distill", "distill.alpha")
    # a fresh PET trained on train.clm_lr does not depend on train.lr; one that inherits does (its teacher)
    cfg = {"train": {"lr": 0.005, "clm_lr": 0.001}}
    assert not depends_on("clm_pet", "train.lr", cfg) and depends_on("clm_cpet", "train.lr", cfg)
    assert depends_on("clm_pet", "train.lr", {"train": {"lr": 0.005, "clm_lr": None}})


def test_sections_show_shared_baselines_beside_each_variant():
    """clm_cpet in two recovery variants; base+PET and CLM+PET (which do not depend on recovery) appear
    in both sections, and the gap recovered is computed in each."""
    from cpet.report import tables

    rows = []
    def add(paradigm, plan, variant, acc):
        rows.extend({"task": "mnli", "plan": plan, "paradigm": paradigm, "seed": 1, "variant": variant, "cell": "c",
                     "fingerprint": "f", "metric": m, "value": acc} for m in ("accuracy", "val_accuracy"))
    add("base_pet", "none", "", 0.50)
    add("clm_pet", "Q", "", 0.40)
    add("clm_cpet", "Q", "recovery.init=fit", 0.48)
    add("clm_cpet", "Q", "recovery.init=zero", 0.42)
    text = tables(rows)
    assert "### recovery.init=fit" in text and "### recovery.init=zero" in text and "\n### \n" not in text
    assert "80% of 10.00" in text and "20% of 10.00" in text
    assert text.count("| — | base+PET | 50.00") == 2
    # the variants side by side, once: the shared baselines in each, the paired difference per variant
    across = text.split("## Across variants")[1].split("### ")[0]
    assert across.count("| base+PET |  | 50.00 |") == 2 and "| recovery.init=fit | Q | CLM+CPET |  | 48.00 |" in across
    assert "| recovery.init=fit | Q | CPET − PET |  | +8.00 (1) |" in across
    assert "| recovery.init=zero | Q | CPET − PET |  | +2.00 (1) |" in across
    assert text.count("Paired by seed: CLM+CPET") == 1  # the long explanation once, not per section
    add("clm_pet", "Q", "", 0.40)  # one variant: no summary
    assert "## Across variants" not in tables([r for r in rows if "zero" not in r["variant"]])
    bases = [{**r, "variant": v} for r in rows if r["paradigm"] == "base_pet" for v in ("lora.r=4", "lora.r=8")]
    assert "## Across variants" not in tables(bases)  # no compressed plan: nothing to set side by side


def test_tasks_where_base_pet_does_not_clear_the_bar_are_marked_and_averaged_apart():
    from cpet.report import tables

    rows = []
    def add(task, paradigm, plan, acc):
        rows.extend({"task": task, "plan": plan, "paradigm": paradigm, "seed": 1, "variant": "", "cell": "c",
                     "fingerprint": "f", "metric": m, "value": acc} for m in ("accuracy", "val_accuracy"))
    for task, base, pet, cpet in (("mnli", 0.50, 0.40, 0.48), ("wic", 0.53, 0.50, 0.54)):
        add(task, "base_pet", "none", base)
        add(task, "clm_pet", "Q", pet)
        add(task, "clm_cpet", "Q", cpet)
    text = tables(rows, {"mnli": 0.35, "wic": 0.50})  # wic: 3 points over trivial, under the 5-point bar
    assert "| wic † |" in text and "| mnli |" in text and "avg w/o †" in text
    assert "| Q | CLM+CPET | 48.00 (n=1) | 54.00 (n=1) | 51.00 | 48.00 |" in text  # both averages
    recovered = next(line for line in text.splitlines() if line.startswith("| Q |") and "%" in line)
    # the share of the summed gap: (8 + 4) / (10 + 3) with wic, 8 / 10 without; CPET above PET on both
    assert recovered.endswith("| 92% of 13.00 | 2/2 | 80% of 10.00 | 1/1 |")
    assert "†" not in tables(rows, {"mnli": 0.35, "wic": 0.40})  # both clear the bar: no marks, one average


def _paired_rows(spec):
    """(task, paradigm, plan, seed, accuracy) -> long rows (test = val)."""
    return [{"task": t, "plan": plan, "paradigm": par, "seed": seed, "variant": "", "cell": "c", "fingerprint": "f",
             "metric": m, "value": acc} for t, par, plan, seed, acc in spec for m in ("accuracy", "val_accuracy")]


def _recovered_line(text: str, plan: str = "Q") -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {plan} |") and "CLM" not in line)


def test_a_negative_or_tiny_gap_gets_no_share_and_cannot_swing_the_summed_one():
    """CLM+PET above base+PET (a negative gap) must not read as '62% recovered', nor cancel another task's
    gap into a tiny denominator ('836% of 0.37' in a committed report)."""
    from cpet.report import tables

    text = tables(_paired_rows([
        ("qnli", "base_pet", "none", 1, 0.721), ("qnli", "clm_pet", "Q", 1, 0.699), ("qnli", "clm_cpet", "Q", 1, 0.741),
        ("sst2", "base_pet", "none", 1, 0.8005), ("sst2", "clm_pet", "Q", 1, 0.8188), ("sst2", "clm_cpet", "Q", 1, 0.8073)]))
    line = _recovered_line(text)
    assert "+4.20 (n=1); 191% of 2.20" in line
    assert "-1.15 (n=1); gap -1.83 (< 1)" in line and "% of -1.83" not in line
    assert line.endswith("| 191% of 2.20 | 1/2 |")  # sst2's noise-level gap left out of the sum, counted in 1/2


def test_the_gap_is_read_on_the_seeds_the_pair_has():
    """base+PET on seeds 1-3, the compressed pair on seed 1 only: the gap is seed 1's (80 - 78 = 2), not
    base+PET's 3-seed mean against one PET seed (73.3 - 78 = -4.7)."""
    from cpet.report import tables

    text = tables(_paired_rows([("mnli", "base_pet", "none", 1, 0.80), ("mnli", "base_pet", "none", 2, 0.70),
                                ("mnli", "base_pet", "none", 3, 0.70), ("mnli", "clm_pet", "Q", 1, 0.78),
                                ("mnli", "clm_cpet", "Q", 1, 0.79)]))
    assert "+1.00 (n=1); 50% of 2.00" in _recovered_line(text)


def test_summaries_over_part_of_the_tasks_say_so():
    from cpet.report import tables

    spec = [("mnli", "base_pet", "none", s, 0.50) for s in (1, 2)] + [("qnli", "base_pet", "none", 1, 0.70)]
    spec += [("mnli", "clm_pet", "Q", s, 0.40) for s in (1, 2)] + [("mnli", "clm_cpet", "Q", 1, 0.45),
                                                                   ("mnli", "clm_cpet", "Q", 2, 0.47)]
    line = _recovered_line(tables(_paired_rows(spec)))
    assert "+6.00 ± 1.41 (2); 60% of 10.00" in line
    assert line.endswith("| 60% of 10.00 (1/2 tasks) | 1/1 (1/2 tasks) |")


def test_a_paradigm_never_reads_beside_another_teacher_and_the_search_seeds_decide():
    from cpet.report import select_on_validation

    def row(paradigm, plan, variant, seed, val):
        base = {"task": "qnli", "plan": plan, "paradigm": paradigm, "seed": seed, "variant": variant,
                "cell": "c", "fingerprint": "f"}
        return [{**base, "metric": "val_accuracy", "value": val}, {**base, "metric": "accuracy", "value": val}]
    rows = row("base_pet", "none", "train.lr=0.005", 42, 0.70) + row("base_pet", "none", "train.lr=0.001", 42, 0.60)
    rows += row("clm_cpet", "Q", "train.lr=0.001", 42, 0.65)  # only under the teacher validation did not choose
    chosen, _ = select_on_validation(rows, ("train.lr",))
    assert not [r for r in chosen if r["paradigm"] == "clm_cpet"]
    # a non-chosen candidate also run on seed 7 (a retried cell, say): the grid chose on seed 42 only
    rows += row("base_pet", "none", "train.lr=0.005", 7, 0.50) + row("base_pet", "none", "train.lr=0.001", 7, 0.95)
    on_42, _ = select_on_validation(rows, ("train.lr",), seeds=(42,))
    on_all, _ = select_on_validation(rows, ("train.lr",))
    assert {r["value"] for r in on_42 if r["paradigm"] == "base_pet"} == {0.70, 0.50}
    assert {r["value"] for r in on_all if r["paradigm"] == "base_pet"} == {0.60, 0.95}


def test_a_tie_on_validation_goes_to_the_lower_value_as_a_number():
    """1e-05 is below 0.001 though it sorts after it as text; a tie must pick it in either spelling."""
    from cpet.report import select_on_validation

    for low, high in (("1e-05", "0.001"), ("0.001", "0.005"), ("0.002", "0.01")):
        rows = []
        for lr, test in ((high, 0.9), (low, 0.1)):
            base = {"task": "sst2", "plan": "Q", "paradigm": "clm_pet", "seed": 1, "variant": f"train.lr={lr}",
                    "cell": "c", "fingerprint": "f"}
            rows += [{**base, "metric": "val_accuracy", "value": 0.5}, {**base, "metric": "accuracy", "value": test}]
        chosen, table = select_on_validation(rows, ("train.lr",))
        assert {r["value"] for r in chosen if r["metric"] == "accuracy"} == {0.1}, (low, high)
        assert f"| train.lr={low} |" in table


def test_an_axis_whose_values_are_mappings_is_searched_like_any_other():
    """A distill axis labels its values as JSON ({"alpha": 1.0, "outputs": ["logits"]}), whose ", " must not split
    the variant: the search chooses among the two targets, and the other axes stay apart."""
    from cpet.report import select_on_validation, variant_parts

    hidden, logits = '{"alpha": 0.05, "outputs": ["hidden"]}', '{"alpha": 1.0, "outputs": ["logits"]}'
    assert variant_parts(f"distill={logits}, recovery.r=[32, 128], train.lr=0.001") == [
        f"distill={logits}", "recovery.r=[32, 128]", "train.lr=0.001"]
    rows = []
    for target, val, test in ((hidden, 0.50, 0.1), (logits, 0.60, 0.2)):
        for lr in ("0.001", "0.005"):
            base = {"task": "qnli", "plan": "SP", "paradigm": "clm_pet", "seed": 1, "cell": "c", "fingerprint": "f",
                    "variant": f"distill={target}, train.lr={lr}"}
            rows += [{**base, "metric": "val_accuracy", "value": val + (lr == "0.005") * 0.01},
                     {**base, "metric": "accuracy", "value": test}]
    chosen, table = select_on_validation(rows, ("train.lr", "distill"))
    assert {r["value"] for r in chosen if r["metric"] == "accuracy"} == {0.2} and len(chosen) == 2
    assert all(r["variant"] == "" for r in chosen)  # both keys chosen: nothing left as a section
    row, = [line for line in table.splitlines() if line.startswith("| qnli | SP |")]
    assert f"| — | distill={hidden}, train.lr=0.001: 50.00;" in row and f"| distill={logits}, train.lr=0.005 |" in row
    # chosen for one key only, the other stays a section of its own
    chosen, _ = select_on_validation(rows, ("train.lr",))
    assert {r["variant"] for r in chosen} == {f"distill={hidden}", f"distill={logits}"}


def test_a_paradigm_with_a_teacher_keeps_the_teachers_chosen_lr():
    from cpet.report import select_on_validation

    rows = []
    def add(paradigm, plan, lr, val):
        base = {"task": "qnli", "plan": plan, "paradigm": paradigm, "seed": 1, "variant": f"train.lr={lr}",
                "cell": "c", "fingerprint": "f"}
        rows.extend([{**base, "metric": "val_accuracy", "value": val}, {**base, "metric": "accuracy", "value": val}])
    add("base_pet", "none", "0.005", 0.65)
    add("base_pet", "none", "0.001", 0.54)
    add("clm_inherit_zero", "Q", "0.005", 0.540)  # the worse teacher happens to do better here
    add("clm_inherit_zero", "Q", "0.001", 0.544)
    chosen, _ = select_on_validation(rows, ("train.lr",))
    assert {r["value"] for r in chosen if r["paradigm"] == "clm_inherit_zero"} == {0.540}


def test_ray_executor_runs_cells_side_by_side_and_makes_shared_work_once(tmp_path, data_dir, tiny_model_dir, capsys):
    """cpet grid --executor ray on a local Ray instance with 2 workers: the two cells of a seed run at once
    and need the same teacher, so one trains it while the other waits on its lock; everything matches
    the in-process executor (same results, same fingerprints)."""
    pytest.importorskip("ray")
    g = _grid_file(tmp_path, data_dir, tiny_model_dir, "  task.name: [sst2]\n  train.seed: [1, 2]\n  compress: [Q, UP]\n")
    assert main(["grid", g, "--executor", "ray", "--workers", "2"]) == 0
    root = tmp_path / "g"
    cells = {c["cell"]: c for c in (json.loads(f.read_text()) for f in (root / "cells").glob("*.json"))}
    assert len(cells) == 4 and all(c["status"] == "done" for c in cells.values())
    folders = sorted(p.name.split("-")[0] for p in (root / "paradigms").iterdir())
    assert folders.count("base_pet") == 2 and folders.count("clm_cpet") == 4  # one teacher per seed
    assert len(list((root / "backbones").iterdir())) == 2
    assert main(["grid", g, "--executor", "ray"]) == 0 and "4 already recorded" in capsys.readouterr().out

    assert main(["grid", g, "-o", str(tmp_path / "local")]) == 0
    local = {c["cell"]: c for c in (json.loads(f.read_text()) for f in (tmp_path / "local" / "cells").glob("*.json"))}
    assert {k: c["results"] for k, c in local.items()} == {k: c["results"] for k, c in cells.items()}
    for c in cells.values():
        for paradigm, fp in c["results"].items():
            a = json.loads((root / "paradigms" / f"{paradigm}-{fp}" / "result.json").read_text())["test"]
            b = json.loads((tmp_path / "local" / "paradigms" / f"{paradigm}-{fp}" / "result.json").read_text())["test"]
            assert a == pytest.approx(b, abs=1e-6), paradigm


def test_cell_ids_outlive_new_config_keys():
    """A store made before model.small, mmlu.lm_eval, pet and train.group_by_length existed keeps its cell ids (this one was
    computed by cpet at b1e5e35); a non-default value of a new key makes a new cell."""
    from cpet.config import load_config
    from cpet.grid import Cell

    then = ["task.name=rte", "train.seed=3"]
    assert Cell(values={}, config=load_config(None, then)).id == "d72cf45886471485"
    assert Cell(values={}, config=load_config(None, [*then, "recovery=paper"])).id == "d72cf45886471485"
    assert Cell(values={}, config=load_config(None, [*then, "pet=ia3"])).id != "d72cf45886471485"
    assert Cell(values={}, config=load_config(None, [*then, "recovery=fitted"])).id != "d72cf45886471485"
    assert Cell(values={}, config=load_config(None, [*then, "train.group_by_length=false"])).id == "d72cf45886471485"
    assert Cell(values={}, config=load_config(None, [*then, "train.group_by_length=true"])).id != "d72cf45886471485"


def test_the_grid_searches_on_one_seed_and_runs_the_others_at_the_values_validation_chose(
        tmp_path, data_dir, tiny_model_dir, capsys):
    """select: train.lr (base+PET, the teacher) and train.clm_lr (the CLM paradigms) searched on seed 1;
    seeds 2 and 3 run each paradigm once, at its chosen values; the report applies the same choice."""
    g = _grid_file(tmp_path, data_dir, tiny_model_dir,
                   "  task.name: [sst2]\n  compress: [Q]\n  train.seed: [1, 2, 3]\n"
                   "  train.lr: [0.001, 0.02]\n  train.clm_lr: [0.001, 0.02]\n")
    Path(g).write_text(Path(g).read_text() + "select: {keys: [train.lr, train.clm_lr], seeds: [1]}\n")
    assert main(["grid", g, "--dry-run"]) == 0
    assert "searched on seeds [1]" in capsys.readouterr().out
    assert main(["grid", g]) == 0
    root = tmp_path / "g"
    folders = sorted(p.name.split("-")[0] for p in (root / "paradigms").iterdir())
    # seed 1: base+PET and CLM+PET at both rates, CLM+CPET at both clm rates but only on the chosen teacher;
    # seeds 2, 3: one run of each
    assert folders.count("base_pet") == 2 + 2 and folders.count("clm_pet") == 2 + 2 and folders.count("clm_cpet") == 2 + 2
    cells = [json.loads(f.read_text()) for f in (root / "cells").glob("*.json")]
    assert len(cells) == 12 and all(c["status"] == "done" for c in cells)
    assert any("chosen (validation, seeds 1)" in why for c in cells for why in c.get("not_chosen", {}).values())
    capsys.readouterr()
    assert main(["grid", g]) == 0 and "12 already recorded" in capsys.readouterr().out  # nothing left to run
    # with the search done, a later seed's estimate is the runs it makes: cells whose candidates lost run nothing
    from cpet.grid import _priors, load_grid

    grid = load_grid(g)
    priors = _priors(grid)
    by_id = {c["cell"]: c for c in cells}
    for seed in (2, 3):
        later = [c for c in grid.cells if c.config.train.seed == seed]
        idle = [c for c in later if not by_id[c.id].get("results")]  # every candidate of it lost on validation
        assert idle and all(priors[c.id] == 0 for c in idle)
        assert sum(priors[c.id] for c in later) > 0

    assert main(["report", str(root)]) == 0
    assert "chosen on validation of seeds [1]: train.lr, train.clm_lr" in capsys.readouterr().out
    rows = list(csv.DictReader((root / "results.csv").open()))
    val = {}  # (paradigm, candidate) -> seed 1 validation accuracy
    for r in rows:
        if r["metric"] == "val_accuracy" and r["seed"] == "1":
            val[(r["paradigm"], r["variant"])] = float(r["value"])
    md = (root / "results.md").read_text()
    assert "## Hyper-parameters chosen on validation" in md and "(on seeds 1)" in md
    teacher = max((v, c) for (p, c), v in val.items() if p == "base_pet")[1]
    for paradigm in ("base_pet", "clm_pet", "clm_cpet"):
        cands = {c: v for (p, c), v in val.items() if p == paradigm
                 and (paradigm != "clm_cpet" or teacher in c)}
        best = max(sorted(cands), key=cands.get)
        # the chosen candidate ran on every seed; the others on the search seed only
        seeds = {r["seed"] for r in rows if r["paradigm"] == paradigm and r["variant"] == best and r["metric"] == "accuracy"}
        assert seeds == {"1", "2", "3"}, (paradigm, best)
        for c in set(cands) - {best}:
            assert {r["seed"] for r in rows if r["paradigm"] == paradigm and r["variant"] == c} == {"1"}
    assert "train.lr" not in next(r["variant"] for r in rows if r["paradigm"] == "clm_pet")  # trains on clm_lr only


def test_a_second_grid_searching_on_more_seeds_shares_the_store_without_changing_the_first(
        tmp_path, data_dir, tiny_model_dir, capsys):
    """Grid A searches the rates on seed 1; grid B (same cells, same store) on seeds 1 and 2. B runs every
    candidate on seed 2 too, teachers first, and A's records, default search and report stay as they were."""
    axes = "  task.name: [sst2]\n  compress: [Q]\n  train.seed: [1, 2]\n  train.lr: [0.001, 0.02]\n" \
           "  train.clm_lr: [0.001, 0.02]\n"
    a = _grid_file(tmp_path, data_dir, tiny_model_dir, axes)
    text = Path(a).read_text()
    Path(a).write_text(text + "select: {keys: [train.lr, train.clm_lr], seeds: [1]}\n")
    b = tmp_path / "b.yaml"
    b.write_text(text + "select: {keys: [train.lr, train.clm_lr], seeds: [1, 2]}\n")
    root = tmp_path / "g"
    assert main(["grid", a]) == 0
    assert main(["report", str(root), "--grid", a, "-o", str(tmp_path / "ra")]) == 0
    first = (tmp_path / "ra" / "results.md").read_text().split("\n", 3)[3]  # after the header (counts the runs)
    capsys.readouterr()
    assert main(["grid", str(b), "--dry-run"]) == 0  # the cells A recorded without B's candidates: more to run
    out = capsys.readouterr().out
    assert "[  more]" in out and "[  done]" in out and "0 to run" not in out
    assert main(["grid", str(b)]) == 0
    out = capsys.readouterr().out
    assert "holds another grid's search" in out and f"--grid {b} makes the tables" in out
    assert json.loads((root / "select.json").read_text())["seeds"] == [1]  # the store's default is still A's
    folders = [p.name.split("-")[0] for p in (root / "paradigms").iterdir()]
    # every candidate on both seeds: 2 teachers x 2 seeds; CLM+PET 2 x 2; CLM+CPET 2 (on the chosen teacher) x 2
    assert folders.count("base_pet") == 4 and folders.count("clm_pet") == 4 and folders.count("clm_cpet") >= 4
    cells = [json.loads(f.read_text()) for f in (root / "cells").glob("*.json")]
    assert all(c["status"] == "done" for c in cells)
    assert main(["report", str(root), "--grid", a, "-o", str(tmp_path / "ra2")]) == 0
    assert (tmp_path / "ra2" / "results.md").read_text().split("\n", 3)[3] == first  # A's tables: unchanged
    assert main(["report", str(root), "--grid", str(b), "-o", str(tmp_path / "rb")]) == 0
    assert "validation of seeds [1, 2]" in capsys.readouterr().out
    assert "(on seeds 1, 2)" in (tmp_path / "rb" / "results.md").read_text()
    capsys.readouterr()
    assert main(["grid", str(b)]) == 0 and "8 already recorded" in capsys.readouterr().out
    assert main(["report", str(root), "--grid", a, str(b)]) != 0
    assert "search differently" in capsys.readouterr().err
    c = tmp_path / "c.yaml"  # no search: its report shows every run, not the store's select.json
    c.write_text(text)
    assert main(["report", str(root), "--grid", str(c), "-o", str(tmp_path / "rc")]) == 0
    assert "chosen on validation" not in capsys.readouterr().out
    assert "## Hyper-parameters chosen on validation" not in (tmp_path / "rc" / "results.md").read_text()


def test_a_grid_that_adds_an_axis_labels_the_cells_it_shares_by_its_own_axes(
        tmp_path, data_dir, tiny_model_dir, capsys):
    """Grid A ran CLM+CPET at the base's recovery rank; grid B (same store) searches recovery.r in {4, 8}, so
    A's cells are B's rank-4 candidates. B's report and search label them recovery.r=4, as B's own cells
    (the records keep A's labels, which lack that axis): the rank-4 and rank-8 runs are candidates of one
    search, not a main variant beside a recovery.r section."""
    from cpet.grid import _choices, grid_labels, results_of
    from cpet.report import long_rows

    axes = "  task.name: [sst2]\n  compress: [Q]\n  train.seed: [1]\n"
    a = _grid_file(tmp_path, data_dir, tiny_model_dir, axes)
    b = tmp_path / "b.yaml"
    b.write_text(Path(a).read_text().replace("axes:\n", "axes:\n  recovery.r: [4, 8]\n")
                 + "select: {keys: [recovery.r], seeds: [1]}\n")
    assert main(["grid", a]) == 0
    root = tmp_path / "g"
    ran = {f.stem for f in (root / "cells").glob("*.json")}
    assert main(["grid", str(b)]) == 0
    grid_b = load_grid(b)
    assert ran < {c.id for c in grid_b.cells}  # A's cell is one of B's: shared, not run again
    rows = [r for r in long_rows(results_of(root)) if r["paradigm"] == "clm_cpet" and r["metric"] == "accuracy"]
    assert sorted(r["variant"] for r in rows) == ["", "recovery.r=8"]  # the records: A's labels on A's cell
    rows = [r for r in long_rows(results_of(root, grid_labels(grid_b)))
            if r["paradigm"] == "clm_cpet" and r["metric"] == "accuracy"]
    assert sorted(r["variant"] for r in rows) == ["recovery.r=4", "recovery.r=8"]
    assert {r["variant"] for r in long_rows(results_of(root, grid_labels(grid_b))) if r["paradigm"] != "clm_cpet"} \
        == {""}  # base+PET and CLM+PET do not depend on the recovery rank
    chosen, = [v for k, v in _choices(grid_b).items() if k[2] == "clm_cpet"]  # the grid's own search, too
    assert chosen in ("recovery.r=4", "recovery.r=8")
    capsys.readouterr()
    assert main(["report", str(root), "--grid", str(b), "-o", str(tmp_path / "rb")]) == 0
    md = (tmp_path / "rb" / "results.md").read_text()
    cpet_row, = [line for line in md.splitlines() if line.startswith("| sst2 | Q | CLM+CPET |")]
    assert "| — | recovery.r=4: " in cpet_row and "; recovery.r=8: " in cpet_row  # one search, two candidates


def test_a_grid_select_names_axes_and_search_seeds(tmp_path, data_dir, tiny_model_dir):
    g = _grid_file(tmp_path, data_dir, tiny_model_dir, "  train.seed: [1, 2]\n  train.lr: [0.001, 0.02]\n")
    for select, needle in (("{keys: [train.epochs], seeds: [1]}", "must name axes"),
                           ("{keys: [train.lr], seeds: [7]}", "values of a train.seed axis"),
                           ("{keys: [train.seed], seeds: [1]}", "cannot be task.name"),
                           ("[train.lr]", "select must be")):
        Path(g).write_text(Path(g).read_text().split("select:")[0] + f"select: {select}\n")
        with pytest.raises(CpetError, match=needle.replace(".", r"\.")):
            load_grid(g)


def test_each_teacher_choice_binds_the_paradigms_that_share_its_axes():
    """base+PET chose lr 0.002 for LoRA and 0.01 for prompt tuning: CLM+CPET of each PET method picks among
    the candidates with its own teacher's lr."""
    from cpet.report import select_on_validation

    rows = []
    def add(paradigm, plan, variant, val):
        base = {"task": "sst2", "plan": plan, "paradigm": paradigm, "seed": 1, "variant": variant, "cell": "c",
                "fingerprint": "f"}
        rows.extend([{**base, "metric": "val_accuracy", "value": val}, {**base, "metric": "accuracy", "value": val}])
    for pet, good in (("lora", "0.002"), ("prompt", "0.01")):
        for lr in ("0.002", "0.01"):
            add("base_pet", "none", f"pet={pet}, train.lr={lr}", 0.9 if lr == good else 0.6)
            add("clm_cpet", "Q", f"pet={pet}, train.lr={lr}", 0.85 if lr == good else 0.5)
    chosen, _ = select_on_validation(rows, ("train.lr",))
    assert sorted((r["paradigm"], r["variant"], r["value"]) for r in chosen if r["metric"] == "accuracy") == [
        ("base_pet", "pet=lora", 0.9), ("base_pet", "pet=prompt", 0.9),
        ("clm_cpet", "pet=lora", 0.85), ("clm_cpet", "pet=prompt", 0.85)]


def test_time_prior_counts_each_tasks_tokens(data_dir, tiny_model_dir):
    """The dry run's estimate scales by the tokens a task's batches hold: pairs cost more than short phrases,
    length-grouped batches less than random ones, and max_length caps it."""
    from cpet.config import TaskConfig
    from cpet.grid import REF_TOKENS, _token_scale

    sst = TaskConfig(name="sst2", data_dir=str(data_dir), val_size=16)
    rte = TaskConfig(name="rte", data_dir=str(data_dir), val_size=6)
    s_train, s_eval = _token_scale(sst, tiny_model_dir, 128, 8, False)
    r_train, r_eval = _token_scale(rte, tiny_model_dir, 128, 8, False)
    assert r_train > 1.5 * s_train and r_eval > 1.5 * s_eval
    assert _token_scale(rte, tiny_model_dir, 128, 8, True)[0] <= r_train
    assert _token_scale(rte, tiny_model_dir, 6, 8, False)[0] == pytest.approx(6 / REF_TOKENS["train"])
    assert _token_scale(TaskConfig(name="sst2", data_dir=str(data_dir / "nowhere")), tiny_model_dir, 64, 8,
                        False) == (0.5, 0.5)  # unreadable data: max_length / 128, as before


def test_cells_that_only_reused_runs_do_not_count_in_the_eta():
    """A resumed grid passes cells whose runs other cells recorded (0.1 s each); counted beside their full
    prior they dragged measured / prior from 1.14 to 0.47 and the ETA from 5 h to 2 h."""
    from cpet.grid import _eta, _ran

    assert not _ran({"seconds": 0.1}) and _ran({"seconds": 150.0})
    done = [(150.0, 100.0)] + [(r["seconds"], 100.0) for r in ({"seconds": 0.1},) * 3 if _ran(r)]
    assert "measured / prior = 1.50 over 1 finished cells" in _eta(1000.0, done)


def test_cost_table_gives_the_timed_steps_apart_when_only_some_runs_have_them():
    from cpet.report import timing_table

    def run(cell, per_step, timed=None):
        base = {"plan": "Q", "paradigm": "clm_pet", "variant": "", "cell": cell}
        rows = [{**base, "metric": "trainable_params", "value": 100},
                {**base, "metric": "train_seconds_per_step", "value": per_step}]
        return rows + ([{**base, "metric": "train_step_seconds", "value": timed}] if timed is not None else [])

    table = timing_table(run("a", 2.0) + run("b", 3.0, 1.5) + run("c", 4.0, 2.5))
    assert "| Q | CLM+PET | 2.000 (2 timed); 3.000* | - | 100 | 3 |" in table
    assert "| Q | CLM+PET | 2.000 | - | 100 | 2 |" in timing_table(run("b", 3.0, 1.5) + run("c", 4.0, 2.5))
    assert "| Q | CLM+PET | 3.000* |" in timing_table(run("a", 2.0) + run("b", 4.0))
