"""The unified training record: its fields, its task-type vocabulary, and (one place) its check.

``{"id", "query", "pos": [...], "neg": [...], "task_type", "category", "instruction", "lang", "source"}``
(DESIGN.md §1.4). Every reader of records (curation, streaming, the trainer) uses this module.
"""

from __future__ import annotations

__all__ = ["TASK_TYPES", "SYMMETRIC_TASK_TYPES"]

# The one task-type vocabulary: unified records, training configs (per-task in-batch switch), ablation
# tables and evaluation (each evaluation type maps onto one of these).
TASK_TYPES = ("retrieval", "reranking", "sts", "pair_classification", "classification", "clustering", "nli",
              "pretrain")
# Symmetric tasks: both texts play the same role (the instruction policy treats both sides alike).
SYMMETRIC_TASK_TYPES = ("sts", "pair_classification")
