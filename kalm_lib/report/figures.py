"""The report's tables and plotly figures; notebooks show the same figures inline.

Each ``*_frame`` / table function returns the numbers a figure draws, so tests and the HTML tables read the
same values. Every score carries its scope ("quick subset" / "full split", :mod:`kalm_lib.report.scope`):
series are named ``label · scope``, and deltas are only taken within one scope. Ablation deltas are
:func:`kalm_lib.ablations.aggregate` (paired by seed, with its 95% interval and ``resolved``): the one
definition notebook 05 and the widgets use too. A figure function returns ``None`` when there is nothing to draw.
"""

from __future__ import annotations

import math

import pandas as pd

from kalm_lib import ablations
from kalm_lib.evaluation import task_scores
from kalm_lib.report.runs import RunData
from kalm_lib.report.scope import FULL, ablation_scope, score_scope, scorer_scope

__all__ = ["per_task_scores", "series_name", "fig_type_bars", "heatmap_frame", "fig_heatmap", "delta_frame",
           "fig_deltas", "fig_reference", "training_metrics", "fig_training", "soup_frame", "heldout_frame",
           "fig_soup", "ablation_grids", "reference_cell", "ablation_deltas", "fig_ablations", "POS", "NEG",
           "ZERO", "UNRESOLVED"]

POS, NEG, ZERO, UNRESOLVED = "#1a7f37", "#cf222e", "#57606a", "#afb8c1"   # gain, loss, no change, unresolved


def _layout(fig, title: str, height: int = 420):
    fig.update_layout(title=title, height=height, margin=dict(l=60, r=20, t=70, b=60), template="plotly_white")
    return fig


def _sign_colour(x) -> str:
    return ZERO if pd.isna(x) or x == 0 else (POS if x > 0 else NEG)


def series_name(label: str, scope: str) -> str:
    """How a run's scores of one scope are named in figures and tables: ``label · scope``."""
    return f"{label} · {scope}"


# ---------------------------------------------------------------------------------------------- results
def per_task_scores(df: pd.DataFrame, tasks: set[str] | None = None) -> pd.DataFrame:
    """One score per (label, scope, task) (:func:`kalm_lib.evaluation.task_scores`: mean over splits and
    subsets; quick and full never averaged together), optionally only ``tasks``. Columns label, scope, series,
    task, task_type, lang, main_score."""
    cols = ["label", "scope", "series", "task", "task_type", "lang", "main_score"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    part = df if tasks is None else df[df["task"].isin(tasks)]
    out = task_scores(part.assign(run=part["label"], scope=score_scope(part))).rename(columns={"run": "label"})
    out["series"] = [series_name(a, b) for a, b in zip(out["label"], out["scope"])]
    return out.groupby(cols[:-1], as_index=False, sort=False)["main_score"].mean()[cols]


def fig_type_bars(df: pd.DataFrame):
    """Per-task-type mean main score for each run/model and scope, one bar group per language/type."""
    import plotly.express as px

    per_task = per_task_scores(df)
    per_task = per_task[per_task["task_type"] != "unknown"]
    if per_task.empty:
        return None
    t = per_task.groupby(["series", "lang", "task_type"], as_index=False)["main_score"].mean()
    t["group"] = t["lang"] + " · " + t["task_type"]
    fig = px.bar(t, x="group", y="main_score", color="series", barmode="group", text_auto=".1f",
                 labels={"main_score": "mean main score", "group": "language · task type",
                         "series": "run · scope"})
    return _layout(fig, "Mean score per task type (each series names its scope: quick subset or full split)")


def heatmap_frame(df: pd.DataFrame, marks: dict[str, str] | None = None) -> pd.DataFrame:
    """Task x ``label · scope`` matrix of main scores (mean over splits); ``marks`` appends a note to a task's
    row name (e.g. the soup's selection tasks)."""
    m = per_task_scores(df).pivot_table(index="task", columns="series", values="main_score", aggfunc="mean")
    if marks:
        m.index = [f"{t} ({marks[t]})" if t in marks else t for t in m.index]
    return m


def fig_heatmap(df: pd.DataFrame, marks: dict[str, str] | None = None):
    """Per-task heatmap across runs and scopes (text = score)."""
    import plotly.graph_objects as go

    m = heatmap_frame(df, marks)
    if m.empty:
        return None
    text = m.map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
    fig = go.Figure(go.Heatmap(z=m.values, x=list(m.columns), y=list(m.index), text=text.values,
                               texttemplate="%{text}", colorscale="Viridis", colorbar=dict(title="score")))
    return _layout(fig, "Per-task main score across runs (column = run · scope)", height=max(300, 28 * len(m) + 160))


def delta_frame(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per-task score of each run minus the baseline run's, within one scope: index (task, scope), one column
    per other label (NaN where either is missing; a quick score is never subtracted from a full one)."""
    p = per_task_scores(df)
    if baseline not in set(p["label"]):
        raise KeyError(baseline)
    m = p.pivot_table(index=["task", "scope"], columns="label", values="main_score", aggfunc="mean")
    m.columns.name = None
    return m.drop(columns=[baseline]).sub(m[baseline], axis=0)


def fig_deltas(deltas: pd.DataFrame, baseline: str):
    """Bars of per-task deltas vs the baseline (x = task · scope), green for gains, red for losses."""
    import plotly.graph_objects as go

    if deltas.empty or deltas.shape[1] == 0:
        return None
    x = [f"{t} · {s}" for t, s in deltas.index]
    fig = go.Figure()
    for col in deltas.columns:
        v = deltas[col]
        fig.add_bar(name=str(col), x=x, y=v.values, marker_color=[_sign_colour(y) for y in v.values],
                    text=[("" if pd.isna(y) else f"{y:+.2f}") for y in v.values], textposition="outside")
    fig.update_layout(barmode="group", yaxis_title=f"score − {baseline} (same task, same scope)")
    return _layout(fig, f"Per-task delta vs baseline {baseline} (x: task · quick subset / full split)")


def fig_reference(ours: pd.DataFrame, ref: pd.DataFrame):
    """Our full-split scores beside published full-split scores, on tasks that are exactly public MTEB tasks
    (same task and split, :func:`kalm_lib.evaluation.reference_for`). Quick-subset scores are left out."""
    import plotly.express as px

    a = per_task_scores(ours[ours["scope"] == FULL], set(ref["task"]))
    if ref.empty or a.empty:
        return None
    b = task_scores(ref[ref["task"].isin(set(a["task"]))])
    both = pd.concat([a.assign(who=a["series"])[["who", "task", "main_score"]],
                      b.assign(who=b["model"] + " · published full split")[["who", "task", "main_score"]]],
                     ignore_index=True)
    fig = px.bar(both, x="task", y="main_score", color="who", barmode="group",
                 labels={"main_score": "main score", "who": "model · scope"})
    return _layout(fig, "Our full-split scores beside published models (same public task and split)", height=480)


# ---------------------------------------------------------------------------------------------- training
def training_metrics(runs: list[RunData]) -> list[str]:
    """The numeric metrics logged in any run's ``metrics.jsonl`` (besides step), loss-like first."""
    seen: dict[str, None] = {}
    for r in runs:
        for m in r.train_metrics.values():
            for c in m.columns:
                if c != "step" and pd.api.types.is_numeric_dtype(m[c]) and m[c].notna().any():
                    seen[c] = None
    return sorted(seen, key=lambda c: (not c.startswith("loss"), c != "lr", list(seen).index(c)))


def fig_training(runs: list[RunData], cols: int = 2):
    """One panel per training metric (each its own y axis: memory in MB next to a loss near 1 would flatten
    the loss), one line per run/stage in every panel, x = step."""
    from plotly.subplots import make_subplots

    curves = [(f"{r.name}/{stage}", m) for r in runs for stage, m in r.train_metrics.items() if "step" in m]
    metrics = training_metrics(runs)
    if not curves or not metrics:
        return None
    rows = math.ceil(len(metrics) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=metrics, vertical_spacing=min(0.12, 0.5 / rows),
                        horizontal_spacing=0.08)
    for k, metric in enumerate(metrics):
        row, col = k // cols + 1, k % cols + 1
        for i, (name, m) in enumerate(curves):
            if metric in m and m[metric].notna().any():
                fig.add_scatter(x=m["step"], y=m[metric], mode="lines", name=name, legendgroup=name,
                                showlegend=k == 0, line=dict(color=_PALETTE[i % len(_PALETTE)]), row=row, col=col)
        fig.update_xaxes(title_text="step" if row == rows else None, row=row, col=col)
    return _layout(fig, "Training curves (one panel per metric)", height=260 * rows + 80)


_PALETTE = ("#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#1b7c83", "#bf3989", "#57606a")


# ---------------------------------------------------------------------------------------------- soup
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
    """Long table (soup, ingredient, weight, selection_score, scope) from ``soup/soup.json`` as written by
    kalm_lib.soup (``ingredients`` [{name}], ``evaluations`` [{source, weights, score}], ``chosen``); a ``soups``
    list or a bare ``weights`` list are read too. ``selection_score`` is the score on the tasks the search
    selected on (in-sample); held-apart scores are :func:`heldout_frame`."""
    columns = ["soup", "ingredient", "weight", "selection_score", "scope"]
    if not isinstance(soup, dict):
        return pd.DataFrame(columns=columns)
    names = [i.get("name", str(k)) if isinstance(i, dict) else str(i)
             for k, i in enumerate(soup.get("ingredients") or [])]
    scope = scorer_scope(soup.get("scorer"))
    rows = []
    for label, s in _soups(soup):
        weights = s.get("weights") or []
        if isinstance(weights, dict):
            weights = [weights.get(n) for n in names]
        for k, w in enumerate(weights):
            rows.append({"soup": label, "ingredient": names[k] if k < len(names) else str(k), "weight": w,
                         "selection_score": s.get("score"), "scope": scope})
    return pd.DataFrame(rows, columns=columns)


def heldout_frame(soup: dict) -> pd.DataFrame:
    """The soup search's held-apart check (``soup.json`` ``heldout``): for the chosen soup, the best single
    ingredient and the uniform soup, the score on the selection tasks and, apart, on the held-apart tasks
    (never used by the search). Columns soup, selection_score, selection_scope, heldout_score, heldout_scope,
    heldout_tasks; ``attrs`` gain_selection / gain_heldout (chosen minus best ingredient)."""
    columns = ["soup", "selection_score", "selection_scope", "heldout_score", "heldout_scope", "heldout_tasks"]
    held = soup.get("heldout") if isinstance(soup, dict) else None
    if not isinstance(held, dict):
        return pd.DataFrame(columns=columns)
    sel_scope, held_scope = scorer_scope(soup.get("scorer")), scorer_scope(soup.get("heldout_scorer"))
    rows = [{"soup": k, "selection_score": v.get("selection_score"), "selection_scope": sel_scope,
             "heldout_score": v.get("heldout_score"), "heldout_scope": held_scope,
             "heldout_tasks": ", ".join(map(str, v.get("tasks") or {}))}
            for k, v in held.items() if isinstance(v, dict)]
    out = pd.DataFrame(rows, columns=columns)
    out.attrs = {k: held.get(k) for k in ("gain_selection", "gain_heldout")}
    return out


def fig_soup(runs: list[RunData]):
    """Stacked soup weights per soup (selection score and its scope in the hover)."""
    import plotly.express as px

    frames = [soup_frame(r.soup).assign(run=r.name) for r in runs if r.soup]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    df["soup"] = df["run"] + " · " + df["soup"]
    fig = px.bar(df, x="soup", y="weight", color="ingredient", hover_data=["selection_score", "scope"],
                 barmode="stack")
    return _layout(fig, "Soup weights (hover: score on the tasks the search selected on)")


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
    ``n`` = seeds paired, ``ci_low``/``ci_high``/``resolved`` its 95% interval where ablations provides it), as
    notebook 05 and the ablation explorer show them. ``attrs["reference_cell"]``, ``attrs["scope"]``."""
    out = ablations.aggregate(ab, level="mtk", baseline=reference_cell(ab))
    out.attrs["reference_cell"] = out.attrs["baseline"]
    out.attrs["scope"] = ablation_scope(ab)
    return out


def _delta_marks(d: pd.DataFrame) -> tuple[list[float], list[str], list[str]]:
    """(error half-widths, colours, labels) of one grid's deltas: the 95% interval where
    :func:`kalm_lib.ablations.aggregate` gives one (grey + "unresolved" when it covers 0 or one seed ran), else
    the std of the per-seed deltas."""
    if "resolved" in d.columns:
        half = (d["ci_high"] - d["delta_mean"]).fillna(0.0).tolist()
        ok = d["resolved"].astype(bool).tolist()
    else:
        half, ok = d["delta_std"].fillna(0.0).tolist(), [n > 1 for n in d["n"]]
    colours = [_sign_colour(x) if good else UNRESOLVED for x, good in zip(d["delta_mean"], ok)]
    labels = [(f"n={n}" if good else f"unresolved · n={n}") for n, good in zip(d["n"], ok)]
    return half, colours, labels


def _panels(runs: list[RunData]) -> dict[str, list[tuple[str, pd.DataFrame]]]:
    panels: dict[str, list[tuple[str, pd.DataFrame]]] = {}
    for r in runs:
        for grid, part in ablation_grids(r.ablations):
            panels.setdefault(grid or "ablations", []).append((r.name, ablation_deltas(part)))
    return panels


def fig_ablations(runs: list[RunData]):
    """Delta of each ablation cell vs its grid's reference cell as a point with its 95% interval (std of the
    paired per-seed deltas where no interval is given), labelled with its seed count; grey and "unresolved" when
    the interval covers 0 or one seed ran. One panel per grid (grids differ in scale); each panel's y axis spans
    at least ±1% of the reference score, so a tiny delta is not drawn as a tall gain."""
    from plotly.subplots import make_subplots

    panels = _panels(runs)
    if not panels:
        return None
    widths = [max(len(d) for _, d in parts) for parts in panels.values()]
    titles = [f"grid {g} ({parts[0][1].attrs['scope']})" for g, parts in panels.items()]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=titles,
                        column_widths=[w / sum(widths) for w in widths], horizontal_spacing=0.08)
    for col, parts in enumerate(panels.values(), start=1):
        reach = 0.0
        for name, d in parts:
            half, colours, labels = _delta_marks(d)
            fig.add_scatter(name=name, legendgroup=name, showlegend=col == 1 and len(runs) > 1, mode="markers+text",
                            x=d["cell"].astype(str), y=d["delta_mean"], text=labels, textposition="middle right",
                            error_y=dict(type="data", array=half, visible=True),
                            marker=dict(color=colours, size=11, symbol="diamond"),
                            customdata=d["n"], hovertemplate="%{x}: %{y:+.3f} ± %{error_y.array:.3f} "
                                                             "(paired seeds: %{customdata})", row=1, col=col)
            reach = max([reach, 0.01 * float(d["baseline_mean"].abs().max()),
                         *[abs(m) + h for m, h in zip(d["delta_mean"].fillna(0), half)]])
        fig.update_yaxes(range=[-1.15 * reach, 1.15 * reach] if reach > 0 else None, zeroline=True,
                         title_text="delta vs reference cell" if col == 1 else None, row=1, col=col)
    return _layout(fig, "Ablation deltas vs each grid's reference cell (95% interval over paired seeds; "
                        "grey = unresolved)", height=480)
