"""Ablations: registered switches, declarative grids, runs, and the one definition of a delta (paired by seed).

    kalm ablate --grid cpu-demo --run-dir runs/<run> --finetune-config cpu-demo/finetune [--parallel 2]
    kalm ablate --grid cpu-demo --run-dir runs/<run> ... --emit-commands     # one command per (cell, seed)

Modules: :mod:`~kalm_lib.ablations.switches` (the switch registry and the one table of config keys they
write), :mod:`~kalm_lib.ablations.grid` (grid files -> cells x seeds), :mod:`~kalm_lib.ablations.runner`
(run_fn: the trainer, or a function by name), :mod:`~kalm_lib.ablations.run` (``run_grid``: whole grids or
single cells, in one process or one cell per GPU), :mod:`~kalm_lib.ablations.parallel` (worker processes pinned
to devices), :mod:`~kalm_lib.ablations.store` (``<run_dir>/ablations/results.csv``: read-merge-write under a
lock), :mod:`~kalm_lib.ablations.analysis` (deltas vs the full recipe, paired by seed, with 95% intervals;
figure), :mod:`~kalm_lib.ablations.cli` (``kalm ablate``).
"""

from __future__ import annotations

from kalm_lib.ablations.analysis import (AGGREGATE_COLUMNS, CONFIDENCE, LEVELS, aggregate, delta_figure,
                                         delta_interval, delta_table, per_seed_scores)
from kalm_lib.ablations.grid import BASELINE, Cell, GridSpec, cells_table, expand, expand_runs, load_grid
from kalm_lib.ablations.run import pending_runs, provenance_path, run_grid
from kalm_lib.ablations.runner import RunFn, TrainerRunFn, load_run_fn, make_run_fn
from kalm_lib.ablations.store import RESULT_COLUMNS, RESULTS, read_results
from kalm_lib.ablations.switches import OVERRIDE_KEYS, SWITCHES, GridError, Switch, split_overrides, value_label

__all__ = [
    # switches
    "Switch", "SWITCHES", "OVERRIDE_KEYS", "GridError", "split_overrides", "value_label",
    # grids
    "GridSpec", "Cell", "BASELINE", "load_grid", "expand", "expand_runs", "cells_table",
    # running
    "RunFn", "RESULTS", "RESULT_COLUMNS", "run_grid", "pending_runs", "read_results", "provenance_path",
    "load_run_fn", "TrainerRunFn", "make_run_fn",
    # analysis
    "LEVELS", "AGGREGATE_COLUMNS", "CONFIDENCE", "per_seed_scores", "aggregate", "delta_interval", "delta_table",
    "delta_figure",
]
