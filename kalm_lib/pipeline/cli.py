"""``kalm pipeline``: run the ordered notebooks headlessly with papermill (argparse and printing only).

    kalm pipeline --preset cpu-demo                       # a new runs/<UTC time>-cpu-demo/
    kalm pipeline --preset cpu-demo --run-dir runs/X      # resume: unchanged stages are skipped
    kalm pipeline --preset smoke --only ablate -p ablate.seeds='[0,1]'
    kalm pipeline --batch runs.yaml --emit-commands       # one command per run, for a scheduler
"""

from __future__ import annotations

import argparse
import json
import sys

from kalm_lib.config import REPO_ROOT
from kalm_lib.pipeline.batch import batch_commands, check_batch, load_batch, run_batch
from kalm_lib.pipeline.manifest import expand
from kalm_lib.pipeline.presets import PipelineError, known_presets, load_preset
from kalm_lib.pipeline.run import PipelineResult, StageFailed, latest_run_dir, plan_pipeline, run_pipeline


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kalm pipeline", description="Run the ordered notebooks headlessly with "
                                "papermill into one run directory; re-running resumes it.")
    p.add_argument("--preset", help="preset name in configs/presets/ or a preset YAML path")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="run this stage and the ones after it")
    p.add_argument("--only", action="append", metavar="STAGE", help="run only this stage (repeatable)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="notebook parameter override: name=value (every stage defining it) or stage.name=value; "
                        "values are YAML, numbers as numbers (1e-5 is a float)")
    p.add_argument("--run-dir", help="run directory (default: a new runs/<timestamp>-<preset>/); "
                                     "re-using one resumes it")
    p.add_argument("--resume", action="store_true", help="re-use the latest runs/*-<preset> directory")
    p.add_argument("--runs-dir", default="runs", help="parent of new run directories (default: runs)")
    p.add_argument("--force", action="store_true", help="re-run selected stages even if unchanged")
    p.add_argument("--batch", metavar="FILE", help="YAML list of {preset, overrides, name, run_dir} runs")
    p.add_argument("--emit-commands", action="store_true",
                   help="with --batch: print one kalm pipeline command per run instead of running")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan, run nothing")
    p.add_argument("--no-html", action="store_true", help="skip the HTML export of executed notebooks")
    p.add_argument("--list-presets", action="store_true", help="list the known presets")
    return p


def cli_main(argv: list[str]) -> int:
    """``kalm pipeline ...`` entry point (see ``kalm pipeline --help``)."""
    args = _parser().parse_args(argv)
    try:
        if args.list_presets:
            for name in known_presets():
                print(f"{name:<18} {load_preset(name)[1].description}")
            return 0
        if args.batch:
            return _batch(args)
        if not args.preset:
            print(f"kalm pipeline: --preset (or --batch) is required; known presets: {known_presets()}",
                  file=sys.stderr)
            return 2
        if args.dry_run:
            _print_plan(args)
            return 0
        run_dir = args.run_dir
        if args.resume and not run_dir:
            run_dir = latest_run_dir(load_preset(args.preset)[0], args.runs_dir)
            if run_dir is None:
                print(f"kalm pipeline: --resume: no earlier run of {args.preset} in {args.runs_dir}/",
                      file=sys.stderr)
                return 2
        result = run_pipeline(args.preset, overrides=args.param, run_dir=run_dir, from_stage=args.from_stage,
                              only=args.only, force=args.force, runs_dir=args.runs_dir, html=not args.no_html)
    except StageFailed as e:
        print(f"kalm pipeline: {e}", file=sys.stderr)
        return 1
    except PipelineError as e:
        print(f"kalm pipeline: error: {e}", file=sys.stderr)
        return 2
    _print_result(result)
    return 0


def _batch(args: argparse.Namespace) -> int:
    entries = load_batch(args.batch)
    if args.emit_commands:
        check_batch(entries)  # validate before printing anything a scheduler would run
        print("\n".join(batch_commands(entries, args.runs_dir)))
        return 0
    results = run_batch(entries, runs_dir=args.runs_dir, force=args.force, html=not args.no_html)
    for r in results:
        print(f"{r['status']:<7} {r['preset']:<16} {r['run_dir']}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def _print_plan(args: argparse.Namespace) -> None:
    name, path, stages, plan = plan_pipeline(args.preset, overrides=args.param, from_stage=args.from_stage,
                                             only=args.only)
    print(f"preset {name} ({path}): {len(plan)} of {len(stages)} stage(s) would run")
    width = max((len(st.name) for st in plan), default=0)
    for st in plan:
        print(f"  {st.name:<{width}} {st.notebook.name:<24} {json.dumps(st.parameters, default=str)}")


def _print_result(result: PipelineResult) -> None:
    """The run dir, what ran, each stage's HTML export and the run's HTML report(s)."""
    stages = result.manifest["stages"]
    order = result.manifest["stage_order"]
    print(f"run directory: {result.run_dir}")
    print(f"ran: {result.ran or '-'}; skipped (unchanged): {result.skipped or '-'}")
    width = max(map(len, order), default=0)
    for name in order:
        if stages.get(name, {}).get("html"):
            print(f"  {name:<{width}} {stages[name]['html']}")
    # the HTML report(s): declared outputs ending in .html, and notebook 06's default reports/<run name>.html
    reports = [p for name in order for pattern in stages.get(name, {}).get("produces", [])
               if pattern.endswith(".html") for p in expand(result.run_dir, pattern)]
    default_report = REPO_ROOT / "reports" / f"{result.run_dir.name}.html"
    for path in reports + ([default_report] if default_report.is_file() else []):
        print(f"report: {path}")


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
