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
statically (:func:`kalm_lib.runtime.is_headless`). Live, each explorer's plot is a :class:`FigureArea`: the
plotly ``FigureWidget`` plus a static fallback drawn when the widget's front end has not drawn anything
:data:`INIT_TIMEOUT_S` seconds after it was shown (a slow machine, issue 14.7). Every figure names the scope
of its scores (quick subset / full split, :mod:`kalm_lib.report.scope`).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable

import pandas as pd

from kalm_lib import ablations
from kalm_lib.report.scope import ablation_scope, score_scope
from kalm_lib.runtime import is_headless

__all__ = ["show", "FigureArea", "ResultsExplorer", "AblationExplorer", "explore_results", "explore_ablations",
           "RUN_COLUMNS", "INIT_TIMEOUT_S"]

RUN_COLUMNS = ("model", "run")
# How long a live plot may take to draw before the static fallback appears. anywidget gives a widget's front
# end 2 s to initialise; under load plotly's ~5 MB widget bundle takes longer and the plot stays empty.
INIT_TIMEOUT_S = 5.0
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def show(explorer: "ResultsExplorer | AblationExplorer", headless: bool | None = None,
         timeout_s: float = INIT_TIMEOUT_S):
    """Display the live widget (with its static fallback armed, :class:`FigureArea`), or (headless) the
    equivalent static figure. Returns what was shown."""
    from IPython.display import display

    headless = is_headless() if headless is None else headless
    shown = explorer.static_figure() if headless else explorer.widget
    display(shown)
    if not headless:
        explorer.area.arm(explorer.static_figure, timeout_s)
    return shown


def _mime_output(fig) -> dict[str, Any]:
    """A figure as a notebook display_data output: plotly's mime bundle, drawn by JupyterLab's plotly
    extension (a regular lab extension: no widget model, no init timeout)."""
    spec = json.loads(fig.to_json())
    spec["config"] = {"displaylogo": False, "responsive": True}
    return {"output_type": "display_data", "metadata": {},
            "data": {PLOTLY_MIME: spec, "text/plain": f"<static figure: {len(spec.get('data', []))} traces>"}}


class FigureArea:
    """An explorer's plot: a plotly ``FigureWidget`` and, below it, a static fallback (an ``Output``).

    The widget's front end reports each view it draws (plotly sends its layout back after ``Plotly.newPlot``);
    :meth:`arm` starts a timer when the explorer is shown, and if no view has reported when it fires, the current
    figure is drawn statically in the fallback and redrawn on every change (:meth:`refresh`) until the widget
    reports, which clears it.
    """

    def __init__(self):
        import ipywidgets as w
        import plotly.graph_objects as go

        self.figure = go.FigureWidget()
        self.fallback = w.Output()
        self.box = w.VBox([self.figure, self.fallback])
        self.drawn = False            # a front-end view of the widget has drawn the figure
        self.fallback_shown = False
        self._static: Callable[[], Any] | None = None
        # plotly's own render acknowledgement (its front end sets these after Plotly.newPlot)
        self.figure.observe(self._on_view, names=["_js2py_layoutDelta", "_js2py_traceDeltas"])

    def _on_view(self, change) -> None:
        if change.get("new") and not self.drawn:
            self.drawn = True
            if self.fallback_shown:
                self.fallback.outputs = ()
                self.fallback_shown = False

    def arm(self, static_figure: Callable[[], Any], timeout_s: float = INIT_TIMEOUT_S) -> threading.Timer:
        """Draw ``static_figure()`` in the fallback if no view has drawn the widget after ``timeout_s``."""
        self._static = static_figure
        timer = threading.Timer(timeout_s, self.check)
        timer.daemon = True
        timer.start()
        return timer

    def check(self) -> bool:
        """Show the static fallback now unless a view has drawn the widget; True when the fallback is shown."""
        if not self.drawn and self._static is not None:
            self.fallback.outputs = (_mime_output(self._static()),)
            self.fallback_shown = True
        return self.fallback_shown

    def refresh(self) -> None:
        """Redraw the fallback (after a change of the explorer's controls) while it is shown."""
        if self.fallback_shown and not self.drawn:
            self.check()


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
        self.df["scope"] = score_scope(self.df)
        self.scopes = sorted(set(self.df["scope"]))
        if len(self.scopes) > 1:  # quick and full scores of a run are different series, never averaged together
            self.df[self.run_col] = self.df[self.run_col].astype(str) + " · " + self.df["scope"]
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
        self.area = FigureArea()
        self.figure = self.area.figure
        self.controls = [self.runs, self.metric, self.task_types, self.languages, self.group_by, self.baseline]
        for c in self.controls:
            c.observe(lambda _change: self.update(), names="value")
        self.widget = w.VBox([w.HBox([self.runs, self.task_types, self.languages]),
                              w.HBox([self.metric, self.baseline]), self.group_by, self.area.box])
        self.update()

    def table(self) -> pd.DataFrame:
        """What the figure shows: one row per (run, group) with ``value`` (metric mean or delta) and ``n``
        (tasks averaged). Deltas are per task (run - baseline on the same task) first."""
        df = self.df[self.df["task_type"].isin(self.task_types.value)
                     & self.df["lang"].astype(str).isin(self.languages.value)]
        metric, base = self.metric.value, self.baseline.value
        keys = ["task", "task_type", "lang", "scope"]   # a delta pairs scores of one task and one scope
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
        scope = self.scopes[0] if len(self.scopes) == 1 else "series name their scope"
        return dict(barmode="group", yaxis_title=ylabel, xaxis_title=self.group_by.value,
                    title=f"{self.metric.value} by {self.group_by.value}" + (f" (delta vs {base})" if base else "")
                    + f" · {scope}")

    def update(self) -> None:
        """Redraw the figure from the current widget values (called on every change)."""
        _replace_traces(self.figure, self.traces(), self._layout())
        self.area.refresh()

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
        self.scope = ablation_scope(self.df)
        self.area = FigureArea()
        self.figure = self.area.figure
        self.controls = [*self.dimensions.values(), self.level, self.task_types, self.baseline]
        for c in self.controls:
            c.observe(lambda _change: self.update(), names="value")
        self.widget = w.VBox([w.HBox([w.VBox(list(self.dimensions.values())), self.task_types]),
                              w.HBox([self.level, self.baseline]), self.area.box])
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
            return pd.DataFrame(columns=ablations.AGGREGATE_COLUMNS)
        return ablations.aggregate(df, level=self.level.value, baseline=self.baseline.value)

    def traces(self) -> list:
        agg = self.table()
        if agg.empty:
            return []
        return list(ablations.delta_figure(agg).data)

    def _layout(self) -> dict[str, Any]:
        where = f"grid {self.grid}: " if self.grid else ""
        return dict(barmode="group", title=f"{where}ablation deltas vs {self.baseline.value} ({self.level.value}; "
                                           f"scores: {self.scope})",
                    yaxis_title="score delta (95% interval)", xaxis_title="cell")

    def update(self) -> None:
        """Redraw from the current widget values."""
        _replace_traces(self.figure, self.traces(), self._layout())
        self.area.refresh()

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
