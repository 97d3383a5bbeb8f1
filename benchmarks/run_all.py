"""Run every ``benchmarks/bench_*.py`` (each exposes ``main(argv) -> int``) and list their result files.

Usage: ``make bench`` or ``python -m benchmarks.run_all [--only NAME ...]``. Each benchmark writes JSON with
provenance under ``benchmarks/results/``; numbers quoted in the README come from those files.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="benchmark names without the bench_ prefix")
    args = parser.parse_args(argv)
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if args.only:
        unknown = sorted(set(args.only) - {n.removeprefix("bench_") for n in names})
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; known: {[n.removeprefix('bench_') for n in names]}")
        names = [n for n in names if n.removeprefix("bench_") in args.only]
    failed = []
    for name in names:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            rc = importlib.import_module(f"benchmarks.{name}").main([])
        except Exception as e:  # one broken benchmark should not hide the others' numbers
            print(f"{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            rc = 1
        print(f"== {name}: rc={rc} in {time.perf_counter() - start:.0f}s", flush=True)
        if rc:
            failed.append(name)
    print("results:", *sorted(str(p.relative_to(HERE.parent)) for p in (HERE / "results").glob("*.json")), sep="\n  ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
