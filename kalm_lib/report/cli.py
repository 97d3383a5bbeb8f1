"""``kalm report RUN_DIR... -o reports/NAME.html [--baseline RUN] [--title T] [--no-reference]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from kalm_lib.report.html import build_report

__all__ = ["cli_main"]


def cli_main(argv: list[str]) -> int:
    """Write the self-contained HTML report of the given run directories and print its path."""
    p = argparse.ArgumentParser(prog="kalm report", description="self-contained HTML report of run directories")
    p.add_argument("runs", nargs="+", help="run directories (or eval result folders)")
    p.add_argument("-o", "--out", default=None, help="output HTML (default reports/<first run>.html)")
    p.add_argument("--baseline", default=None, help="run name to compute deltas against")
    p.add_argument("--title", default="KaLM workbench report")
    p.add_argument("--no-reference", action="store_true", help="leave published reference models out")
    args = p.parse_args(argv)
    out = Path(args.out or f"reports/{Path(args.runs[0]).name or 'report'}.html")
    path = build_report(args.runs, out, baseline=args.baseline, title=args.title,
                        include_reference=not args.no_reference)
    print(path.resolve())
    return 0
