"""Wall time of the offline quick evaluation suite (``kalm eval minilm --quick``) and, optionally, the full
public-comparable tasks against the published all-MiniLM-L6-v2 scores.

Writes ``benchmarks/results/quick_suite.json``: total wall and CPU seconds (CPU time is the steadier
number on a shared machine; wall time on an idle 2-core machine is about CPU time / 2), per-task seconds, per-task scores, the machine's
load average (the suite shares the CPU with whatever else runs), and provenance. With ``--comparability``
it also runs STSBenchmark and Banking77 on their full public test splits with no instruction (as the public
evaluation did) and records our score beside the published one.

Usage: ``python -m benchmarks.bench_quick_suite`` (quick suite -> results/quick_suite.json) and
``python -m benchmarks.bench_quick_suite --comparability --out benchmarks/results/quick_suite_comparability.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from kalm_lib import provenance
from kalm_lib.evaluation import EvalConfig, InstructionConfig, load_results, reference_for, run_eval, task_scores

HERE = Path(__file__).resolve().parent


def _scores(folder: Path) -> dict[str, float]:
    df = task_scores(load_results([folder]))
    return {r["task"]: round(float(r["main_score"]), 4) for _, r in df.iterrows()}


def _cpu_s() -> float:
    """User + system CPU seconds of this process (steadier than wall time on a shared machine)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(out_dir: Path, comparability: bool = False) -> dict:
    t0, c0 = time.perf_counter(), _cpu_s()
    load_start = os.getloadavg()
    summary = run_eval("minilm", EvalConfig(quick=True), out_dir / "quick")[0]
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    res = {"quick_wall_s": wall, "quick_cpu_s": cpu, "quick_task_s": summary["seconds"], "quick_errors": summary["errors"],
           "quick_scores": _scores(out_dir / "quick"), "load_average_start": load_start,
           "load_average_end": os.getloadavg(), "cpus": os.cpu_count()}
    if comparability:
        tasks = ["KalmDev-STSB-en", "KalmDev-Banking77-en"]
        t1, c1 = time.perf_counter(), _cpu_s()
        run_eval("minilm", EvalConfig(tasks=tasks, instructions=InstructionConfig(enabled="off")), out_dir / "full")
        ours = _scores(out_dir / "full")
        ref = reference_for(tasks)
        ref = ref[ref["model"] == "sentence-transformers/all-MiniLM-L6-v2"]
        res["comparability"] = {t: {"ours": ours.get(t), "published": round(float(ref.loc[ref["task"] == t, "main_score"].iloc[0]), 4),
                                    "public_task": ref.loc[ref["task"] == t, "public_task"].iloc[0]} for t in tasks}
        for v in res["comparability"].values():
            v["diff"] = None if v["ours"] is None else round(v["ours"] - v["published"], 4)
        res["comparability_wall_s"] = time.perf_counter() - t1
        res["comparability_cpu_s"] = _cpu_s() - c1
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comparability", action="store_true", help="also run the full public-comparable tasks")
    p.add_argument("--out", default=str(HERE / "results" / "quick_suite.json"))
    p.add_argument("--keep", default=None, help="keep the eval results in this folder (default: temp)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        res = run(Path(args.keep or tmp), args.comparability)
    provenance.write(args.out, provenance.collect(vars(args), seed=42, benchmark="quick_suite", result=res))
    print(json.dumps(res, indent=1, default=str))
    return 0 if not res["quick_errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
