"""What a report reads: run directories (layout in docs/CONTRACTS.md, every part optional) as :class:`RunData`.

:func:`load_run` reads one run directory (or a bare eval-results folder); a part that is missing or broken
becomes a note, never an error. :func:`combined_results` joins several runs' result tables with a display
``label``. :func:`models_to_evaluate` and :func:`evaluate_run` fill a run's ``eval/`` (the report stage's
evaluation, through :func:`kalm_lib.evaluation.evaluate_model`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kalm_lib import evaluation
from kalm_lib.config import resolve_config
from kalm_lib.report.scope import score_scope

__all__ = ["RunData", "load_run", "load_runs", "combined_results", "auto_baseline", "model_info",
           "soup_selection_tasks", "models_to_evaluate", "eval_config_for", "evaluate_run", "ABLATION_COLUMNS"]

MINILM_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # the workbench's reference point
ABLATION_COLUMNS = ("cell", "seed", "score")  # what a paired-by-seed ablation delta needs (kalm_lib.ablations)


@dataclass
class RunData:
    """Everything a report shows about one run directory; ``notes`` lists what is missing or broken."""

    name: str
    path: Path
    results: pd.DataFrame
    provenance: dict | None = None
    eval_records: dict[str, dict] = field(default_factory=dict)   # results folder -> kalm_eval.json
    errors: dict[str, dict] = field(default_factory=dict)         # results folder -> {task: error}
    train_metrics: dict[str, pd.DataFrame] = field(default_factory=dict)  # stage -> metrics
    soup: dict | None = None
    ablations: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- reading
def _read_json(path: Path, notes: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        notes.append(f"{path}: unreadable ({type(e).__name__}: {e})")
        return None


def _read_metrics(path: Path, notes: list[str]) -> pd.DataFrame:
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            bad += 1
    if bad:
        notes.append(f"{path}: {bad} unreadable line(s) skipped, {len(rows)} kept")
    return pd.DataFrame(rows)


def _read_ablations(path: Path, notes: list[str]) -> pd.DataFrame | None:
    try:
        ab = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        notes.append(f"{path}: unreadable ({e})")
        return None
    missing = [c for c in ABLATION_COLUMNS if c not in ab.columns]
    if missing:
        notes.append(f"{path}: no column(s) {missing}, so no paired-by-seed deltas: ablations not shown")
        return None
    return ab


def _folder_key(folder: Path, run_path: Path, eval_root: Path) -> str:
    """How a results folder is named in the report: relative to the run's eval/ folder, or to the run directory
    for folders elsewhere in it (mteb/<benchmark>/...), so two folders never share a key."""
    base = run_path / "eval" if eval_root == run_path / "eval" else run_path
    try:
        return str(folder.relative_to(base))
    except ValueError:
        return str(folder.relative_to(eval_root))


def _read_eval_folder(run: RunData, eval_root: Path) -> None:
    """The results' provenance (``kalm_eval.json``) and failed tasks (``errors.json``) of every results folder."""
    for f in sorted(eval_root.rglob("kalm_eval.json")):
        rec = _read_json(f, run.notes)
        if rec is not None:
            run.eval_records[_folder_key(f.parent, run.path, eval_root)] = rec
    for f in sorted(eval_root.rglob("errors.json")):
        rec = _read_json(f, run.notes)
        if rec:
            rel = _folder_key(f.parent, run.path, eval_root)
            run.errors[rel] = rec
            for task, err in rec.items():
                run.notes.append(f"{run.name}: task {task} FAILED for {rel}: {err}")


def _note_results(run: RunData, eval_root: Path) -> None:
    results = run.results
    if results.empty:
        run.notes.append(f"{run.name}: no evaluation results under {eval_root}")
        return
    unknown = sorted(results.loc[~results["known"].astype(bool), "task"].unique())
    if unknown:
        run.notes.append(f"{run.name}: results of tasks this report does not know (shown without type/language, "
                         f"left out of MTK/MTY): {', '.join(unknown)}")


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Read one run directory (or a bare eval-results folder); missing parts become notes."""
    path = Path(path)
    name = name or path.name
    if not path.is_dir():
        return RunData(name, path, evaluation.load_results([]), notes=[f"run directory not found: {path}"])
    # <run>/mteb/<benchmark>/: the GPU preset's online MTEB stages, one folder per stage (apart from eval/, which
    # the report stage re-creates when it re-runs: hours of benchmark evaluation must not go with it)
    benchmark_dirs = sorted(d for d in (path / "mteb").glob("*") if d.is_dir())
    frames = [evaluation.load_results([path], run_names=[name])]
    frames += [evaluation.load_results([d], run_names=[name]) for d in benchmark_dirs]
    run = RunData(name, path, pd.concat([f for f in frames if not f.empty] or frames[:1], ignore_index=True))
    eval_root = path / "eval" if (path / "eval").is_dir() else path
    _note_results(run, eval_root)
    for folder in benchmark_dirs:
        _read_eval_folder(run, folder)
    if (path / "provenance.json").is_file():
        run.provenance = _read_json(path / "provenance.json", run.notes)
    else:
        run.notes.append(f"{name}: no provenance.json")
    _read_eval_folder(run, eval_root)
    for f in sorted((path / "train").glob("*/metrics.jsonl")):
        df = _read_metrics(f, run.notes)
        if not df.empty:
            run.train_metrics[f.parent.name] = df
    if (path / "soup" / "soup.json").is_file():
        run.soup = _read_json(path / "soup" / "soup.json", run.notes)
    if (path / "ablations" / "results.csv").is_file():
        run.ablations = _read_ablations(path / "ablations" / "results.csv", run.notes)
    return run


def _unique_names(paths: list[Path]) -> list[str]:
    names, seen = [], {}
    for p in paths:
        n = p.name or str(p)
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return names


def load_runs(paths: list[str | Path]) -> list[RunData]:
    """Load several run directories with unique display names."""
    paths = [Path(p) for p in paths]
    return [load_run(p, n) for p, n in zip(paths, _unique_names(paths))]


def combined_results(runs: list[RunData]) -> pd.DataFrame:
    """All runs' results with a ``label`` column (the run name, plus the model when a run holds several) and a
    ``scope`` column ("quick subset" / "full split" / "scope unknown", :func:`kalm_lib.report.scope.score_scope`)."""
    frames = [r.results for r in runs if not r.results.empty]
    if not frames:
        return evaluation.load_results([]).assign(label=pd.Series(dtype=str), scope=pd.Series(dtype=str))
    df = pd.concat(frames, ignore_index=True)
    n_models = df.groupby("run")["model"].nunique()
    df["label"] = [r if n_models[r] == 1 else f"{r} · {m}" for r, m in zip(df["run"], df["model"])]
    df["scope"] = score_scope(df)
    return df


def model_info(df: pd.DataFrame) -> pd.DataFrame:
    """Size, embedding dim and max tokens of each ``label``'s model, from mteb's ``model_meta.json`` beside its
    result files (columns label, n_parameters, embed_dim, max_tokens; empty where not recorded)."""
    rows = []
    for label, part in df.groupby("label", sort=True):
        meta: dict = {}
        for folder in dict.fromkeys(Path(s).parent for s in part["source"].dropna()):
            found = _read_json(folder / "model_meta.json", []) if (folder / "model_meta.json").is_file() else None
            if isinstance(found, dict):
                meta = found
                break
        dim = meta.get("embed_dim")
        rows.append({"label": label, "n_parameters": meta.get("n_parameters"),
                     "embed_dim": max(dim) if isinstance(dim, list) and dim else dim,
                     "max_tokens": meta.get("max_tokens")})
    return pd.DataFrame(rows, columns=["label", "n_parameters", "embed_dim", "max_tokens"])


def soup_selection_tasks(runs: list[RunData]) -> list[str]:
    """The tasks a soup search of these runs selected its weights on (``soup.json``: the chosen soup's per-task
    selection scores and the config's ``selection_tasks``); scores of the soup on them are in-sample."""
    tasks: dict[str, None] = {}
    for r in runs:
        soup = r.soup if isinstance(r.soup, dict) else {}
        chosen = soup.get("chosen") if isinstance(soup.get("chosen"), dict) else {}
        config = (soup.get("provenance") or {}).get("config") or {}
        by_config = config.get("selection_tasks") or [] if config.get("scorer", "evaluate") == "evaluate" else []
        for t in [*(chosen.get("tasks") or {}), *by_config]:
            tasks[str(t)] = None
    return list(tasks)


def auto_baseline(df: pd.DataFrame) -> str | None:
    """The label of the all-MiniLM-L6-v2 results when present (the workbench's reference point)."""
    if df.empty:
        return None
    hits = sorted(set(df.loc[df["model"] == MINILM_MODEL, "label"]))
    return hits[0] if hits else None


# ---------------------------------------------------------------------------------------------- evaluating
def _step(p: Path) -> int:
    try:
        return int(p.name.rsplit("-", 1)[-1])
    except ValueError:
        return -1


def models_to_evaluate(run_dir: str | Path) -> list[str]:
    """What notebook 06 evaluates by default: the MiniLM baseline, the final model of every training stage
    (``train/<stage>/final``, else its last ``checkpoint-<step>``) and the soup model (``soup/model``)."""
    run_dir = Path(run_dir)
    models = ["minilm"]
    for stage in sorted(p for p in (run_dir / "train").glob("*") if p.is_dir()):
        if (stage / "final" / "config.json").is_file():
            models.append(str(stage / "final"))
            continue
        ckpts = [c for c in stage.glob("checkpoint-*") if (c / "config.json").is_file()]
        if ckpts:
            models.append(str(max(ckpts, key=_step)))
    if (run_dir / "soup" / "model" / "config.json").is_file():
        models.append(str(run_dir / "soup" / "model"))
    return models


def eval_config_for(preset: str | None) -> str:
    """The report stage's eval config: ``configs/eval/<preset>.yaml`` when the preset has one, else "quick"."""
    if preset:
        try:
            resolve_config(preset, "eval")
            return preset
        except FileNotFoundError:
            pass
    return "quick"


def evaluate_run(run_dir: str | Path, models: list[str] | str = "auto", eval_config: str | Path | None = None, *,
                 preset: str | None = None, overrides: list[str] | None = None) -> pd.DataFrame:
    """Evaluate models into ``<run_dir>/eval`` (what :func:`load_run` reads) and return their per-task scores.

    ``models``: "auto" (:func:`models_to_evaluate`) or a list ("minilm" / model folders). ``eval_config``: a
    name or path (:func:`kalm_lib.evaluation.load_eval_config`); ``None`` = :func:`eval_config_for` ``preset``.
    Columns as :func:`kalm_lib.evaluation.evaluate_model`; ``attrs["errors"]`` = {model: {task: error}} of
    failed tasks (the others still ran), ``attrs["results_dirs"]`` the folders written, ``attrs["eval_config"]``
    the config used.
    """
    run_dir = Path(run_dir)
    models = models_to_evaluate(run_dir) if models == "auto" else list(models)
    eval_config = eval_config if eval_config is not None else eval_config_for(preset)
    frames, errors, folders = [], {}, []
    for model in models:
        # the run's shared cache: a model the stage notebooks already scored on a task is not encoded again
        scores = evaluation.evaluate_model(model, eval_config, run_dir / "eval", overrides=overrides,
                                           mteb_cache=evaluation.run_eval_cache(run_dir))
        frames.append(scores)
        folders += scores.attrs["results_dirs"]
        if scores.attrs["errors"]:
            errors[str(model)] = scores.attrs["errors"]
    out = (pd.concat(frames, ignore_index=True) if frames
           else pd.DataFrame(columns=[*evaluation.TASK_KEYS, "main_score"]))
    out.attrs = {"errors": errors, "results_dirs": folders, "eval_config": str(eval_config)}
    return out
