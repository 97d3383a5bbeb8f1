"""Evaluation: mteb adapter, offline dev tasks built from the data cards, results tables."""

from __future__ import annotations

from kalm_lib.evaluation.tasks import (TASK_TYPES, MTEB_TYPE_TO_OURS, LANGS, SYMMETRIC_TYPES, EvalDataError, OfflineTask, OFFLINE_TASKS, TASKS_BY_NAME, offline_task_names, split_file, split_sha256, stable_key_hash, subsample, read_pair_score, read_pair_label, read_text_label, read_scifact, read_cmrc, read_cmrc_rerank, read_trecqa, build_task, build_tasks)
from kalm_lib.evaluation.run import (REPO_ROOT, REFERENCE_DIR, LANG_OF_ISO, DEFAULT_TYPE_INSTRUCTIONS, InstructionConfig, EvalConfig, load_eval_config, MtebEncoder, resolve_model, resolve_tasks, evaluate_encoder, run_eval, task_info, read_result_file, COLUMNS, load_results, task_scores, aggregate, load_reference_scores, reference_for, summary_table, cli_main)

__all__ = ['TASK_TYPES', 'MTEB_TYPE_TO_OURS', 'LANGS', 'SYMMETRIC_TYPES', 'EvalDataError', 'OfflineTask', 'OFFLINE_TASKS', 'TASKS_BY_NAME', 'offline_task_names', 'split_file', 'split_sha256', 'stable_key_hash', 'subsample', 'read_pair_score', 'read_pair_label', 'read_text_label', 'read_scifact', 'read_cmrc', 'read_cmrc_rerank', 'read_trecqa', 'build_task', 'build_tasks', 'REPO_ROOT', 'REFERENCE_DIR', 'LANG_OF_ISO', 'DEFAULT_TYPE_INSTRUCTIONS', 'InstructionConfig', 'EvalConfig', 'load_eval_config', 'MtebEncoder', 'resolve_model', 'resolve_tasks', 'evaluate_encoder', 'run_eval', 'task_info', 'read_result_file', 'COLUMNS', 'load_results', 'task_scores', 'aggregate', 'load_reference_scores', 'reference_for', 'summary_table', 'cli_main']
