"""``kalm ablate``: run a declarative ablation grid, or one (cell, seed) of it, and print its deltas.

    kalm ablate --grid cpu-demo --run-dir runs/X --finetune-config cpu-demo/finetune     # the whole grid
    kalm ablate ... --parallel 2               # cells in 2 worker processes: one cell per GPU (CPU: threads split)
    kalm ablate ... --emit-commands            # one `kalm ablate ... --cell C --seed S` line per pending run
    kalm ablate ... --cell focal=off --seed 1  # exactly one run, its rows merged into results.csv

A user mistake (unknown grid, switch or cell, a bad override, no run directory) is one line on stderr and exit
code 2; a grid or run that another process is running is refused with exit code 3, naming the holder.
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from kalm_lib.cli import ArgumentParser  # one-line usage errors for every kalm command
from kalm_lib.ablations.analysis import LEVELS, aggregate
from kalm_lib.ablations.grid import expand, load_grid
from kalm_lib.ablations.run import pending_runs, run_grid
from kalm_lib.ablations.runner import make_run_fn
from kalm_lib.ablations.store import RESULTS
from kalm_lib.ablations.switches import SWITCHES, GridError, value_label
from kalm_lib.config import ConfigError, split_override
from kalm_lib.locking import LockHeld

DEFAULT_RUNNER = "trainer"
EXIT_MISTAKE, EXIT_IN_USE = 2, 3


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="kalm ablate", description="Run a declarative ablation grid (or one cell of it).")
    p.add_argument("--grid", help="grid name in configs/ablations/ or a YAML path")
    p.add_argument("--run-dir", default=None, help="run directory (results in <run-dir>/ablations/)")
    p.add_argument("--seeds", type=int, nargs="+", help="override the grid's seeds")
    p.add_argument("--cell", help="run only this cell (a name from --dry-run), e.g. for a scheduler")
    p.add_argument("--seed", type=int, help="run only this seed (with --cell: exactly one run)")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="run cells in N worker processes: one cell per GPU when GPUs are visible "
                        "(worker i gets CUDA_VISIBLE_DEVICES=<i-th GPU>), else the CPU threads split between them")
    p.add_argument("--emit-commands", action="store_true",
                   help="print one `kalm ablate ... --cell C --seed S` command per pending run (nothing else on "
                        "stdout) and run nothing")
    p.add_argument("--runner", default=DEFAULT_RUNNER,
                   help="'trainer' (kalm_lib.train + kalm_lib.evaluation, see --finetune-config), or "
                        "module:function / file.py:function run_fn(cell_config, seed) -> {task: score}")
    p.add_argument("--finetune-config", help="trainer runner: fine-tune stage config (configs/train/...)")
    p.add_argument("--pretrain-config", help="trainer runner: pre-train stage config (stage 1 per cell)")
    p.add_argument("--eval-config", help="trainer runner: evaluation config (configs/eval/...)")
    p.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer runner: evaluation override, e.g. 'tasks=[KalmDev-STSB-en]'")
    p.add_argument("--run-dir-path", action="append", default=[], metavar="STAGE:KEY=PATH",
                   help="trainer runner: a stage config key set to a path inside the run directory, e.g. "
                        "finetune:model.name_or_path=train/pretrain/final (notebook 05's run_dir_paths)")
    p.add_argument("--keep-models", action="store_true",
                   help="trainer runner: keep every cell's checkpoints (default: delete once scored)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer runner: extra StageConfig override for every cell, e.g. train.max_steps=30")
    p.add_argument("--level", default="mtk", choices=LEVELS, help="aggregation level of the printed table")
    p.add_argument("--dry-run", action="store_true", help="print the expanded cells and overrides, run nothing")
    p.add_argument("--list-switches", action="store_true", help="list the known switches")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _list_switches() -> None:
    for s in SWITCHES.values():
        values = list(s.choices) if s.choices else s.kind
        print(f"{s.name:<30} default {value_label(s.default):<20} {values}  {s.help}")


def _absolute_if_path(value: str) -> str:
    """A path that exists from here, made absolute (the command runs from anywhere); a config name stays a name."""
    return str(Path(value).resolve()) if Path(value).exists() else value


def run_dir_paths(specs: list[str]) -> dict[str, dict[str, str]]:
    """``["finetune:model.name_or_path=train/pretrain/final", ...]`` -> ``{"finetune": {key: path}}``."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        stage, sep, rest = spec.partition(":")
        key, eq, path = rest.partition("=")
        if not (sep and eq and key and path) or stage not in ("finetune", "pretrain"):
            raise ConfigError(f"--run-dir-path {spec!r}: expected finetune:KEY=PATH or pretrain:KEY=PATH")
        out.setdefault(stage, {})[key] = path
    return out


def cell_command(args: argparse.Namespace, cell: str, seed: int) -> str:
    """The ``kalm ablate`` command that runs exactly (cell, seed) with the runner settings of ``args``."""
    runner, sep, fn = args.runner.rpartition(":")
    runner = f"{_absolute_if_path(runner)}:{fn}" if sep and runner.endswith(".py") else args.runner
    parts = ["kalm", "ablate", "--grid", _absolute_if_path(args.grid), "--run-dir", str(Path(args.run_dir).resolve())]
    if runner != DEFAULT_RUNNER:
        parts += ["--runner", runner]
    for flag, value in (("--finetune-config", args.finetune_config), ("--pretrain-config", args.pretrain_config),
                        ("--eval-config", args.eval_config)):
        if value:
            parts += [flag, _absolute_if_path(value)]
    for o in args.eval_override:
        parts += ["--eval-override", o]
    for o in args.override:
        parts += ["-o", o]
    for o in args.run_dir_path:
        parts += ["--run-dir-path", o]
    if args.keep_models:
        parts.append("--keep-models")
    return shlex.join([*parts, "--cell", cell, "--seed", str(seed)])


def _run(args: argparse.Namespace) -> int:
    if not args.grid:
        raise ConfigError("--grid is required (a name in configs/ablations/ or a YAML path)")
    if args.seed is not None and args.seeds:
        raise ConfigError("give --seed or --seeds, not both")
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
    seeds = [args.seed] if args.seed is not None else args.seeds
    spec = load_grid(args.grid)
    cells = expand(spec)
    if args.cell is not None and args.cell not in [c.name for c in cells]:
        raise GridError(f"grid {spec.name} has no cell {args.cell!r}; its cells: {[c.name for c in cells]}")
    if args.dry_run:
        n_seeds = len(seeds or spec.seeds)
        print(f"grid {spec.name}: {len(cells)} cells x {n_seeds} seeds = {len(cells) * n_seeds} runs")
        for c in cells:
            print(f"  {c.name:<40} {json.dumps(c.as_config()['overrides'])}")
        return 0
    if not args.run_dir:
        raise ConfigError("--run-dir is required to run the grid (results go to <run-dir>/ablations/)")
    run_dir = Path(args.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} exists and is not a directory")
    run_fn = make_run_fn(args.runner, run_dir, finetune_config=args.finetune_config,
                         pretrain_config=args.pretrain_config, eval_config=args.eval_config,
                         train_overrides=dict(split_override(o) for o in args.override),
                         eval_overrides=args.eval_override, keep_models=args.keep_models,
                         run_dir_paths=run_dir_paths(args.run_dir_path))
    only = None if args.cell is None else [args.cell]
    if args.emit_commands:
        if hasattr(run_fn, "check"):
            run_fn.check(spec)   # refuse a grid the runner cannot run before a scheduler gets its commands
        for cell, seed in pending_runs(spec, run_fn, run_dir, seeds=seeds, cells=only):
            print(cell_command(args, cell.name, seed))
        return 0
    results = run_grid(spec, run_fn, run_dir, seeds=seeds, cells=only, parallel=args.parallel)
    if only is None:
        print(aggregate(results, level=args.level).to_string(index=False))
    else:
        print(f"grid {spec.name}, cell {args.cell}: seeds {sorted(set(results['seed']))}, {len(results)} rows")
    print(f"results: {run_dir / RESULTS}")
    return 0


def cli_main(argv: list[str]) -> int:
    """Parse ``argv`` and run, list, dry-run or emit; a mistake is one line on stderr (exit 2), a grid or run
    held by another process exit 3."""
    args = _parser().parse_args(argv)
    if args.list_switches:
        _list_switches()
        return 0
    try:
        return _run(args)
    except (ConfigError, OSError, LockHeld) as e:   # GridError is a ConfigError; OSError: paths, disk
        if args.debug:
            raise
        print(f"kalm ablate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_IN_USE if isinstance(e, LockHeld) else EXIT_MISTAKE


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
