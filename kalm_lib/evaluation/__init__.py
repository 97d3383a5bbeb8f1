"""Evaluation: real mteb evaluators on offline dev tasks (or mteb's own), and tidy result tables.

Modules, one job each: :mod:`~kalm_lib.evaluation.tasks` (offline mteb tasks built from the data cards),
:mod:`~kalm_lib.evaluation.encoder` (the mteb adapter and its instruction policy),
:mod:`~kalm_lib.evaluation.run` (config, models, runs; :func:`evaluate_model` for notebooks),
:mod:`~kalm_lib.evaluation.results` (result files -> tables, MTK/MTY, published reference scores),
:mod:`~kalm_lib.evaluation.vocabulary` (mteb task types and languages -> ours),
:mod:`~kalm_lib.evaluation.cli` (``kalm eval``).
"""

from __future__ import annotations

from kalm_lib.evaluation.encoder import InstructionConfig, MtebEncoder
from kalm_lib.evaluation.results import (COLUMNS, RECORDS_DIR, REFERENCE_DIR, RESULTS_DIR, SCOPES, TASK_KEYS, aggregate,
                                         load_reference_scores, load_results, read_result_file, reference_for,
                                         scope_of, task_info, task_scores)
from kalm_lib.evaluation.run import (EvalConfig, LoadedModel, evaluate_encoder, evaluate_model, load_eval_config,
                                     resolve_model, resolve_tasks, run_eval, run_eval_cache)
from kalm_lib.evaluation.tasks import (OFFLINE_TASKS, TASKS_BY_NAME, EvalDataError, OfflineTask, build_task,
                                       build_tasks, offline_task_names)
from kalm_lib.evaluation.vocabulary import lang_of, mteb_type_of, task_type_of

__all__ = [
    # running
    "EvalConfig", "InstructionConfig", "load_eval_config", "evaluate_model", "run_eval", "evaluate_encoder",
    "resolve_model", "LoadedModel", "resolve_tasks", "MtebEncoder", "run_eval_cache",
    # offline tasks
    "OfflineTask", "OFFLINE_TASKS", "TASKS_BY_NAME", "offline_task_names", "build_task", "build_tasks",
    "EvalDataError",
    # result tables
    "COLUMNS", "TASK_KEYS", "SCOPES", "RESULTS_DIR", "RECORDS_DIR", "load_results", "read_result_file", "task_info",
    "scope_of", "task_scores", "aggregate", "REFERENCE_DIR", "load_reference_scores", "reference_for",
    "task_type_of", "mteb_type_of", "lang_of",
]
