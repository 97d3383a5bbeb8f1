"""Reports: run directories -> tables, plotly figures, one self-contained HTML file, interactive explorers.

Modules, one job each: :mod:`~kalm_lib.report.runs` (reading run directories; filling a run's ``eval/``),
:mod:`~kalm_lib.report.scope` (quick subset or full split: the scope of every score),
:mod:`~kalm_lib.report.anchors` (published anchor models, the paper's table, ranks, what is comparable),
:mod:`~kalm_lib.report.figures` (tables and plotly figures, shared with notebook 06),
:mod:`~kalm_lib.report.markup` (escaping, tables, figure divs), :mod:`~kalm_lib.report.sections` (the report's
sections), :mod:`~kalm_lib.report.html` (:func:`build_report`), :mod:`~kalm_lib.report.widgets` (JupyterLab
explorers with a static fallback), :mod:`~kalm_lib.report.cli` (``kalm report``).
"""

from __future__ import annotations

from kalm_lib.report.anchors import (ANCHOR_DIR, anchor_summary, comparable_scores, load_anchor_models,
                                     load_anchor_scores, load_anchor_tasks, load_paper_table, not_compared,
                                     paper_check, ranked_table, task_comparison)
from kalm_lib.report.figures import (ablation_deltas, ablation_grids, delta_frame, fig_ablations, fig_deltas,
                                     fig_heatmap, fig_reference, fig_soup, fig_training, fig_type_bars, heatmap_frame,
                                     heldout_frame, per_task_scores, reference_cell, soup_frame, training_metrics)
from kalm_lib.report.html import build_report, render_report
from kalm_lib.report.markup import esc, fig_html, table_html
from kalm_lib.report.runs import (RunData, auto_baseline, combined_results, eval_config_for, evaluate_run, load_run,
                                  load_runs, model_info, models_to_evaluate, soup_selection_tasks)
from kalm_lib.report.scope import FULL, QUICK, UNKNOWN, score_scope, with_scope
from kalm_lib.report.sections import ranked_runs, scoped_aggregate
from kalm_lib.report.widgets import AblationExplorer, FigureArea, ResultsExplorer, explore_ablations, explore_results, show

__all__ = [
    # runs
    "RunData", "load_run", "load_runs", "combined_results", "auto_baseline", "model_info", "soup_selection_tasks",
    "models_to_evaluate", "eval_config_for", "evaluate_run",
    # scope of a score
    "QUICK", "FULL", "UNKNOWN", "score_scope", "with_scope",
    # published anchors
    "ANCHOR_DIR", "load_anchor_scores", "load_anchor_tasks", "load_anchor_models", "load_paper_table",
    "anchor_summary", "paper_check", "comparable_scores", "not_compared", "ranked_table", "task_comparison",
    # tables and figures
    "per_task_scores", "scoped_aggregate", "ranked_runs", "fig_type_bars", "heatmap_frame", "fig_heatmap",
    "delta_frame", "fig_deltas", "fig_reference", "training_metrics", "fig_training", "soup_frame", "heldout_frame",
    "fig_soup", "ablation_grids", "reference_cell", "ablation_deltas", "fig_ablations",
    # HTML
    "build_report", "render_report", "esc", "table_html", "fig_html",
    # explorers
    "show", "FigureArea", "ResultsExplorer", "AblationExplorer", "explore_results", "explore_ablations",
]
