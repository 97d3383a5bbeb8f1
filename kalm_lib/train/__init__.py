"""Training: one trainer on accelerate for every stage (pre-train, fine-tune, distill)."""

from __future__ import annotations

from kalm_lib.train.config import (TASK_TYPES, DEFAULT_IN_BATCH_BY_TASK, LoraConfig, ModelConfig, LossConfig, DataConfig, TrainConfig, CheckpointConfig, LogConfig, DistillConfig, StageConfig, load_config, validate_config)
from kalm_lib.train.data import (DataError, load_records, epoch_batches, Batch, build_batch, TeacherCache, teacher_scores, model_identity)
from kalm_lib.train.checkpoint import (STATE_FILE, STATE_DIR, checkpoint_dirs, latest_checkpoint, read_state, remove_stale_temp, save_checkpoint, load_checkpoint)
from kalm_lib.train.gradcache import (Chunk, tokenize_unpadded, make_chunks, embed_with_graph, grad_cache_step)
from kalm_lib.train.loop import (make_objective, TrainResult, NonFiniteLossError, enable_gradient_checkpointing, train, run_dir_overrides, launch, read_metrics, loss_figure, live_loss_plot, cli_main)

__all__ = ['TASK_TYPES', 'DEFAULT_IN_BATCH_BY_TASK', 'LoraConfig', 'ModelConfig', 'LossConfig', 'DataConfig', 'TrainConfig', 'CheckpointConfig', 'LogConfig', 'DistillConfig', 'StageConfig', 'load_config', 'validate_config', 'DataError', 'load_records', 'epoch_batches', 'Batch', 'build_batch', 'TeacherCache', 'teacher_scores', 'model_identity', 'STATE_FILE', 'STATE_DIR', 'checkpoint_dirs', 'latest_checkpoint', 'read_state', 'remove_stale_temp', 'save_checkpoint', 'load_checkpoint', 'Chunk', 'tokenize_unpadded', 'make_chunks', 'embed_with_graph', 'grad_cache_step', 'make_objective', 'TrainResult', 'NonFiniteLossError', 'enable_gradient_checkpointing', 'train', 'run_dir_overrides', 'launch', 'read_metrics', 'loss_figure', 'live_loss_plot', 'cli_main']
