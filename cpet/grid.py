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
"""

from __future__ import annotations

import itertools
import json
import os
import time
import traceback
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable

from transformers import AutoConfig

from cpet.config import PARADIGM_SPECS, ExperimentConfig, TaskConfig, load_config, read_yaml_mapping
from cpet.errors import CpetError
from cpet.experiments import StoreLayout, run_experiment
from cpet.fingerprint import digest
from cpet.io import atomic_write_json, read_json
from cpet.models import resolve_model_path
from cpet.tasks import load_task

CELLS = "cells"
# config keys added after grids were first committed, with the value that means "as before" (cell ids
# of existing stores stay valid; a non-default value is part of the id like any key)
ADDED_LATER = ((("model", "small"), None), (("mmlu", "lm_eval"), False), (("pet",), {"method": "lora", "options": {}}))


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
    def labels(self) -> dict[str, str]:
        """Axis values as short text (a string as is; numbers, lists and mappings as JSON)."""
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.values.items()}


@dataclass(frozen=True)
class Grid:
    root: Path
    cells: list[Cell]


def _dotted(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML flow syntax: the override parses back to the value


def load_grid(path: str | Path, overrides: list[str] | None = None, output_dir: str | None = None) -> Grid:
    """Parse a grid file; every cell's config is built and validated here, before anything runs."""
    path = Path(path)
    data = read_yaml_mapping(path, "grid file")
    unknown = sorted(set(data) - {"base", "axes", "output_dir"})
    if unknown:
        raise CpetError(f"{path}: unknown key {unknown[0]!r}; a grid has base, axes and output_dir")
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
    return Grid(root, cells)


def cell_record(root: Path, cell: Cell) -> dict | None:
    f = root / CELLS / f"{cell.id}.json"
    return read_json(f, "grid cell record", f"delete {f} to run that cell again") if f.is_file() else None


# Seconds per example measured by the demo (all-MiniLM-L6-v2, 128 tokens, batch 32, 2 cores, 2026-11-30):
# training per epoch (base+PET, a CLM paradigm, one with recovery modules) and evaluation.
RATES = {"train": 0.025, "train_clm": 0.030, "train_recover": 0.042, "eval": 0.0067}
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
def _split_sizes(task: TaskConfig) -> tuple[int, int, int] | None:
    """(train, val, test) sizes of a task config; None when its data cannot be read."""
    try:
        data = load_task(task)
    except CpetError:
        return None  # the run will record this cell as failed
    return len(data.train), len(data.val), len(data.test)


def prior_seconds(cell: Cell, shared: set) -> float:
    """A rough time for one cell from the demo's rates, counting a teacher once per (model, task, PET,
    training) key in ``shared`` (cells share it); finished cells refine the estimate."""
    cfg = cell.config
    sizes = _split_sizes(cfg.task)
    if sizes is None:
        return 0.0
    n_train, n_val, n_test = sizes
    epochs, total = cfg.train.epochs, 0.0
    for p in cfg.paradigms:
        spec = PARADIGM_SPECS[p]
        if p == "base_pet":
            key = (cfg.model, cfg.task, cfg.pet_config, cfg.train)
            if key in shared:
                continue
            shared.add(key)
        rate = RATES["train"] if not spec.compressed else RATES["train_recover" if spec.recover else "train_clm"]
        total += (n_train * epochs * rate if spec.trains else 0.0) \
            + (n_val * (epochs if spec.trains else 1) + n_test) * RATES["eval"]
    return total * _model_size(cfg.model.name) * cfg.model.max_length / 128


def _eta(prior_left: float, done: list[tuple[float, float]]) -> str:
    """Time left: the prior of the cells to run, scaled by how finished cells compared with their prior."""
    ratio = sum(s for s, _ in done) / max(1e-9, sum(p for _, p in done)) if done else 1.0
    how = f"measured / prior = {ratio:.2f} over {len(done)} finished cells" if done else \
        "prior from the demo's rates scaled by model size; refined as cells finish"
    return f"ETA ~{prior_left * ratio / 60:.0f} min ({how})"


def describe(grid: Grid, log: Callable[[str], None] = print) -> list[dict]:
    """The cells with their status and an estimate of the time left."""
    rows, done, prior_left, shared = [], [], 0.0, set()
    for cell in grid.cells:
        rec = cell_record(grid.root, cell)
        status = rec["status"] if rec else "todo"
        prior = prior_seconds(cell, shared)
        if status == "done":
            done.append((rec["seconds"], prior))
        else:
            prior_left += prior
        rows.append({"cell": cell.id, "status": status, "est_min": round(prior / 60, 1), **cell.labels})
    left = sum(r["status"] != "done" for r in rows)
    for r in rows:
        log(f"  [{r['status']:>6}] {r['cell']}  ~{r['est_min']:.1f} min  " + "  ".join(
            f"{k}={v}" for k, v in r.items() if k not in ("cell", "status", "est_min")))
    log(f"{len(rows)} cells, {len(rows) - left} done, {left} to run; {_eta(prior_left, done)}")
    return rows


def run_grid(grid: Grid, log: Callable[[str], None] = print, retry_failed: bool = False,
             executor: str = "local", workers: int = 2) -> list[dict]:
    """Run every cell not yet done; returns the cell records (grid order). A cell that raises is recorded
    as failed with its error and the others go on; ``retry_failed`` runs failed cells again.

    ``executor``: ``local`` runs the cells one after another in this process; ``ray`` runs them as Ray
    tasks, ``workers`` at a time on a local Ray instance (on the cluster ``RAY_ADDRESS`` names, its CPUs
    decide how many run at once; the store must be a folder every worker sees). Cells that need the same compressed backbone or teacher make it
    once: the first takes its folder's lock, the others wait for it (``cpet.io.folder_lock``)."""
    recorded = {c.id: cell_record(grid.root, c) for c in grid.cells}
    skip = ("done",) if retry_failed else ("done", "failed")
    todo = [c for c in grid.cells if (recorded[c.id] or {}).get("status") not in skip]
    shared: set = set()
    priors = {c.id: prior_seconds(c, shared) for c in grid.cells}
    log(f"grid {grid.root}: {len(grid.cells)} cells, {len(grid.cells) - len(todo)} already recorded"
        + (f"; {len(todo)} to run on Ray, {workers} at a time" if executor == "ray" and todo else ""))
    done: list[tuple[float, float]] = []
    left = [c.id for c in todo]

    position = {c.id: n for n, c in enumerate(grid.cells, 1)}

    def finished(cell: Cell, rec: dict) -> None:
        atomic_write_json(grid.root / CELLS / f"{cell.id}.json", rec)
        recorded[cell.id] = rec
        if rec["status"] == "done":
            done.append((rec["seconds"], priors[cell.id]))
        else:
            log(f"  cell {cell.id} failed: {rec['error']}")
        left.remove(cell.id)
        par = workers if executor == "ray" else 1
        log(f"  cell {cell.id} {rec['status']} in {rec['seconds']:.0f}s; {len(left)} cells left, "
            f"{_eta(sum(priors[c] for c in left) / par, done)}")

    if executor == "ray":
        for cell in todo:
            log(f"queued cell {position[cell.id]}/{len(grid.cells)} {cell.id}: " + _labels(cell))
        _run_on_ray(grid, todo, workers, finished)
    elif executor == "local":
        for cell in todo:
            log(f"cell {position[cell.id]}/{len(grid.cells)} {cell.id}: " + _labels(cell))
            finished(cell, run_cell(cell, grid.root, log=lambda s: log("  " + s)))
    else:
        raise CpetError(f"executor {executor!r}: use local or ray")
    records = [recorded[c.id] for c in grid.cells]
    failed = [r for r in records if r and r["status"] == "failed"]
    if failed:
        log(f"{len(failed)} cells failed (see {grid.root / CELLS}/<cell>.json); rerun with --retry-failed")
    return records


def _labels(cell: Cell) -> str:
    return "  ".join(f"{k}={v}" for k, v in cell.labels.items())


def _failed(cell: Cell, seconds: float, error: str, **extra) -> dict:
    return {**_cell_base(cell), "status": "failed", "seconds": round(seconds, 1), "error": error, **extra}


def _cell_base(cell: Cell) -> dict:
    return {"cell": cell.id, "values": cell.values, "labels": cell.labels, "config": cell.config.to_dict()}


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


def results_of(root: Path) -> list[dict]:
    """Every finished paradigm of the recorded cells (each distinct result once): the result record + the
    axis labels and config of the (first) cell that produced it."""
    layout = StoreLayout(Path(root))
    out, seen = [], set()
    for f in sorted((Path(root) / CELLS).glob("*.json")):
        rec = read_json(f, "grid cell record", f"delete {f} to run that cell again")
        if rec.get("status") != "done":
            continue
        for paradigm, fp in rec["results"].items():
            if (paradigm, fp) in seen:  # a teacher shared by cells that differ only in the plan: once
                continue
            seen.add((paradigm, fp))
            rf = layout.paradigm_dir(paradigm, fp) / "result.json"
            result = read_json(rf, "result", f"delete {rf.parent} and {f}, then rerun the grid")
            out.append({**result, "cell": rec["cell"], "labels": rec["labels"], "cell_config": rec["config"]})
    return out

