"""An ablation stage as one command per (cell, seed), for a scheduler (``kalm pipeline --emit-commands``).

A stage that runs notebook 05 (``ablate``, ``ablate_distill``, ...) trains every cell of its grid in one job. For a
scheduler the cells are better as separate jobs: :func:`cell_commands` asks ``kalm ablate --emit-commands`` (the
ablations package's own list of pending runs, :func:`kalm_lib.ablations.pending_runs`) for one
``kalm ablate ... --cell C --seed S`` command per run that ``results.csv`` does not hold yet, with the stage's
notebook parameters mapped onto ``kalm ablate``'s flags. The stage's own command comes after them: its notebook
then finds every run done (run_grid's resume key: cell, seed, overrides and the runner's settings, which the
mapping keeps identical) and only aggregates and exports.

The cells are independent of each other (each holds its own cell lock and merges its rows into ``results.csv``
under the results lock), so a scheduler may run them at the same time; the stage command needs all of them.

Why the ``kalm`` command in a subprocess: the pipeline imports only core modules and talks to stages through
notebooks, run-dir files and commands (layering: no ``kalm_lib.ablations`` import here, nor a module name that
would put the whole library into the key of every stage importing the pipeline, :mod:`kalm_lib.pipeline.code`).
It runs where the notebook runs (the repository root, with the kernels' environment), so relative config and
runner paths resolve as the notebook resolves them.

A stage is split only when every parameter maps exactly; otherwise (a parameter ``kalm ablate`` has no flag for;
``distillation: false``, which may skip the grid; ``reuse_results: false``, which would
re-run every cell) it stays one command and :func:`cell_commands` says why.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from kalm_lib.config import REPO_ROOT
from kalm_lib.pipeline.presets import STAGE_NOTEBOOKS, PipelineError, Stage

ABLATE_NOTEBOOK = STAGE_NOTEBOOKS["ablate"]   # every stage running this notebook is an ablation grid
# notebook 05's parameters -> kalm ablate's flags (same meaning, same resolution: kalm_lib.ablations.make_run_fn)
_VALUE_FLAGS = {"grid": "--grid", "runner": "--runner", "finetune_config": "--finetune-config",
                "pretrain_config": "--pretrain-config", "eval_config": "--eval-config"}
# parameters that change how the notebook runs or shows the grid, not what a run computes
_NO_EFFECT = {"run_dir", "parallel", "level"}
# parameters that match kalm ablate only at this value (the notebook's default)
_ONLY_AT = {"distillation": True, "reuse_results": True}


def is_ablation_stage(stage: Stage) -> bool:
    """Whether ``stage`` runs an ablation grid (notebook 05, under any stage name)."""
    return stage.notebook.name == ABLATE_NOTEBOOK


def ablate_arguments(stage: Stage) -> tuple[list[str], str]:
    """``kalm ablate`` arguments that run what the stage's notebook runs -> ``(arguments, "")``, or
    ``([], why)`` when a parameter has no exact equivalent. Without ``--run-dir`` (the caller adds it)."""
    params: dict[str, Any] = {}
    for name, info in stage.declared.items():   # the notebook's defaults, then the stage's own values
        try:
            params[name] = ast.literal_eval(info.get("default") or "None")
        except (ValueError, SyntaxError):
            if name not in stage.parameters and name not in _NO_EFFECT:
                return [], f"the default of parameter {name!r} is not a plain value"
    params.update(stage.parameters)
    args: list[str] = []
    for name, value in params.items():
        if name in _NO_EFFECT:
            continue
        if name in _ONLY_AT:
            if value != _ONLY_AT[name]:
                return [], f"{name}={json.dumps(value)} has no kalm ablate equivalent"
        elif name in _VALUE_FLAGS and (value is None or isinstance(value, str)):
            args += [_VALUE_FLAGS[name], value] if value is not None else []
        elif name == "seeds" and (value is None or isinstance(value, list)):
            args += ["--seeds", *map(str, value)] if value else []
        elif name == "eval_overrides" and isinstance(value, list):
            args += [a for o in value for a in ("--eval-override", str(o))]
        elif name == "train_overrides" and isinstance(value, dict):
            # JSON is YAML, so kalm ablate's parse_value reads each value back exactly as the notebook has it
            args += [a for k, v in value.items() for a in ("-o", f"{k}={json.dumps(v)}")]
        elif name == "run_dir_paths" and isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
            args += [a for st, keys in value.items() for k, v in keys.items() for a in ("--run-dir-path", f"{st}:{k}={v}")]
        elif name == "keep_models" and isinstance(value, bool):
            args += ["--keep-models"] if value else []
        else:
            return [], f"parameter {name}={json.dumps(value, default=str)} has no kalm ablate equivalent"
    return args, ""


def kalm_executable() -> str:
    """The ``kalm`` command of this environment (beside this Python, else on PATH): what the chain runs too."""
    beside = Path(sys.executable).with_name("kalm")
    found = str(beside) if beside.is_file() else shutil.which("kalm")
    if not found:
        raise PipelineError("the kalm command is neither beside this Python nor on PATH (pip install the workbench)")
    return found


def cell_commands(stage: Stage, run_dir: Path, env: dict[str, str], online: bool) -> tuple[list[str], str]:
    """One ``kalm ablate ... --cell C --seed S`` command per pending run of an ablation stage ->
    ``(commands, "")``, or ``([], why)`` when the stage cannot be split (see the module docstring).

    ``env``: the variables the notebook's kernel would get (:func:`kalm_lib.pipeline.run.kernel_environment`);
    ``online`` adds ``--online`` to each command. Raises :class:`PipelineError` when ``kalm ablate`` refuses
    the grid (unknown grid or switch, a config the runner rejects): the same mistake the stage would stop on."""
    args, why = ablate_arguments(stage)
    if why:
        return [], why
    argv = [kalm_executable(), "ablate", *args, "--run-dir", str(run_dir), "--emit-commands"]
    done = subprocess.run(argv, cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise PipelineError(f"stage {stage.name}: kalm ablate --emit-commands refused the grid: {last}")
    commands = [line for line in done.stdout.splitlines() if line.strip()]
    if online:   # `kalm --online ablate ...`: the global flag goes before the subcommand
        commands = [shlex.join(["kalm", "--online", *shlex.split(c)[1:]]) for c in commands]
    return commands, ""
