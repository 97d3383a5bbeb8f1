"""The pipeline: run the ordered notebooks headlessly with papermill into one run directory.

- :mod:`~kalm_lib.pipeline.presets`: presets (configs/presets/), notebook parameters, ``-p`` overrides, stage selection
- :mod:`~kalm_lib.pipeline.manifest`: ``manifest.json``, stage keys, input hashing, the run lock
- :mod:`~kalm_lib.pipeline.code`: the library code a stage runs (part of its key)
- :mod:`~kalm_lib.pipeline.rerun`: when a stage runs again (skip, resume, or from scratch with old outputs kept aside)
- :mod:`~kalm_lib.pipeline.run`: :func:`plan_pipeline` / :func:`run_pipeline` / :func:`explain_pipeline`, one stage
  through papermill, HTML export
- :mod:`~kalm_lib.pipeline.batch`: one command per stage for a scheduler; several runs from one YAML file
- :mod:`~kalm_lib.pipeline.cells`: an ablation stage as one ``kalm ablate`` command per (cell, seed)
- :mod:`~kalm_lib.pipeline.setup_stage`: what notebook 00_setup records
- :mod:`~kalm_lib.pipeline.cli`: ``kalm pipeline`` (argparse and printing)
"""

from __future__ import annotations

from kalm_lib.pipeline.batch import (BatchEntry, StageCommands, batch_commands, load_batch, run_batch,
                                     stage_commands)
from kalm_lib.pipeline.code import stage_code
from kalm_lib.pipeline.manifest import MANIFEST, hash_paths, read_manifest, stage_key
from kalm_lib.pipeline.presets import (NOTEBOOKS_DIR, STAGE_NOTEBOOKS, PipelineError, Preset, Stage, StageSpec,
                                       known_presets, load_preset, notebook_parameters, resolve_stages,
                                       select_stages)
from kalm_lib.pipeline.rerun import SUPERSEDED, Decision
from kalm_lib.pipeline.run import (PipelineResult, StageFailed, explain_pipeline, export_html, latest_run_dir,
                                   new_run_dir, plan_pipeline, run_pipeline)
from kalm_lib.pipeline.setup_stage import describe_environment, hash_tree, setup_record

__all__ = [
    # presets
    "STAGE_NOTEBOOKS", "NOTEBOOKS_DIR", "PipelineError", "Preset", "StageSpec", "Stage", "known_presets",
    "load_preset", "notebook_parameters", "resolve_stages", "select_stages",
    # running
    "StageFailed", "PipelineResult", "plan_pipeline", "run_pipeline", "new_run_dir", "latest_run_dir",
    "export_html",
    # what re-runs (dry run: explain_pipeline)
    "Decision", "explain_pipeline", "SUPERSEDED",
    # the run directory
    "MANIFEST", "read_manifest", "hash_paths", "stage_key", "stage_code",
    # schedulers and batches
    "stage_commands", "StageCommands", "BatchEntry", "load_batch", "batch_commands", "run_batch",
    # notebook 00_setup
    "describe_environment", "hash_tree", "setup_record",
]
