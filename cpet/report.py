"""Reports generated from results: a long CSV, the paper-style markdown tables, and plots.

    results.csv   one row per (task, plan, paradigm, seed, metric): the input of every table
    results.md    per metric, tasks as columns + their average, mean +- std over seeds; paired
                  differences CLM+CPET - CLM+PET; the share of the compression gap recovered; a task
                  where base+PET beats its trivial baseline by under BAR points is marked † and the
                  averages are also given without it
    *.png         (with matplotlib, ``pip install 'cpet[report]'``) per plan, each paradigm per task

The gap recovered for a (task, plan) is (CLM+CPET - CLM+PET) / (base+PET - CLM+PET) on seed means:
100% means the compressed model with CPET matches the uncompressed one.
"""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

from cpet.compress import PRESETS, plan_to_json
from cpet.config import PARADIGM_SPECS, PARADIGMS, TaskConfig
from cpet.experiments import LABELS
from cpet.errors import CpetError
from cpet.fingerprint import diff as config_diff
from cpet.io import atomic_write, read_json
from cpet.tasks import load_task, trivial_baseline

BAR = 5.0  # points over the trivial baseline below which a task's base+PET is marked as not learning it
GAP_FLOOR = 1.0  # points: a compression gap (base+PET - CLM+PET) below this is noise, not a gap to recover
COLUMNS = ("task", "plan", "paradigm", "seed", "metric", "value", "variant", "cell", "fingerprint")
ORDER = {name: i for i, name in enumerate(PARADIGMS)}


def plan_name(steps: list[dict]) -> str:
    """A resolved plan as preset names joined by '+' (``Q+UP+M``) where every step is a preset or is
    closer to a preset of its method than to the method's defaults (``M(min_speedup=0.0)``: the fields
    that differ from the preset), else each step as ``method(field=value, ...)`` with the fields that
    differ from its defaults."""
    if not steps:
        return "none"
    steps = _json_plan(plan_to_json(steps))  # defaults filled in: a plan written short names the same
    single = {k: v[0] for k, v in ((k, _json_plan(plan_to_json(v))) for k, v in PRESETS.items()) if len(v) == 1}
    named = lambda name, diff: f"{name}({', '.join(diff)})" if diff else name  # noqa: E731
    generic, presets = [], []
    for step in steps:
        diff = lambda ref: [f"{k}={v}" for k, v in step.items() if k != "method" and ref.get(k) != v]  # noqa: E731
        own = diff(_json_plan(plan_to_json([{"method": step["method"]}]))[0])
        generic.append(named(step["method"], own))
        near = next((k for k, v in single.items() if v["method"] == step["method"]), None)
        if near and len(off := diff(single[near])) <= len(own):  # a preset, or closer to one than to the defaults
            presets.append(named(near, off))
    return "+".join(presets if len(presets) == len(steps) else generic)


def _json_plan(steps) -> list[dict]:
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in s.items()} for s in steps]


def depends_on(paradigm: str, key: str, config: dict | None = None) -> bool:
    """Whether a paradigm's result depends on a config key (the sections its fingerprint records): a
    teacher does not depend on the plan or the recovery settings; no result on the paradigm list; a
    compressed paradigm that trains on ``train.clm_lr`` (set in ``config``) and has no teacher not on
    ``train.lr``."""
    spec = PARADIGM_SPECS[paradigm]
    section = key.split(".")[0]
    if key == "train.clm_lr":
        return spec.compressed and spec.trains
    if key == "train.lr" and config is not None and config.get("train", {}).get("clm_lr") \
            and spec.compressed and spec.trains and not spec.needs_teacher:
        return False
    return section in ("model", "task", "lora", "pet", "train", "mmlu") or (section == "compress" and spec.compressed) \
        or (section == "recovery" and spec.sized_by_recovery) or (section == "distill" and spec.distill)


def plan_and_variant(paradigm: str, config: dict, labels: dict[str, str]) -> tuple[str, str]:
    """A paradigm's plan name ("none" uncompressed) and variant ("k=v, ..." of the grid axes besides
    task, plan and seed that its result depends on) in a cell of this config and these axis labels."""
    plan = plan_name(config["compress"]) if PARADIGM_SPECS[paradigm].compressed else "none"
    return plan, ", ".join(f"{k}={v}" for k, v in sorted(labels.items())
                           if k not in ("task", "task.name", "compress", "train.seed") and depends_on(paradigm, k, config))


def long_rows(results: list[dict]) -> list[dict]:
    """Result records (as ``cpet.grid.results_of`` returns) -> long rows, one per metric. A row's variant
    names the grid axes (besides task, plan and seed) that its paradigm depends on."""
    rows = []
    for r in results:
        cfg = r["cell_config"]
        plan, variant = plan_and_variant(r["paradigm"], cfg, r.get("labels", {}))
        base = {"task": r["task"], "plan": plan, "paradigm": r["paradigm"], "seed": cfg["train"]["seed"],
                "variant": variant, "cell": r.get("cell", ""), "fingerprint": r.get("fingerprint", "")}
        values = {**r["test"], **{f"val_{k}": v for k, v in r["best_val"].items()},
                  "train_seconds": r["train_seconds"], "eval_seconds": r["eval_seconds"],
                  "trainable_params": r["trainable_params"]}
        if r["steps"]:
            values["train_seconds_per_step"] = r["train_seconds"] / r["steps"]  # validation passes included
        if r.get("step_seconds") is not None and r["steps"]:
            values["train_step_seconds"] = r["step_seconds"] / r["steps"]  # one training step alone (no validation)
        if (r.get("split_sizes") or {}).get("test"):
            values["eval_ms_per_example"] = 1000 * r["eval_seconds"] / r["split_sizes"]["test"]
        rows += [{**base, "metric": m, "value": v} for m, v in values.items()]
    return rows


def check_one_run_per_row(results: list[dict]) -> None:
    """Stop when two different runs land on one table entry (task, plan, paradigm, seed and the axes the
    paradigm depends on): a store a grid kept writing to after its base config changed (or another grid
    with the same axes) holds both, and a table would silently show one of them."""
    seen: dict[tuple, dict] = {}
    for r in results:
        cfg = r["cell_config"]
        plan, variant = plan_and_variant(r["paradigm"], cfg, r.get("labels", {}))
        key = (r["task"], plan, r["paradigm"], cfg["train"]["seed"], variant)
        other = seen.setdefault(key, r)
        if other is not r and other.get("fingerprint") != r.get("fingerprint"):
            diff = config_diff(other["cell_config"], r["cell_config"])
            raise CpetError(
                f"two different {r['paradigm']} runs for task {key[0]}, plan {plan}, seed {key[3]}"
                f"{', ' + variant if variant else ''} (cells {other['cell']} and {r['cell']}; they differ in "
                f"{diff or 'their inputs'}): this folder holds cells of more than one grid config. Report the "
                "cells of the current grid file(s) with --grid GRID.yaml, or delete the stale cell records")


def metric_scale(metric: str) -> float:
    """The factor a metric is shown with: percent, except log-likelihoods (shown as they are)."""
    return 1.0 if metric == "answer_logprob" else 100.0


def paired(pet: dict, cpet: dict) -> dict:
    """{seed: CLM+CPET − CLM+PET} over the seeds both ran (from {seed: value} of each)."""
    return {s: cpet[s] - pet[s] for s in sorted(set(pet) & set(cpet))}


def main_metrics(rows: list[dict]) -> tuple[dict[str, str], dict[str, float]]:
    """Per task: the metric its checkpoint was selected on (the first of its val metrics) and the scale
    it is shown in (percent, except log-likelihoods)."""
    main: dict[str, str] = {}
    for r in rows:
        if r["metric"].startswith("val_") and r["task"] not in main:
            main[r["task"]] = r["metric"][4:]
    return main, {t: metric_scale(m) for t, m in main.items()}


def _pyplot():
    """matplotlib's pyplot on the file backend, or None without the report extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _seed_values(rows: list[dict], task: str, plan: str, paradigm: str, metric: str) -> list[float]:
    """The values over seeds of one (task, plan, paradigm, metric), main variant (no extra axes) only."""
    return [float(r["value"]) for r in rows if r["task"] == task and r["plan"] == plan and
            r["paradigm"] == paradigm and r["metric"] == metric and not r["variant"]]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(xs: list[float], scale: float, sign: str = "") -> str:
    """mean ± std (n); one seed has no spread to show: "mean (n=1)"."""
    if not xs:
        return ""
    m, s = _mean_std(xs)
    return f"{scale * m:{sign}.2f} ± {scale * s:.2f} ({len(xs)})" if len(xs) > 1 else f"{scale * m:{sign}.2f} (n=1)"


def trivial_baselines(results: list[dict]) -> dict[str, float]:
    """Per task, the trivial baseline's main metric on its test set (majority class of the training part;
    SQuAD: the paragraph's first words), recomputed from the local data folder each result records, and
    only where that gives the results' own split sizes (never from the hub); other tasks are left out."""
    out: dict[str, float] = {}
    tried: set[str] = set()
    for r in results:
        task = r["task"]
        if task in tried:
            continue
        tried.add(task)
        source = r.get("data_source")
        metric = next(iter(r.get("best_val") or {}), None)  # the task's main metric (its first val metric)
        if not source or not Path(source).is_dir() or metric is None:
            continue
        try:
            cfg = {k: v for k, v in r["cell_config"]["task"].items() if k in TaskConfig.__dataclass_fields__}
            data = load_task(TaskConfig(**{**cfg, "data_dir": source}))
            if r.get("split_sizes") and r["split_sizes"] != {"train": len(data.train), "val": len(data.val),
                                                             "test": len(data.test)}:
                continue  # not the data the runs had
            scores = trivial_baseline(data)
        except Exception:  # noqa: BLE001 - a supplementary row: a task whose data cannot be read is left out
            continue
        if metric in scores:
            out[task] = float(scores[metric])
    return out


PAIRED = ("Paired by seed: CLM+CPET − CLM+PET (each paradigm at its own chosen hyper-parameters), and the "
          "share of the compression gap CLM+CPET recovers ((CPET − PET) / (base − PET) on the means over the "
          f"seeds all three have); a gap under {GAP_FLOOR:g} point is noise, not a gap: shown, with no share. "
          "'recovered' over tasks is the share of the summed gap (Σ(CPET − PET) / Σ(base − PET)) over the "
          f"tasks whose gap is at least {GAP_FLOOR:g} point, so no one task can swing it; 'CPET > PET' counts "
          "the tasks where CLM+CPET's mean is above CLM+PET's, over every task with both. Where some tasks "
          "have no pair yet, both say over how many of the columns' tasks they are.")


def _across_variants(variants, plans, tasks, scale, get, sizes) -> list[str]:
    """One table over every variant section (a grid axis such as ``pet``): per variant and plan, base+PET,
    CLM+PET and CLM+CPET per task (seed means), CLM+CPET − CLM+PET paired by seed, and each paradigm's task
    parameters, so the variants read side by side; the sections below keep the details."""
    out = ["## Across variants", "",
           "Seed means per task; 'CPET − PET': paired by seed, mean over the seeds both have (n). Task "
           "parameters: median over the runs shown (its tasks and seeds).", "",
           "| variant | plan | paradigm | task params | " + " | ".join(tasks) + " |",
           "|" + "---|" * (4 + len(tasks))]
    for variant in variants:
        for plan in plans:
            for paradigm, at in (("base_pet", "none"), ("clm_pet", plan), ("clm_cpet", plan)):
                vals = [get(variant, at, paradigm, t) for t in tasks]
                if not any(vals):
                    continue
                n = [v for t in tasks for v in get(variant, at, paradigm, t, sizes).values()]
                out.append("| " + " | ".join([variant or "—", plan, LABELS.get(paradigm, paradigm),
                                              f"{statistics.median(n):,.0f}" if n else "",
                                              *(f"{scale[t] * statistics.fmean(v.values()):.2f}" if v else ""
                                                for t, v in zip(tasks, vals))]) + " |")
            cells = []
            for t in tasks:
                d = paired(get(variant, plan, "clm_pet", t), get(variant, plan, "clm_cpet", t))
                cells.append(f"{scale[t] * statistics.fmean(d.values()):+.2f} ({len(d)})" if d else "")
            if any(cells):
                out.append("| " + " | ".join([variant or "—", plan, "CPET − PET", "", *cells]) + " |")
    return out + [""]


def tables(rows: list[dict], trivial: dict[str, float] | None = None) -> str:
    """The markdown report (see the module docstring)."""
    main_metric, scale = main_metrics(rows)
    tasks = sorted(main_metric)
    by = defaultdict(dict)  # (variant, plan, paradigm, task) -> {seed: value}
    sizes = defaultdict(dict)  # the same keys -> {seed: task parameters}
    for r in rows:
        if main_metric.get(r["task"]) == r["metric"]:
            by[(r["variant"], r["plan"], r["paradigm"], r["task"])][r["seed"]] = float(r["value"])
        elif r["metric"] == "trainable_params":
            sizes[(r["variant"], r["plan"], r["paradigm"], r["task"])][r["seed"]] = float(r["value"])

    def parts(v: str) -> set[str]:
        return set(variant_parts(v))

    def get(variant: str, plan: str, paradigm: str, task: str, table: dict = by) -> dict:
        """A paradigm's values in a variant section; a paradigm that does not depend on some of the
        section's axes (base+PET on the recovery settings, say) shows its runs without them."""
        if (variant, plan, paradigm, task) in table:
            return table[(variant, plan, paradigm, task)]
        own = [k[0] for k in table if k[1:] == (plan, paradigm, task) and parts(k[0]) <= parts(variant)]
        return table[(max(own, key=lambda v: len(parts(v))), plan, paradigm, task)] if own else {}

    found = {k[0] for k in by}
    variants = sorted(v for v in found if not any(parts(v) < parts(w) for w in found))  # the widest sections
    plans = sorted({k[1] for k in by if k[1] != "none"})
    out = ["Metric per task: " + ", ".join(f"{t} {main_metric[t]}" for t in tasks)
           + " (in percent, except log-likelihoods). Cells: mean ± std over seeds (n); one seed: mean (n=1).", ""]
    if len(variants) > 1 and plans:  # (base+PET alone: the sections say it all)
        out += _across_variants(variants, plans, tasks, scale, get, sizes)
    for i, variant in enumerate(variants):
        if variant:
            out += [f"### {variant}", ""]
        base_means = {t: statistics.fmean(v.values()) for t in tasks if (v := get(variant, "none", "base_pet", t))}
        below = {t for t in tasks if trivial and t in trivial and t in base_means
                 and scale[t] * (base_means[t] - trivial[t]) < BAR}
        kept = [t for t in tasks if t not in below]
        head = ["plan", "paradigm", *(f"{t} †" if t in below else t for t in tasks), "avg",
                *(["avg w/o †"] if below else [])]
        if below:
            out += [f"† base+PET beats the trivial baseline by less than {BAR:g} points on this task: its "
                    "columns are near chance and say little about compression or CPET; 'w/o †' averages "
                    "leave it out.", ""]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        present = sorted({k[2] for k in by if PARADIGM_SPECS[k[2]].compressed and (k[0] == variant or (
            parts(k[0]) <= parts(variant) and get(variant, k[1], k[2], k[3])))}, key=ORDER.get)
        keys = [("none", "base_pet"), ("none", "small_pet")] + [(p, par) for p in plans for par in present]
        if trivial:
            out.append("| — | trivial (majority class; SQuAD: first words) | " + " | ".join(
                f"{scale[t] * trivial[t]:.2f}" if t in trivial else "" for t in tasks) + " | |" + (" |" if below else ""))
        for plan, paradigm in keys:
            vals = [list(get(variant, plan, paradigm, t).values()) for t in tasks]
            if not any(vals):
                continue
            means = {t: scale[t] * statistics.fmean(v) for t, v in zip(tasks, vals) if v}
            avgs = [f"{statistics.fmean(means[t] for t in ts):.2f}" if ts and all(t in means for t in ts) else ""
                    for ts in ([tasks, kept] if below else [tasks])]
            out.append("| " + " | ".join([plan if plan != "none" else "—", LABELS.get(paradigm, paradigm),
                                          *(_fmt(v, scale[t]) for t, v in zip(tasks, vals)), *avgs]) + " |")
        out += ["", *([PAIRED] if i == 0 else ["Paired by seed (as above):"]), "",
                "| plan | " + " | ".join(f"{t} †" if t in below else t for t in tasks) + " | recovered | CPET > PET |"
                + (" recovered w/o † | CPET > PET w/o † |" if below else ""),
                "|" + "---|" * (len(tasks) + 3 + 2 * bool(below))]
        for plan in plans:
            cells, diffs, recovered = [], {}, {}  # task -> CPET - PET (paired seeds); (CPET - PET, gap) on the matched
            for t in tasks:
                pet, cpet = get(variant, plan, "clm_pet", t), get(variant, plan, "clm_cpet", t)
                base = get(variant, "none", "base_pet", t)
                d = paired(pet, cpet)
                if not d:
                    cells.append("")
                    continue
                text = _fmt(list(d.values()), scale[t], sign="+")
                diffs[t] = scale[t] * statistics.fmean(d.values())
                matched = [s for s in d if s in base]  # the gap on the seeds base+PET also has
                if matched:
                    gap = scale[t] * statistics.fmean(base[s] - pet[s] for s in matched)
                    if gap >= GAP_FLOOR:
                        recovered[t] = (scale[t] * statistics.fmean(d[s] for s in matched), gap)
                        text += f"; {100 * recovered[t][0] / gap:.0f}% of {gap:.2f}"
                    else:
                        text += f"; gap {gap:.2f} (< {GAP_FLOOR:g})"
                cells.append(text)
            summary = []
            for ts in ([tasks, kept] if below else [tasks]):
                done = [t for t in ts if t in diffs]
                partial = f" ({len(done)}/{len(ts)} tasks)" if done and len(done) < len(ts) else ""
                with_gap = [recovered[t] for t in done if t in recovered]
                total = sum(gap for _, gap in with_gap)
                summary.append("" if not done else f"no gap ≥ {GAP_FLOOR:g}{partial}" if not with_gap else
                               f"{100 * sum(diff for diff, _ in with_gap) / total:.0f}% of {total:.2f}{partial}")
                summary.append(f"{sum(diffs[t] > 0 for t in done)}/{len(done)}{partial}" if done else "")
            out.append(f"| {plan} | " + " | ".join([*cells, *summary]) + " |")
        out.append("")
    return "\n".join(out)


def load_bench(path: str | Path) -> dict[str, dict]:
    """``cpet bench --json`` output (a list of records) or a bench/ results file ({"records": [...]})
    -> plan name -> record."""
    data = read_json(Path(path), "benchmark results", "pass the JSON that cpet bench --json wrote")
    records = data.get("records") if isinstance(data, dict) else data
    if not isinstance(records, list) or not all(isinstance(r, dict) and "plan" in r for r in records):
        raise CpetError(f"{path}: expected cpet bench records (a list of objects with 'plan')")
    return {plan_name(r["plan"]): r for r in records}


def cost_table(rows: list[dict], bench: dict[str, dict]) -> str:
    """Quality against measured cost per plan: the average over tasks of each paradigm's main metric
    (seed means) beside size, measured speedup per shape and hidden-state cosine from ``cpet bench``."""
    main, scale = main_metrics(rows)
    tasks = sorted(main)

    def avg(plan: str, paradigm: str) -> str:
        per_task = []
        for t in tasks:
            xs = _seed_values(rows, t, plan, paradigm, main[t])
            if not xs:
                return ""
            per_task.append(scale[t] * statistics.fmean(xs))
        return f"{statistics.fmean(per_task):.2f}"

    plans = sorted({r["plan"] for r in rows if r["plan"] != "none"})
    shapes = sorted({s for b in bench.values() for s in b.get("measured_speedup", {})},
                    key=lambda s: [int(x) for x in s.split("x")])
    head = ["plan", "CLM+PET avg", "CLM+CPET avg", "size % of fp32", *(f"speedup {s}" for s in shapes),
            "hidden cos"]
    out = [f"Quality against cost (base+PET avg {avg('none', 'base_pet')}); speed, size and fidelity from "
           "cpet bench on this machine.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for plan in plans:
        b = bench.get(plan)
        cost = (["", *("" for _ in shapes), ""] if b is None else
                [f"{b['size_pct_of_fp32']:.1f}", *(f"{b['measured_speedup'].get(s, float('nan')):.2f}x" for s in shapes),
                 f"{b.get('hidden_cosine', float('nan')):.4f}"])
        out.append("| " + " | ".join([plan, avg(plan, "clm_pet"), avg(plan, "clm_cpet"), *cost]) + " |")
    missing = [p for p in plans if p not in bench]
    if missing:
        out += ["", f"No benchmark record for {', '.join(missing)} (bench plans: {', '.join(sorted(bench))})."]
    return "\n".join(out) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in sorted(rows, key=lambda r: (r["task"], r["plan"], ORDER.get(r["paradigm"], 9), r["variant"],
                                         r["seed"], r["metric"])):
        w.writerow({k: r[k] for k in COLUMNS})
    atomic_write(path, buf.getvalue().encode())


def plot(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per plan: each task's main metric per paradigm (mean, error bar = std over seeds)."""
    plt = _pyplot()
    if plt is None:
        return []
    main, _ = main_metrics(rows)
    tasks = sorted(main)
    plans = sorted({r["plan"] for r in rows if r["plan"] != "none"})
    paths = []
    for plan in plans:
        fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(tasks)), 3.2))
        for j, (paradigm, plan_key) in enumerate((("base_pet", "none"), ("clm_pet", plan), ("clm_cpet", plan))):
            means, stds = [], []
            for t in tasks:
                xs = _seed_values(rows, t, plan_key, paradigm, main[t])
                m, s = _mean_std(xs) if xs else (math.nan, 0.0)
                means.append(m)
                stds.append(s)
            ax.bar([i + 0.27 * (j - 1) for i in range(len(tasks))], means, 0.27, yerr=stds, capsize=2,
                   label=LABELS[paradigm])
        ax.set_xticks(range(len(tasks)), [f"{t}\n({main[t]})" for t in tasks])
        ax.set_title(f"plan {plan}")
        paths.append(_save(fig, out / f"plot_{_slug(plan)}.png"))
    return paths


def _slug(text: str) -> str:
    return text.replace("+", "_").replace("(", "_").replace(")", "").replace(", ", "_").replace("=", "")


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chosen_runs(results: list[dict], rows: list[dict]) -> list[dict]:
    """The result records behind ``rows`` (after ``select_on_validation``: the chosen runs only)."""
    chosen = {(r["cell"], r["fingerprint"], r["paradigm"]) for r in rows}
    return [r for r in results if (r.get("cell", ""), r.get("fingerprint", ""), r["paradigm"]) in chosen]


def curve_series(results: list[dict]) -> dict[tuple[str, str], dict]:
    """{(task, plan): {"metric": m, "curves": {paradigm: [(step, mean val over its runs)]}, "levels":
    {paradigm: mean val}}} for every (task, plan) whose results carry a curve (``train.eval_every``); the
    paradigms that do not train (zero data) as levels. Pass the chosen runs only (one per paradigm and
    seed), or the means mix hyper-parameter candidates."""
    groups = defaultdict(list)
    for r in results:
        plan = plan_name(r["cell_config"]["compress"]) if "cell_config" in r else "?"
        groups[(r["task"], plan)].append(r)
    series = {}
    for key, rs in sorted(groups.items()):
        curved = [r for r in rs if r.get("curve")]
        if not curved:
            continue
        metric = next(iter(curved[0]["best_val"]))
        curves = {}
        for paradigm in sorted({r["paradigm"] for r in curved}, key=lambda p: ORDER.get(p, len(ORDER))):
            by_step = defaultdict(list)
            for r in curved:
                if r["paradigm"] == paradigm:
                    for pt in r["curve"]:
                        by_step[pt["step"]].append(pt[f"val_{metric}"])
            curves[paradigm] = [(s, statistics.fmean(by_step[s])) for s in sorted(by_step)]
        flat = defaultdict(list)
        for r in rs:
            if not PARADIGM_SPECS.get(r["paradigm"], PARADIGM_SPECS["clm_pet"]).trains:
                flat[r["paradigm"]].append(r["best_val"][metric])
        series[key] = {"metric": metric, "curves": curves,
                       "levels": {p: statistics.fmean(v) for p, v in sorted(flat.items())}}
    return series


def plot_curves(results: list[dict], out: Path) -> list[Path]:
    """Convergence (Figure 3): validation metric against optimizer steps per paradigm (mean over seeds),
    zero-data paradigms as dashed levels (``curve_series``)."""
    plt = _pyplot()
    if plt is None:
        return []
    paths = []
    for (task, plan), s in curve_series(results).items():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for paradigm, pts in s["curves"].items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=LABELS.get(paradigm, paradigm))
        for paradigm, level in s["levels"].items():
            ax.axhline(level, ls="--", lw=1, color="grey", label=LABELS.get(paradigm, paradigm))
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(f"val {s['metric']}")
        ax.set_title(f"{task}, plan {plan}")
        paths.append(_save(fig, out / f"curve_{task}_{_slug(plan)}.png"))
    return paths


def curve_table(series: dict[tuple[str, str], dict]) -> str:
    """Figure 3 as numbers (``curve_series``): per task, plan and paradigm the mean validation metric at the
    start (step 0: an inherited paradigm starts from its teacher's modules), after a quarter, half and all of
    the training steps, its best, and the first step whose value is within 1 point of that best (how fast
    it converges); zero-data paradigms as their level. Empty when no result has a curve."""
    if not series:
        return ""
    lines = ["## Convergence (Figure 3)", "",
             "Validation metric (mean over the chosen runs' seeds, in percent except log-likelihoods) against "
             "optimizer steps. 'within 1 of best': the first step whose value is within 1 point of the curve's "
             "own best. A paradigm with no training (no data) shows its level.", "",
             "| task | plan | paradigm | step 0 | 1/4 | 1/2 | end | best | within 1 of best |", "|---|---|---|---|---|---|---|---|---|"]
    for (task, plan), s in series.items():
        scale = metric_scale(s["metric"])
        for paradigm, pts in s["curves"].items():
            last = pts[-1][0]

            def at(frac: float) -> str:
                step, value = min(pts, key=lambda p: (abs(p[0] - frac * last), p[0]))
                return f"{scale * value:.2f} ({step})"

            best = max(v for _, v in pts)
            reach = next(st for st, v in pts if scale * (best - v) <= 1.0)
            lines.append(f"| {task} | {plan} | {LABELS.get(paradigm, paradigm)} | {scale * pts[0][1]:.2f} | "
                         f"{at(0.25)} | {at(0.5)} | {scale * pts[-1][1]:.2f} ({last}) | {scale * best:.2f} | {reach} |")
        for paradigm, level in s["levels"].items():
            v = f"{scale * level:.2f}"
            lines.append(f"| {task} | {plan} | {LABELS.get(paradigm, paradigm)} | {v} | {v} | {v} | {v} (0) | {v} | 0 |")
    return "\n".join(lines) + "\n"


def timing_table(rows: list[dict]) -> str:
    """Table 5's costs per plan and paradigm, medians over the runs the tables show (every task and seed):
    seconds per training step (the steps alone where the run recorded them, the teacher's cached forward left
    out; else its whole training time over its steps, validation passes included: marked), evaluation
    milliseconds per test example (batched, not one request's latency) and the task parameters trained."""
    vals = defaultdict(lambda: defaultdict(list))
    for r in rows:
        vals[(r["plan"], r["paradigm"], r["variant"])][r["metric"]].append(float(r["value"]))
    if not vals:
        return ""
    out = ["## Costs per paradigm (Table 5)", "",
           "Medians over the chosen runs of every task and seed. Measured inside the grid's runs, on a machine "
           "that may have been shared: read ratios within a plan, not absolute speed (for that, `cpet bench`). "
           "Train s/step: the optimizer steps alone, the teacher's forward left out (its outputs are computed once "
           "per experiment and cached); marked * they include the validation passes (runs from before step timing "
           "was recorded). Where only some runs timed their steps, their median comes first, with their count "
           "(the same cells for every paradigm of a plan when they ran together).", "",
           "| plan | paradigm | train s/step | eval ms/example | task params | runs |", "|---|---|---|---|---|---|"]
    for (plan, paradigm, variant), m in sorted(vals.items(), key=lambda kv: (kv[0][0], ORDER.get(kv[0][1], len(ORDER)),
                                                                          kv[0][2])):
        runs = len(m["trainable_params"])
        timed, whole = m["train_step_seconds"], m["train_seconds_per_step"]
        step = f"{statistics.median(whole):.3f}*" if whole else "-"
        if timed and len(timed) == runs:
            step = f"{statistics.median(timed):.3f}"
        elif timed:  # some runs timed their steps: their median beside every run's marked one
            step = f"{statistics.median(timed):.3f} ({len(timed)} timed); {step}"
        ev = f"{statistics.median(m['eval_ms_per_example']):.2f}" if m["eval_ms_per_example"] else "-"
        params = f"{statistics.median(m['trainable_params']):,.0f}" if m["trainable_params"] else "-"
        name = LABELS.get(paradigm, paradigm) + (f" ({variant})" if variant else "")
        out.append(f"| {plan} | {name} | {step} | {ev} | {params} | {runs} |")
    return "\n".join(out) + "\n"


def variant_parts(variant: str) -> list[str]:
    """The "k=v" parts of a variant "k=v, k=v" (``plan_and_variant`` builds them): split only where ", " starts a
    new key, so a value that is a mapping or a list ({"alpha": 1.0, "outputs": ["logits"]}) stays one part. A text
    inside such a value that itself holds ", name=" would still split there."""
    return [p for p in _PART_START.split(variant) if p]


_PART_START = re.compile(r", (?=[A-Za-z_][\w.]*=)")


def split_variant(variant: str, keys: tuple[str, ...]) -> tuple[str, str]:
    """("k=v, ..." of the keys not selected, "k=v, ..." of the selected ones)."""
    parts = variant_parts(variant)
    chosen = [p for p in parts if p.split("=", 1)[0] in keys]
    return ", ".join(p for p in parts if p not in chosen), ", ".join(chosen)


def _candidate_order(candidate: str) -> tuple:
    """Sort key of "k=v, ..." with numbers compared as numbers (1e-05 before 0.001), so a tie on validation
    goes to the lowest values (the smaller learning rate), whatever way the numbers are written."""
    def value(part: str) -> tuple:
        key, _, v = part.partition("=")
        try:
            return (key, 0, float(v), "")
        except ValueError:
            return (key, 1, 0.0, v)
    return tuple(value(p) for p in variant_parts(candidate))


def choose_on_validation(rows: list[dict], keys: tuple[str, ...],
                         seeds: tuple[int, ...] | None = None) -> tuple[dict[tuple, str], list[str]]:
    """Per (task, plan, paradigm, other axes): the values of ``keys`` ("k=v, ...") with the best validation
    mean, compared on the seeds every candidate has (a grid that searches on some seeds runs the others
    with the chosen values only; ``seeds``: only these seeds' validation counts, as the grid's search);
    paradigms with a teacher choose among the candidates that keep the values chosen for base+PET (a
    teacher's lr is not theirs to pick; with no such run yet the group is left unchosen, never set beside
    another teacher). Returns the choices and a markdown table of the search (candidates' validation
    means, the chosen one's test mean over all its seeds)."""
    main_metric, scale = main_metrics(rows)
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        rest, chosen = split_variant(r["variant"], keys)
        groups[(r["task"], r["plan"], r["paradigm"], rest)][chosen].append(r)
    choices: dict[tuple, str] = {}
    lines = ["| task | plan | paradigm | other axes | candidates: val mean (seeds) | chosen | test (all its seeds) |",
             "|---|---|---|---|---|---|---|"]
    parts = lambda v: frozenset(variant_parts(v))  # noqa: E731
    teacher: dict[tuple[str, frozenset], set[str]] = {}  # (task, base+PET's other axes) -> its chosen "key=value" parts
    for group, cands in sorted(groups.items(), key=lambda kv: (kv[0][2] != "base_pet", kv[0][0], kv[0][1],
                                                              ORDER.get(kv[0][2], 99), kv[0][3])):
        task, plan, paradigm, rest = group
        metric = main_metric.get(task)
        # its teacher: the base+PET group of the task whose axes (a PET config, say) this group shares
        mine = [k for k in teacher if k[0] == task and k[1] <= parts(rest)]
        if PARADIGM_SPECS[paradigm].needs_teacher and mine:
            base_keys = {p.split("=", 1)[0]: p for p in teacher[max(mine, key=lambda k: len(k[1]))]}
            kept = {c: rs for c, rs in cands.items()
                    if all(base_keys.get(p.split("=", 1)[0], p) == p for p in variant_parts(c))}
            if not kept:  # no run yet with the teacher's chosen values: nothing to choose from (never another teacher's)
                continue
            cands = kept
        val = {c: {r["seed"]: float(r["value"]) for r in rs if r["metric"] == f"val_{metric}"
                   and (seeds is None or r["seed"] in seeds)} for c, rs in cands.items()}
        val = {c: v for c, v in val.items() if v}
        if not val:
            continue
        common = set.intersection(*(set(v) for v in val.values()))
        scored = {c: statistics.fmean(v[s] for s in common) if common else statistics.fmean(v.values())
                  for c, v in val.items()}
        best = max(sorted(scored, key=_candidate_order), key=lambda c: scored[c])  # ties: the lowest values
        choices[group] = best
        if paradigm == "base_pet":
            teacher[(task, parts(rest))] = set(parts(best))
        test = [float(r["value"]) for r in cands[best] if r["metric"] == metric]
        on = f"seeds {', '.join(map(str, sorted(common)))}" if common else "all seeds (none common)"
        lines.append(f"| {task} | {plan} | {LABELS.get(paradigm, paradigm)} | {rest or '—'} | " + "; ".join(
            f"{c or '—'}: {scale[task] * scored[c]:.2f}" for c in sorted(scored)) +
            f" (on {on}) | {best or '—'} | {_fmt(test, scale[task])} |")
    return choices, lines


def select_on_validation(rows: list[dict], keys: tuple[str, ...],
                         seeds: tuple[int, ...] | None = None) -> tuple[list[dict], str]:
    """Hyper-parameters chosen on validation only (``choose_on_validation``): the rows of the chosen
    runs (the selected keys moved out of the variant) and the markdown table of the search."""
    choices, lines = choose_on_validation(rows, keys, seeds)
    out = []
    for r in rows:
        rest, chosen = split_variant(r["variant"], keys)
        if choices.get((r["task"], r["plan"], r["paradigm"], rest)) == chosen:
            out.append({**r, "variant": rest})
    return out, "\n".join(lines)


def write_report(results: list[dict], out_dir: str | Path, title: str = "Results",
                 bench: str | Path | None = None, select: tuple[str, ...] = (),
                 select_seeds: tuple[int, ...] | None = None) -> dict[str, Path]:
    """results.csv + results.md (+ PNGs) under ``out_dir`` from result records; with ``bench`` (cpet bench
    JSON) a table of quality against measured speed, size and fidelity per plan. ``select``: config keys
    (grid axes) whose value is chosen per task, plan and paradigm on validation; the tables then show
    the chosen runs and a search table says what was tried and chosen (results.csv keeps every run);
    ``select_seeds``: choose on these seeds' validation only (the grid's search seeds, as the grid did)."""
    if not results:
        raise CpetError("no finished results to report (run the grid first, or check the folder)")
    out = Path(out_dir)
    check_one_run_per_row(results)
    rows = long_rows(results)
    write_csv(rows, out / "results.csv")
    prov = defaultdict(set)  # field -> the values the results were produced with
    for r in results:
        for k, v in (r.get("provenance") or {}).items():
            if k in ("cpet", "commit", "torch", "transformers", "threads", "cpu") and v is not None:
                prov[k].add(str(v))
    provenance = [f"{k} {', '.join(sorted(prov[k]))}" for k in ("cpet", "commit", "torch", "transformers", "threads", "cpu")
                  if prov[k]]
    data = sorted({f"{r['task']} {r['provenance']['data']}" for r in results if (r.get("provenance") or {}).get("data")})
    search = ""
    if select:
        rows, table = select_on_validation(rows, tuple(select), select_seeds)
        on = (f"seeds {', '.join(map(str, select_seeds))} (the grid's search)" if select_seeds else
              "the seeds every candidate ran")
        search = (f"## Hyper-parameters chosen on validation\n\n{', '.join(select)} chosen per task, plan and "
                  f"paradigm by the validation mean over {on} (test never consulted; a tie goes to the lower "
                  "values; a paradigm with a teacher chooses among the runs at its teacher's chosen values); the "
                  "tables below show the chosen runs on every seed.\n\n" + table + "\n\n")
    chosen = chosen_runs(results, rows)
    pngs = plot(rows, out) + plot_curves(chosen, out)
    curves = curve_table(curve_series(chosen))
    text = (f"# {title}\n\n{len(results)} results ({len({r['cell'] for r in results})} cells). "
            f"Produced with: {'; '.join(provenance) or 'unknown'}."
            + (f" Examples used (digest per task): {', '.join(data)}." if data else "") + "\n\n" + search + tables(rows, trivial_baselines(results))
            + "\n" + timing_table(rows)
            + ("\n" + curves if curves else "")
            + ("\n" + cost_table(rows, load_bench(bench)) if bench else "")
            + ("\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n" if pngs else ""))
    atomic_write(out / "results.md", text.encode())
    return {"csv": out / "results.csv", "md": out / "results.md", **{p.stem: p for p in pngs}}
