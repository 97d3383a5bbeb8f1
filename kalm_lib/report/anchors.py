"""Published anchor models (``data/reference-scores/anchors``, CC0): their scores, ranks and sizes, and our scores
beside them only where the measurement is the same.

The anchors are the published main score per task of 12 models on MTEB(cmn, v1), MTEB(eng, v1) and
MTEB(eng, v2) (``main_scores.csv``), the benchmarks' task splits and dataset revisions (``tasks.csv``), the
models' size / embedding dim / max tokens (``models.csv``, from mteb's registry) and the KaLM-V2 paper's summary
table (``paper_table.csv``); see the folder's README.md. Benchmark means are :func:`kalm_lib.evaluation.aggregate`
(MTK = mean over tasks, MTY = mean of task-type means), ranked only over models scored on every task.

One of our scores is comparable with a benchmark task's published scores (:func:`comparable_scores`) when it is a
full-split score (:mod:`kalm_lib.report.scope`) of the same public task, on the benchmark's eval splits and
subsets, and either the same dataset revision or an offline copy that the evaluation declares the same data and
split (``mteb_equivalent``). Everything else is listed with the reason it is not compared
(:func:`not_compared`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kalm_lib import evaluation, provenance
from kalm_lib.report.scope import FULL, score_scope

__all__ = ["ANCHOR_DIR", "BENCHMARK_LANG", "load_anchor_scores", "load_anchor_tasks", "load_anchor_models",
           "load_anchor_coverage", "load_paper_table", "anchor_summary", "paper_check", "comparable_scores",
           "not_compared", "benchmark_rows", "ranked_table", "task_comparison"]

ANCHOR_DIR = provenance.REPO_ROOT / "data" / "reference-scores" / "anchors"
BENCHMARK_LANG = {"MTEB(cmn, v1)": "zh", "MTEB(eng, v1)": "en", "MTEB(eng, v2)": "en"}
PAPER_BENCHMARKS = {"cmn": "MTEB(cmn, v1)", "eng": "MTEB(eng, v1)"}  # the paper's C-MTEB / MTEB-eng (56)
MODEL_COLUMNS = ["n_parameters", "embed_dim", "max_tokens"]
RANKED_COLUMNS = ["rank", "model", "source", "revision", "scope", "n_tasks", "tasks_in_benchmark", "MTK", "MTY",
                  "n_parameters", "embed_dim", "max_tokens", "zero_shot_percent"]


# ---------------------------------------------------------------------------------------------- loading
def load_anchor_scores(root: str | Path = ANCHOR_DIR) -> pd.DataFrame:
    """``main_scores.csv`` with our vocabulary added: columns benchmark, model, revision, task, type (mteb's),
    task_type (:func:`kalm_lib.evaluation.task_type_of`), lang (the benchmark's), main_score (0-100)."""
    df = pd.read_csv(Path(root) / "main_scores.csv", dtype={"revision": str})
    return df.assign(task_type=df["type"].map(evaluation.task_type_of), lang=df["benchmark"].map(BENCHMARK_LANG))


def load_anchor_tasks(root: str | Path = ANCHOR_DIR) -> pd.DataFrame:
    """``tasks.csv``: benchmark, task, type, eval_splits and hf_subsets (tuples), dataset_revision, main_score."""
    df = pd.read_csv(Path(root) / "tasks.csv", dtype=str, keep_default_na=False)
    return df.assign(eval_splits=df["eval_splits"].str.split().map(tuple),
                     hf_subsets=df["hf_subsets"].str.split().map(tuple))


def load_anchor_models(root: str | Path = ANCHOR_DIR) -> pd.DataFrame:
    """``models.csv``: model, revision, n_parameters, embed_dim, mrl_dims, max_tokens, release_date, license."""
    return pd.read_csv(Path(root) / "models.csv", dtype={"revision": str, "meta_revision": str, "mrl_dims": str})


def load_anchor_coverage(root: str | Path = ANCHOR_DIR) -> pd.DataFrame:
    """``coverage.csv``: benchmark, model, tasks_scored, tasks_in_benchmark, zero_shot_percent."""
    return pd.read_csv(Path(root) / "coverage.csv")


def load_paper_table(root: str | Path = ANCHOR_DIR) -> pd.DataFrame:
    """``paper_table.csv``: the KaLM-V2 paper's summary table (cmn = MTEB(cmn, v1), eng = MTEB(eng, v1))."""
    return pd.read_csv(Path(root) / "paper_table.csv", dtype={"anchor_model": str})


# ---------------------------------------------------------------------------------------------- anchors alone
def _means(per_task: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """MTK / MTY / n_tasks through the one definition (:func:`kalm_lib.evaluation.aggregate`)."""
    return evaluation.aggregate(per_task.assign(run=per_task["benchmark"]), by=tuple(by))


def _rank(table: pd.DataFrame) -> pd.DataFrame:
    """Rank 1.. by MTK (then MTY) within each benchmark over complete rows; partial rows get no rank."""
    table = table.copy()
    complete = table["n_tasks"] == table["tasks_in_benchmark"]
    table["rank"] = pd.array([pd.NA] * len(table), dtype="Int64")
    for bench, part in table[complete].groupby("benchmark"):
        order = part.sort_values(["MTK", "MTY"], ascending=False).index
        table.loc[order, "rank"] = range(1, len(order) + 1)
    return table


def anchor_summary(root: str | Path = ANCHOR_DIR) -> pd.DataFrame:
    """One row per (benchmark, model, revision): MTK, MTY, n_tasks of tasks_in_benchmark, rank (complete rows
    only), zero_shot_percent, n_parameters, embed_dim, max_tokens; sorted by benchmark and rank."""
    means = _means(load_anchor_scores(root), ["run", "model", "revision"]).rename(columns={"run": "benchmark"})
    n_bench = load_anchor_tasks(root).groupby("benchmark").size().rename("tasks_in_benchmark")
    zero_shot = (load_anchor_coverage(root).dropna(subset=["zero_shot_percent"])
                 .drop_duplicates(["benchmark", "model"])[["benchmark", "model", "zero_shot_percent"]])
    models = load_anchor_models(root)[["model", "revision", *MODEL_COLUMNS]]
    table = (means.merge(n_bench, left_on="benchmark", right_index=True)
             .merge(zero_shot, on=["benchmark", "model"], how="left")
             .merge(models, on=["model", "revision"], how="left")
             .assign(source="published", scope=FULL))
    return _rank(table).sort_values(["benchmark", "rank", "MTK"], ascending=[True, True, False],
                                    na_position="last").reset_index(drop=True)


def paper_check(root: str | Path = ANCHOR_DIR) -> pd.DataFrame:
    """The paper's table beside the same means recomputed from ``main_scores.csv`` (rows naming an anchor)."""
    paper = load_paper_table(root)
    summary = anchor_summary(root)
    out = paper.copy()
    for lang, bench in PAPER_BENCHMARKS.items():
        part = summary[(summary["benchmark"] == bench) & (summary["n_tasks"] == summary["tasks_in_benchmark"])]
        part = part.drop_duplicates("model").set_index("model")
        for m in ("MTK", "MTY"):
            out[f"{lang}_{m.lower()}_recomputed"] = out["anchor_model"].map(part[m])
    return out


# ---------------------------------------------------------------------------------------------- ours beside them
def _candidates(results: pd.DataFrame) -> pd.DataFrame:
    """Our result rows with their scope and public task name (``public``; NaN when none)."""
    df = results.copy()
    df["scope"] = score_scope(df)
    df["public"] = df["mteb_equivalent"] if "mteb_equivalent" in df.columns else None
    if "label" not in df.columns:
        df["label"] = df["run"]
    return df


def _match(rows: pd.DataFrame, spec: pd.Series) -> tuple[pd.DataFrame | None, str]:
    """The rows of one (label, our task) that measure the benchmark task ``spec``, or None and why not."""
    if (rows["scope"] != FULL).any():
        return None, f"{sorted(set(rows['scope']))[0]} (published scores are full split)"
    offline = (rows["task"] != spec["task"]).all()
    if not offline and not (rows["dataset_revision"].astype(str) == spec["dataset_revision"]).all():
        revs = sorted(set(rows["dataset_revision"].astype(str)))
        return None, f"dataset revision {', '.join(revs)} is not the benchmark's {spec['dataset_revision'][:12]}"
    subsets = set(spec["hf_subsets"]) | ({"default"} if len(spec["hf_subsets"]) == 1 else set())
    kept = rows[rows["split"].isin(spec["eval_splits"]) & rows["subset"].isin(subsets)]
    have = set(zip(kept["split"], kept["subset"].map(lambda s: spec["hf_subsets"][0] if s == "default" else s)))
    need = {(s, h) for s in spec["eval_splits"] for h in spec["hf_subsets"]}
    if have != need:
        return None, (f"splits {'+'.join(sorted(set(rows['split'])))} are not the benchmark's "
                      f"{'+'.join(spec['eval_splits'])}")
    return kept, "offline copy (same data and split per data card)" if offline else "same task, split and revision"


def _walk(results: pd.DataFrame, root: str | Path):
    """(benchmark spec, label, our task, matched rows or None, reason) for every pairing of our results with a
    benchmark task of the same public name."""
    df = _candidates(results)
    df = df[df["public"].notna() & df["main_score"].notna()]
    tasks = load_anchor_tasks(root)
    for _, spec in tasks[tasks["task"].isin(set(df["public"]))].iterrows():
        for (label, task), rows in df[df["public"] == spec["task"]].groupby(["label", "task"], sort=True):
            kept, why = _match(rows, spec)
            yield spec, label, task, kept, why


def comparable_scores(results: pd.DataFrame, root: str | Path = ANCHOR_DIR) -> pd.DataFrame:
    """Our per-task scores that measure a benchmark task exactly as the published ones: columns benchmark,
    task (public name), our_task, label, task_type / lang (the benchmark's), main_score (mean over the
    benchmark's splits and subsets, :func:`kalm_lib.evaluation.task_scores`), match."""
    parts = []
    for spec, label, task, kept, why in _walk(results, root):
        if kept is None:
            continue
        one = kept.assign(run=label, model=label, revision="", task=spec["task"],
                          task_type=evaluation.task_type_of(spec["type"]), lang=BENCHMARK_LANG[spec["benchmark"]])
        score = evaluation.task_scores(one)
        parts.append(score.assign(benchmark=spec["benchmark"], our_task=task, label=label, match=why))
    cols = ["benchmark", "task", "our_task", "label", "task_type", "lang", "main_score", "match"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def not_compared(results: pd.DataFrame, root: str | Path = ANCHOR_DIR) -> pd.DataFrame:
    """Our scores of a benchmark's public task that are NOT placed beside the published ones, and why."""
    rows = [{"label": label, "our_task": task, "benchmark": spec["benchmark"], "task": spec["task"], "reason": why}
            for spec, label, task, kept, why in _walk(results, root) if kept is None]
    return pd.DataFrame(rows, columns=["label", "our_task", "benchmark", "task", "reason"])


def benchmark_rows(results: pd.DataFrame, model_info: pd.DataFrame | None = None,
                   root: str | Path = ANCHOR_DIR) -> pd.DataFrame:
    """Our models' MTK / MTY on each benchmark, over their comparable tasks only (partial unless every task of
    the benchmark is there), in the columns of :func:`anchor_summary`."""
    comp = comparable_scores(results, root)
    if comp.empty:
        return pd.DataFrame(columns=RANKED_COLUMNS + ["benchmark"])
    n_bench = load_anchor_tasks(root).groupby("benchmark").size().rename("tasks_in_benchmark")
    means = _means(comp.assign(model=comp["label"], revision=""), ["run", "model"])
    out = (means.rename(columns={"run": "benchmark"}).merge(n_bench, left_on="benchmark", right_index=True)
           .assign(source="ours", scope=FULL, revision="", zero_shot_percent=float("nan")))
    if model_info is not None and not model_info.empty:
        out = out.merge(model_info[["label", *MODEL_COLUMNS]].rename(columns={"label": "model"}), on="model",
                        how="left")
    return out


def ranked_table(results: pd.DataFrame | None = None, model_info: pd.DataFrame | None = None,
                 root: str | Path = ANCHOR_DIR) -> pd.DataFrame:
    """Anchors and our comparable models per benchmark, ranked by MTK over the models scored on every task of
    the benchmark (columns :data:`RANKED_COLUMNS` + benchmark)."""
    table = anchor_summary(root)
    if results is not None and not results.empty:
        ours = benchmark_rows(results, model_info, root)
        if not ours.empty:
            table = _rank(pd.concat([table, ours], ignore_index=True))
    table = table.sort_values(["benchmark", "rank", "MTK"], ascending=[True, True, False], na_position="last")
    return table.reindex(columns=["benchmark", *RANKED_COLUMNS]).reset_index(drop=True)


def task_comparison(results: pd.DataFrame, root: str | Path = ANCHOR_DIR) -> pd.DataFrame:
    """Per comparable task: our score(s) and every anchor's published score on it, long form (columns
    benchmark, task, who, source, revision, main_score, match), ranked within the task."""
    comp = comparable_scores(results, root)
    if comp.empty:
        return pd.DataFrame(columns=["benchmark", "task", "rank", "who", "source", "revision", "main_score", "match"])
    pub = load_anchor_scores(root)
    pub = pub.merge(comp[["benchmark", "task"]].drop_duplicates(), on=["benchmark", "task"])
    long = pd.concat([comp.assign(who=comp["label"], source="ours", revision="")
                      [["benchmark", "task", "who", "source", "revision", "main_score", "match"]],
                      pub.assign(who=pub["model"], source="published", match="published full split")
                      [["benchmark", "task", "who", "source", "revision", "main_score", "match"]]],
                     ignore_index=True)
    long["rank"] = long.groupby(["benchmark", "task"])["main_score"].rank(ascending=False, method="min").astype(int)
    return long.sort_values(["benchmark", "task", "rank"]).reset_index(drop=True)[
        ["benchmark", "task", "rank", "who", "source", "revision", "main_score", "match"]]
