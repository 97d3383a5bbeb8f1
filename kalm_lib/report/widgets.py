"""Interactive explorers for JupyterLab: ipywidgets driving a plotly ``FigureWidget``.

Two explorers read the same tidy tables as the HTML report:

* :class:`ResultsExplorer` - evaluation results (:func:`kalm_lib.evaluation.load_results`), one row per
  (model, task[, lang, split]) with ``task_type`` and ``main_score`` (and any other numeric metric columns):
  pick runs, metric, task types, languages, grouping and a baseline (bars become deltas against it, paired
  by task).
* :class:`AblationExplorer` - ``<run_dir>/ablations/results.csv``: toggle ablation dimensions (switches),
  pick task types, aggregation level and baseline cell; bars are :func:`kalm_lib.ablations.aggregate`'s
  deltas paired by seed, error bars the std of the per-seed deltas (as notebook 05 and the HTML report).

Widgets do not render in exported HTML, so in headless papermill runs :func:`show` draws the same figure
statically (:func:`kalm_lib.runtime.is_headless`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from kalm_lib import ablations
from kalm_lib.runtime import is_headless

__all__ = ["show", "ResultsExplorer", "AblationExplorer", "explore_results", "explore_ablations", "RUN_COLUMNS"]

RUN_COLUMNS = ("model", "run")


def show(explorer: "ResultsExplorer | AblationExplorer", headless: bool | None = None):
    """Display the live widget, or (headless) the equivalent static figure. Returns what was shown."""
    from IPython.display import display

    headless = is_headless() if headless is None else headless
    shown = explorer.static_figure() if headless else explorer.widget
    display(shown)
    return shown


def _figure_widget():
    import plotly.graph_objects as go

    return go.FigureWidget()


def _replace_traces(fig, traces: list, layout: dict[str, Any]) -> None:
    with fig.batch_update():
        fig.data = []
        for tr in traces:
            fig.add_trace(tr)
        fig.update_layout(**layout)


# ---------------------------------------------------------------------------------------------- results
class ResultsExplorer:
    """Bars of a metric per run and group (task type / task / language / all), optionally as deltas
    against a baseline run. ``results`` is the report's tidy table."""

    GROUPINGS = ("task_type", "task", "lang", "all")

    def __init__(self, results: pd.DataFrame, *, metric: str = "main_score", run_column: str | None = None):
        import ipywidgets as w

        self.run_col = run_column or next((c for c in RUN_COLUMNS if c in results.columns), None)
        missing = [c for c in ("task", "task_type") if c not in results.columns]
        if self.run_col is None or missing:
            raise ValueError(f"results table needs a model/run column and task, task_type; missing: "
                             f"{missing or ['model']} (columns: {list(results.columns)})")
        metrics = [c for c in results.columns if pd.api.types.is_numeric_dtype(results[c])
                   and c not in ("seed",)]
        if metric not in metrics:
            raise ValueError(f"metric {metric!r} is not a numeric column; numeric columns: {metrics}")
        self.df = results.copy()
        if "lang" not in self.df.columns:
            self.df["lang"] = "-"
        runs = list(dict.fromkeys(self.df[self.run_col]))
        types = sorted(set(self.df["task_type"]))
        langs = sorted(set(self.df["lang"].astype(str)))
        self.runs = w.SelectMultiple(options=runs, value=tuple(runs), description="runs")
        self.metric = w.Dropdown(options=metrics, value=metric, description="metric")
        self.task_types = w.SelectMultiple(options=types, value=tuple(types), description="task types")
        self.languages = w.SelectMultiple(options=langs, value=tuple(langs), description="languages")
        self.group_by = w.ToggleButtons(options=self.GROUPINGS, value="task_type", description="group by")
        self.baseline = w.Dropdown(options=[("(none)", None)] + [(r, r) for r in runs], value=None,
                                   description="baseline")
        self.figure = _figure_widget()
        self.controls = [self.runs, self.metric, self.task_types, self.languages, self.group_by, self.baseline]
        for c in self.controls:
            c.observe(lambda _change: self.update(), names="value")
        self.widget = w.VBox([w.HBox([self.runs, self.task_types, self.languages]),
                              w.HBox([self.metric, self.baseline]), self.group_by, self.figure])
        self.update()

    def table(self) -> pd.DataFrame:
        """What the figure shows: one row per (run, group) with ``value`` (metric mean or delta) and ``n``
        (tasks averaged). Deltas are per task (run - baseline on the same task) first."""
        df = self.df[self.df["task_type"].isin(self.task_types.value)
                     & self.df["lang"].astype(str).isin(self.languages.value)]
        metric, base = self.metric.value, self.baseline.value
        keys = ["task", "task_type", "lang"]
        # one score per (run, task): the mean over its splits/subsets, so every task weighs the same
        per_task = df.groupby([self.run_col, *keys], as_index=False, sort=False)[metric].mean()
        runs = [r for r in self.runs.value if r != base]
        part = per_task[per_task[self.run_col].isin(runs)]
        if base is not None:
            ref = per_task[per_task[self.run_col] == base][[*keys, metric]].rename(columns={metric: "_base"})
            part = part.merge(ref, on=keys, how="inner")
            part[metric] = part[metric] - part["_base"]
        group = self.group_by.value
        if group == "all":
            part = part.assign(all="all")
        out = (part.groupby([self.run_col, group], sort=False)[metric].agg(["mean", "size"]).reset_index()
               .rename(columns={"mean": "value", "size": "n", group: "group", self.run_col: "run"}))
        return out

    def traces(self) -> list:
        import plotly.graph_objects as go

        t = self.table()
        return [go.Bar(x=list(p["group"]), y=list(p["value"]), name=str(run), customdata=list(p["n"]),
                       hovertemplate="%{x}: %{y:.4f} (%{customdata} tasks)")
                for run, p in t.groupby("run", sort=False)]

    def _layout(self) -> dict[str, Any]:
        base = self.baseline.value
        ylabel = f"{self.metric.value}" + (f" - {base}" if base is not None else "")
        return dict(barmode="group", yaxis_title=ylabel, xaxis_title=self.group_by.value,
                    title=f"{self.metric.value} by {self.group_by.value}" + (f" (delta vs {base})" if base else ""))

    def update(self) -> None:
        """Redraw the figure from the current widget values (called on every change)."""
        _replace_traces(self.figure, self.traces(), self._layout())

    def static_figure(self):
        """The current view as a plain ``go.Figure`` (renders in exported HTML)."""
        import plotly.graph_objects as go

        return go.Figure(data=self.traces(), layout=self._layout())


# ---------------------------------------------------------------------------------------------- ablations
class AblationExplorer:
    """Mean deltas (± std over seeds) of ablation cells against a baseline cell, with one checkbox per
    ablation dimension (switch): a cell is shown when every switch it changes is ticked. A results table
    holding several grids is explored one grid at a time (``grid``; default: the first in the table)."""

    def __init__(self, results: pd.DataFrame, *, baseline: str = ablations.BASELINE, grid: str | None = None):
        import ipywidgets as w

        need = {"cell", "seed", "task", "task_type", "score"}
        if not need <= set(results.columns):
            raise ValueError(f"ablation results need columns {sorted(need)}; got {list(results.columns)}")
        grids = list(dict.fromkeys(results["grid"].astype(str))) if "grid" in results.columns else []
        if grid is not None and grid not in grids:
            raise ValueError(f"grid {grid!r} not in the results (grids: {grids})")
        self.grid = grid or (grids[0] if grids else None)
        self.df = (results[results["grid"].astype(str) == self.grid] if self.grid else results).copy()
        cells = list(dict.fromkeys(self.df["cell"]))
        if baseline not in cells:
            raise ValueError(f"baseline cell {baseline!r} not in the results (cells: {cells})")
        self.changed = self._changed_switches(baseline)
        dims = list(dict.fromkeys(s for ch in self.changed.values() for s in ch))
        types = sorted(set(self.df["task_type"]))
        self.dimensions = {d: w.Checkbox(value=True, description=d, indent=False) for d in dims}
        self.level = w.Dropdown(options=ablations.LEVELS, value="mtk", description="level")
        self.task_types = w.SelectMultiple(options=types, value=tuple(types), description="task types")
        self.baseline = w.Dropdown(options=cells, value=baseline, description="baseline")
        self.figure = _figure_widget()
        self.controls = [*self.dimensions.values(), self.level, self.task_types, self.baseline]
        for c in self.controls:
            c.observe(lambda _change: self.update(), names="value")
        self.widget = w.VBox([w.HBox([w.VBox(list(self.dimensions.values())), self.task_types]),
                              w.HBox([self.level, self.baseline]), self.figure])
        self.update()

    def _changed_switches(self, baseline: str) -> dict[str, list[str]]:
        """cell -> switches whose value differs from the baseline cell (from the ``sw.*`` columns; cells
        named ``a=x,b=y`` without those columns fall back to the name)."""
        sw_cols = [c for c in self.df.columns if c.startswith("sw.")]
        first = self.df.drop_duplicates("cell").set_index("cell")
        out = {}
        for cell in first.index:
            if sw_cols:
                out[cell] = [c[3:] for c in sw_cols
                             if str(first.loc[cell, c]) != str(first.loc[baseline, c])]
            else:
                out[cell] = [] if cell == baseline else [p.split("=")[0] for p in str(cell).split(",")]
        return out

    def visible_cells(self) -> list[str]:
        """Cells whose changed switches are all ticked (the full recipe and the baseline cell always)."""
        on = {d for d, cb in self.dimensions.items() if cb.value}
        return [c for c, ch in self.changed.items() if c == self.baseline.value or set(ch) <= on]

    def table(self) -> pd.DataFrame:
        """The aggregated deltas the figure shows (see :func:`kalm_lib.ablations.aggregate`)."""
        df = self.df[self.df["cell"].isin(self.visible_cells()) & self.df["task_type"].isin(self.task_types.value)]
        if df.empty:
            return pd.DataFrame(columns=["cell", "group", "score_mean", "baseline_mean", "delta_mean",
                                         "delta_std", "n"])
        return ablations.aggregate(df, level=self.level.value, baseline=self.baseline.value)

    def traces(self) -> list:
        agg = self.table()
        if agg.empty:
            return []
        return list(ablations.delta_figure(agg).data)

    def _layout(self) -> dict[str, Any]:
        where = f"grid {self.grid}: " if self.grid else ""
        return dict(barmode="group", title=f"{where}ablation deltas vs {self.baseline.value} ({self.level.value})",
                    yaxis_title="score delta", xaxis_title="cell")

    def update(self) -> None:
        """Redraw from the current widget values."""
        _replace_traces(self.figure, self.traces(), self._layout())

    def static_figure(self):
        """The current view as a plain ``go.Figure``."""
        import plotly.graph_objects as go

        return go.Figure(data=self.traces(), layout=self._layout())


def explore_results(results: pd.DataFrame, **kwargs: Any) -> ResultsExplorer:
    """Build a :class:`ResultsExplorer` and show it (static figure when headless)."""
    explorer = ResultsExplorer(results, **kwargs)
    show(explorer)
    return explorer


def explore_ablations(results: pd.DataFrame, **kwargs: Any) -> AblationExplorer:
    """Build an :class:`AblationExplorer` and show it (static figure when headless)."""
    explorer = AblationExplorer(results, **kwargs)
    show(explorer)
    return explorer
