"""Experiments as data: a base experiment plus axes -> cells, run (or continued) one after another.

    base:  an experiment (inline mapping, or the path of an experiment YAML)
    axes:  {dotted key: [values]}    e.g. task.name: [sst2, rte], compress: [Q, UP], train.seed: [1, 2, 3]
    output_dir: runs/grid

Cells are the product of the axes (first axis outermost). Every cell runs ``run_experiment`` on a
content-addressed store (``StoreLayout``): a paradigm's folder is named by the fingerprint of its
inputs, so cells share what they have in common (one compressed backbone per model, plan and
calibration; one base+PET teacher per task, seed and PET config), a rerun skips what is done, and a
changed config can never reuse a stale result. Each cell's record (its axis values, config, status,
the fingerprints of its results, or its error) is ``<root>/cells/<cell id>.json``; a failed cell is
recorded and the rest go on.

    select: {keys: [train.lr, train.clm_lr], seeds: [42]}   (optional)

A hyper-parameter search the grid runs itself: ``keys`` are axes whose value validation chooses per
task, plan and paradigm (the other axes apart); the search runs every candidate on ``seeds`` (base+PET
first: a paradigm with a teacher only tries the teacher's chosen values), and the other seeds run each
paradigm at its chosen values only. ``cpet report`` applies the same choice (``select.json``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import traceback
from dataclasses import asdict, dataclass, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable

from transformers import AutoConfig, AutoTokenizer

from cpet.config import PARADIGM_SPECS, ExperimentConfig, TaskConfig, TrainConfig, load_config, read_yaml_mapping
from cpet.errors import CpetError
from cpet.experiments import StoreLayout, run_experiment
from cpet.fingerprint import digest
from cpet.io import atomic_write_json, read_json
from cpet.models import resolve_model_path
from cpet.report import choose_on_validation, long_rows, plan_and_variant, split_variant
from cpet.tasks import load_task
from cpet.train import epoch_batches

CELLS = "cells"
SELECT = "select.json"  # the grid's search (keys, seeds): cpet report applies it by default
# config keys added after grids were first committed, with the value that means "as before" (cell ids
# of existing stores stay valid; a non-default value is part of the id like any key)
ADDED_LATER = ((("model", "small"), None), (("mmlu", "lm_eval"), False), (("pet",), {"method": "lora", "options": {}}),
               (("train", "group_by_length"), False))


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its axis values (as written in the grid file) and its resolved config."""

    values: dict  # dotted key -> value as given
    config: ExperimentConfig

    @cached_property
    def id(self) -> str:
        """The fingerprint of the resolved config (output_dir aside)."""
        d = self.config.to_dict()
        d.pop("output_dir", None)
        for path, default in ADDED_LATER:  # at their defaults, keys added since a store was made leave ids as they were
            *parents, key = path
            sec = d
            for p in parents:
                sec = sec.get(p, {})
            if key in sec and sec[key] == default:
                del sec[key]
        return digest(d)

    @cached_property
    def config_dict(self) -> dict:
        """The resolved config as a mapping (read, never changed: records, plan names, estimates use it)."""
        return self.config.to_dict()

    @cached_property
    def labels(self) -> dict[str, str]:
        """Axis values as short text (a string as is; numbers, lists and mappings as JSON)."""
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.values.items()}


@dataclass(frozen=True)
class Selection:
    """Axes whose value is chosen on validation (``keys``), searched on ``seeds``."""

    keys: tuple[str, ...]
    seeds: tuple[int, ...]

    def searches(self, cell: Cell) -> bool:
        return cell.config.train.seed in self.seeds

    @property
    def spec(self) -> dict:
        """As ``select.json`` holds it."""
        return {"keys": list(self.keys), "seeds": list(self.seeds)}


@dataclass(frozen=True)
class Grid:
    root: Path
    cells: list[Cell]
    select: Selection | None = None


def _dotted(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML flow syntax: the override parses back to the value


def load_grid(path: str | Path, overrides: list[str] | None = None, output_dir: str | None = None) -> Grid:
    """Parse a grid file; every cell's config is built and validated here, before anything runs."""
    path = Path(path)
    data = read_yaml_mapping(path, "grid file")
    unknown = sorted(set(data) - {"base", "axes", "output_dir", "select"})
    if unknown:
        raise CpetError(f"{path}: unknown key {unknown[0]!r}; a grid has base, axes, output_dir and select")
    base = data.get("base") or {}
    if isinstance(base, str):  # a path to an experiment YAML, relative to the grid file
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        base = read_yaml_mapping(base_path, "base experiment")
    if not isinstance(base, dict):
        raise CpetError(f"{path}: base must be an experiment mapping or the path of an experiment YAML")
    axes = data.get("axes") or {}
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        raise CpetError(f"{path}: axes must map dotted keys to non-empty lists, e.g. train.seed: [1, 2, 3]")
    root = Path(output_dir or data.get("output_dir") or "runs/grid")
    cells = []
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        try:
            cfg = load_config(None, [*(overrides or []), *(_dotted(k, v) for k, v in values.items())], base=base)
        except CpetError as e:
            raise CpetError(f"{path}, cell {values}: {e}") from None
        cells.append(Cell(values, cfg))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise CpetError(f"{path}: two cells resolve to the same config (an axis repeats a value?)")
    return Grid(root, cells, _selection(path, data.get("select"), axes))


def _selection(path: Path, spec, axes: dict) -> Selection | None:
    """The grid's ``select`` section, checked against its axes."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) != {"keys", "seeds"}:
        raise CpetError(f"{path}: select must be {{keys: [axes chosen on validation], seeds: [seeds searched on]}}")
    keys, seeds = spec["keys"], spec["seeds"]
    if not isinstance(keys, list) or not keys or any(k not in axes for k in keys):
        raise CpetError(f"{path}: select.keys must name axes of this grid (axes: {list(axes)})")
    if any(k in ("task.name", "compress", "train.seed") for k in keys):
        raise CpetError(f"{path}: select.keys cannot be task.name, compress or train.seed (the search is per task, "
                        "plan and seed)")
    if not isinstance(seeds, list) or not seeds or not set(seeds) <= set(axes.get("train.seed", [])):
        raise CpetError(f"{path}: select.seeds must be values of a train.seed axis (the other seeds run the "
                        "chosen values only)")
    return Selection(tuple(keys), tuple(seeds))


def cell_record(root: Path, cell: Cell) -> dict | None:
    f = root / CELLS / f"{cell.id}.json"
    return read_json(f, "grid cell record", f"delete {f} to run that cell again") if f.is_file() else None


# Seconds per example measured by the demo (all-MiniLM-L6-v2, 128 tokens, batch 32, 2 cores, 2026-11-30):
# training per epoch (base+PET, a CLM paradigm, one with recovery modules) and evaluation.
RATES = {"train": 0.025, "train_clm": 0.030, "train_recover": 0.042, "eval": 0.0067}  # s / example, MiniLM
REF_TOKENS = {"train": 40.0, "eval": 20.0}  # tokens per example the RATES were measured at (SST-2: padded
# training batches of 32 drawn at random, length-sorted eval batches), so other tasks scale by their own
_MINILM_SIZE = 384 * 384 * 6


@lru_cache(maxsize=None)
def _model_size(name: str) -> float:
    """d^2 x layers of a model relative to MiniLM's (1.0 where its config cannot be read)."""
    try:
        c = AutoConfig.from_pretrained(resolve_model_path(name))
        d = getattr(c, "hidden_size", None) or getattr(c, "d_model")
        layers = getattr(c, "num_hidden_layers", None) or getattr(c, "num_layers")
        return d * d * layers / _MINILM_SIZE
    except Exception:  # noqa: BLE001 - an estimate only: unknown models count as MiniLM
        return 1.0


@lru_cache(maxsize=None)
def _task_data(task: TaskConfig):
    """The task's data; None when it cannot be read (the run will record that cell as failed)."""
    try:
        return load_task(task)
    except CpetError:
        return None


def _split_sizes(task: TaskConfig) -> tuple[int, int, int] | None:
    """(train, val, test) sizes of a task config; None when its data cannot be read."""
    data = _task_data(task)
    return None if data is None else (len(data.train), len(data.val), len(data.test))


@lru_cache(maxsize=None)
def _token_scale(task: TaskConfig, model: str, max_length: int, batch_size: int, grouped: bool) -> tuple[float, float]:
    """(training, eval) tokens per example of this task relative to ``REF_TOKENS``: the training batches as
    ``epoch_batches`` draws them (padded to each batch's longest; fewer with ``group_by_length``), eval at the
    mean length (its batches are length-sorted). Lengths are the text pair (or text + each choice) as the
    model's tokenizer cuts them at ``max_length``; where that cannot be read, ``max_length / 128``."""
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(model))
        data = _task_data(task)
        if data is None or not data.train:
            raise CpetError("no data")
        def rows(e):
            pairs = [(e.text_a, c) for c in e.choices] if e.choices else [(e.text_a, e.text_b)]
            return [len(tok(a, b, truncation=True, max_length=max_length)["input_ids"]) for a, b in pairs]
        lengths = [rows(e) for e in data.train]
    except Exception:  # noqa: BLE001 - an estimate only
        return max_length / 128, max_length / 128
    features = [{"rows": [{"input_ids": range(n)} for n in r]} for r in lengths]
    batches = epoch_batches(features, TrainConfig(batch_size=batch_size, group_by_length=grouped), 0)
    padded = sum(len(b) * max(max(lengths[i]) for i in b) * len(lengths[b[0]]) for b in batches) / len(lengths)
    mean = sum(sum(r) for r in lengths) / len(lengths)
    return padded / REF_TOKENS["train"], mean / REF_TOKENS["eval"]


def prior_seconds(cell: Cell, shared: set, teacher_share: float = 1.0, chosen_only: bool = False,
                  paradigms: tuple[str, ...] | None = None) -> float:
    """A rough time for one cell from the demo's rates, counting each run once across cells (``shared``
    holds what earlier cells made: a teacher per model, task, PET and training; a fresh PET trained at
    ``train.clm_lr`` whatever ``train.lr`` is); ``teacher_share``: the share of a paradigm with a teacher
    expected to run (a search tries it at the chosen teacher's rate only); ``chosen_only``: the learning rates
    are left out of what tells runs apart (a seed that does not search runs each paradigm at one rate);
    ``paradigms``: count these of the cell's paradigms only (what a search still runs there). Finished cells
    refine it."""
    cfg = cell.config
    sizes = _split_sizes(cfg.task)
    if sizes is None:
        return 0.0
    n_train, n_val, n_test = sizes
    epochs, total = cfg.train.epochs, 0.0
    for p in cfg.paradigms if paradigms is None else paradigms:
        spec = PARADIGM_SPECS[p]
        share = 1.0
        if p == "base_pet":
            key = (cfg.model, cfg.task, cfg.pet_config, _train_key(cfg.train, None if chosen_only else cfg.train.lr))
        else:  # what the run depends on, roughly: its fingerprint's inputs
            lr = None if chosen_only else cfg.train.clm_lr or cfg.train.lr
            train = _train_key(cfg.train, lr) if spec.trains else None
            key = (p, cfg.model, cfg.task, cfg.pet_config, json.dumps(cell.config_dict["compress"]), train,
                   cfg.recovery if spec.sized_by_recovery else None, cfg.distill if spec.distill else None,
                   cfg.train.lr if spec.needs_teacher and not chosen_only else None)
            share = teacher_share if spec.needs_teacher else 1.0
        if key in shared:
            continue
        shared.add(key)
        rate = RATES["train"] if not spec.compressed else RATES["train_recover" if spec.recover else "train_clm"]
        train_scale, eval_scale = _token_scale(cfg.task, cfg.model.name, cfg.model.max_length,
                                                 cfg.train.batch_size, cfg.train.group_by_length)
        passes = 1  # validation passes over n_val: the steps validation runs at (epoch ends, and with eval_every
        if spec.trains:  # the curve's points from step 0; a step that is both runs once)
            per_epoch, every = math.ceil(n_train / cfg.train.batch_size), cfg.train.eval_every
            at = {e * per_epoch for e in range(1, epochs + 1)} | (set(range(0, per_epoch * epochs + 1, every)) if every else set())
            passes = len(at)
        total += share * ((n_train * epochs * rate * train_scale if spec.trains else 0.0)
                          + (n_val * passes + n_test) * RATES["eval"] * eval_scale)
    return total * _model_size(cfg.model.name)


def _train_key(train, lr) -> tuple:
    """The training settings with the learning rate given (None: left out)."""
    return tuple(sorted({**asdict(train), "lr": lr, "clm_lr": None}.items()))


def _priors(grid: Grid, choices: dict[tuple, str] | None = None) -> dict[str, float]:
    """Each cell's prior (``prior_seconds``): with a search, a searching seed tries a paradigm with a teacher at
    one teacher rate; a seed that does not search runs what validation chose, so once the search has chosen a
    cell's paradigms its prior is the runs it will make (a cell whose candidates were not chosen: none), else
    one candidate of each paradigm spread over the cells. ``choices``: ``_choices(grid)``, when the caller has it."""
    shared: set = set()
    sel = grid.select
    if sel is None:
        return {c.id: prior_seconds(c, shared) for c in grid.cells}
    rates = len({c.labels.get("train.lr") for c in grid.cells}) if "train.lr" in sel.keys else 1
    choices = _choices(grid) if choices is None else choices
    chosen: set = set()
    priors = {}
    for c in grid.cells:
        if sel.searches(c):
            priors[c.id] = prior_seconds(c, shared, 1.0 / rates)
            continue
        keep, skipped = _chosen_paradigms(c, sel, choices)
        if any(p in skipped for p in keep):  # a paradigm not chosen yet: the spread-out estimate
            priors[c.id] = prior_seconds(c, chosen, chosen_only=True)
        else:
            priors[c.id] = prior_seconds(c, shared, paradigms=tuple(keep))
    return priors


def _ran(rec: dict) -> bool:
    """Whether a finished cell ran anything: one that only reused runs recorded by other cells (or had
    nothing chosen to run) takes well under a second and would drag measured / prior towards 0."""
    return rec["seconds"] >= 1.0


def _eta(prior_left: float, done: list[tuple[float, float]]) -> str:
    """Time left: the prior of the cells to run, scaled by how finished cells compared with their prior."""
    ratio = sum(s for s, _ in done) / max(1e-9, sum(p for _, p in done)) if done else 1.0
    how = f"measured / prior = {ratio:.2f} over {len(done)} finished cells" if done else \
        "prior from the demo's rates scaled by model size and each task's tokens; refined as cells finish"
    return f"ETA ~{prior_left * ratio / 60:.0f} min ({how})"


def describe(grid: Grid, log: Callable[[str], None] = print) -> list[dict]:
    """The cells with their status and an estimate of the time left."""
    rows, done, prior_left = [], [], 0.0
    choices = _choices(grid) if grid.select else {}
    priors = _priors(grid, choices)
    more_shared: set = set()
    for cell in grid.cells:
        rec = cell_record(grid.root, cell)
        status = rec["status"] if rec else "todo"
        prior = priors[cell.id]
        if grid.select and status in ("done", "partial"):  # the record's status is the last writer's: a grid
            # sharing the store whose search chose otherwise leaves more, or less, to run in this grid's view
            more = _unrun(rec, _chosen_paradigms(cell, grid.select, choices)[0])
            status = ("more" if status == "done" else "partial") if more else "done"
            prior = prior_seconds(cell, more_shared, paradigms=tuple(more)) if more else prior
        if status == "done":
            if _ran(rec):
                done.append((rec["seconds"], prior))
        else:
            prior_left += prior
        rows.append({"cell": cell.id, "status": status, "est_min": round(prior / 60, 1), **cell.labels})
    left = sum(r["status"] != "done" for r in rows)
    for r in rows:
        log(f"  [{r['status']:>6}] {r['cell']}  ~{r['est_min']:.1f} min  " + "  ".join(
            f"{k}={v}" for k, v in r.items() if k not in ("cell", "status", "est_min")))
    if grid.select:
        log(f"{', '.join(grid.select.keys)} searched on seeds {list(grid.select.seeds)}; the other seeds run each "
            "paradigm at its chosen values (their estimates count one run of each)")
    log(f"{len(rows)} cells, {len(rows) - left} done, {left} to run; {_eta(prior_left, done)}")
    return rows


def _unrun(rec: dict | None, paradigms) -> list[str]:
    """The paradigms with no result in a cell's record: what a search still runs there (the record may come
    from another grid sharing the store, whose search chose or tried other values)."""
    have = (rec or {}).get("results") or {}
    return [p for p in paradigms if p not in have]


def store_search(root: Path) -> dict | None:
    """The search ``select.json`` holds (the first grid that searched on this store): ``cpet report``'s default."""
    f = Path(root) / SELECT
    return read_json(f, "grid search", f"delete {f} or pass cpet report --select") if f.is_file() else None


def shares_store(grid: Grid) -> bool:
    """Whether the store holds another grid's cells or search, so that a report of this grid names it (--grid)."""
    search = store_search(grid.root)
    mine = {c.id for c in grid.cells}
    others = any(f.stem not in mine for f in (grid.root / CELLS).glob("*.json"))
    return others or (search is not None and search != (grid.select.spec if grid.select else None))


def run_grid(grid: Grid, log: Callable[[str], None] = print, retry_failed: bool = False,
             executor: str = "local", workers: int = 2) -> list[dict]:
    """Run every cell not yet done; returns the cell records (grid order). A cell that raises is recorded
    as failed with its error and the others go on; ``retry_failed`` runs failed cells again. With a
    ``select`` section the search seeds run first (base+PET, then the rest), then the other seeds, each
    paradigm at the values validation chose (see the module docstring).

    ``executor``: ``local`` runs the cells one after another in this process; ``ray`` runs them as Ray
    tasks, ``workers`` at a time on a local Ray instance (on the cluster ``RAY_ADDRESS`` names, its CPUs
    decide how many run at once; the store must be a folder every worker sees). Cells that need the same compressed backbone or teacher make it
    once: the first takes its folder's lock, the others wait for it (``cpet.io.folder_lock``)."""
    if executor not in ("local", "ray"):
        raise CpetError(f"executor {executor!r}: use local or ray")
    recorded = {c.id: cell_record(grid.root, c) for c in grid.cells}
    skip = ("done",) if retry_failed else ("done", "failed")
    todo = [c for c in grid.cells if (recorded[c.id] or {}).get("status") not in skip]
    sel = grid.select
    priors = _priors(grid)
    log(f"grid {grid.root}: {len(grid.cells)} cells, {len(grid.cells) - len(todo)} already recorded"
        + (f"; {len(todo)} to run on Ray, {workers} at a time" if executor == "ray" and todo else "")
        + (f"; {', '.join(sel.keys)} searched on seeds {list(sel.seeds)}, the other seeds run the values chosen "
           "on validation" if sel else ""))
    done: list[tuple[float, float]] = []
    left = [c.id for c in todo]
    position = {c.id: n for n, c in enumerate(grid.cells, 1)}
    failed_now: set[str] = set()  # cells that failed in this invocation: not tried again in a later round

    def finished(cell: Cell, rec: dict, final: bool = True) -> None:
        before = (recorded[cell.id] or {}).get("results") or {}
        if rec["status"] != "failed" and before:  # grids sharing a store share cell records: a paradigm this
            rec = {**rec, "results": {**before, **rec["results"]}}  # search did not choose keeps its result
        atomic_write_json(grid.root / CELLS / f"{cell.id}.json", rec)
        recorded[cell.id] = rec
        if rec["status"] == "failed":
            log(f"  cell {cell.id} failed: {rec['error']}")
        if not final and rec["status"] != "failed":
            return
        if rec["status"] == "done" and _ran(rec):
            done.append((rec["seconds"], priors[cell.id]))
        if cell.id in left:
            left.remove(cell.id)
        par = workers if executor == "ray" else 1
        log(f"  cell {cell.id} {rec['status']} in {rec['seconds']:.0f}s; {len(left)} cells left, "
            f"{_eta(sum(priors[c] for c in left) / par, done)}")

    def execute(batch: list[tuple[Cell, list[str], dict[str, str]]], final: bool = True) -> None:
        """Run each (cell, paradigms to run, paradigms not run and why); record it (partial if not final)."""
        runs = []
        for cell, keep, skipped in batch:
            if not keep:  # nothing chosen in this cell
                finished(cell, {**_cell_base(cell), "status": "done", "seconds": 0.0, "results": {},
                                "not_chosen": skipped})
                continue
            runs.append((cell, Cell(cell.values, replace(cell.config, paradigms=tuple(keep))), skipped))
        by_run = {id(narrow): (cell, skipped) for cell, narrow, skipped in runs}  # (two cells may narrow alike)

        def done_one(narrow: Cell, rec: dict) -> None:
            cell, skipped = by_run[id(narrow)]
            rec = {**rec, **_cell_base(cell)}
            if rec["status"] == "failed":
                failed_now.add(cell.id)
                before = (recorded[cell.id] or {}).get("results")
                if before:  # what finished before (its teacher, say) still counts
                    rec["results"] = before
            else:
                rec["status"] = "done" if final else "partial"
                if skipped:
                    rec["not_chosen"] = skipped
            finished(cell, rec, final)

        if executor == "ray":
            for _, narrow, _ in runs:
                log(f"queued cell {position[by_run[id(narrow)][0].id]}/{len(grid.cells)} {narrow.id}: " + _labels(narrow))
            _run_on_ray(grid, [n for _, n, _ in runs], workers, done_one)
        else:
            for cell, narrow, _ in runs:
                log(f"cell {position[cell.id]}/{len(grid.cells)} {cell.id}: " + _labels(cell)
                    + ("" if narrow.config.paradigms == cell.config.paradigms else
                       f"  [{', '.join(narrow.config.paradigms)}]"))
                done_one(narrow, run_cell(narrow, grid.root, log=lambda s: log("  " + s)))

    if sel is None:
        execute([(c, list(c.config.paradigms), {}) for c in todo])
    else:
        other = store_search(grid.root)
        if other is None:
            atomic_write_json(grid.root / SELECT, sel.spec)
        elif other != sel.spec:  # the store's default for cpet report stays the first grid's search
            log(f"{grid.root / SELECT} holds another grid's search ({other}); left as it is: report this grid's "
                "choice with cpet report --grid GRID.yaml")
        # every search cell's teacher first (also in cells another grid sharing the store recorded without it)
        search = [c for c in grid.cells if sel.searches(c) and _unrun(recorded[c.id], ["base_pet"])
                  and "base_pet" in c.config.paradigms
                  and (retry_failed or (recorded[c.id] or {}).get("status") != "failed")]
        execute([(c, ["base_pet"], {}) for c in search], final=False)
        for searching in (True, False):  # the search seeds' other paradigms, then the other seeds
            choices = _choices(grid)
            batch = []
            for c in grid.cells:
                if sel.searches(c) != searching or c.id in failed_now:
                    continue
                rec = recorded[c.id] or {}
                keep, skipped = _chosen_paradigms(c, sel, choices)
                if rec.get("status") == "done" and not _unrun(rec, keep):
                    continue  # done, and everything chosen since has its result
                if rec.get("status") == "failed" and not retry_failed:
                    continue
                missing = [p for p in keep if p in skipped]
                if missing:  # a paradigm whose search has no result: nothing to choose from
                    finished(c, _failed(c, 0.0, f"{missing[0]}: no validation result on the search seeds "
                                                f"{list(sel.seeds)} to choose {', '.join(sel.keys)} from "
                                                f"({skipped[missing[0]]}); fix the search cell, then rerun with "
                                                "--retry-failed"))
                    continue
                if c.id not in left:
                    left.append(c.id)
                batch.append((c, keep, skipped))
            execute(batch)
    records = [recorded[c.id] for c in grid.cells]
    failed = [r for r in records if r and r["status"] == "failed"]
    if failed:
        log(f"{len(failed)} cells failed (see {grid.root / CELLS}/<cell>.json); rerun with --retry-failed")
    return records


def _group(cell: Cell, paradigm: str, keys: tuple[str, ...]) -> tuple[tuple, str]:
    """A paradigm's (task, plan, paradigm, other axes) in a cell, and its candidate there ("k=v, ...")."""
    plan, variant = plan_and_variant(paradigm, cell.config_dict, cell.labels)
    rest, cand = split_variant(variant, keys)
    return (cell.config.task.name, plan, paradigm, rest), cand


def _choices(grid: Grid) -> dict[tuple, str]:
    """The values validation chose so far, from the search seeds' results of this grid's cells (another
    grid sharing the store has its own search)."""
    rows = long_rows(results_of(grid.root, grid_labels(grid)))
    return choose_on_validation(rows, grid.select.keys, grid.select.seeds)[0] if rows else {}


def _chosen_paradigms(cell: Cell, sel: Selection, choices: dict) -> tuple[list[str], dict[str, str]]:
    """The paradigms of a cell to run given the choices so far, and why each other one is not run. On a
    search seed every candidate runs, except that a paradigm with a teacher runs only where the teacher's
    chosen values are; on the other seeds a paradigm runs where its chosen values are (a paradigm whose
    search has no result yet is both kept and named in the reasons: the caller reports it)."""
    keep, skipped = [], {}
    on = f"validation, seeds {', '.join(map(str, sel.seeds))}"
    for p in cell.config.paradigms:
        group, cand = _group(cell, p, sel.keys)
        if sel.searches(cell):
            teacher, have = _group(cell, "base_pet", sel.keys) if PARADIGM_SPECS[p].needs_teacher else (None, None)
            want = choices.get(teacher)
            if want is not None and want != have:
                skipped[p] = f"its teacher runs at {want} ({on})"
            else:
                keep.append(p)
        else:
            want = choices.get(group)
            if want is None:
                keep.append(p)
                skipped[p] = f"no search result for {p} on {group[0]}, plan {group[1]}"
            elif want != cand:
                skipped[p] = f"{want or 'the other candidate'} chosen ({on})"
            else:
                keep.append(p)
    if any(PARADIGM_SPECS[p].needs_teacher for p in keep) and "base_pet" in cell.config.paradigms \
            and "base_pet" not in keep:  # its teacher: already made at these values (no work), but the config needs it
        keep.insert(0, "base_pet")
        skipped.pop("base_pet", None)
    return keep, skipped


def _labels(cell: Cell) -> str:
    return "  ".join(f"{k}={v}" for k, v in cell.labels.items())


def _failed(cell: Cell, seconds: float, error: str, **extra) -> dict:
    return {**_cell_base(cell), "status": "failed", "seconds": round(seconds, 1), "error": error, **extra}


def _cell_base(cell: Cell) -> dict:
    return {"cell": cell.id, "values": cell.values, "labels": cell.labels, "config": cell.config_dict}


def run_cell(cell: Cell, root: Path, log: Callable[[str], None] = print) -> dict:
    """Run one cell on the store at ``root``; its record (done with its results' fingerprints, or failed
    with the cause). Not written here: the caller records it."""
    t0 = time.perf_counter()
    try:
        results = run_experiment(cell.config, log=log, layout=StoreLayout(Path(root)))
        return {**_cell_base(cell), "status": "done", "seconds": round(time.perf_counter() - t0, 1),
                "results": {r["paradigm"]: r["fingerprint"] for r in results}}
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - any failure is recorded with its cause; the grid goes on
        return _failed(cell, time.perf_counter() - t0, f"{type(e).__name__}: {e}",
                       **({} if isinstance(e, CpetError) else {"traceback": traceback.format_exc()}))


def _ray_cell(cell: Cell, root: str, threads: int) -> dict:
    """A cell as a Ray task: torch on its share of the cores; log lines prefixed with the cell id."""
    import torch

    torch.set_num_threads(threads)
    return run_cell(cell, Path(root), log=lambda s: print(f"[{cell.id}] {s}", flush=True))


def _run_on_ray(grid: Grid, todo: list[Cell], workers: int, finished) -> None:
    try:
        import ray
    except ImportError:
        raise CpetError("--executor ray needs Ray: pip install 'cpet[ray]'") from None
    if workers < 1:
        raise CpetError(f"--workers {workers}: use 1 or more")
    if not todo:
        return
    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, **({} if address else {"num_cpus": workers, "include_dashboard": False}),
                 logging_level="WARNING")
    try:
        threads = max(1, (os.cpu_count() or workers) // workers)
        task = ray.remote(num_cpus=1, max_retries=0)(_ray_cell)
        pending = {task.remote(c, str(Path(grid.root).resolve()), threads): c for c in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                rec = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - a worker that died: recorded like any failure
                rec = _failed(cell, 0.0, f"Ray worker: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            finished(cell, rec)
    finally:
        if started:
            ray.shutdown()


def grid_labels(*grids: Grid) -> dict[str, dict[str, str]]:
    """Cell id -> its axis labels in these grids (a cell two grids share: the union of both grids' labels;
    one config, so one value per key, though not always one text: 1e-3 and 0.001 name one rate, and the
    later grid's text is kept)."""
    out: dict[str, dict[str, str]] = {}
    for g in grids:
        for c in g.cells:
            out[c.id] = {**out.get(c.id, {}), **c.labels}
    return out


def results_of(root: Path, cells: dict[str, dict[str, str]] | None = None) -> list[dict]:
    """Every finished paradigm of the recorded cells (each distinct result once): the result record + the
    axis labels and config of the (first) cell that produced it. ``cells`` (``grid_labels``): of these cell
    ids only, labelled as these grids label them, not as the record says. A cell's id is its config, so
    grids that share a store share cells; the record holds the labels of the grid that last wrote it, which
    lack the axes another grid adds (``recovery.r`` beside runs made without that axis): read with those,
    a later grid's candidates would not be told apart and a tie would not go to the lower value. A cell
    still partial or failed contributes the paradigms it finished (a search cell's teacher, say)."""
    layout = StoreLayout(Path(root))
    out, seen = [], set()
    for f in sorted((Path(root) / CELLS).glob("*.json")):
        if cells is not None and f.stem not in cells:
            continue
        rec = read_json(f, "grid cell record", f"delete {f} to run that cell again")
        if not rec.get("results"):
            continue
        for paradigm, fp in rec["results"].items():
            if (paradigm, fp) in seen:  # a teacher shared by cells that differ only in the plan: once
                continue
            seen.add((paradigm, fp))
            rf = layout.paradigm_dir(paradigm, fp) / "result.json"
            result = read_json(rf, "result", f"delete {rf.parent} and {f}, then rerun the grid")
            labels = cells[f.stem] if cells is not None else rec["labels"]
            out.append({**result, "cell": rec["cell"], "labels": labels, "cell_config": rec["config"]})
    return out

