"""``kalm pipeline``: run the ordered notebooks headlessly with papermill (argparse and printing only).

    kalm pipeline --preset cpu-demo                       # a new runs/<UTC time>-cpu-demo/
    kalm pipeline --preset cpu-demo --run-dir runs/X      # resume: unchanged stages are skipped
    kalm pipeline --preset cpu-demo --run-dir runs/X --dry-run         # what would run, and why
    kalm pipeline --preset smoke --only ablate -p ablate.seeds='[0,1]'
    kalm pipeline --preset gpu-qwen2-0.5b --run-dir /shared/run --emit-commands   # one command per stage
    kalm pipeline --batch runs.yaml --emit-commands       # one command per run, for a scheduler
    kalm pipeline --preset gpu-qwen2-0.5b --online        # hub downloads allowed in every stage's kernel

Hub access: offline unless asked (``--online`` here or on ``kalm --online``, ``KALM_ONLINE=1``, or your own
``HF_HUB_OFFLINE=0``; :func:`kalm_lib.runtime.configure_hub`); the decision goes into every kernel's environment
and the manifest.

A user mistake (unknown preset or stage, a bad ``-p``, a broken YAML file, a missing run directory) is one line on
stderr and exit code 2; a failed notebook names the stage, cell and executed copy, exit code 1. ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from kalm_lib import runtime
from kalm_lib.cli import ArgumentParser  # one-line usage errors for every kalm command
from kalm_lib.config import ConfigError
from kalm_lib.locking import holder
from kalm_lib.pipeline.batch import batch_commands, check_batch, load_batch, run_batch, stage_commands
from kalm_lib.pipeline.manifest import LOCK, MANIFEST, expand, read_manifest
from kalm_lib.pipeline.presets import PipelineError, known_presets, load_preset
from kalm_lib.pipeline.run import (PipelineResult, StageFailed, explain_pipeline, latest_run_dir, new_run_dir,
                                   run_pipeline)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="kalm pipeline", description="Run the ordered notebooks headlessly with papermill into one "
                       "run directory; re-running resumes it.")
    p.add_argument("--preset", help="preset name in configs/presets/ or a preset YAML path")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="run this stage and the ones after it")
    p.add_argument("--only", action="append", metavar="STAGE", help="run only this stage (repeatable)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="notebook parameter override: name=value (every stage defining it) or stage.name=value; "
                        "values are YAML, numbers as numbers (1e-5 is a float)")
    p.add_argument("--run-dir", help="run directory (default: a new runs/<timestamp>-<preset>/); "
                                     "re-using one resumes it")
    p.add_argument("--resume", action="store_true", help="re-use the latest runs/*-<preset> directory; with "
                                                         "--run-dir, that directory must hold a run")
    p.add_argument("--runs-dir", default="runs", help="parent of new run directories (default: runs)")
    p.add_argument("--force", action="store_true", help="re-run the selected stages from scratch even if "
                                                        "unchanged (their previous outputs move to superseded/)")
    p.add_argument("--batch", metavar="FILE", help="YAML list of {preset, overrides, name, run_dir} runs")
    p.add_argument("--emit-commands", action="store_true",
                   help="print one shell command per stage (with --batch: per run) for a scheduler's job "
                        "chain, one per line, and run nothing")
    p.add_argument("--dry-run", action="store_true",
                   help="say which stages would run and why, and which would be skipped; run nothing")
    p.add_argument("--log-output", action="store_true",
                   help="stream each running cell's output to stderr (papermill's log_output)")
    p.add_argument("--online", action="store_true",
                   help="allow Hugging Face hub downloads in the notebooks (same as kalm --online or "
                        f"{runtime.ONLINE_ENV}=1; default offline unless HF_HUB_OFFLINE=0 is set)")
    p.add_argument("--no-html", action="store_true", help="skip the HTML export of executed notebooks")
    p.add_argument("--list-presets", action="store_true", help="list the known presets")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def cli_main(argv: list[str]) -> int:
    """``kalm pipeline ...`` entry point (see ``kalm pipeline --help``)."""
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except StageFailed as e:
        if args.debug:
            raise
        print(f"kalm pipeline: {e}", file=sys.stderr)
        return 1
    except (PipelineError, ConfigError) as e:
        if args.debug:
            raise
        print(f"kalm pipeline: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kalm pipeline: interrupted (the run directory resumes with the same command)", file=sys.stderr)
        return 130
    except Exception as e:  # a full disk, a permission, or a bug: one line; --debug shows where
        if args.debug:
            raise
        print(f"kalm pipeline: error: {type(e).__name__}: {e} (--debug shows the traceback)", file=sys.stderr)
        return 1


def _main(args: argparse.Namespace) -> int:
    if args.online:
        runtime.configure_hub(True)   # this process too: the kernels inherit what run_pipeline passes on
    if args.list_presets:
        for name in known_presets():
            print(f"{name:<18} {load_preset(name)[1].description}")
        return 0
    if args.batch:
        with _reports_env():
            return _batch(args)
    if not args.preset:
        raise PipelineError(f"--preset (or --batch) is required; known presets: {known_presets()}")
    run_dir = _run_dir(args)
    if args.emit_commands:
        _emit_commands(args, run_dir)
        return 0
    if args.dry_run:
        _print_plan(args, run_dir)
        return 0
    with _reports_env() as reports:
        result = run_pipeline(args.preset, overrides=args.param, run_dir=run_dir, from_stage=args.from_stage,
                              only=args.only, force=args.force, runs_dir=args.runs_dir, html=not args.no_html,
                              log_output=args.log_output, online=runtime.hub_online())
        _print_result(result, reports)
    return 0


@contextlib.contextmanager
def _reports_env():
    """Notebook 06 publishes into ``reports_dir()``; its kernel runs in the workbench home, which for a wheel is
    the installed package, so the user's choice (decided here, in their current directory) is passed down in
    ``$KALM_REPORTS_DIR`` for the run and restored after it."""
    from kalm_lib.report.html import REPORTS_ENV, reports_dir  # here: plotly/pandas stay out of `kalm pipeline -h`

    before = os.environ.get(REPORTS_ENV)
    folder = reports_dir()
    if folder is not None:
        os.environ[REPORTS_ENV] = str(folder)
    try:
        yield folder
    finally:
        if before is None:
            os.environ.pop(REPORTS_ENV, None)
        else:
            os.environ[REPORTS_ENV] = before


def _run_dir(args: argparse.Namespace) -> Path | None:
    """``--run-dir``, checked to hold a run with ``--resume``; or the latest run of the preset with ``--resume``."""
    if not args.resume:
        return Path(args.run_dir) if args.run_dir else None
    if args.run_dir:
        if not (Path(args.run_dir) / MANIFEST).is_file():
            raise PipelineError(f"--resume: {args.run_dir} holds no pipeline run (no {MANIFEST}); leave out "
                                "--resume to start a run there")
        return Path(args.run_dir)
    found = latest_run_dir(load_preset(args.preset)[0], args.runs_dir)
    if found is None:
        raise PipelineError(f"--resume: no earlier run of {args.preset} in {args.runs_dir}/ (leave out --resume "
                            "to start one)")
    return found


def _emit_commands(args: argparse.Namespace, run_dir: Path | None) -> None:
    """The chain's commands on stdout, one per line and nothing else (pipeline.sbatch reads them line by line):
    one per stage, an ablation stage's pending (cell, seed) runs before it. Notes go to stderr as ``#`` lines:
    which commands may run at the same time, and why a grid stays one command."""
    if args.force:
        raise PipelineError("--emit-commands with --force: a forced command re-runs its stage each time it is "
                            "submitted, so a re-submitted chain would redo finished work; run the forced stage "
                            "once (kalm pipeline ... --force --only STAGE), then emit the chain")
    run_dir = run_dir or new_run_dir(load_preset(args.preset)[0], args.runs_dir)
    online = runtime.hub_online()
    extra = [flag for flag, on in (("--no-html", args.no_html), ("--log-output", args.log_output),
                                   ("--online", online)) if on]
    chain = stage_commands(args.preset, run_dir, overrides=args.param, from_stage=args.from_stage,
                           only=args.only, extra=extra, online=online)   # everything checked before printing
    line = 0
    for step in chain:
        if len(step.cells) > 1:
            print(f"# kalm pipeline: stage {step.stage}: commands {line + 1}-{line + len(step.cells)} are its "
                  f"{len(step.cells)} pending ablation runs, independent of each other (they may run in parallel); "
                  f"command {line + len(step.cells) + 1} (the stage: aggregates and exports) needs all of them",
                  file=sys.stderr)
        if step.whole:
            print(f"# kalm pipeline: stage {step.stage} runs its grid in one command ({step.whole})",
                  file=sys.stderr)
        print("\n".join(step.commands))
        line += len(step.commands)


def _batch(args: argparse.Namespace) -> int:
    entries = load_batch(args.batch)
    if args.emit_commands:
        check_batch(entries)  # validate before printing anything a scheduler would run
        extra = [flag for flag, on in (("--no-html", args.no_html), ("--online", runtime.hub_online())) if on]
        print("\n".join(batch_commands(entries, args.runs_dir, extra)))
        return 0
    results = run_batch(entries, runs_dir=args.runs_dir, force=args.force, html=not args.no_html,
                        log_output=args.log_output, online=runtime.hub_online())
    for r in results:
        print(f"{r['status']:<7} {r['preset']:<16} {r['run_dir']}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def _print_plan(args: argparse.Namespace, run_dir: Path | None) -> None:
    """What a run would do, stage by stage (:func:`kalm_lib.pipeline.run.explain_pipeline`), and why."""
    new = run_dir is None
    run_dir = run_dir or new_run_dir(load_preset(args.preset)[0], args.runs_dir)
    name, path, plan, decisions = explain_pipeline(args.preset, run_dir, overrides=args.param,
                                                   from_stage=args.from_stage, only=args.only, force=args.force)
    manifest = read_manifest(run_dir)
    state = "new" if new or not manifest.get("stages") else \
        f"holds a run: {manifest.get('status')}, updated {manifest.get('updated')}"
    print(f"preset {name} ({path}), run directory {Path(run_dir).resolve()} ({state}), "
          f"hub access {'on' if runtime.hub_online() else 'off'}")
    lock = holder(Path(run_dir) / LOCK)
    if lock:
        print(f"  note: {LOCK} names pid {lock.get('pid')} on {lock.get('host')} (since {lock.get('since')}): "
              "a run would be refused while it is alive")
    counts = {a: sum(d.action == a for d in decisions) for a in ("run", "skip", "maybe")}
    print(f"  {counts['run']} of {len(plan)} stage(s) would run, {counts['skip']} skipped (unchanged)"
          + (f", {counts['maybe']} decided after earlier stages ran" if counts["maybe"] else ""))
    width = max((len(st.name) for st in plan), default=0)
    for st, d in zip(plan, decisions):
        print(f"  {st.name:<{width}} {d.action:<5} {st.notebook.name:<24} {'; '.join(d.reasons)}")
        print(f"  {'':<{width}}       parameters: {json.dumps(st.parameters, default=str)}")


def _print_result(result: PipelineResult, reports_folder: Path | None = None) -> None:
    """The run dir, what ran, what moved aside, each stage's HTML export and the run's HTML report(s)."""
    stages = result.manifest["stages"]
    order = result.manifest["stage_order"]
    print(f"run directory: {result.run_dir}")
    print(f"ran: {result.ran or '-'}; skipped (unchanged): {result.skipped or '-'}")
    for name, folder in result.superseded.items():
        print(f"previous outputs of {name} moved aside to: {folder}")
    width = max(map(len, order), default=0)
    for name in order:
        if stages.get(name, {}).get("html"):
            print(f"  {name:<{width}} {stages[name]['html']}")
    # the HTML report(s): declared outputs ending in .html, and notebook 06's default reports/<run name>.html
    reports = [p for name in order for pattern in stages.get(name, {}).get("produces", [])
               if pattern.endswith(".html") for p in expand(result.run_dir, pattern)]
    default = reports_folder / f"{result.run_dir.name}.html" if reports_folder is not None else None
    for path in reports + ([default] if default is not None and default.is_file() else []):
        print(f"report: {path}")


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
