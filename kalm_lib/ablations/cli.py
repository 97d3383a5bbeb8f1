"""``kalm ablate --grid <name> --run-dir DIR [...]``: run a declarative ablation grid and print its deltas."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kalm_lib.ablations.analysis import LEVELS, aggregate
from kalm_lib.ablations.grid import expand, expand_runs, load_grid
from kalm_lib.ablations.run import RESULTS, make_run_fn, run_grid
from kalm_lib.ablations.switches import SWITCHES, value_label
from kalm_lib.config import ConfigError, split_override

DEFAULT_RUNNER = "trainer"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kalm ablate", description="Run a declarative ablation grid.")
    p.add_argument("--grid", help="grid name in configs/ablations/ or a YAML path")
    p.add_argument("--run-dir", default=None, help="run directory (results in <run-dir>/ablations/)")
    p.add_argument("--seeds", type=int, nargs="+", help="override the grid's seeds")
    p.add_argument("--runner", default=DEFAULT_RUNNER,
                   help="'trainer' (kalm_lib.train + kalm_lib.evaluation, see --finetune-config), or "
                        "module:function / file.py:function run_fn(cell_config, seed) -> {task: score}")
    p.add_argument("--finetune-config", help="trainer runner: fine-tune stage config (configs/train/...)")
    p.add_argument("--pretrain-config", help="trainer runner: pre-train stage config (stage 1 per cell)")
    p.add_argument("--eval-config", help="trainer runner: evaluation config (configs/eval/...)")
    p.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer runner: evaluation override, e.g. 'tasks=[KalmDev-STSB-en]'")
    p.add_argument("--keep-models", action="store_true",
                   help="trainer runner: keep every cell's checkpoints (default: delete once scored)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer runner: extra StageConfig override for every cell, e.g. train.max_steps=30")
    p.add_argument("--level", default="mtk", choices=LEVELS, help="aggregation level of the printed table")
    p.add_argument("--dry-run", action="store_true", help="print the expanded cells and overrides, run nothing")
    p.add_argument("--list-switches", action="store_true", help="list the known switches")
    return p


def _list_switches() -> None:
    for s in SWITCHES.values():
        values = list(s.choices) if s.choices else s.kind
        print(f"{s.name:<30} default {value_label(s.default):<20} {values}  {s.help}")


def cli_main(argv: list[str]) -> int:
    """Parse ``argv``, run (or list, or dry-run) the grid; 2 on a config error, which names its cause."""
    args = _parser().parse_args(argv)
    if args.list_switches:
        _list_switches()
        return 0
    if not args.grid:
        print("kalm ablate: --grid is required", file=sys.stderr)
        return 2
    try:
        spec = load_grid(args.grid)
        runs = expand_runs(spec, args.seeds)
        if args.dry_run:
            cells = expand(spec)
            print(f"grid {spec.name}: {len(cells)} cells x {len(runs) // len(cells)} seeds = {len(runs)} runs")
            for c in cells:
                print(f"  {c.name:<40} {json.dumps(c.as_config()['overrides'])}")
            return 0
        if not args.run_dir:
            print("kalm ablate: --run-dir is required to run the grid", file=sys.stderr)
            return 2
        run_fn = make_run_fn(args.runner, args.run_dir, finetune_config=args.finetune_config,
                             pretrain_config=args.pretrain_config, eval_config=args.eval_config,
                             train_overrides=dict(split_override(o) for o in args.override),
                             eval_overrides=args.eval_override, keep_models=args.keep_models)
        results = run_grid(spec, run_fn, args.run_dir, seeds=args.seeds)
    except (ConfigError, FileNotFoundError) as e:
        print(f"kalm ablate: error: {e}", file=sys.stderr)
        return 2
    print(aggregate(results, level=args.level).to_string(index=False))
    print(f"results: {Path(args.run_dir) / RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
