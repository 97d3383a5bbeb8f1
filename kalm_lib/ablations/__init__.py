"""Ablations: registered switches, declarative grids, runs and paired-by-seed deltas."""

from __future__ import annotations

from kalm_lib.ablations.grid import (GRIDS_DIR, RESULTS, BASELINE, TASK_TYPES, OVERRIDE_KEYS, GridError, Switch, SWITCHES, GridSpec, Cell, split_overrides, load_grid, expand, expand_runs, load_run_fn, run_grid, provenance_path, read_results, TrainerRunFn, make_run_fn, LEVELS, per_seed_scores, aggregate, delta_figure, DEFAULT_RUNNER, cli_main)

__all__ = ['GRIDS_DIR', 'RESULTS', 'BASELINE', 'TASK_TYPES', 'OVERRIDE_KEYS', 'GridError', 'Switch', 'SWITCHES', 'GridSpec', 'Cell', 'split_overrides', 'load_grid', 'expand', 'expand_runs', 'load_run_fn', 'run_grid', 'provenance_path', 'read_results', 'TrainerRunFn', 'make_run_fn', 'LEVELS', 'per_seed_scores', 'aggregate', 'delta_figure', 'DEFAULT_RUNNER', 'cli_main']
