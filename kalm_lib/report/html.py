"""Self-contained HTML reports of run directories: :func:`build_report`.

ONE HTML file with plotly.js embedded once, so it opens from ``file://`` with no network. It holds: a summary
table (MTK/MTY per run, scope and language; with a soup, held-apart tasks first), per-task-type bars, a per-task
heatmap, deltas against a baseline run (within one scope), published scores on the same task, split and revision
(per-split files and the 12 anchor models with the paper's table and ranked, sortable tables), training curves
(one panel per metric), soup weights with the held-apart check, ablation deltas with their 95% interval and seed
count, and the provenance of every number. Every score names its scope (quick subset / full split). Anything
missing gets a visible note instead of an error. The sections are built by :mod:`kalm_lib.report.sections`;
escaping is :mod:`kalm_lib.report.markup`.

:func:`publish_report` copies a run's report to :func:`reports_dir` (``<checkout>/reports/`` in a checkout, never
into an installed package's folder).
"""

from __future__ import annotations

import os
from pathlib import Path

from kalm_lib import atomic, config, provenance
from kalm_lib.report import sections
from kalm_lib.report.markup import CSS, ERROR_HOOK, SORT_JS, esc, note
from kalm_lib.report.runs import RunData, combined_results, load_runs, model_info, soup_selection_tasks

__all__ = ["REPORTS_ENV", "build_report", "render_report", "reports_dir", "publish_report"]

REPORTS_ENV = "KALM_REPORTS_DIR"   # where published reports go, when set (kalm pipeline sets it for its kernels)


def _page(title: str, runs: list[RunData], baseline: str | None, notes: list[str], body: list[str]) -> str:
    import plotly.offline  # the plotly.js bundle, embedded once

    me = provenance.collect(None, report={"runs": [str(r.path) for r in runs], "baseline": baseline})
    header = (f"<h1>{esc(title)}</h1><p class='small'>generated {esc(me['created'])} · git "
              f"{esc((me['git'] or {}).get('commit'))} · runs: {esc(', '.join(r.name for r in runs))}</p>")
    notes_html = (f"<section id='notes'><h2>Notes</h2>{''.join(note(n) for n in notes)}</section>" if notes else "")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(title)}</title><style>{CSS}</style>{ERROR_HOOK}"
            f"<script>{plotly.offline.get_plotlyjs()}</script>{SORT_JS}</head><body>"
            f"{header}<div id='kalm-errors'></div>{notes_html}" + "\n".join(body) + "</body></html>")


def render_report(runs: list[RunData], *, baseline: str | None = None, title: str = "KaLM workbench report",
                  include_reference: bool = True) -> str:
    """The report page of already loaded runs (what :func:`build_report` writes)."""
    df = combined_results(runs)
    notes = [n for r in runs for n in r.notes]
    selection = soup_selection_tasks(runs)
    info = model_info(df) if not df.empty else None
    body = [sections.summary(df, selection), sections.per_task(df, selection), sections.deltas(df, baseline, notes),
            sections.reference(df, include_reference), sections.published_anchors(df, include_reference, info),
            sections.training(runs), sections.soup(runs), sections.ablation(runs), sections.provenance_section(runs)]
    return _page(title, runs, baseline, notes, body)


def build_report(run_dirs: list[str | Path], out: str | Path, *, baseline: str | None = None,
                 title: str = "KaLM workbench report", include_reference: bool = True) -> Path:
    """Write one self-contained HTML report for ``run_dirs`` to ``out`` (atomically). Returns the path."""
    page = render_report(load_runs(run_dirs), baseline=baseline, title=title, include_reference=include_reference)
    return atomic.write_text(out, page)


def reports_dir(cwd: str | os.PathLike | None = None) -> Path | None:
    """The folder a run's report is published to, in this order: ``$KALM_REPORTS_DIR``; ``<home>/reports`` when the
    workbench home (:data:`kalm_lib.config.REPO_ROOT`) is a checkout (source tree, editable install, ``KALM_HOME``);
    otherwise (a wheel: the home is the package's own ``kalm_lib/_home/``) ``reports/`` under ``cwd`` (default: the
    current directory). None when that directory lies inside the installed package (a pipeline kernel runs in
    ``kalm_lib/_home/``): a report is never written into site-packages; it stays in its run directory."""
    if os.environ.get(REPORTS_ENV):
        return Path(os.environ[REPORTS_ENV]).expanduser().resolve()
    package = config.INSTALLED_HOME.parent.resolve()   # the kalm_lib folder this code runs from
    home = config.REPO_ROOT.resolve()
    if not home.is_relative_to(package):
        return home / "reports"
    here = Path.cwd() if cwd is None else Path(cwd)
    here = here.resolve()
    return None if here.is_relative_to(package) else here / "reports"


def publish_report(report: str | os.PathLike, name: str, cwd: str | os.PathLike | None = None) -> Path | None:
    """Copy ``report`` to ``<reports_dir>/<name>.html`` (atomically) and return that path; None (nothing written)
    when there is no place to publish outside the installed package (see :func:`reports_dir`)."""
    folder = reports_dir(cwd)
    if folder is None:
        return None
    return atomic.write_bytes(folder / f"{name}.html", Path(report).read_bytes())
