"""Pipeline: presets, papermill stage runs, manifest, batch runs."""

from __future__ import annotations

from kalm_lib.pipeline.run import (REPO_ROOT, PRESETS_DIR, NOTEBOOKS_DIR, MANIFEST, STAGE_NOTEBOOKS, HEADLESS_ENV, PipelineError, StageFailed, StageSpec, Preset, Stage, known_presets, load_preset, notebook_parameters, parse_overrides, resolve_stages, select_stages, notebook_hash, hash_paths, stage_key, check_inputs, read_manifest, executed_name, export_html, PipelineResult, new_run_dir, latest_run_dir, plan_pipeline, run_pipeline, BatchEntry, load_batch, batch_commands, run_batch, cli_main)

__all__ = ['REPO_ROOT', 'PRESETS_DIR', 'NOTEBOOKS_DIR', 'MANIFEST', 'STAGE_NOTEBOOKS', 'HEADLESS_ENV', 'PipelineError', 'StageFailed', 'StageSpec', 'Preset', 'Stage', 'known_presets', 'load_preset', 'notebook_parameters', 'parse_overrides', 'resolve_stages', 'select_stages', 'notebook_hash', 'hash_paths', 'stage_key', 'check_inputs', 'read_manifest', 'executed_name', 'export_html', 'PipelineResult', 'new_run_dir', 'latest_run_dir', 'plan_pipeline', 'run_pipeline', 'BatchEntry', 'load_batch', 'batch_commands', 'run_batch', 'cli_main']
