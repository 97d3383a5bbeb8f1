"""``kalm eval MODEL... [--quick] [--tasks T...] [--benchmark NAME] [--out DIR] [--config NAME|YAML] [--device D]
[--online]``.

Evaluates each model (``minilm``, a model folder, or a hub id) with mteb (:func:`kalm_lib.evaluation.run_eval`),
showing progress per task on stderr, then prints a per-task table and MTK/MTY per language and scope, and the
``kalm report`` command that shows the results. Hub access follows :func:`kalm_lib.runtime.configure_hub`
(``--online`` turns it on). A user mistake (bad config, unknown task, missing model) is a one-line error, exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from kalm_lib.cli import ArgumentParser  # one-line usage errors for every kalm command
from kalm_lib import runtime
from kalm_lib.config import ConfigError
from kalm_lib.evaluation.results import aggregate, load_results, task_info, task_scores
from kalm_lib.evaluation.run import EvalConfig, load_eval_config, run_eval
from kalm_lib.evaluation.tasks import TASKS_BY_NAME

__all__ = ["cli_main", "summary_table"]


def summary_table(df: pd.DataFrame) -> str:
    """Plain-text per-task table and MTK/MTY per language."""
    lines = []
    for _, r in task_scores(df).sort_values(["model", "lang", "task_type", "task"]).iterrows():
        lines.append(f"{r['model'][:40]:<40} {r['task']:<28} {r['task_type']:<20} {r['lang']:<4} "
                     f"{r['main_score']:7.2f}  {r['scope']}")
    for _, r in aggregate(df).iterrows():
        lines.append(f"{r['model'][:40]:<40} {'MTK/MTY ' + str(r['lang']):<28} {int(r['n_tasks'])} tasks "
                     f"{int(r['n_types'])} types {r['MTK']:7.2f} / {r['MTY']:6.2f}  {r['scope']}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="kalm eval", description="evaluate models with mteb (offline dev tasks or "
                                                                "mteb benchmarks)")
    p.add_argument("models", nargs="*", help="'minilm', model folders, or hub ids (org/name[@revision])")
    p.add_argument("--quick", action="store_true", help="offline quick subset (subsampled, minutes on CPU)")
    p.add_argument("--tasks", nargs="+", default=None, help="offline KalmDev-* or public mteb task names")
    p.add_argument("--benchmark", default=None, help='mteb benchmark, e.g. "MTEB(eng, v2)" (needs hub access)')
    p.add_argument("--out", default="runs/latest/eval", help="results folder (a run dir's eval/)")
    p.add_argument("--mteb-cache", default=None, help="also use mteb's ResultCache here (reuse finished tasks)")
    p.add_argument("--config", default=None, help="preset name in configs/eval/ or a YAML path")
    p.add_argument("--dims", nargs="+", type=int, default=None, help="Matryoshka dims to evaluate")
    p.add_argument("--instructions", choices=["auto", "on", "off"], default=None)
    p.add_argument("--symmetric", choices=["both", "none"], default=None)
    p.add_argument("--batch-size", type=int, default=None, help="encode batch size (on the device in use)")
    p.add_argument("--device", default=None, help="auto (cuda when present, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--online", action="store_true", help="allow hub downloads (models, mteb datasets); same as "
                                                          "KALM_ONLINE=1")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no per-task progress on stderr")
    p.add_argument("--list-tasks", action="store_true", help="print the offline tasks and exit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set instructions.symmetric=none (repeatable)")
    return p


def _apply_flags(config: EvalConfig, args: argparse.Namespace) -> None:
    """The convenience flags win over the preset and ``--set`` overrides."""
    if args.quick:
        config.quick = True
    if args.tasks:
        config.tasks = args.tasks
    if args.benchmark:
        config.benchmark = args.benchmark
    if args.dims:
        config.dims = args.dims
    if args.instructions:
        config.instructions.enabled = args.instructions
    if args.symmetric:
        config.instructions.symmetric = args.symmetric
    if args.batch_size:
        config.batch_size = config.gpu_batch_size = args.batch_size
    if args.device:
        config.device = args.device


def cli_main(argv: list[str]) -> int:
    """``kalm eval``: 0 when every task ran, 1 when one failed, 2 for a bad config or an unknown task."""
    p = _parser()
    args = p.parse_args(argv)
    if args.list_tasks:
        for t in TASKS_BY_NAME.values():
            print(f"{t.name:<28} {t.type:<20} {t.lang} quick={t.quick} public={t.mteb_equivalent or '-'}")
        return 0
    if not args.models:
        p.error("give at least one model ('minilm' or a model folder)")
    try:
        config = load_eval_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"kalm eval: {e}", file=sys.stderr)
        return 2
    unknown = [t for t in args.tasks or [] if t not in TASKS_BY_NAME and task_info(t)["task_type"] == "unknown"]
    if unknown:
        print(f"kalm eval: unknown task(s) {unknown}; offline tasks: {sorted(TASKS_BY_NAME)}", file=sys.stderr)
        return 2
    _apply_flags(config, args)
    runtime.configure_hub(True if args.online else None)
    status = 0
    for m in args.models:
        t0 = time.perf_counter()
        try:
            summaries = run_eval(m, config, args.out, mteb_cache=args.mteb_cache, progress=args.progress)
        except (FileNotFoundError, ValueError) as e:  # a missing model / hub id, a bad device or dtype
            print(f"kalm eval: {m}: {e}", file=sys.stderr)
            return 2
        for s in summaries:
            print(f"{m}: {len(s['tasks_ok'])} tasks -> {s['results_dir']} ({time.perf_counter() - t0:.0f} s)")
            for task, err in s["errors"].items():
                print(f"  FAILED {task}: {err}", file=sys.stderr)
                status = 1
    df = load_results([args.out])
    if not df.empty:
        print(summary_table(df))
    print(f"mteb: mteb.ResultCache({str(args.out)!r}).load_results() reads these results")
    run_dir = Path(args.out).parent if Path(args.out).name == "eval" else Path(args.out)
    print(f"report: kalm report {run_dir} -o reports/{run_dir.name}.html")
    return status
