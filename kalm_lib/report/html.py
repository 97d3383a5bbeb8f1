"""Self-contained HTML reports of evaluation runs (plotly figures + tables), and ``kalm report``.

A report reads run directories (layout in docs/CONTRACTS.md, every part optional) and writes ONE HTML file
with plotly.js embedded once, so it opens from ``file://`` with no network. It holds: a summary table
(MTK/MTY per language), per-task-type bars, a per-task heatmap across runs, deltas against a baseline run
(sign coloured), published reference models on the same tasks, training curves, soup weights, ablation
deltas, and the provenance of every number (source file of each score; config, seed, data hashes,
versions, git revision of each run). Anything missing gets a visible note instead of an error. All text
that comes from datasets, configs or file names is HTML-escaped.

The figure builders return plotly figures, so notebooks show the same figures inline.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kalm_lib import provenance
from kalm_lib.evaluation import aggregate, load_reference_scores, load_results, reference_for, task_scores

POS, NEG, ZERO = "#1a7f37", "#cf222e", "#57606a"


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class RunData:
    """Everything a report shows about one run directory; ``notes`` lists what is missing or broken."""

    name: str
    path: Path
    results: pd.DataFrame
    provenance: dict | None = None
    eval_records: dict[str, dict] = field(default_factory=dict)   # results folder -> kalm_eval.json
    errors: dict[str, dict] = field(default_factory=dict)         # results folder -> {task: error}
    train_metrics: dict[str, pd.DataFrame] = field(default_factory=dict)  # stage -> metrics
    soup: dict | None = None
    ablations: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path, notes: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        notes.append(f"{path}: unreadable ({type(e).__name__}: {e})")
        return None


def _read_metrics(path: Path, notes: list[str]) -> pd.DataFrame:
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if isinstance(obj, dict):
                rows.append(obj)
            else:
                bad += 1
        except json.JSONDecodeError:
            bad += 1
    if bad:
        notes.append(f"{path}: {bad} unreadable line(s) skipped, {len(rows)} kept")
    return pd.DataFrame(rows)


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Read one run directory (or a bare eval-results folder); missing parts become notes."""
    path = Path(path)
    name = name or path.name
    notes: list[str] = []
    if not path.is_dir():
        return RunData(name, path, load_results([]), notes=[f"run directory not found: {path}"])
    results = load_results([path], run_names=[name])
    run = RunData(name, path, results, notes=notes)
    eval_root = path / "eval" if (path / "eval").is_dir() else path
    if results.empty:
        notes.append(f"{name}: no evaluation results under {eval_root}")
    unknown = sorted(results.loc[~results["known"].astype(bool), "task"].unique()) if not results.empty else []
    if unknown:
        notes.append(f"{name}: results of tasks this report does not know (shown without type/language, "
                     f"left out of MTK/MTY): {', '.join(unknown)}")
    prov = path / "provenance.json"
    if prov.is_file():
        run.provenance = _read_json(prov, notes)
    else:
        notes.append(f"{name}: no provenance.json")
    for f in sorted(eval_root.rglob("kalm_eval.json")):
        rel = str(f.parent.relative_to(eval_root))
        rec = _read_json(f, notes)
        if rec is not None:
            run.eval_records[rel] = rec
    for f in sorted(eval_root.rglob("errors.json")):
        rec = _read_json(f, notes)
        if rec:
            rel = str(f.parent.relative_to(eval_root))
            run.errors[rel] = rec
            for task, err in rec.items():
                notes.append(f"{name}: task {task} FAILED for {rel}: {err}")
    for f in sorted((path / "train").glob("*/metrics.jsonl")):
        df = _read_metrics(f, notes)
        if not df.empty:
            run.train_metrics[f.parent.name] = df
    if (path / "soup" / "soup.json").is_file():
        run.soup = _read_json(path / "soup" / "soup.json", notes)
    if (path / "ablations" / "results.csv").is_file():
        try:
            run.ablations = pd.read_csv(path / "ablations" / "results.csv")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            notes.append(f"{path / 'ablations' / 'results.csv'}: unreadable ({e})")
    return run


def _unique_names(paths: list[Path]) -> list[str]:
    names, seen = [], {}
    for p in paths:
        n = p.name or str(p)
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return names


def load_runs(paths: list[str | Path]) -> list[RunData]:
    """Load several run directories with unique display names."""
    paths = [Path(p) for p in paths]
    return [load_run(p, n) for p, n in zip(paths, _unique_names(paths))]


def combined_results(runs: list[RunData]) -> pd.DataFrame:
    """All runs' results with a ``label`` column: the run name, plus the model when a run holds several."""
    frames = [r.results for r in runs if not r.results.empty]
    if not frames:
        return load_results([]).assign(label=pd.Series(dtype=str))
    df = pd.concat(frames, ignore_index=True)
    n_models = df.groupby("run")["model"].nunique()
    df["label"] = [r if n_models[r] == 1 else f"{r} · {m}" for r, m in zip(df["run"], df["model"])]
    return df


def _step(p: Path) -> int:
    try:
        return int(p.name.rsplit("-", 1)[-1])
    except ValueError:
        return -1


def models_to_evaluate(run_dir: str | Path) -> list[str]:
    """What notebook 06 evaluates by default: the MiniLM baseline, the final model of every training stage
    (``train/<stage>/final``, else its last ``checkpoint-<step>``) and the soup model (``soup/model``)."""
    run_dir = Path(run_dir)
    models = ["minilm"]
    for stage in sorted(p for p in (run_dir / "train").glob("*") if p.is_dir()):
        if (stage / "final" / "config.json").is_file():
            models.append(str(stage / "final"))
            continue
        ckpts = [c for c in stage.glob("checkpoint-*") if (c / "config.json").is_file()]
        if ckpts:
            models.append(str(max(ckpts, key=_step)))
    if (run_dir / "soup" / "model" / "config.json").is_file():
        models.append(str(run_dir / "soup" / "model"))
    return models


def auto_baseline(df: pd.DataFrame) -> str | None:
    """The label of the all-MiniLM-L6-v2 results when present (the workbench's reference point)."""
    if df.empty:
        return None
    hits = sorted(set(df.loc[df["model"] == "sentence-transformers/all-MiniLM-L6-v2", "label"]))
    return hits[0] if hits else None


# ---------------------------------------------------------------------------------------------- figures
def _layout(fig, title: str, height: int = 420):
    fig.update_layout(title=title, height=height, margin=dict(l=60, r=20, t=60, b=60), template="plotly_white")
    return fig


def fig_type_bars(df: pd.DataFrame):
    """Per-task-type mean main score for each run/model, one bar group per language/type."""
    import plotly.express as px

    per_task = task_scores(df.assign(run=df["label"]))
    per_task = per_task[per_task["type"] != "unknown"]
    if per_task.empty:
        return None
    t = per_task.groupby(["run", "lang", "type"], as_index=False)["main_score"].mean()
    t["group"] = t["lang"] + " · " + t["type"]
    fig = px.bar(t, x="group", y="main_score", color="run", barmode="group", text_auto=".1f",
                 labels={"main_score": "mean main score", "group": "language · task type", "run": "run"})
    return _layout(fig, "Mean score per task type")


def heatmap_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Task x run matrix of main scores (mean over splits)."""
    per_task = task_scores(df.assign(run=df["label"]))
    return per_task.pivot_table(index="task", columns="run", values="main_score", aggfunc="mean")


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
        fig.add_bar(name=str(col), x=list(deltas.index), y=v.values,
                    marker_color=[ZERO if pd.isna(x) or x == 0 else (POS if x > 0 else NEG) for x in v.values],
                    text=[("" if pd.isna(x) else f"{x:+.2f}") for x in v.values], textposition="outside")
    fig.update_layout(barmode="group", yaxis_title=f"score − {baseline}")
    return _layout(fig, f"Per-task delta vs baseline {baseline}")


def fig_reference(ours: pd.DataFrame, ref: pd.DataFrame):
    """Our runs beside published models, on the tasks that are exactly public MTEB tasks."""
    import plotly.express as px

    if ref.empty:
        return None
    a = task_scores(ours.assign(run=ours["label"]))
    a = a[a["task"].isin(ref["task"].unique())].rename(columns={"run": "who"})
    b = task_scores(ref).rename(columns={"model": "who_model"})
    b["who"] = b["who_model"]
    both = pd.concat([a[["who", "task", "main_score"]], b[["who", "task", "main_score"]]], ignore_index=True)
    fig = px.bar(both, x="task", y="main_score", color="who", barmode="group",
                 labels={"main_score": "main score", "who": "model / run"})
    return _layout(fig, "Our runs beside published models (same public task and split)", height=480)


def fig_training(runs: list[RunData]):
    """Loss (and lr on a second axis where logged) against step for every run and stage."""
    import plotly.graph_objects as go
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


def soup_frame(soup: dict) -> pd.DataFrame:
    """Long table (soup, ingredient, weight, score) from ``soup/soup.json`` as written by kalm_lib.soup
    (``ingredients`` [{name}], ``evaluations`` [{source, weights, score}], ``chosen``); a ``soups`` list or a
    bare ``weights`` list are read too."""
    if not isinstance(soup, dict):
        return pd.DataFrame(columns=["soup", "ingredient", "weight", "score"])
    names = [i.get("name", str(k)) if isinstance(i, dict) else str(i)
             for k, i in enumerate(soup.get("ingredients") or [])]
    if "soups" in soup:
        soups = [(str(s.get("name", k)), s) for k, s in enumerate(soup["soups"])]
    elif "evaluations" in soup:
        soups = [(f"{e.get('source', 'eval')} #{k}", e) for k, e in enumerate(soup["evaluations"])]
        if isinstance(soup.get("chosen"), dict):
            soups.append(("chosen", soup["chosen"]))
    elif "weights" in soup:
        soups = [("chosen", soup)]
    else:
        soups = []
    rows = []
    for label, s in soups:
        weights = s.get("weights") or []
        if isinstance(weights, dict):
            weights = [weights.get(n) for n in names]
        for k, w in enumerate(weights):
            rows.append({"soup": label, "ingredient": names[k] if k < len(names) else str(k), "weight": w,
                         "score": s.get("score")})
    return pd.DataFrame(rows, columns=["soup", "ingredient", "weight", "score"])


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


def ablation_grids(ab: pd.DataFrame | None) -> list[tuple[str | None, pd.DataFrame]]:
    """(grid name, its rows) for each grid in an ablations table (one unnamed part without a grid column)."""
    if ab is None or ab.empty:
        return []
    if "grid" not in ab.columns:
        return [(None, ab)]
    return [(str(g), part) for g, part in ab.groupby("grid", sort=False)]


def ablation_deltas(ab: pd.DataFrame) -> pd.DataFrame:
    """Mean score per ablation cell (over seeds and tasks), its std over seeds, and the delta vs the
    reference cell ("full" or "baseline" when present, else the first cell). One grid's rows: see
    :func:`ablation_grids` for a table holding several grids."""
    if ab is None or ab.empty or not {"cell", "score"} <= set(ab.columns):
        return pd.DataFrame(columns=["cell", "mean", "std_over_seeds", "n", "delta"])
    per_seed = ab.groupby(["cell", "seed"] if "seed" in ab.columns else ["cell"], sort=False)["score"].mean()
    g = per_seed.groupby(level=0, sort=False)
    out = pd.DataFrame({"mean": g.mean(), "std_over_seeds": g.std(ddof=1), "n": g.size()}).reset_index()
    ref = next((c for c in ("full", "baseline") if c in set(out["cell"])), out["cell"].iloc[0])
    out["delta"] = out["mean"] - float(out.loc[out["cell"] == ref, "mean"].iloc[0])
    out.attrs["reference_cell"] = ref
    return out


def fig_ablations(runs: list[RunData]):
    """Delta of each ablation cell vs its grid's reference cell, error bars = std over seeds; one panel per
    grid (grids differ in scale: a from-scratch architecture grid moves scores far more than recipe switches)."""
    from plotly.subplots import make_subplots

    panels: dict[str, list[tuple[str, pd.DataFrame]]] = {}
    for r in runs:
        for grid, part in ablation_grids(r.ablations):
            d = ablation_deltas(part)
            if not d.empty:
                panels.setdefault(grid or "ablations", []).append((r.name, d))
    if not panels:
        return None
    widths = [max(len(d) for _, d in parts) for parts in panels.values()]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[f"grid {g}" for g in panels],
                        column_widths=[w / sum(widths) for w in widths], horizontal_spacing=0.08)
    for col, parts in enumerate(panels.values(), start=1):
        for name, d in parts:
            fig.add_bar(name=name, legendgroup=name, showlegend=col == 1 and len(runs) > 1,
                        x=d["cell"].astype(str), y=d["delta"],
                        error_y=dict(type="data", array=d["std_over_seeds"].fillna(0).values),
                        customdata=d["n"], hovertemplate="%{x}: %{y:+.2f} (seeds: %{customdata})",
                        marker_color=[ZERO if x == 0 else (POS if x > 0 else NEG) for x in d["delta"]],
                        row=1, col=col)
        fig.update_yaxes(title_text="delta vs reference cell" if col == 1 else None, row=1, col=col)
    return _layout(fig, "Ablation deltas vs each grid's reference cell (error bars: std over seeds)", height=480)


# ---------------------------------------------------------------------------------------------- HTML
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


def _section(title: str, body: str, sid: str) -> str:
    return f"<section id='{sid}'><h2>{esc(title)}</h2>\n{body}\n</section>"


def _note(text: str) -> str:
    return f"<div class='note'>{esc(text)}</div>"


def build_report(run_dirs: list[str | Path], out: str | Path, *, baseline: str | None = None,
                 title: str = "KaLM workbench report", include_reference: bool = True) -> Path:
    """Write one self-contained HTML report for ``run_dirs`` to ``out`` (atomically). Returns the path."""
    import plotly.offline

    runs = load_runs(run_dirs)
    df = combined_results(runs)
    notes = [n for r in runs for n in r.notes]
    figs: list[tuple[str, str, Any]] = []   # (section, div id, figure)
    sections: list[str] = []

    # summary
    if df.empty:
        summary = _note("No evaluation results in any run directory: nothing to summarise.")
    else:
        agg = aggregate(df.assign(run=df["label"]), by=("run", "lang"))
        agg = agg.rename(columns={"run": "run / model", "lang": "language"})
        summary = (table_html(agg) + "<p class='small'>MTK = mean of task main scores; MTY = mean of the "
                   "task-type means (paper convention). Scores ×100. Tasks the report does not know are left out."
                   "</p>")
    sections.append(_section("Summary (MTK / MTY per language)", summary, "summary"))

    # per task type + heatmap + per-task table with sources
    fb = fig_type_bars(df) if not df.empty else None
    fh = fig_heatmap(df) if not df.empty else None
    body = fig_html(fb, "fig-types") + fig_html(fh, "fig-heatmap")
    if not df.empty:
        cols = ["label", "task", "type", "lang", "split", "subset", "main_score", "mteb_version", "source"]
        body += "<details><summary>Every score and the file it comes from</summary>" + \
            table_html(df[cols].sort_values(["task", "label", "split"])) + "</details>"
    else:
        body += _note("No per-task results to plot.")
    sections.append(_section("Per task", body, "per-task"))
    figs += [("types", "fig-types", fb), ("heatmap", "fig-heatmap", fh)]

    # deltas vs baseline
    labels = sorted(df["label"].unique()) if not df.empty else []
    if baseline is None:
        body = _note("No baseline chosen (pass --baseline RUN): deltas not shown.")
    elif baseline not in labels:
        body = _note(f"Baseline {baseline!r} not found among runs with results ({', '.join(labels) or 'none'}): "
                     "deltas not shown.")
        notes.append(f"missing baseline {baseline!r}")
    else:
        d = delta_frame(df, baseline)
        fd = fig_deltas(d, baseline)
        figs.append(("deltas", "fig-deltas", fd))
        body = fig_html(fd, "fig-deltas") + table_html(d.reset_index(), signed=tuple(d.columns))
    sections.append(_section("Deltas vs baseline", body, "deltas"))

    # reference models
    if include_reference and not df.empty:
        ref = reference_for(sorted(df["task"].unique()))
        if ref.empty:
            body = _note("None of these tasks is exactly a public MTEB task with published scores here.")
        else:
            fr = fig_reference(df, ref)
            figs.append(("reference", "fig-reference", fr))
            ours = task_scores(df.assign(run=df["label"]))
            ours = ours[ours["task"].isin(ref["task"].unique())].assign(model=lambda x: "run: " + x["run"])
            both = pd.concat([ours, task_scores(ref)], ignore_index=True)
            pivot = both.pivot_table(index="model", columns="task", values="main_score", aggfunc="mean")
            mapping = ref[["task", "public_task"]].drop_duplicates()
            body = fig_html(fr, "fig-reference") + table_html(pivot.reset_index()) + \
                "<p class='small'>Public task of each of our tasks: " + esc(", ".join(
                    f"{a} = {b}" for a, b in zip(mapping["task"], mapping["public_task"]))) + \
                ". Published scores: data/reference-scores (embeddings-benchmark/results, CC0); source files " \
                "and revisions in the table below.</p><details><summary>reference score sources</summary>" + \
                table_html(ref[["model", "revision", "task", "split", "main_score", "source"]]) + "</details>"
    else:
        body = _note("Reference models not shown (no results, or disabled).")
    sections.append(_section("Reference models on the same tasks", body, "reference"))

    # training, soup, ablations
    ft = fig_training(runs)
    figs.append(("training", "fig-training", ft))
    sections.append(_section("Training curves", fig_html(ft, "fig-training") if ft else
                             _note("No train/<stage>/metrics.jsonl in these runs."), "training"))
    fs = fig_soup(runs)
    figs.append(("soup", "fig-soup", fs))
    soup_tables = "".join(f"<h3>{esc(r.name)}</h3>" + table_html(soup_frame(r.soup)) for r in runs if r.soup)
    sections.append(_section("Model soup", fig_html(fs, "fig-soup") + soup_tables if fs else
                             _note("No soup/soup.json in these runs."), "soup"))
    fa = fig_ablations(runs)
    figs.append(("ablations", "fig-ablations", fa))
    ab_tables = "".join(
        f"<h3>{esc(r.name)}{'' if grid is None else ' · grid ' + esc(grid)} "
        f"(reference cell: {esc(d.attrs.get('reference_cell'))})</h3>" + table_html(d, signed=("delta",))
        for r in runs for grid, part in ablation_grids(r.ablations)
        for d in [ablation_deltas(part)] if not d.empty)
    sections.append(_section("Ablations", fig_html(fa, "fig-ablations") + ab_tables if fa else
                             _note("No ablations/results.csv in these runs."), "ablations"))

    # provenance
    prov_parts = []
    for r in runs:
        p = r.provenance or {}
        keys = {k: p.get(k) for k in ("created", "config_hash", "seed", "git", "packages", "data")}
        prov_parts.append(f"<h3>{esc(r.name)} <span class='small'>{esc(r.path)}</span></h3>")
        prov_parts.append(_note("no provenance.json") if r.provenance is None else
                          f"<pre>{esc(json.dumps(keys, indent=1, ensure_ascii=False, default=str))}</pre>"
                          f"<details><summary>full provenance.json (config)</summary><pre>"
                          f"{esc(json.dumps(p, indent=1, ensure_ascii=False, default=str))}</pre></details>")
        for folder, rec in r.eval_records.items():
            short = {k: rec.get(k) for k in ("created", "config_hash", "seed", "model", "use_instructions",
                                             "prompts", "git", "data", "task_seconds", "errors")}
            prov_parts.append(f"<details><summary>evaluation {esc(folder)} (kalm_eval.json)</summary><pre>"
                              f"{esc(json.dumps(short, indent=1, ensure_ascii=False, default=str))}</pre></details>")
    sections.append(_section("Provenance", "".join(prov_parts) or _note("no runs"), "provenance"))

    notes_html = "".join(_note(n) for n in notes)
    me = provenance.collect(None, report={"runs": [str(r.path) for r in runs], "baseline": baseline})
    header = (f"<h1>{esc(title)}</h1><p class='small'>generated {esc(me['created'])} · git "
              f"{esc((me['git'] or {}).get('commit'))} · runs: {esc(', '.join(r.name for r in runs))}</p>")
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(title)}</title><style>{CSS}</style>{ERROR_HOOK}"
            f"<script>{plotly.offline.get_plotlyjs()}</script></head><body>"
            f"{header}<div id='kalm-errors'></div>"
            + (f"<section id='notes'><h2>Notes</h2>{notes_html}</section>" if notes else "")
            + "\n".join(sections) + "</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


def cli_main(argv: list[str]) -> int:
    """``kalm report RUN_DIR... -o reports/NAME.html [--baseline RUN] [--title T] [--no-reference]``."""
    p = argparse.ArgumentParser(prog="kalm report", description="self-contained HTML report of run directories")
    p.add_argument("runs", nargs="+", help="run directories (or eval result folders)")
    p.add_argument("-o", "--out", default=None, help="output HTML (default reports/<first run>.html)")
    p.add_argument("--baseline", default=None, help="run name to compute deltas against")
    p.add_argument("--title", default="KaLM workbench report")
    p.add_argument("--no-reference", action="store_true", help="leave published reference models out")
    args = p.parse_args(argv)
    out = Path(args.out or f"reports/{Path(args.runs[0]).name or 'report'}.html")
    path = build_report(args.runs, out, baseline=args.baseline, title=args.title,
                        include_reference=not args.no_reference)
    print(path.resolve())
    return 0
