"""Ablations: registered switches, declarative grids, runs, and the one definition of a delta (paired by seed).

    kalm ablate --grid cpu-demo --run-dir runs/<run> --finetune-config cpu-demo/finetune

Modules: :mod:`~kalm_lib.ablations.switches` (the switch registry and the one table of config keys they
write), :mod:`~kalm_lib.ablations.grid` (grid files -> cells x seeds), :mod:`~kalm_lib.ablations.run`
(``run_grid`` -> ``<run_dir>/ablations/results.csv``; the trainer as a run_fn),
:mod:`~kalm_lib.ablations.analysis` (deltas vs the full recipe, paired by seed; figure),
:mod:`~kalm_lib.ablations.cli` (``kalm ablate``).
"""

from __future__ import annotations

from kalm_lib.ablations.analysis import AGGREGATE_COLUMNS, LEVELS, aggregate, delta_figure, delta_table, per_seed_scores
from kalm_lib.ablations.grid import BASELINE, Cell, GridSpec, cells_table, expand, expand_runs, load_grid
from kalm_lib.ablations.run import (RESULT_COLUMNS, RESULTS, RunFn, TrainerRunFn, load_run_fn, make_run_fn,
                                    provenance_path, read_results, run_grid)
from kalm_lib.ablations.switches import OVERRIDE_KEYS, SWITCHES, GridError, Switch, split_overrides, value_label

__all__ = [
    # switches
    "Switch", "SWITCHES", "OVERRIDE_KEYS", "GridError", "split_overrides", "value_label",
    # grids
    "GridSpec", "Cell", "BASELINE", "load_grid", "expand", "expand_runs", "cells_table",
    # running
    "RunFn", "RESULTS", "RESULT_COLUMNS", "run_grid", "read_results", "provenance_path", "load_run_fn",
    "TrainerRunFn", "make_run_fn",
    # analysis
    "LEVELS", "AGGREGATE_COLUMNS", "per_seed_scores", "aggregate", "delta_table", "delta_figure",
]
