"""Quick subset or full split: what kind of score each number of the report is.

A quick-subset score (``kalm eval --quick``, ``configs/eval/quick.yaml``: a deterministic subsample of a task's
split) and a full-split score of the same task are different measurements: they are never averaged together,
never subtracted from each other and never shown side by side as if comparable. Every table and figure of the
report names the scope of each score it shows (issue 14).

The scope of an evaluation result is the evaluation's (one definition: :func:`kalm_lib.evaluation.scope_of`,
the ``scope`` column of :func:`kalm_lib.evaluation.load_results`; dataset revision ``quick-<n>`` = quick subset).
A table without that column counts as :data:`UNKNOWN`, as in :func:`kalm_lib.evaluation.task_scores`; unknown
is treated like a quick subset: never compared with published scores. This module adds only the scope of
scores the evaluation's tables do not carry: a soup scorer's (:func:`scorer_scope`) and an ablation grid's
(:func:`ablation_scope`).
"""

from __future__ import annotations

import pandas as pd

from kalm_lib.evaluation import SCOPES

__all__ = ["QUICK", "FULL", "UNKNOWN", "SCOPES", "score_scope", "scorer_scope", "ablation_scope",
           "with_scope", "scope_note"]

QUICK, FULL, UNKNOWN = SCOPES   # "quick subset", "full split", "scope unknown"


def score_scope(df: pd.DataFrame) -> pd.Series:
    """The scope of every row of a result table: its ``scope`` column (the evaluation's), else :data:`UNKNOWN`."""
    if "scope" in df.columns:
        return df["scope"].fillna(UNKNOWN).astype(str)
    return pd.Series([UNKNOWN] * len(df), index=df.index, dtype=object)


def with_scope(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with its ``scope`` column (added by :func:`score_scope` when absent)."""
    return df if "scope" in df.columns else df.assign(scope=score_scope(df))


def scorer_scope(scorer_id: str | None) -> str:
    """Scope of a soup scorer's scores from its id (``kalm_lib.soup``'s ``mteb:quick:...`` / ``mteb:full:...``)."""
    parts = str(scorer_id or "").split(":")
    if len(parts) > 1 and parts[0] == "mteb":
        return {"quick": QUICK, "full": FULL}.get(parts[1], UNKNOWN)
    return UNKNOWN


def ablation_scope(ab: pd.DataFrame) -> str:
    """Scope of an ablation grid's scores: its ``scope`` column when results.csv has one (several: joined), else
    :data:`UNKNOWN` (results.csv does not record it today)."""
    if "scope" in ab.columns:
        values = sorted(set(ab["scope"].dropna().astype(str)))
    else:
        values = [UNKNOWN]
    return " + ".join(values) or UNKNOWN


def scope_note(scopes) -> str:
    """One sentence on the scopes present in a table, for its caption."""
    present = [s for s in SCOPES if s in set(scopes)]
    parts = {QUICK: "quick subset = a deterministic subsample of the task's split (not comparable with published "
                    "or full-split scores)",
             FULL: "full split = every row of the task's evaluation split",
             UNKNOWN: "scope unknown = the results do not say whether they are a subsample (treated as not "
                      "comparable)"}
    return "Scope of each score: " + "; ".join(parts[s] for s in present) + "." if present else ""
