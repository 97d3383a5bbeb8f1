"""The sections of the HTML report, one builder each (:func:`kalm_lib.report.html.build_report` strings them).

Every builder takes the loaded runs / the combined result table and returns one ``<section>``; what is
missing becomes a visible note. Every score shown names its scope (quick subset / full split); published
scores are only placed beside full-split scores of the same task, split and revision.
"""

from __future__ import annotations

import pandas as pd

from kalm_lib.evaluation import aggregate, reference_for, task_scores
from kalm_lib.report import anchors
from kalm_lib.report.figures import (ablation_deltas, ablation_grids, delta_frame, fig_ablations, fig_deltas,
                                     fig_heatmap, fig_reference, fig_soup, fig_training, fig_type_bars,
                                     heldout_frame, per_task_scores, soup_frame)
from kalm_lib.report.markup import esc, fig_html, json_pre, note, section, table_html
from kalm_lib.report.runs import RunData
from kalm_lib.report.scope import FULL, score_scope, scope_note

__all__ = ["summary", "per_task", "deltas", "reference", "published_anchors", "training", "soup", "ablation",
           "provenance_section", "scoped_aggregate", "ranked_runs", "soup_verdict"]

ABLATION_TABLE = ["cell", "score_mean", "baseline_mean", "delta_mean", "delta_std", "n", "ci_low", "ci_high",
                  "resolved"]
SELECTION_MARK = "soup selection task"


def _millions(v) -> str:
    return f"{float(v) / 1e6:,.0f}M"


MODEL_FORMATS = {"n_parameters": _millions, "embed_dim": lambda v: f"{int(v)}", "max_tokens": lambda v: f"{int(v)}",
                 "rank": lambda v: f"{int(v)}", "zero_shot_percent": lambda v: f"{float(v):.0f}",
                 "revision": lambda v: str(v)[:12]}  # a commit hash is told apart by its first characters


# ---------------------------------------------------------------------------------------------- tables
def scoped_aggregate(df: pd.DataFrame, by: tuple[str, ...] = ("lang",)) -> pd.DataFrame:
    """MTK / MTY (:func:`kalm_lib.evaluation.aggregate`) per (label, scope, *by): quick and full never mixed."""
    cols = ["label", "scope", *by, "MTK", "MTY", "n_tasks", "n_types"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    agg = aggregate(df.assign(run=df["label"], scope=score_scope(df)), by=("run", "scope", *by))
    return agg.rename(columns={"run": "label"})[cols]


def ranked_runs(df: pd.DataFrame, info: pd.DataFrame | None = None) -> pd.DataFrame:
    """Our models ranked by MTK per (scope, language) among those scored on the same tasks (a model whose task
    set differs is ranked in its own group), with size / embedding dim / max tokens."""
    cols = ["rank", "label", "scope", "lang", "MTK", "MTY", "n_tasks", "n_parameters", "embed_dim", "max_tokens"]
    per_task = per_task_scores(df)
    per_task = per_task[per_task["task_type"] != "unknown"]
    if per_task.empty:
        return pd.DataFrame(columns=cols)
    task_sets = (per_task.groupby(["label", "scope", "lang"])["task"].agg(lambda t: "|".join(sorted(t)))
                 .rename("task_set").reset_index())
    table = scoped_aggregate(df).merge(task_sets, on=["label", "scope", "lang"])
    table["rank"] = pd.array([pd.NA] * len(table), dtype="Int64")
    for _, part in table.groupby(["scope", "lang", "task_set"]):
        table.loc[part.sort_values(["MTK", "MTY"], ascending=False).index, "rank"] = range(1, len(part) + 1)
    if info is not None and not info.empty:
        table = table.merge(info, on="label", how="left")
    return table.sort_values(["scope", "lang", "rank"]).reindex(columns=cols).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- results
def summary(df: pd.DataFrame, selection: list[str]) -> str:
    """MTK / MTY per run, scope and language; with a soup, first over the held-apart tasks only."""
    if df.empty:
        return section("Summary (MTK / MTY per language)",
                       note("No evaluation results in any run directory: nothing to summarise."), "summary")
    caption = ("<p class='small'>MTK = mean of task main scores; MTY = mean of the task-type means (paper "
               f"convention). Scores ×100. Tasks the report does not know are left out. {esc(scope_note(df['scope']))}"
               "</p>")
    picked = sorted(set(selection) & set(df["task"]))
    if not picked:
        return section("Summary (MTK / MTY per language)", table_html(scoped_aggregate(df)) + caption, "summary")
    held = df[~df["task"].isin(picked)]
    body = (f"<h3>Held-apart tasks</h3><p class='small'>The soup search chose its weights on {esc(', '.join(picked))}"
            ": those tasks are left out here for every model (the soup's scores on them are in-sample).</p>"
            + (table_html(scoped_aggregate(held)) if not held.empty else note("No held-apart tasks evaluated."))
            + "<h3>All tasks (including the soup's selection tasks: the soup's row is optimistic)</h3>"
            + table_html(scoped_aggregate(df)) + caption)
    return section("Summary (MTK / MTY per language)", body, "summary")


def per_task(df: pd.DataFrame, selection: list[str]) -> str:
    """Per-task-type bars, the per-task heatmap and every score with its source file."""
    if df.empty:
        return section("Per task", note("No per-task results to plot."), "per-task")
    marks = {t: SELECTION_MARK for t in selection}
    cols = ["label", "scope", "task", "task_type", "lang", "split", "subset", "main_score", "dataset_revision",
            "mteb_version", "source"]
    body = (fig_html(fig_type_bars(df), "fig-types") + fig_html(fig_heatmap(df, marks), "fig-heatmap")
            + "<details><summary>Every score and the file it comes from</summary>"
            + table_html(df.reindex(columns=cols).sort_values(["task", "label", "split"]), sortable=True)
            + "</details>")
    return section("Per task", body, "per-task")


def deltas(df: pd.DataFrame, baseline: str | None, notes: list[str]) -> str:
    """Per-task deltas against the baseline run, within one scope."""
    labels = sorted(df["label"].unique()) if not df.empty else []
    if baseline is None:
        body = note("No baseline chosen (pass --baseline RUN): deltas not shown.")
    elif baseline not in labels:
        body = note(f"Baseline {baseline!r} not found among runs with results ({', '.join(labels) or 'none'}): "
                    "deltas not shown.")
        notes.append(f"missing baseline {baseline!r}")
    else:
        d = delta_frame(df, baseline)
        body = (fig_html(fig_deltas(d, baseline), "fig-deltas") + table_html(d.reset_index(), signed=tuple(d.columns))
                + "<p class='small'>Each delta is run − baseline on the same task and the same scope (a quick-subset "
                "score is never subtracted from a full-split one).</p>")
    return section("Deltas vs baseline", body, "deltas")


def reference(df: pd.DataFrame, include: bool) -> str:
    """Published per-split scores (``data/reference-scores``) beside our FULL-split scores of the same task."""
    title = "Published models on the same tasks and splits (per-split files)"
    if not include or df.empty:
        return section(title, note("Reference models not shown (no results, or disabled)."), "reference")
    ref = reference_for(sorted(df["task"].unique()))
    if ref.empty:
        return section(title, note("None of these tasks is exactly a public MTEB task with published scores here."),
                       "reference")
    same = df[df["task"].isin(set(ref["task"]))]
    left_out = same[same["scope"] != FULL][["label", "task", "scope"]].drop_duplicates()
    ours = task_scores(same[same["scope"] == FULL].assign(run=lambda x: x["label"] + " · " + FULL))
    ref = ref[ref["task"].isin(set(ours["task"]))]   # published scores only where we have a full-split one
    left_note = (note("Not placed beside published scores (not the same measurement): " + "; ".join(
        f"{r.label} on {r.task} ({r.scope})" for r in left_out.itertuples())) if len(left_out) else "")
    if ref.empty:
        return section(title, left_note or note("No full-split score of ours on these tasks."), "reference")
    both = pd.concat([ours.assign(model="run: " + ours["run"]), task_scores(ref).assign(
        model=lambda x: x["model"] + " · published full split")], ignore_index=True)
    pivot = both.pivot_table(index="model", columns="task", values="main_score", aggfunc="mean")
    mapping = ref[["task", "public_task"]].drop_duplicates()
    body = (fig_html(fig_reference(df, ref), "fig-reference") + table_html(pivot.reset_index(), sortable=True)
            + left_note
            + "<p class='small'>Public task of each of our tasks: "
            + esc(", ".join(f"{a} = {b}" for a, b in zip(mapping["task"], mapping["public_task"])))
            + ". Published scores: data/reference-scores (embeddings-benchmark/results, CC0).</p>"
            "<details><summary>reference score sources</summary>"
            + table_html(ref[["model", "revision", "task", "split", "main_score", "source"]]) + "</details>")
    return section(title, body, "reference")


def published_anchors(df: pd.DataFrame, include: bool, info: pd.DataFrame | None) -> str:
    """The paper's table, the anchors ranked per benchmark (with our comparable models), our comparable tasks
    beside the anchors, what is not compared and why, and our models ranked on our own tasks."""
    title = "Published anchors (MTEB(cmn, v1), MTEB(eng, v1), MTEB(eng, v2))"
    if not include:
        return section(title, note("Published anchors not shown (disabled)."), "anchors")
    paper = anchors.paper_check()
    parts = ["<h3>The paper's summary table</h3><p class='small'>KaLM-Embedding-V2 paper (DESIGN.md §1.5): C-MTEB = "
             "MTEB(cmn, v1), MTEB-eng = MTEB(eng, v1). <code>*_recomputed</code>: the same means from the published "
             "per-task scores below.</p>" + table_html(paper)]
    ranked = anchors.ranked_table(df if not df.empty else None, info)
    for bench, part in ranked.groupby("benchmark", sort=True):
        parts.append(f"<h3>{esc(bench)}: ranked by MTK</h3>" + table_html(
            part.drop(columns="benchmark"), sortable=True, formats=MODEL_FORMATS))
    parts.append("<p class='small'>Rank over models scored on every task of the benchmark (partial rows have no "
                 "rank; their means are not comparable). All published scores are full split. Click a header to "
                 "sort. Sources: data/reference-scores/anchors (embeddings-benchmark/results, CC0; sizes from "
                 "mteb's model registry).</p>")
    comp, skipped = (anchors.task_comparison(df), anchors.not_compared(df)) if not df.empty else (None, None)
    if comp is not None and not comp.empty:
        parts.append("<h3>Our scores beside the anchors (same task, split and revision)</h3>"
                     + table_html(comp, sortable=True))
    if skipped is not None and not skipped.empty:
        parts.append("<h3>Not compared with published scores</h3>" + table_html(skipped))
    ours = ranked_runs(df, info) if not df.empty else pd.DataFrame()
    if not ours.empty:
        parts.append("<h3>Our models on the workbench's tasks</h3><p class='small'>Ranked within one scope and "
                     "language among models scored on the same tasks; not comparable with the benchmark tables "
                     f"above. {esc(scope_note(ours['scope']))}</p>" + table_html(ours, sortable=True,
                                                                                  formats=MODEL_FORMATS))
    return section(title, "".join(parts), "anchors")


# ---------------------------------------------------------------------------------------------- runs
def training(runs: list[RunData]) -> str:
    """One panel per logged training metric."""
    fig = fig_training(runs)
    return section("Training curves", fig_html(fig, "fig-training") if fig else
                   note("No train/<stage>/metrics.jsonl in these runs."), "training")


def soup(runs: list[RunData]) -> str:
    """Soup weights with their selection scores, and the held-apart check apart from them."""
    fig = fig_soup(runs)
    if fig is None:
        return section("Model soup", note("No soup/soup.json in these runs."), "soup")
    parts = [fig_html(fig, "fig-soup")]
    for r in runs:
        if not r.soup:
            continue
        held = heldout_frame(r.soup)
        parts.append(f"<h3>{esc(r.name)}: held-apart check</h3>" + (
            table_html(held) + "<p class='small'>selection_score: on the tasks the search chose the weights on "
            f"(in-sample); heldout_score: on tasks it never saw. Gain of the chosen soup over the best ingredient: "
            f"{_num(held.attrs.get('gain_selection'))} on the selection tasks, "
            f"{_num(held.attrs.get('gain_heldout'))} held apart. <b>{esc(soup_verdict(held.attrs.get('gain_heldout')))}"
            "</b></p>" if not held.empty
            else note("No held-apart check in this soup.json: its scores are all on the selection tasks.")))
        parts.append(f"<details><summary>{esc(r.name)}: every soup scored by the search</summary>"
                     + table_html(soup_frame(r.soup)) + "</details>")
    return section("Model soup", "".join(parts), "soup")


def soup_verdict(gain_heldout) -> str:
    """One plain sentence on whether the soup earned its place: its held-apart gain over the best ingredient."""
    if gain_heldout is None:
        return "No held-apart comparison with the best ingredient was recorded."
    if gain_heldout > 0:
        return f"The chosen soup beats its best single ingredient on the held-apart tasks ({gain_heldout:+.2f})."
    if gain_heldout == 0:
        return ("The chosen soup does not beat its best single ingredient on the held-apart tasks (+0.00): the "
                "search may have chosen that ingredient itself.")
    return (f"The chosen soup does NOT beat its best single ingredient on the held-apart tasks "
            f"({gain_heldout:+.2f}): here the soup stage did not earn its place.")


def _num(v) -> str:
    return "n/a" if v is None else f"{float(v):+.2f}"


def ablation(runs: list[RunData]) -> str:
    """Ablation deltas (ablations.aggregate) with their 95% interval, seed count and resolution."""
    fig = fig_ablations(runs)
    if fig is None:
        return section("Ablations", note("No ablations/results.csv in these runs."), "ablations")
    tables = []
    for r in runs:
        for grid, part in ablation_grids(r.ablations):
            d = ablation_deltas(part)
            tables.append(f"<h3>{esc(r.name)}{'' if grid is None else ' · grid ' + esc(grid)} "
                          f"(reference cell: {esc(d.attrs['reference_cell'])}; deltas paired by seed; scores: "
                          f"{esc(d.attrs['scope'])})</h3>"
                          + table_html(d.reindex(columns=[c for c in ABLATION_TABLE if c in d.columns]),
                                       signed=("delta_mean",), row_class=_unresolved_class))
    body = (fig_html(fig, "fig-ablations") + "".join(tables) + "<p class='small'>delta_mean ± delta_std: mean and "
            "sample std of the per-seed deltas against the reference cell (same seed), over the mean of the tasks; "
            "n = seeds paired; ci_low..ci_high: its 95% interval; unresolved (grey) when the interval covers 0 or "
            "one seed ran (kalm_lib.ablations.aggregate).</p>")
    return section("Ablations", body, "ablations")


def _unresolved_class(row: pd.Series) -> str:
    return "unresolved" if "resolved" in row.index and not bool(row["resolved"]) else ""


def provenance_section(runs: list[RunData]) -> str:
    """Config, seed, data hashes, versions and git revision of each run and evaluation record."""
    parts = []
    for r in runs:
        p = r.provenance or {}
        parts.append(f"<h3>{esc(r.name)} <span class='small'>{esc(r.path)}</span></h3>")
        if r.provenance is None:
            parts.append(note("no provenance.json"))
        else:
            parts.append(json_pre({k: p.get(k) for k in ("created", "config_hash", "seed", "git", "packages", "data")})
                         + "<details><summary>full provenance.json (config)</summary>" + json_pre(p) + "</details>")
        for folder, rec in r.eval_records.items():
            short = {k: rec.get(k) for k in ("created", "config_hash", "seed", "model", "use_instructions",
                                             "prompts", "git", "data", "task_seconds", "errors")}
            parts.append(f"<details><summary>evaluation {esc(folder)} (kalm_eval.json)</summary>"
                         + json_pre(short) + "</details>")
    return section("Provenance", "".join(parts) or note("no runs"), "provenance")
