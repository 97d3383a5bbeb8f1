"""Running a grid: every (cell, seed) through a ``run_fn``, rows merged into ``<run_dir>/ablations/results.csv``.

A run is ``run_fn(cell_config, seed) -> {task: score | {"score", "task_type"}}``; any function with that
signature plugs in (:mod:`kalm_lib.ablations.runner`). A (cell, seed) is the unit of work: :func:`run_grid` runs
a whole grid, some cells of it (``cells=``, what ``kalm ablate --cell`` does for a scheduler), in one process or
in N worker processes (``parallel=N``: one cell per GPU, :mod:`kalm_lib.ablations.parallel`); every finished run
is merged into results.csv at once, under the results lock (:mod:`kalm_lib.ablations.store`).
"""

from __future__ import annotations

import contextlib
import math
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from kalm_lib import locking, provenance
from kalm_lib.ablations.grid import Cell, GridSpec, expand, jsonable
from kalm_lib.ablations.parallel import run_in_workers
from kalm_lib.ablations.runner import RunFn
from kalm_lib.ablations.store import (RESULT_COLUMNS, cell_lock, grid_lock, hold_waiting, merge_rows, read_table,
                                      results_path, run_key, safe_name)
from kalm_lib.ablations.switches import GridError, value_label
from kalm_lib.runtime import progress_bar

GRID_PROBE_S = 5.0   # a single-cell run waits this long for the grid lock (other cell runs hold it for an instant)
Run = tuple[Cell, int, tuple[str, int, str, str]]   # (cell, seed, run key)


def _score_rows(cell: Cell, seed: int, scores: Mapping[str, Any], task_types: Mapping[str, str]):
    if not scores:
        raise GridError(f"run_fn returned no scores for cell {cell.name}, seed {seed}")
    for task, value in scores.items():
        if isinstance(value, Mapping):  # {"score": x, "task_type": t}
            score, ttype = value.get("score", value.get("main_score")), value.get("task_type")
        else:
            score, ttype = value, None
        ttype = ttype or task_types.get(task, "unknown")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise GridError(f"cell {cell.name}, seed {seed}, task {task}: score {score!r} is not a finite number")
        yield task, ttype, float(score)


def _runner_hash(run_fn: RunFn) -> str:
    """What else decides a score: the runner's own settings (configs, evaluation) when it states them
    (``run_fn.signature()``), else its name."""
    if hasattr(run_fn, "signature"):
        return provenance.config_hash(run_fn.signature())
    return f"{getattr(run_fn, '__module__', '')}.{getattr(run_fn, '__qualname__', type(run_fn).__name__)}"


def provenance_path(run_dir: str | Path, grid: str) -> Path:
    """Where :func:`run_grid` records a grid's provenance: ``<run_dir>/ablations/provenance/<grid>.json``."""
    return Path(run_dir) / "ablations" / "provenance" / f"{safe_name(grid)}.json"


def _write_provenance(run_dir: Path, spec: GridSpec, seeds: list[int] | None) -> None:
    provenance.write(provenance_path(run_dir, spec.name), provenance.collect(
        config={"grid": spec.name, "design": spec.design, "switches": jsonable(spec.switches),
                "baseline": jsonable(spec.baseline), "base_overrides": spec.base_overrides},
        seed=None, seeds=list(seeds if seeds is not None else spec.seeds),
        cells=[c.as_config() for c in expand(spec)]))


def _plan(spec: GridSpec, run_fn: RunFn, seeds: list[int] | None, cells: list[str] | None) -> list[Run]:
    """The (cell, seed, run key) of every run asked for: all cells, or the named ones (unknown: an error)."""
    grid_cells = expand(spec)
    if cells is not None:
        unknown = [c for c in cells if c not in {g.name for g in grid_cells}]
        if unknown:
            raise GridError(f"grid {spec.name} has no cell(s) {unknown}; its cells: {[c.name for c in grid_cells]}")
        grid_cells = [c for c in grid_cells if c.name in cells]
    rhash = _runner_hash(run_fn)
    return [(c, s, (c.name, s, provenance.config_hash(c.as_config()["overrides"]), rhash))
            for c in grid_cells for s in (seeds if seeds is not None else spec.seeds)]


def _rank(spec: GridSpec):
    """Order of a grid's rows in results.csv: the grid's cells, then its seeds (other seeds after, by value)."""
    cells = {c.name: i for i, c in enumerate(expand(spec))}
    seeds = {s: i for i, s in enumerate(spec.seeds)}
    return lambda cell, seed: (cells.get(cell, len(cells)), seeds.get(seed, len(seeds)), seed)


def _grid_rows(run_dir: Path, grid: str) -> pd.DataFrame:
    table = read_table(results_path(run_dir))
    return table[table["grid"].astype(str) == grid] if "grid" in table else table.iloc[:0]


def pending_runs(spec: GridSpec, run_fn: RunFn, run_dir: str | Path, *, seeds: list[int] | None = None,
                 cells: list[str] | None = None) -> list[tuple[Cell, int]]:
    """The (cell, seed) runs that results.csv does not hold yet for this runner (same overrides, same runner
    settings): what :func:`run_grid` would run, and what ``kalm ablate --emit-commands`` prints."""
    done = {run_key(r) for r in _grid_rows(Path(run_dir), spec.name).to_dict("records")}
    return [(c, s) for c, s, key in _plan(spec, run_fn, seeds, cells) if key not in done]


def _run_locked(run_fn: RunFn, cell_config: dict[str, Any], seed: int, lock: Path) -> Mapping[str, Any]:
    """One run under its cell lock (module-level: worker processes call it)."""
    with locking.hold(lock, what=f"ablation run (grid {cell_config['grid']}, cell {cell_config['cell']}, "
                                 f"seed {seed})"):
        return run_fn(cell_config, seed)


def _execute(todo: list[Run], run_fn: RunFn, spec: GridSpec, run_dir: Path, parallel: int,
             progress: bool) -> Iterator[tuple[Run, Mapping[str, Any]]]:
    """Each run of ``todo`` with its scores, in this process (lazily, in order) or in ``parallel`` workers."""
    tasks = [(run_fn, {**c.as_config(), "grid": spec.name}, s, cell_lock(run_dir, spec.name, c.name, s))
             for c, s, _ in todo]
    if parallel == 1:
        done = ((i, _run_locked(*task)) for i, task in enumerate(tasks))
    else:
        done = run_in_workers(_run_locked, tasks, parallel)
    # text bars when headless: a widget bar does not survive the HTML export
    with progress_bar()(total=len(todo), desc=f"ablation grid {spec.name}", disable=not progress) as bar:
        for i, scores in done:
            bar.update(1)
            yield todo[i], scores


def _wanted_only(wanted: set) -> Callable[[Mapping[str, Any]], bool]:
    return lambda row: run_key(row) in wanted


def _check_parallel(run_fn: RunFn, parallel: int) -> None:
    if not isinstance(parallel, int) or parallel < 1:
        raise GridError(f"parallel must be a whole number >= 1, got {parallel!r}")
    if parallel > 1:
        try:
            pickle.dumps(run_fn)
        except Exception as e:  # what fails to pickle varies (lambda, closure, open file, ...)
            raise GridError(f"parallel runs need a run_fn that worker processes can load (a module-level "
                            f"function, a TrainerRunFn, or a runner spec module:function / file.py:function); "
                            f"{run_fn!r} does not pickle ({e})") from None


def run_grid(spec: GridSpec, run_fn: RunFn, run_dir: str | Path, *, seeds: list[int] | None = None,
             cells: list[str] | None = None, task_types: Mapping[str, str] | None = None, resume: bool = True,
             progress: bool = True, parallel: int = 1) -> pd.DataFrame:
    """Run the grid's (cell, seed) runs through ``run_fn`` and merge their rows into ``<run_dir>/ablations/results.csv``.

    Each finished run is merged at once (read-merge-write under the results lock), so an interrupted grid
    resumes: runs whose (cell, seed, overrides hash, runner hash) are in the file are not run again (see
    :func:`_runner_hash`; ``resume=False`` re-runs them). Other grids' rows are kept as they are on disk.

    - Whole grid (``cells=None``): holds the grid lock for its duration (a second run of the same grid on this
      run dir is refused with :class:`kalm_lib.locking.LockHeld`, naming the holder); this grid's rows no longer
      wanted (changed grid, seeds or runner) are dropped.
    - ``cells=[names]``: only those cells (``kalm ablate --cell``); refused while a whole-grid run holds the grid;
      several such runs of one grid may run side by side, and the grid's other rows stay.
    - ``parallel=N``: the runs in N worker processes, **one cell per GPU** when GPUs are visible (worker i sees
      only GPU i), else the CPU threads split between the workers (:mod:`kalm_lib.ablations.parallel`).
      ``run_fn`` must pickle. The rows, and results.csv, are those of a sequential run.

    Every run holds its cell lock while it runs. A runner with a ``check(spec)`` method may refuse the grid
    before any work. ``run_fn`` gets the cell config with the grid's name added (``cell_config["grid"]``).
    Returns the rows of the runs asked for (columns :data:`RESULT_COLUMNS` + ``sw.*``), in grid order.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise GridError(f"run directory {run_dir} exists and is not a directory")
    runs = _plan(spec, run_fn, seeds, cells)
    _check_parallel(run_fn, parallel)
    if hasattr(run_fn, "check"):
        run_fn.check(spec)
    rank, wanted = _rank(spec), {key for _, _, key in runs}
    keep = _wanted_only(wanted) if cells is None else None   # a whole-grid run drops its stale rows
    with contextlib.ExitStack() as stack:
        lock, what = grid_lock(run_dir, spec.name), f"ablation grid {spec.name} in {run_dir}"
        if cells is None:
            stack.enter_context(locking.hold(lock, what=what))
            merge_rows(run_dir, spec.name, [], keep=keep if resume else _wanted_only(set()), rank=rank)
        else:
            with hold_waiting(lock, what=what, wait_s=GRID_PROBE_S):
                pass   # only checks that no whole-grid run holds it
        if cells is None or not provenance_path(run_dir, spec.name).is_file():
            _write_provenance(run_dir, spec, seeds if cells is None else None)
        done = {run_key(r) for r in _grid_rows(run_dir, spec.name).to_dict("records")} if resume else set()
        todo = [run for run in runs if run[2] not in done]
        for (cell, seed, key), scores in _execute(todo, run_fn, spec, run_dir, parallel, progress):
            rows = [{"grid": spec.name, "cell": cell.name, "is_baseline": cell.is_baseline, "seed": seed,
                     "task": task, "task_type": ttype, "score": score, "overrides_hash": key[2], "runner_hash": key[3],
                     **{f"sw.{k}": value_label(v) for k, v in cell.switches.items()}}
                    for task, ttype, score in _score_rows(cell, seed, scores, dict(task_types or {}))]
            merge_rows(run_dir, spec.name, rows, keep=keep, rank=rank)
    mine = _grid_rows(run_dir, spec.name)
    mine = mine[pd.Series([run_key(r) in wanted for r in mine.to_dict("records")], index=mine.index, dtype=bool)]
    mine = mine.reset_index(drop=True)
    columns = [*RESULT_COLUMNS, *(f"sw.{s}" for s in spec.mentioned)]
    return mine[[c for c in columns if c in mine.columns]]
