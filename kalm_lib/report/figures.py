"""The report's tables and plotly figures; notebooks show the same figures inline.

Each ``*_frame`` / table function returns the numbers a figure draws, so tests and the HTML tables read the
same values. Ablation deltas are :func:`kalm_lib.ablations.aggregate` (paired by seed): the one definition
notebook 05 and the widgets use too. A figure function returns ``None`` when there is nothing to draw.
"""

from __future__ import annotations

import pandas as pd

from kalm_lib import ablations
from kalm_lib.evaluation import task_scores
from kalm_lib.report.runs import RunData

__all__ = ["fig_type_bars", "heatmap_frame", "fig_heatmap", "delta_frame", "fig_deltas", "fig_reference",
           "fig_training", "soup_frame", "fig_soup", "ablation_grids", "reference_cell", "ablation_deltas",
           "fig_ablations", "POS", "NEG", "ZERO"]

POS, NEG, ZERO = "#1a7f37", "#cf222e", "#57606a"   # gain, loss, no change


def _layout(fig, title: str, height: int = 420):
    fig.update_layout(title=title, height=height, margin=dict(l=60, r=20, t=60, b=60), template="plotly_white")
    return fig


def _sign_colour(x) -> str:
    return ZERO if pd.isna(x) or x == 0 else (POS if x > 0 else NEG)


# ---------------------------------------------------------------------------------------------- results
def _per_task(df: pd.DataFrame) -> pd.DataFrame:
    """One score per (label, task): the report's runs are its labels."""
    return task_scores(df.assign(run=df["label"]))


def fig_type_bars(df: pd.DataFrame):
    """Per-task-type mean main score for each run/model, one bar group per language/type."""
    import plotly.express as px

    per_task = _per_task(df)
    per_task = per_task[per_task["task_type"] != "unknown"]
    if per_task.empty:
        return None
    t = per_task.groupby(["run", "lang", "task_type"], as_index=False)["main_score"].mean()
    t["group"] = t["lang"] + " · " + t["task_type"]
    fig = px.bar(t, x="group", y="main_score", color="run", barmode="group", text_auto=".1f",
                 labels={"main_score": "mean main score", "group": "language · task type", "run": "run"})
    return _layout(fig, "Mean score per task type")


def heatmap_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Task x run matrix of main scores (mean over splits)."""
    return _per_task(df).pivot_table(index="task", columns="run", values="main_score", aggfunc="mean")


def fig_heatmap(df: pd.DataFrame):
    """Per-task heatmap across runs (text = score)."""
    import plotly.graph_objects as go

    m = heatmap_frame(df)
    if m.empty:
        return None
    text = m.map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
    fig = go.Figure(go.Heatmap(z=m.values, x=list(m.columns), y=list(m.index), text=text.values,
                               texttemplate="%{text}", colorscale="Viridis", colorbar=dict(title="score")))
    return _layout(fig, "Per-task main score across runs", height=max(300, 28 * len(m) + 140))


def delta_frame(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per-task score of each run minus the baseline run's (NaN where either is missing)."""
    m = heatmap_frame(df)
    if baseline not in m.columns:
        raise KeyError(baseline)
    return m.drop(columns=[baseline]).sub(m[baseline], axis=0)


def fig_deltas(deltas: pd.DataFrame, baseline: str):
    """Bars of per-task deltas vs the baseline, green for gains, red for losses."""
    import plotly.graph_objects as go

    if deltas.empty or deltas.shape[1] == 0:
        return None
    fig = go.Figure()
    for col in deltas.columns:
        v = deltas[col]
        fig.add_bar(name=str(col), x=list(deltas.index), y=v.values, marker_color=[_sign_colour(x) for x in v.values],
                    text=[("" if pd.isna(x) else f"{x:+.2f}") for x in v.values], textposition="outside")
    fig.update_layout(barmode="group", yaxis_title=f"score − {baseline}")
    return _layout(fig, f"Per-task delta vs baseline {baseline}")


def fig_reference(ours: pd.DataFrame, ref: pd.DataFrame):
    """Our runs beside published models, on the tasks that are exactly public MTEB tasks."""
    import plotly.express as px

    if ref.empty:
        return None
    a = _per_task(ours)
    a = a[a["task"].isin(ref["task"].unique())].rename(columns={"run": "who"})
    b = task_scores(ref).rename(columns={"model": "who_model"})
    b["who"] = b["who_model"]
    both = pd.concat([a[["who", "task", "main_score"]], b[["who", "task", "main_score"]]], ignore_index=True)
    fig = px.bar(both, x="task", y="main_score", color="who", barmode="group",
                 labels={"main_score": "main score", "who": "model / run"})
    return _layout(fig, "Our runs beside published models (same public task and split)", height=480)


# ---------------------------------------------------------------------------------------------- training, soup
def fig_training(runs: list[RunData]):
    """Loss (and lr on a second axis where logged) against step for every run and stage."""
    from plotly.subplots import make_subplots

    curves = [(r.name, stage, m) for r in runs for stage, m in r.train_metrics.items() if "step" in m]
    if not curves:
        return None
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for run, stage, m in curves:
        for col in [c for c in m.columns if c != "step" and pd.api.types.is_numeric_dtype(m[c])]:
            fig.add_scatter(x=m["step"], y=m[col], mode="lines", name=f"{run}/{stage} {col}",
                            secondary_y=(col == "lr"))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="lr", secondary_y=True)
    return _layout(fig, "Training curves")


def _soups(soup: dict) -> list[tuple[str, dict]]:
    """(label, {weights, score}) of every soup in a ``soup.json``: its evaluations and the chosen one."""
    if "soups" in soup:
        return [(str(s.get("name", k)), s) for k, s in enumerate(soup["soups"])]
    if "evaluations" in soup:
        soups = [(f"{e.get('source', 'eval')} #{k}", e) for k, e in enumerate(soup["evaluations"])]
        if isinstance(soup.get("chosen"), dict):
            soups.append(("chosen", soup["chosen"]))
        return soups
    return [("chosen", soup)] if "weights" in soup else []


def soup_frame(soup: dict) -> pd.DataFrame:
    """Long table (soup, ingredient, weight, score) from ``soup/soup.json`` as written by kalm_lib.soup
    (``ingredients`` [{name}], ``evaluations`` [{source, weights, score}], ``chosen``); a ``soups`` list or a
    bare ``weights`` list are read too."""
    columns = ["soup", "ingredient", "weight", "score"]
    if not isinstance(soup, dict):
        return pd.DataFrame(columns=columns)
    names = [i.get("name", str(k)) if isinstance(i, dict) else str(i)
             for k, i in enumerate(soup.get("ingredients") or [])]
    rows = []
    for label, s in _soups(soup):
        weights = s.get("weights") or []
        if isinstance(weights, dict):
            weights = [weights.get(n) for n in names]
        for k, w in enumerate(weights):
            rows.append({"soup": label, "ingredient": names[k] if k < len(names) else str(k), "weight": w,
                         "score": s.get("score")})
    return pd.DataFrame(rows, columns=columns)


def fig_soup(runs: list[RunData]):
    """Stacked soup weights per soup (score in the hover)."""
    import plotly.express as px

    frames = [soup_frame(r.soup).assign(run=r.name) for r in runs if r.soup]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    df["soup"] = df["run"] + " · " + df["soup"]
    fig = px.bar(df, x="soup", y="weight", color="ingredient", hover_data=["score"], barmode="stack")
    return _layout(fig, "Soup weights")


# ---------------------------------------------------------------------------------------------- ablations
def ablation_grids(ab: pd.DataFrame | None) -> list[tuple[str | None, pd.DataFrame]]:
    """(grid name, its rows) for each grid in an ablations table (one unnamed part without a grid column)."""
    if ab is None or ab.empty:
        return []
    if "grid" not in ab.columns:
        return [(None, ab)]
    return [(str(g), part) for g, part in ab.groupby("grid", sort=False)]


def reference_cell(ab: pd.DataFrame) -> str:
    """The cell a grid's deltas are taken against: the full recipe (:data:`kalm_lib.ablations.BASELINE`) when
    present, else a cell named "baseline", else the first cell."""
    cells = list(dict.fromkeys(ab["cell"]))
    return next((c for c in (ablations.BASELINE, "baseline") if c in cells), cells[0])


def ablation_deltas(ab: pd.DataFrame) -> pd.DataFrame:
    """One grid's deltas against its :func:`reference_cell`, over the mean of its tasks (MTK): exactly
    :func:`kalm_lib.ablations.aggregate` (paired by seed: ``delta_std`` = sample std of the per-seed deltas,
    ``n`` = seeds paired with the reference), as notebook 05 and the ablation explorer show them.
    Columns: cell, group, score_mean, baseline_mean, delta_mean, delta_std, n; ``attrs["reference_cell"]``."""
    out = ablations.aggregate(ab, level="mtk", baseline=reference_cell(ab))
    out.attrs["reference_cell"] = out.attrs["baseline"]
    return out


def fig_ablations(runs: list[RunData]):
    """Delta of each ablation cell vs its grid's reference cell, error bars = std of the paired per-seed
    deltas; one panel per grid (grids differ in scale: a from-scratch architecture grid moves scores far
    more than recipe switches)."""
    from plotly.subplots import make_subplots

    panels: dict[str, list[tuple[str, pd.DataFrame]]] = {}
    for r in runs:
        for grid, part in ablation_grids(r.ablations):
            panels.setdefault(grid or "ablations", []).append((r.name, ablation_deltas(part)))
    if not panels:
        return None
    widths = [max(len(d) for _, d in parts) for parts in panels.values()]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[f"grid {g}" for g in panels],
                        column_widths=[w / sum(widths) for w in widths], horizontal_spacing=0.08)
    for col, parts in enumerate(panels.values(), start=1):
        for name, d in parts:
            fig.add_bar(name=name, legendgroup=name, showlegend=col == 1 and len(runs) > 1,
                        x=d["cell"].astype(str), y=d["delta_mean"],
                        error_y=dict(type="data", array=d["delta_std"].fillna(0).values),
                        customdata=d["n"], hovertemplate="%{x}: %{y:+.2f} (paired seeds: %{customdata})",
                        marker_color=[_sign_colour(x) for x in d["delta_mean"]], row=1, col=col)
        fig.update_yaxes(title_text="delta vs reference cell" if col == 1 else None, row=1, col=col)
    return _layout(fig, "Ablation deltas vs each grid's reference cell (error bars: std of the per-seed deltas)",
                   height=480)
