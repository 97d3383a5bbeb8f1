"""Tables and plotly figures of a curation run (used by notebooks/01_data_curation.ipynb and reports)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from kalm_lib.data.records import Tally, read_records

__all__ = ["load_run", "source_table", "rejection_table", "rejected_samples", "consistency_table", "figures"]


def load_run(out_dir: str | Path) -> tuple[dict[str, Any], dict[str, pd.DataFrame], dict[str, Any]]:
    """``(report, {stage: records DataFrame}, mining similarities)`` of a curation output folder."""
    out_dir = Path(out_dir)
    report = json.loads((out_dir / "curation_report.json").read_text(encoding="utf-8"))
    frames = {}
    for stage in ("pretrain", "finetune"):
        p = out_dir / f"{stage}.jsonl"
        # the one record reader (an empty stage file is no rows here, not an error)
        rows = list(read_records(p, Tally())) if p.exists() and p.stat().st_size else []
        df = pd.DataFrame(rows, columns=["id", "query", "pos", "neg", "task_type", "category", "instruction",
                                         "lang", "source"])
        df["stage"] = stage
        frames[stage] = df
    sims_path = out_dir / "mining_similarities.json"
    sims = json.loads(sims_path.read_text(encoding="utf-8")) if sims_path.exists() else {}
    return report, frames, sims


def source_table(report: dict[str, Any]) -> pd.DataFrame:
    """One row per source: raw rows read/used/rejected, records curated/kept/rejected, stage."""
    stage_of = {s["name"]: s["stage"] for s in report.get("config", {}).get("sources", [])}
    rows = []
    read, cur = report["read"]["per_source"], report["curate"]["per_source"]
    for s in sorted(set(read) | set(cur)):
        r, c = read.get(s, {}), cur.get(s, {})
        rows.append({"source": s, "stage": stage_of.get(s, ""), "raw_rows": r.get("rows_in", 0),
                     "raw_used": r.get("kept", 0), "raw_rejected": r.get("rejected", 0),
                     "records_in": c.get("rows_in", 0), "records_kept": c.get("kept", 0),
                     "records_rejected": c.get("rejected", 0)})
    df = pd.DataFrame(rows)
    return df


def rejection_table(report: dict[str, Any]) -> pd.DataFrame:
    """Long table: (step, source, reason, count) for every rejection in the report."""
    rows = []
    for step in ("read", "curate"):
        for s, d in report[step]["per_source"].items():
            for reason, n in d["rejected_by_reason"].items():
                rows.append({"step": step, "source": s, "reason": reason, "count": n})
    return pd.DataFrame(rows, columns=["step", "source", "reason", "count"])


def rejected_samples(out_dir: str | Path) -> pd.DataFrame:
    """The rejected-row samples written beside the report (step, source, reason, file, line, field, excerpt)."""
    p = Path(out_dir) / "rejected_samples.jsonl"
    rows = [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()] if p.exists() else []
    cols = ["step", "source", "reason", "file", "line", "id", "field", "excerpt"]
    return pd.DataFrame(rows, columns=cols)


def consistency_table(report: dict[str, Any]) -> pd.DataFrame:
    """One row per (mined source, language): the miner's recall@k vs chance and whether the
    ranking-consistency filter ran (or why not)."""
    rows = [{"source": s, "lang": lang, **d} for s, st in report.get("mining", {}).items()
            for lang, d in st.get("consistency", {}).items()]
    return pd.DataFrame(rows, columns=["source", "lang", "records", "recall_at_k", "chance", "lift", "filtered", "why"])


def figures(report: dict[str, Any], frames: dict[str, pd.DataFrame], sims: dict[str, Any]) -> dict[str, Any]:
    """Plotly figures: rejection reasons, task/category/language mix, text lengths, mined similarities."""
    import plotly.express as px  # heavy: only when figures are drawn
    import plotly.graph_objects as go

    figs: dict[str, Any] = {}
    rej = rejection_table(report)
    if len(rej):
        figs["rejections"] = px.bar(rej, x="source", y="count", color="reason", facet_row="step", barmode="stack",
                                    title="Rejected rows per source and reason (read = raw rows, curate = records)",
                                    height=650)
    df = pd.concat([f for f in frames.values() if len(f)], ignore_index=True) if any(len(f) for f in frames.values()) \
        else pd.DataFrame(columns=["stage", "lang", "task_type", "category", "query", "pos"])
    if len(df):
        mix = df.groupby(["stage", "lang", "task_type", "category"]).size().reset_index(name="records")
        figs["mix"] = px.sunburst(mix, path=["stage", "lang", "task_type", "category"], values="records",
                                  title="Curated records: stage / language / task type / category")
        lens = pd.DataFrame({"stage": df["stage"], "lang": df["lang"],
                             "query_chars": df["query"].str.len(),
                             "pos_chars": df["pos"].map(lambda p: len(p[0]) if len(p) else 0)})
        long = lens.melt(id_vars=["stage", "lang"], value_vars=["query_chars", "pos_chars"], var_name="field",
                         value_name="chars")
        figs["lengths"] = px.histogram(long, x="chars", color="lang", facet_col="field", facet_row="stage",
                                       nbins=60, log_y=True, barmode="overlay", opacity=0.6,
                                       title="Text length (characters) by language")
    if sims:
        fig = go.Figure()
        for s, d in sorted(sims.items()):
            if d.get("pos_sim"):
                fig.add_trace(go.Violin(y=d["pos_sim"], x=[s] * len(d["pos_sim"]), name="positive", legendgroup="pos",
                                        side="negative", line_color="#1f77b4", showlegend=s == sorted(sims)[0]))
            if d.get("neg_sim"):
                fig.add_trace(go.Violin(y=d["neg_sim"], x=[s] * len(d["neg_sim"]), name="mined negative",
                                        legendgroup="neg", side="positive", line_color="#d62728",
                                        showlegend=s == sorted(sims)[0]))
        fig.update_layout(title="Cosine similarity to the query: positives vs mined hard negatives",
                          violinmode="overlay", yaxis_title="cosine")
        figs["mining"] = fig
    return figs
