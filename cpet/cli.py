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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpet", description="Parameter-efficient tuning for compressed LMs (CPET).")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("demo", help="run the embedded default experiment (MiniLM, SST-2, prune 50%% + int8)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=1")
    p.add_argument("-o", "--output-dir", default=None)
    p = sub.add_parser("run", help="run an experiment YAML: every paradigm, one result JSON each")
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. task.name=rte train.lr=5e-4")
    p.add_argument("-o", "--output-dir", default=None)
    args = parser.parse_args(argv)
    try:
        if args.verb == "demo":
            return _run(DEMO_CONFIG, args.overrides, args.output_dir)
        if args.verb == "run":
            return _run(args.config, args.overrides, args.output_dir)
    except CpetError as e:
        print(f"cpet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpet: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
