"""``cpet <verb>``: each verb parses its arguments into a config and makes one library call."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cpet.errors import CpetError

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def _run(config_path, overrides: list[str], output_dir: str | None) -> int:
    import torch

    from cpet.config import load_config
    from cpet.experiments import results_table, run_experiment

    if output_dir:
        overrides = [*overrides, f"output_dir={output_dir}"]
    cfg = load_config(config_path, overrides)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    records = run_experiment(cfg, log=lambda s: print(s, flush=True))
    if int(os.environ.get("RANK", "0")) != 0:  # other processes of a distributed launch stay quiet
        return 0
    print()
    print(results_table(records))
    print(f"\nresults: {Path(cfg.output_dir).resolve()} (one result.json per paradigm, results.md)")
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


def _compress(model: str, plan_text: str, out: str, data_dir: str | None) -> int:
    from cpet.compress import compress, needs_calibration, plan_to_json, save_compressed
    from cpet.models import load_backbone

    plan = _plan_arg(plan_text)
    plan_to_json(plan)  # validate before loading anything
    backbone, tok = load_backbone(model)
    if needs_calibration(plan):
        print("calibrating on task-agnostic text (alpaca)", flush=True)
    compress(backbone, plan, tokenizer=tok, data_dir=data_dir)
    path = save_compressed(backbone, tok, out, plan, source=model)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpet", description="Parameter-efficient tuning for compressed LMs (CPET).")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("demo", help="run the embedded default experiment (MiniLM, SST-2, prune 70%% + int8)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=1")
    p.add_argument("-o", "--output-dir", default=None)
    p = sub.add_parser("run", help="run an experiment YAML: every paradigm, one result JSON each")
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. task.name=rte train.lr=5e-4")
    p.add_argument("-o", "--output-dir", default=None)
    p = sub.add_parser("compress", help="compress a backbone once and save it (safetensors + plan)")
    p.add_argument("model", help="HF id, local folder, or minilm")
    p.add_argument("--plan", required=True, help="YAML file, inline list, or preset like UP+Q (presets: Q, UP, SP)")
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--data-dir", default=None, help="data folder holding alpaca/ for calibration text")
    p = sub.add_parser("bench", help="size, ideal and measured speedup, memory, fidelity of compressed backbones")
    p.add_argument("dirs", nargs="+", help="folders written by cpet compress (same source model)")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("--shapes", default="1x16,8x128,32x128", help="batch x seq shapes, comma-separated")
    p.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        if args.verb == "demo":
            return _run(DEMO_CONFIG, args.overrides, args.output_dir)
        if args.verb == "run":
            return _run(args.config, args.overrides, args.output_dir)
        if args.verb == "compress":
            return _compress(args.model, args.plan, args.output_dir, args.data_dir)
        if args.verb == "bench":
            return _bench(args.dirs, args.json, args.shapes, args.repeats)
    except CpetError as e:
        print(f"cpet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpet: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
