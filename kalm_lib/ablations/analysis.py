"""Ablation deltas: THE one definition, used by notebook 05, the widgets and the HTML report.

A cell's delta is measured against the baseline cell (the full recipe) **paired by seed**: for each seed
both cells ran, ``delta_s = score(cell, s) - score(baseline, s)``; the table reports the mean and the sample
standard deviation (ddof=1) of those per-seed deltas, and ``n``, the number of seeds paired. Pairing
removes the seed-to-seed variation both cells share, which the unpaired std of a cell's own scores
would count as noise.

Each mean delta comes with its 95% interval over the paired seeds (Student t: ``mean ± t_{0.975, n-1} ·
sd / sqrt(n)``; no interval for one seed) and ``resolved``: False when the interval covers 0 or n < 2, i.e.
the seeds cannot tell the cell from the full recipe. Computed once, in :func:`delta_interval`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from kalm_lib.ablations.grid import BASELINE

LEVELS = ("task", "task_type", "mtk", "mty")
# columns each level needs besides cell, seed and score
_LEVEL_COLUMNS = {"task": ["task"], "task_type": ["task_type"], "mtk": [], "mty": ["task_type"]}
AGGREGATE_COLUMNS = ["cell", "group", "score_mean", "baseline_mean", "delta_mean", "delta_std", "n",
                     "ci_low", "ci_high", "resolved"]
CONFIDENCE = 0.95   # of the interval around each mean delta


def delta_interval(mean, std, n, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low, high, resolved) of mean paired deltas: the Student t interval ``mean ± t_{(1+c)/2, n-1} · std /
    sqrt(n)`` over ``n`` paired seeds (NaN for n < 2), resolved = the interval excludes 0 (False for n < 2).

    Element-wise over arrays; ``std`` is the sample std (ddof=1) of the per-seed deltas.
    """
    mean, std, n = (np.asarray(x, dtype=float) for x in (mean, std, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        half = np.where(n >= 2, stats.t.ppf((1 + confidence) / 2, n - 1) * std / np.sqrt(n), np.nan)
    low, high = mean - half, mean + half
    resolved = (n >= 2) & ((low > 0) | (high < 0))
    return low, high, resolved


def per_seed_scores(results: pd.DataFrame, level: str = "task") -> pd.DataFrame:
    """Score per (cell, seed, group): a task's score; the mean over a task type's tasks; ``mtk`` = mean
    over tasks; ``mty`` = mean over task-type means (the paper's MTK/MTY). Columns: cell, seed, group, score."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    needed = ["cell", "seed", *_LEVEL_COLUMNS[level], "score"]
    missing = [c for c in needed if c not in results.columns]
    if missing:
        raise ValueError(f"ablation results lack column(s) {missing} needed at level {level!r}")
    df = results[needed]
    if level == "task":
        out = df.rename(columns={"task": "group"})
    elif level == "task_type":
        out = df.groupby(["cell", "seed", "task_type"], as_index=False)["score"].mean()
        out = out.rename(columns={"task_type": "group"})
    elif level == "mtk":
        out = df.groupby(["cell", "seed"], as_index=False)["score"].mean().assign(group="MTK")
    else:
        by_type = df.groupby(["cell", "seed", "task_type"], as_index=False)["score"].mean()
        out = by_type.groupby(["cell", "seed"], as_index=False)["score"].mean().assign(group="MTY")
    return out[["cell", "seed", "group", "score"]]


def aggregate(results: pd.DataFrame, *, level: str = "mtk", baseline: str = BASELINE) -> pd.DataFrame:
    """Deltas against ``baseline`` (default: the full recipe), paired by seed, per (cell, group).

    Columns: cell, group, score_mean (cell's mean score), baseline_mean, delta_mean, delta_std (sample std
    of the per-seed deltas, ddof=1; NaN for one seed), n (seeds present in both), ci_low / ci_high (95%
    interval of delta_mean, NaN for one seed) and resolved (the interval excludes 0), see
    :func:`delta_interval`. Baseline rows are
    included (delta 0). Cells keep their order of first appearance in ``results``. Results of several grids
    (a ``grid`` column with more than one value) are aggregated per grid, each against its own baseline
    cell, with a ``grid`` column added. ``attrs["baseline"]`` names the baseline cell.
    """
    if "grid" in results.columns and results["grid"].nunique() > 1:
        parts = [aggregate(part, level=level, baseline=baseline).assign(grid=str(g))
                 for g, part in results.groupby("grid", sort=False)]
        out = pd.concat(parts, ignore_index=True)
        out.attrs["baseline"] = baseline
        return out
    scores = per_seed_scores(results, level)
    if baseline not in set(scores["cell"]):
        raise ValueError(f"baseline cell {baseline!r} is not in the results (cells: {sorted(set(scores['cell']))})")
    base = scores[scores["cell"] == baseline][["seed", "group", "score"]].rename(columns={"score": "base"})
    paired = scores.merge(base, on=["seed", "group"], how="inner")
    paired["delta"] = paired["score"] - paired["base"]
    agg = paired.groupby(["cell", "group"], sort=False).agg(
        score_mean=("score", "mean"), baseline_mean=("base", "mean"), delta_mean=("delta", "mean"),
        delta_std=("delta", "std"), n=("delta", "size")).reset_index()
    order = {c: i for i, c in enumerate(dict.fromkeys(results["cell"]))}
    agg = agg.sort_values(["cell", "group"], key=lambda s: s.map(order) if s.name == "cell" else s)
    agg = pd.DataFrame(agg).reset_index(drop=True)
    agg["ci_low"], agg["ci_high"], agg["resolved"] = delta_interval(agg["delta_mean"], agg["delta_std"], agg["n"])
    agg.attrs["baseline"] = baseline
    return agg


def delta_table(results: pd.DataFrame, levels: tuple[str, ...] = ("mtk", "mty"), *, baseline: str = BASELINE,
                include_baseline: bool = False) -> pd.DataFrame:
    """:func:`aggregate` at each of ``levels``, stacked with a ``level`` column; baseline rows left out
    unless asked for (their delta is 0 by definition)."""
    table = pd.concat([aggregate(results, level=lv, baseline=baseline).assign(level=lv) for lv in levels],
                      ignore_index=True)
    return table if include_baseline else table[table["cell"] != baseline].reset_index(drop=True)


def delta_figure(agg: pd.DataFrame, title: str = "Ablation deltas vs the full recipe", include_baseline: bool = False):
    """Plotly bar chart of an :func:`aggregate` table: mean delta per cell, one colour per group, error bars =
    the 95% interval of the paired deltas (none for one seed); each bar is labelled with its seed count, and
    "unresolved" when the interval covers 0 or one seed ran. Several grids: cells named ``grid · cell``."""
    import plotly.graph_objects as go  # third-party, only the figure needs it

    fig = go.Figure()
    data = agg if include_baseline else agg[agg["cell"] != agg.attrs.get("baseline", BASELINE)]
    if "grid" in data.columns:
        data = data.assign(cell=data["grid"].astype(str) + " · " + data["cell"].astype(str))
    for group, part in data.groupby("group", sort=False):
        half = (part["ci_high"] - part["delta_mean"]).fillna(0.0)
        labels = [f"n={n}" if ok else f"unresolved · n={n}" for n, ok in zip(part["n"], part["resolved"])]
        fig.add_bar(x=list(part["cell"]), y=list(part["delta_mean"]), name=str(group),
                    error_y=dict(type="data", array=list(half), visible=True),
                    text=labels, textposition="outside", customdata=list(part["n"]),
                    hovertemplate="%{x}<br>delta %{y:.4f} ± %{error_y.array:.4f} (95% interval, "
                                  "n=%{customdata})<br>%{text}")
    fig.update_layout(title=title, barmode="group", yaxis_title="score delta vs full recipe (95% interval)",
                      xaxis_title="cell", legend_title="group")
    fig.add_hline(y=0, line_width=1, line_color="gray")
    return fig
