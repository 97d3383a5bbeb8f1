"""Reports: run directories -> tables, plotly figures, one self-contained HTML file, interactive explorers.

Modules, one job each: :mod:`~kalm_lib.report.runs` (reading run directories; filling a run's ``eval/``),
:mod:`~kalm_lib.report.figures` (tables and plotly figures, shared with notebook 06),
:mod:`~kalm_lib.report.html` (:func:`build_report`: escaping, tables, the page),
:mod:`~kalm_lib.report.widgets` (JupyterLab explorers), :mod:`~kalm_lib.report.cli` (``kalm report``).
"""

from __future__ import annotations

from kalm_lib.report.figures import (ablation_deltas, ablation_grids, delta_frame, fig_ablations, fig_deltas,
                                     fig_heatmap, fig_reference, fig_soup, fig_training, fig_type_bars, heatmap_frame,
                                     reference_cell, soup_frame)
from kalm_lib.report.html import build_report, esc, fig_html, table_html
from kalm_lib.report.runs import (RunData, auto_baseline, combined_results, eval_config_for, evaluate_run, load_run,
                                  load_runs, models_to_evaluate)
from kalm_lib.report.widgets import AblationExplorer, ResultsExplorer, explore_ablations, explore_results, show

__all__ = [
    # runs
    "RunData", "load_run", "load_runs", "combined_results", "auto_baseline", "models_to_evaluate",
    "eval_config_for", "evaluate_run",
    # tables and figures
    "fig_type_bars", "heatmap_frame", "fig_heatmap", "delta_frame", "fig_deltas", "fig_reference", "fig_training",
    "soup_frame", "fig_soup", "ablation_grids", "reference_cell", "ablation_deltas", "fig_ablations",
    # HTML
    "build_report", "esc", "table_html", "fig_html",
    # explorers
    "show", "ResultsExplorer", "AblationExplorer", "explore_results", "explore_ablations",
]
