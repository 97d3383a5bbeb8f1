"""Result tables: mteb result files -> one tidy frame, per-task scores, MTK / MTY, published reference scores.

- :func:`load_results` reads any number of result folders (an mteb result cache ``<out>/results/<model>/
  <revision>/<Task>.json`` as :func:`kalm_lib.evaluation.evaluate_encoder` writes it, or a bare
  ``<out>/<model>/<revision>/`` tree; new 2.x/1.12 or old 1.0 files) into one frame with the columns of
  :data:`COLUMNS`; every table of this package names the task type ``task_type``, the language ``lang`` (one
  vocabulary: :mod:`kalm_lib.evaluation.vocabulary`) and the ``scope`` of the score: ``"quick subset"`` (an
  offline task's subsample, dataset revision ``quick-<n>``) or ``"full split"`` (:func:`scope_of`).
- :func:`task_scores` gives one score per task; :func:`aggregate` MTK (mean over tasks) and MTY (mean over
  task-type means) per language, as in the paper.
- :func:`load_reference_scores` reads published leaderboard scores (``data/reference-scores``, CC0) and
  :func:`reference_for` places them beside our tasks where the task is exactly the same.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from kalm_lib import provenance
from kalm_lib.evaluation.tasks import TASKS_BY_NAME
from kalm_lib.evaluation.vocabulary import lang_of, task_type_of

__all__ = ["REFERENCE_DIR", "RESULTS_DIR", "RECORDS_DIR", "COLUMNS", "TASK_KEYS", "SCOPES", "task_info", "scope_of",
           "read_result_file", "load_results", "task_scores", "aggregate", "load_reference_scores", "reference_for"]

logger = logging.getLogger(__name__)
REFERENCE_DIR = provenance.REPO_ROOT / "data" / "reference-scores" / "results"
RESULTS_DIR = "results"   # <out>/results/<model>/<revision>/<Task>.json: an mteb result cache
RECORDS_DIR = "kalm"      # <out>/kalm/<model>/<revision>/kalm_eval.json, errors.json: outside mteb's glob
COLUMNS = ["run", "model", "revision", "task", "task_type", "lang", "scope", "split", "subset", "main_score",
           "mteb_equivalent", "known", "scores", "source", "mteb_version", "dataset_revision"]
# one score per these (task_scores): a quick subset and a full split of one task are never averaged together
TASK_KEYS = ["run", "model", "revision", "task", "task_type", "lang", "scope"]
SCOPES = ("quick subset", "full split", "scope unknown")
NOT_RESULTS = ("model_meta.json", "kalm_eval.json", "errors.json")  # JSON files that are no task results


def task_info(task_name: str) -> dict[str, Any]:
    """task_type, lang, mteb_equivalent, known of a task name (ours, or mteb's registry; "unknown" if neither)."""
    if task_name in TASKS_BY_NAME:
        s = TASKS_BY_NAME[task_name]
        return {"task_type": s.type, "lang": s.lang, "mteb_equivalent": s.mteb_equivalent, "known": True}
    try:
        import mteb  # seconds to import; only for result files of public tasks

        md = mteb.get_task(task_name).metadata
        return {"task_type": task_type_of(md.type), "lang": lang_of(md.languages), "mteb_equivalent": task_name,
                "known": True}
    except Exception:
        return {"task_type": "unknown", "lang": "unknown", "mteb_equivalent": None, "known": False}


def scope_of(task_name: str, dataset_revision: Any) -> str:
    """"quick subset" (dataset revision ``quick-<n>``: an offline task's subsample), "full split", or "scope
    unknown" for an offline task written before quick subsets had their own revision (revision "0")."""
    revision = str(dataset_revision or "")
    if revision.startswith("quick"):
        return SCOPES[0]
    if task_name in TASKS_BY_NAME and revision in ("", "0"):
        return SCOPES[2]
    return SCOPES[1]


def _main_score_old(task_type: str, split_scores: dict) -> float | None:
    """Main score of an mteb 1.0-layout split entry (no "main_score" key)."""
    if "main_score" in split_scores:
        return split_scores["main_score"]
    if task_type == "sts":
        return split_scores.get("cos_sim", {}).get("spearman")
    if task_type == "classification":
        return split_scores.get("accuracy")
    if task_type == "pair_classification":
        return split_scores.get("cos_sim", {}).get("ap")
    if task_type == "clustering":
        return split_scores.get("v_measure")
    return split_scores.get("ndcg_at_10") or split_scores.get("map")


def read_result_file(path: str | Path) -> list[dict[str, Any]]:
    """Rows (one per split x subset) of one mteb result JSON, new (2.x/1.12) or old (1.0) layout."""
    path = Path(path)
    d = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(d, dict) or not (d.get("task_name") or d.get("mteb_dataset_name")):
        return []  # not an mteb result file (configs, provenance, model_meta, ...)
    task = d.get("task_name") or d.get("mteb_dataset_name")
    info = task_info(task)
    rows = []
    if "scores" in d:
        for split, entries in d["scores"].items():
            for e in entries:
                scores = {k: v for k, v in e.items() if k not in ("hf_subset", "languages")}
                rows.append({"task": task, "split": split, "subset": e.get("hf_subset", "default"),
                             "main_score": e.get("main_score"), "scores": scores, **info})
    else:
        for split, e in d.items():
            if isinstance(e, dict) and split not in ("dataset_revision",):
                rows.append({"task": task, "split": split, "subset": "default",
                             "main_score": _main_score_old(info["task_type"], e), "scores": e, **info})
    for r in rows:
        r.update(source=str(path), mteb_version=d.get("mteb_version"), dataset_revision=d.get("dataset_revision"),
                 scope=scope_of(task, d.get("dataset_revision")))
    return rows


def _model_and_revision(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """``(model, revision)`` from the folders above a result file (``<model>/<revision>/[experiments/<x>/]``)."""
    folders = list(parts[:-1])
    if "experiments" in folders:
        folders = folders[:folders.index("experiments")]
    if len(folders) < 2:
        return None
    return folders[-2].replace("__", "/", 1), folders[-1]


def _folder_rows(root: Path, run: str) -> list[dict[str, Any]]:
    """Rows of every result file under ``root``; model and revision from the ``<model>/<revision>/`` folders."""
    rows = []
    for f in sorted(root.rglob("*.json")):
        rel = f.relative_to(root).parts
        if f.name in NOT_RESULTS or rel[0] == RECORDS_DIR:
            continue
        try:
            file_rows = read_result_file(f)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as e:
            logger.warning("skipping unreadable result file %s: %s", f, e)
            continue
        model, revision = _model_and_revision(rel) or (root.name, "unknown")
        for r in file_rows:
            r.update(run=run, model=model, revision=revision)
        rows.extend(file_rows)
    return rows


def load_results(paths: list[str | Path] | str | Path, run_names: list[str] | None = None) -> pd.DataFrame:
    """One tidy frame from result folders: a run dir (uses ``<dir>/eval``), an eval dir, or a model folder.

    Columns (:data:`COLUMNS`): run, model, revision, task, task_type, lang, scope (:func:`scope_of`), split,
    subset, main_score (0-100 as on the leaderboard), mteb_equivalent, known, scores (all metrics), source
    (file), mteb_version, dataset_revision.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows = []
    for i, p in enumerate(paths):
        p = Path(p)
        root = p / "eval" if (p / "eval").is_dir() else p
        if root == p and (p / "provenance.json").is_file():
            continue  # a run directory without eval/: no results (not its configs and checkpoints)
        rows.extend(_folder_rows(root, run_names[i] if run_names else p.name))
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["main_score"] = pd.to_numeric(df["main_score"], errors="coerce") * 100.0
    return df


def task_scores(df: pd.DataFrame) -> pd.DataFrame:
    """One score per (run, model, revision, task, scope): the mean over its eval splits and subsets (as mteb).
    A frame without a ``scope`` column (made by hand) counts as "scope unknown"."""
    if "scope" not in df.columns:
        df = df.assign(scope=SCOPES[2])
    return df.dropna(subset=["main_score"]).groupby(TASK_KEYS, as_index=False, dropna=False)["main_score"].mean()


def aggregate(df: pd.DataFrame, by: tuple[str, ...] = ("run", "model", "revision", "lang", "scope")) -> pd.DataFrame:
    """MTK (mean over tasks) and MTY (mean over task-type means) per ``by`` group, plus task counts.
    Tasks of unknown type are left out; quick-subset and full-split scores are separate groups."""
    per_task = task_scores(df)
    per_task = per_task[per_task["task_type"] != "unknown"]
    by = list(by)
    if per_task.empty:
        return pd.DataFrame(columns=[*by, "MTK", "MTY", "n_tasks", "n_types"])
    mtk = per_task.groupby(by, dropna=False)["main_score"].agg(["mean", "size"])
    type_means = per_task.groupby([*by, "task_type"], dropna=False)["main_score"].mean().reset_index()
    mty = type_means.groupby(by, dropna=False)["main_score"].agg(["mean", "size"])
    out = pd.DataFrame({"MTK": mtk["mean"], "MTY": mty["mean"], "n_tasks": mtk["size"], "n_types": mty["size"]})
    return out.reset_index()


def load_reference_scores(root: str | Path = REFERENCE_DIR) -> pd.DataFrame:
    """Published scores (mteb results repo subset) as a frame like :func:`load_results` (run = "reference")."""
    root = Path(root)
    if not root.is_dir():
        return pd.DataFrame(columns=COLUMNS)
    return load_results([root], run_names=["reference"])


def reference_for(tasks: list[str], reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Reference rows re-labelled with our task names, only where our task is the same public task and
    split (column ``public_task`` names it). One row per (model, our task, split); where a model has several
    revisions the newest file wins."""
    ref = load_reference_scores() if reference is None else reference
    parts = []
    for t in tasks:
        spec = TASKS_BY_NAME.get(t)
        if spec is None:  # a public mteb task name: the same task by definition, every split
            sub = ref[ref["task"] == t].copy()
            sub["public_task"] = t
        elif spec.mteb_equivalent:
            sub = ref[(ref["task"] == spec.mteb_equivalent) & (ref["split"].isin(list(spec.splits)))]
            sub = sub[sub["subset"].isin(["default", spec.lang])].copy()
            sub["public_task"], sub["task"], sub["task_type"], sub["lang"] = sub["task"], t, spec.type, spec.lang
        else:
            continue
        if sub.empty:
            continue
        parts.append(sub.drop_duplicates(["model", "task", "split"], keep="last"))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*COLUMNS, "public_task"])
