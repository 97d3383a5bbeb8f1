"""Self-contained HTML reports of run directories: :func:`build_report`.

ONE HTML file with plotly.js embedded once, so it opens from ``file://`` with no network. It holds: a summary
table (MTK/MTY per language), per-task-type bars, a per-task heatmap across runs, deltas against a baseline
run (sign coloured), published reference models on the same tasks, training curves, soup weights, ablation
deltas (paired by seed, as notebook 05), and the provenance of every number (source file of each score;
config, seed, data hashes, versions, git revision of each run). Anything missing gets a visible note instead
of an error. All text that comes from datasets, configs or file names is HTML-escaped (:func:`esc`, and
:func:`fig_html` for text inside figure JSON).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from kalm_lib import atomic, provenance
from kalm_lib.evaluation import aggregate, reference_for, task_scores
from kalm_lib.report.figures import (ablation_deltas, ablation_grids, delta_frame, fig_ablations, fig_deltas,
                                     fig_heatmap, fig_reference, fig_soup, fig_training, fig_type_bars, soup_frame)
from kalm_lib.report.runs import RunData, combined_results, load_runs

__all__ = ["build_report", "esc", "table_html", "fig_html", "CSS", "ERROR_HOOK"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#1f2328}
h1{margin-bottom:4px} h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:36px}
table.tbl{border-collapse:collapse;font-size:13px;margin:8px 0} .tbl th,.tbl td{border:1px solid #d0d7de;padding:3px 8px;text-align:right}
.tbl th{background:#f6f8fa} .tbl td:first-child,.tbl th:first-child{text-align:left}
td.pos{color:#1a7f37;font-weight:600} td.neg{color:#cf222e;font-weight:600} td.zero{color:#57606a}
.note{background:#fff8c5;border:1px solid #d4a72c;padding:6px 10px;margin:6px 0;border-radius:4px}
#kalm-errors:empty{display:none} #kalm-errors{background:#ffebe9;border:1px solid #cf222e;padding:6px}
pre{background:#f6f8fa;padding:8px;overflow:auto;font-size:12px;max-height:420px} .small{font-size:12px;color:#57606a}
"""

# Collects script errors visibly in the page (and lets the browser test check there are none).
ERROR_HOOK = """<script>window.kalmErrors=[];window.onerror=function(m,s,l,c,e){window.kalmErrors.push(String(m));
var d=document.getElementById('kalm-errors');if(d){var p=document.createElement('div');p.className='kalm-error';
p.textContent='script error: '+m+' ('+s+':'+l+')';d.appendChild(p);}return false;};</script>"""

ABLATION_TABLE = ["cell", "score_mean", "baseline_mean", "delta_mean", "delta_std", "n"]


# ---------------------------------------------------------------------------------------------- pieces
def esc(x: Any) -> str:
    """HTML-escape any value's text."""
    return html.escape("" if x is None else str(x), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if pd.isna(v) else f"{v:.2f}"
    return esc(v)


def table_html(df: pd.DataFrame, *, signed: tuple[str, ...] = (), cls: str = "tbl") -> str:
    """An escaped HTML table; columns in ``signed`` get green/red/grey by sign."""
    if df is None or df.empty:
        return "<p class='note'>(empty)</p>"
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    body = []
    for _, row in df.iterrows():
        cells = []
        for c in df.columns:
            v = row[c]
            if c in signed and isinstance(v, (int, float)) and not pd.isna(v):
                k = "pos" if v > 0 else ("neg" if v < 0 else "zero")
                cells.append(f"<td class='{k}'>{v:+.2f}</td>")
            else:
                cells.append(f"<td>{_fmt(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def fig_html(fig, div_id: str) -> str:
    """A figure as a div + a Plotly.newPlot call. The figure JSON has every '<' escaped as \\u003c so text
    from datasets can never close the script tag (hand-written because plotly's to_html does not do this)."""
    if fig is None:
        return ""
    spec = fig.to_json().replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (f"<div id='{div_id}' class='kalm-fig'></div>\n<script>(function(){{var f={spec};"
            f"Plotly.newPlot('{div_id}', f.data, f.layout, {{responsive: true, displaylogo: false}});}})();</script>")


def _section(title: str, body: str, sid: str) -> str:
    return f"<section id='{sid}'><h2>{esc(title)}</h2>\n{body}\n</section>"


def _note(text: str) -> str:
    return f"<div class='note'>{esc(text)}</div>"


def _json_pre(obj: Any) -> str:
    return f"<pre>{esc(json.dumps(obj, indent=1, ensure_ascii=False, default=str))}</pre>"


# ---------------------------------------------------------------------------------------------- sections
def _summary(df: pd.DataFrame) -> str:
    if df.empty:
        body = _note("No evaluation results in any run directory: nothing to summarise.")
    else:
        agg = aggregate(df.assign(run=df["label"]), by=("run", "lang"))
        body = (table_html(agg.rename(columns={"run": "run / model"})) + "<p class='small'>MTK = mean of task "
                "main scores; MTY = mean of the task-type means (paper convention). Scores ×100. Tasks the report "
                "does not know are left out.</p>")
    return _section("Summary (MTK / MTY per language)", body, "summary")


def _per_task(df: pd.DataFrame) -> str:
    if df.empty:
        return _section("Per task", _note("No per-task results to plot."), "per-task")
    cols = ["label", "task", "task_type", "lang", "split", "subset", "main_score", "mteb_version", "source"]
    body = (fig_html(fig_type_bars(df), "fig-types") + fig_html(fig_heatmap(df), "fig-heatmap")
            + "<details><summary>Every score and the file it comes from</summary>"
            + table_html(df[cols].sort_values(["task", "label", "split"])) + "</details>")
    return _section("Per task", body, "per-task")


def _deltas(df: pd.DataFrame, baseline: str | None, notes: list[str]) -> str:
    labels = sorted(df["label"].unique()) if not df.empty else []
    if baseline is None:
        body = _note("No baseline chosen (pass --baseline RUN): deltas not shown.")
    elif baseline not in labels:
        body = _note(f"Baseline {baseline!r} not found among runs with results ({', '.join(labels) or 'none'}): "
                     "deltas not shown.")
        notes.append(f"missing baseline {baseline!r}")
    else:
        d = delta_frame(df, baseline)
        body = fig_html(fig_deltas(d, baseline), "fig-deltas") + table_html(d.reset_index(), signed=tuple(d.columns))
    return _section("Deltas vs baseline", body, "deltas")


def _reference(df: pd.DataFrame, include: bool) -> str:
    title = "Reference models on the same tasks"
    if not include or df.empty:
        return _section(title, _note("Reference models not shown (no results, or disabled)."), "reference")
    ref = reference_for(sorted(df["task"].unique()))
    if ref.empty:
        return _section(title, _note("None of these tasks is exactly a public MTEB task with published scores "
                                     "here."), "reference")
    ours = task_scores(df.assign(run=df["label"]))
    ours = ours[ours["task"].isin(ref["task"].unique())].assign(model=lambda x: "run: " + x["run"])
    both = pd.concat([ours, task_scores(ref)], ignore_index=True)
    pivot = both.pivot_table(index="model", columns="task", values="main_score", aggfunc="mean")
    mapping = ref[["task", "public_task"]].drop_duplicates()
    same = ", ".join(f"{a} = {b}" for a, b in zip(mapping["task"], mapping["public_task"]))
    body = (fig_html(fig_reference(df, ref), "fig-reference") + table_html(pivot.reset_index())
            + f"<p class='small'>Public task of each of our tasks: {esc(same)}. Published scores: "
            "data/reference-scores (embeddings-benchmark/results, CC0); source files and revisions in the table "
            "below.</p><details><summary>reference score sources</summary>"
            + table_html(ref[["model", "revision", "task", "split", "main_score", "source"]]) + "</details>")
    return _section(title, body, "reference")


def _training_soup_ablations(runs: list[RunData]) -> list[str]:
    ft, fs, fa = fig_training(runs), fig_soup(runs), fig_ablations(runs)
    soup_tables = "".join(f"<h3>{esc(r.name)}</h3>" + table_html(soup_frame(r.soup)) for r in runs if r.soup)
    ab_tables = "".join(
        f"<h3>{esc(r.name)}{'' if grid is None else ' · grid ' + esc(grid)} "
        f"(reference cell: {esc(d.attrs['reference_cell'])}; deltas paired by seed)</h3>"
        + table_html(d[ABLATION_TABLE], signed=("delta_mean",))
        for r in runs for grid, part in ablation_grids(r.ablations) for d in [ablation_deltas(part)])
    return [
        _section("Training curves", fig_html(ft, "fig-training") if ft else
                 _note("No train/<stage>/metrics.jsonl in these runs."), "training"),
        _section("Model soup", fig_html(fs, "fig-soup") + soup_tables if fs else
                 _note("No soup/soup.json in these runs."), "soup"),
        _section("Ablations", fig_html(fa, "fig-ablations") + ab_tables + "<p class='small'>delta_mean ± delta_std: "
                 "mean and sample std of the per-seed deltas against the reference cell (same seed), over the mean "
                 "of the tasks; n = seeds paired.</p>" if fa else
                 _note("No ablations/results.csv in these runs."), "ablations"),
    ]


def _provenance(runs: list[RunData]) -> str:
    parts = []
    for r in runs:
        p = r.provenance or {}
        parts.append(f"<h3>{esc(r.name)} <span class='small'>{esc(r.path)}</span></h3>")
        if r.provenance is None:
            parts.append(_note("no provenance.json"))
        else:
            parts.append(_json_pre({k: p.get(k) for k in ("created", "config_hash", "seed", "git", "packages", "data")})
                         + "<details><summary>full provenance.json (config)</summary>" + _json_pre(p) + "</details>")
        for folder, rec in r.eval_records.items():
            short = {k: rec.get(k) for k in ("created", "config_hash", "seed", "model", "use_instructions",
                                             "prompts", "git", "data", "task_seconds", "errors")}
            parts.append(f"<details><summary>evaluation {esc(folder)} (kalm_eval.json)</summary>"
                         + _json_pre(short) + "</details>")
    return _section("Provenance", "".join(parts) or _note("no runs"), "provenance")


def _page(title: str, runs: list[RunData], baseline: str | None, notes: list[str], sections: list[str]) -> str:
    import plotly.offline  # the plotly.js bundle, embedded once

    me = provenance.collect(None, report={"runs": [str(r.path) for r in runs], "baseline": baseline})
    header = (f"<h1>{esc(title)}</h1><p class='small'>generated {esc(me['created'])} · git "
              f"{esc((me['git'] or {}).get('commit'))} · runs: {esc(', '.join(r.name for r in runs))}</p>")
    notes_html = (f"<section id='notes'><h2>Notes</h2>{''.join(_note(n) for n in notes)}</section>" if notes else "")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(title)}</title><style>{CSS}</style>{ERROR_HOOK}"
            f"<script>{plotly.offline.get_plotlyjs()}</script></head><body>"
            f"{header}<div id='kalm-errors'></div>{notes_html}" + "\n".join(sections) + "</body></html>")


# ---------------------------------------------------------------------------------------------- report
def build_report(run_dirs: list[str | Path], out: str | Path, *, baseline: str | None = None,
                 title: str = "KaLM workbench report", include_reference: bool = True) -> Path:
    """Write one self-contained HTML report for ``run_dirs`` to ``out`` (atomically). Returns the path."""
    runs = load_runs(run_dirs)
    df = combined_results(runs)
    notes = [n for r in runs for n in r.notes]
    sections = [_summary(df), _per_task(df), _deltas(df, baseline, notes), _reference(df, include_reference),
                *_training_soup_ablations(runs), _provenance(runs)]
    return atomic.write_text(out, _page(title, runs, baseline, notes, sections))
