"""Training: one trainer on accelerate for every stage (pre-train, fine-tune, distill).

Modules, in the order a run uses them: ``config`` (StageConfig, the one validation of every knob), ``data``
(records -> batches, teacher cache), ``stream`` (streamed data: per-process shares, a saved position),
``objective`` (the loss, in one place), ``setup`` (accelerator, model,
optimizer, scheduler, output lock, resume), ``engines`` (DDP, FSDP2, DeepSpeed ZeRO-2/3: everything that
differs between them), ``step`` (one step's gradients), ``gradcache``, ``loop`` (``train()``),
``checkpoint`` (atomic, resumable), ``launch`` (run directory, ``accelerate launch``), ``notebook`` (the
stage notebooks' shared cells), ``cli`` (``kalm train``).
"""

from __future__ import annotations

from kalm_lib.train.config import StageConfig, load_config, validate_config
from kalm_lib.train.data import DataError
from kalm_lib.train.launch import launch, run_dir_overrides
from kalm_lib.train.loop import NonFiniteLossError, TrainResult, train
from kalm_lib.train.notebook import (StagePlan, live_loss_plot, loss_figure, notebook_setup, plan_stage, read_metrics,
                                     run_stage, score_change, throughput_table)
from kalm_lib.train.objective import make_objective

__all__ = [
    # run a stage
    "StageConfig", "load_config", "validate_config", "train", "TrainResult", "DataError", "NonFiniteLossError", "make_objective",
    "launch", "run_dir_overrides",
    # the stage notebooks (02, 03, 03b)
    "StagePlan", "plan_stage", "run_stage", "notebook_setup", "read_metrics", "loss_figure", "live_loss_plot",
    "throughput_table", "score_change",
]
