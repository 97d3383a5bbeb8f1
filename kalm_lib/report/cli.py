"""``kalm report RUN_DIR... -o reports/NAME.html [--baseline RUN] [--title T] [--no-reference]``."""

from __future__ import annotations

import sys
from pathlib import Path

from kalm_lib.cli import ArgumentParser  # one-line usage errors for every kalm command
from kalm_lib import atomic
from kalm_lib.report.html import render_report
from kalm_lib.report.runs import RunData, load_runs

__all__ = ["cli_main"]


def _has_content(run: RunData) -> bool:
    return not run.results.empty or bool(run.train_metrics) or run.soup is not None or run.ablations is not None


def _problem(paths: list[Path], runs: list[RunData] | None) -> str | None:
    """What makes the input unusable (one line), or None."""
    for p in paths:
        if not p.exists():
            return f"run directory not found: {p}"
        if not p.is_dir():
            return f"not a directory: {p}"
    if runs is not None and not any(_has_content(r) for r in runs):
        return (f"nothing to report in {', '.join(map(str, paths))} (no eval results, train/*/metrics.jsonl, "
                "soup/soup.json or ablations/results.csv)")
    return None


def cli_main(argv: list[str]) -> int:
    """Write the self-contained HTML report of the given run directories and print its path. A missing or empty
    input is a one-line error on stderr, exit code 2, and no report is written."""
    p = ArgumentParser(prog="kalm report", description="self-contained HTML report of run directories")
    p.add_argument("runs", nargs="+", help="run directories (or eval result folders)")
    p.add_argument("-o", "--out", default=None, help="output HTML (default reports/<first run>.html)")
    p.add_argument("--baseline", default=None, help="run name to compute deltas against")
    p.add_argument("--title", default="KaLM workbench report")
    p.add_argument("--no-reference", action="store_true", help="leave published reference models out")
    args = p.parse_args(argv)
    paths = [Path(r) for r in args.runs]
    problem = _problem(paths, None)
    runs = load_runs(paths) if problem is None else None
    problem = problem or _problem(paths, runs)
    if problem:
        print(f"kalm report: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out or f"reports/{paths[0].resolve().name or 'report'}.html")
    page = render_report(runs, baseline=args.baseline, title=args.title, include_reference=not args.no_reference)
    print(atomic.write_text(out, page).resolve())
    return 0
