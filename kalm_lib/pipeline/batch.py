"""For schedulers and batches: one command per stage of a run, or several runs from one YAML file.

:func:`stage_commands` turns one run into a chain of per-stage commands (``kalm pipeline --emit-commands``,
consumed by ``configs/accelerate/slurm/pipeline.sbatch``), an ablation stage into one command per pending
(cell, seed) followed by the stage's own (:mod:`kalm_lib.pipeline.cells`). A batch file lists whole runs, run
here one after another (:func:`run_batch`) or printed as commands (:func:`batch_commands`).

A batch file is a YAML list of runs::

    - {preset: cpu-demo, overrides: [seed=1], name: s1}
    - {preset: cpu-demo, overrides: {seed: 2}, run_dir: runs/seed2}     # a mapping works too
    - {preset: smoke, only: [ablate], name: ablate-only}          # or from_stage: <stage>

Every entry is validated (preset, overrides, stage selection) before the first run starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kalm_lib.config import ConfigError, from_dict
from kalm_lib.pipeline.cells import cell_commands, is_ablation_stage
from kalm_lib.pipeline.manifest import check_inputs, read_manifest
from kalm_lib.pipeline.presets import PipelineError
from kalm_lib.pipeline.run import kernel_environment, new_run_dir, pipeline_command, plan_pipeline, run_pipeline


@dataclass
class StageCommands:
    """One stage of a scheduler chain: ``cells`` first (an ablation stage's pending runs, independent of each
    other: they may run at the same time), then ``command`` (the stage itself, which needs all of them).
    ``whole``: why an ablation stage stays one command (empty otherwise)."""

    stage: str
    command: str
    cells: list[str] = field(default_factory=list)
    whole: str = ""

    @property
    def commands(self) -> list[str]:
        """Every command of the stage, in the order they run."""
        return [*self.cells, self.command]


@dataclass
class BatchEntry:
    """One run of a batch file: a preset, its overrides, and optionally a run dir / name suffix."""

    preset: str
    overrides: list[str] = field(default_factory=list)
    name: str = ""
    run_dir: str | None = None
    from_stage: str | None = None
    only: list[str] | None = None


def load_batch(path: str | Path) -> list[BatchEntry]:
    """Read a batch file (see the module docstring); ``overrides`` as a mapping become ``name=value`` items."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"batch file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise PipelineError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, list) or not data:
        raise PipelineError(f"{path}: a batch file is a non-empty YAML list of runs")
    entries = []
    for i, item in enumerate(data):
        if isinstance(item, dict) and isinstance(item.get("overrides"), dict):
            # JSON is YAML, so kalm_lib.config.parse_value reads every value back as it was written
            item = {**item, "overrides": [f"{k}={json.dumps(v)}" for k, v in item["overrides"].items()]}
        try:
            entries.append(from_dict(BatchEntry, item, where=f"{path}[{i}]"))
        except ConfigError as e:
            raise PipelineError(str(e)) from None
    return entries


def check_batch(entries: list[BatchEntry], *, presets_dir: Path | None = None,
                notebooks_dir: Path | None = None) -> None:
    """Validate every entry (see :func:`~kalm_lib.pipeline.run.plan_pipeline`); raises the first problem."""
    for e in entries:
        plan_pipeline(e.preset, overrides=e.overrides, from_stage=e.from_stage, only=e.only,
                      presets_dir=presets_dir, notebooks_dir=notebooks_dir)


def batch_commands(entries: list[BatchEntry], runs_dir: Path | str = "runs", extra: list[str] = ()) -> list[str]:
    """One ``kalm pipeline`` command per batch entry, each with its own run dir (for a scheduler); ``extra``
    arguments go at the end of each (``--online``, ``--no-html``)."""
    cmds = []
    for e in entries:
        run_dir = e.run_dir or new_run_dir(Path(e.preset).stem, runs_dir, e.name)
        selection = ["--from", e.from_stage] if e.from_stage else []
        selection += [arg for stage in e.only or [] for arg in ("--only", stage)]
        cmds.append(pipeline_command(e.preset, run_dir, e.overrides, *selection, *extra))
    return cmds


def stage_commands(preset: str | Path, run_dir: Path | str, *, overrides: list[str] = (),
                   from_stage: str | None = None, only: list[str] | None = None, extra: list[str] = (),
                   cells: bool = True, online: bool = False, presets_dir: Path | None = None,
                   notebooks_dir: Path | None = None) -> list[StageCommands]:
    """The commands of each planned stage, in order, for a scheduler's job chain.

    A stage's command is ``kalm pipeline --preset P --run-dir R [-p ...] --only STAGE [extra]`` (quoted), so it
    runs or skips exactly that stage by the usual rule (:mod:`kalm_lib.pipeline.rerun`): re-submitting a chain
    re-runs only what did not finish or changed. With ``cells``, an ablation stage's pending (cell, seed) runs
    come first as ``kalm ablate ... --cell C --seed S`` commands (:func:`kalm_lib.pipeline.cells.cell_commands`;
    ``online`` adds ``--online`` to them). Everything is checked first, as a run would: preset, overrides,
    selection, the run directory's preset, that each stage's inputs exist or come from an earlier stage of the
    chain, and each split grid. The run directory is made absolute (jobs may start elsewhere), a preset given as
    a file path too."""
    overrides = list(overrides)
    name, _, _, plan = plan_pipeline(preset, overrides=overrides, from_stage=from_stage, only=only,
                                     presets_dir=presets_dir, notebooks_dir=notebooks_dir)
    run_dir = Path(run_dir).resolve()
    check_inputs(plan, run_dir)
    recorded = read_manifest(run_dir).get("preset")
    if recorded not in (None, name):
        raise PipelineError(f"{run_dir} holds a run of preset {recorded!r}, not {name!r}")
    spec = str(Path(preset).resolve()) if Path(preset).is_file() else str(preset)
    chain = []
    for st in plan:
        step = StageCommands(st.name, pipeline_command(spec, run_dir, overrides, "--only", st.name, *extra))
        if cells and is_ablation_stage(st):
            step.cells, step.whole = cell_commands(st, run_dir, kernel_environment(online), online)
        chain.append(step)
    return chain


def run_batch(entries: list[BatchEntry], *, runs_dir: Path | str = "runs", log=print,
              **kwargs: Any) -> list[dict[str, Any]]:
    """Validate every entry first, then run them one after another; a failed run does not stop the
    others. ``kwargs`` go to :func:`~kalm_lib.pipeline.run.run_pipeline`. Returns one
    ``{preset, name, run_dir, status, error}`` per entry."""
    check_batch(entries, presets_dir=kwargs.get("presets_dir"), notebooks_dir=kwargs.get("notebooks_dir"))
    results = []
    for i, e in enumerate(entries):
        run_dir = Path(e.run_dir) if e.run_dir else new_run_dir(Path(e.preset).stem, runs_dir, e.name or str(i))
        log(f"[batch] {i + 1}/{len(entries)}: {e.preset} {e.overrides} -> {run_dir}")
        status, error = "ok", None
        try:
            run_pipeline(e.preset, overrides=e.overrides, run_dir=run_dir, from_stage=e.from_stage,
                         only=e.only, runs_dir=runs_dir, log=log, **kwargs)
        except PipelineError as err:
            log(f"[batch] run {i + 1} failed: {err}")
            status, error = "failed", str(err)
        results.append({"preset": e.preset, "name": e.name, "run_dir": str(run_dir), "status": status,
                        "error": error})
    return results
