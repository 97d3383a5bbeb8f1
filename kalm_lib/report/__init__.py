"""Reports: plotly figures, self-contained HTML reports and the interactive explorers."""

from __future__ import annotations

from kalm_lib.report.html import (RunData, load_run, load_runs, combined_results, models_to_evaluate, auto_baseline, fig_type_bars, heatmap_frame, fig_heatmap, delta_frame, fig_deltas, fig_reference, fig_training, soup_frame, fig_soup, ablation_grids, ablation_deltas, fig_ablations, esc, table_html, fig_html, CSS, ERROR_HOOK, build_report, cli_main)
from kalm_lib.report.widgets import (HEADLESS_ENV, RUN_COLUMNS, is_headless, show, ResultsExplorer, AblationExplorer, explore_results, explore_ablations)

__all__ = ['RunData', 'load_run', 'load_runs', 'combined_results', 'models_to_evaluate', 'auto_baseline', 'fig_type_bars', 'heatmap_frame', 'fig_heatmap', 'delta_frame', 'fig_deltas', 'fig_reference', 'fig_training', 'soup_frame', 'fig_soup', 'ablation_grids', 'ablation_deltas', 'fig_ablations', 'esc', 'table_html', 'fig_html', 'CSS', 'ERROR_HOOK', 'build_report', 'cli_main', 'HEADLESS_ENV', 'RUN_COLUMNS', 'is_headless', 'show', 'ResultsExplorer', 'AblationExplorer', 'explore_results', 'explore_ablations']
