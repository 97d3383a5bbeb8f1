"""Quick subset or full split (issue 14.1, report side): every table and figure names the scope of each score it
shows, and a quick-subset score is never placed beside a published full-split score as if comparable."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kalm_lib import report as rp
from kalm_lib.report import scope

QUICK_SCORE = 0.7908      # MiniLM's quick-subset STSB-en score of the issue
PUBLISHED = 82.03         # MiniLM's published STSBenchmark test score (data/reference-scores)


def _result(folder: Path, task: str, splits: dict[str, float], revision: str = "0") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}.json").write_text(json.dumps({
        "task_name": task, "dataset_revision": revision, "mteb_version": "2.26.24",
        "scores": {sp: [{"main_score": v, "hf_subset": "default", "languages": ["eng-Latn"]}] for sp, v in
                   splits.items()}}))


def _quick_run(tmp_path: Path, how: str) -> Path:
    """MiniLM's quick STSB-en result: written as the evaluation writes it today (dataset revision quick-<n>),
    or as it wrote it before quick subsets had their own revision ("0": quick and full indistinguishable)."""
    run = tmp_path / f"minilm-{how}"
    folder = run / "eval" / "results" / "sentence-transformers__all-MiniLM-L6-v2" / "gt-1234"
    _result(folder, "KalmDev-STSB-en", {"test": QUICK_SCORE}, revision="quick-250" if how == "quick" else "0")
    return run


@pytest.mark.parametrize("how, expected", [("quick", scope.QUICK), ("legacy", scope.UNKNOWN)])
def test_scope_is_the_evaluations(tmp_path, how, expected):
    df = rp.combined_results(rp.load_runs([_quick_run(tmp_path, how)]))
    assert df["scope"].tolist() == [expected]


def test_scope_rules():
    rows = pd.DataFrame({"task": ["STSBenchmark", "KalmDev-STSB-en"], "main_score": [80.0, 79.0]})
    assert scope.score_scope(rows).tolist() == [scope.UNKNOWN] * 2           # a table made by hand: unknown
    assert scope.score_scope(rows.assign(scope="full split")).tolist() == [scope.FULL] * 2   # the evaluation's
    assert (scope.QUICK, scope.FULL, scope.UNKNOWN) == ("quick subset", "full split", "scope unknown")
    assert scope.scorer_scope("mteb:quick:instr=1:seed=0:A,B") == scope.QUICK
    assert scope.scorer_scope("mteb:full:instr=1") == scope.FULL and scope.scorer_scope("pairs") == scope.UNKNOWN
    assert scope.ablation_scope(pd.DataFrame({"cell": ["full"], "scope": ["quick subset"]})) == scope.QUICK
    assert scope.ablation_scope(pd.DataFrame({"cell": ["full"]})) == scope.UNKNOWN


def _figures(page: str) -> list[dict]:
    """The figure specs of the report's Plotly.newPlot calls (the plotly.js bundle left aside)."""
    import plotly.offline

    page = page.replace(plotly.offline.get_plotlyjs(), "")
    return [json.loads(m.group(1).replace("\\u003c", "<").replace("\\u003e", ">").replace("\\u0026", "&"))
            for m in re.finditer(r"<script>\(function\(\)\{var f=(\{.*?\});Plotly\.newPlot", page, re.S)]


def _has_value(obj, value: float) -> bool:
    """Whether a figure spec holds ``value`` anywhere (plotly writes numeric arrays as base64 "bdata")."""
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return abs(obj - value) < 1e-6
    if isinstance(obj, dict) and "bdata" in obj and "dtype" in obj:
        return bool(np.any(np.abs(np.frombuffer(base64.b64decode(obj["bdata"]), dtype=obj["dtype"]) - value) < 1e-6))
    if isinstance(obj, dict):
        return any(_has_value(v, value) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_value(v, value) for v in obj)
    return False


@pytest.mark.parametrize("how, expected", [("quick", scope.QUICK), ("legacy", scope.UNKNOWN)])
def test_a_quick_report_says_so_on_every_comparison(tmp_path, how, expected):
    """The issue's case: MiniLM's quick 79.08 on STSB-en must not stand beside the published 82.03 under "same
    public task and split"; every table and figure holding 79.08 says "quick subset" (or, for a result written
    before quick subsets had their own revision, "scope unknown": not compared either)."""
    run = _quick_run(tmp_path, how)
    page = rp.build_report([run], tmp_path / "r.html").read_text()
    ours = f"{100 * QUICK_SCORE:.2f}"
    tables = re.findall(r"<table.*?</table>", page, re.S)
    holding = [t for t in tables if ours in t]
    assert holding, "our score is shown"
    for t in holding:
        assert expected in t, t[:300]
    figures = [f for f in _figures(page) if _has_value(f["data"], 100 * QUICK_SCORE)]
    assert figures
    for f in figures:
        assert expected in json.dumps(f), f["layout"].get("title")
    # the published full-split scores stand apart: no table or figure holds both 79.08 and 82.03
    assert not [t for t in holding if f"{PUBLISHED:.2f}" in t]
    assert not [f for f in figures if _has_value(f["data"], PUBLISHED)]
    assert "id='fig-reference'" not in page
    assert "Not placed beside published scores" in page and "minilm-" in page
    assert f"{expected} (published scores are full split)" in page        # the anchors' not-compared list


def test_quick_and_full_of_one_task_are_never_mixed(tmp_path):
    """Two scopes of one task in one run: two rows, two series, and deltas only within a scope."""
    base = tmp_path / "base"
    q = base / "eval" / "m" / "rev-a"
    f = base / "eval" / "m" / "rev-b"
    _result(q, "KalmDev-STSB-en", {"test": 0.70}, revision="quick-1")
    _result(f, "KalmDev-STSB-en", {"test": 0.80}, revision="full")
    cand = tmp_path / "cand"
    _result(cand / "eval" / "m" / "rev-a", "KalmDev-STSB-en", {"test": 0.75}, revision="quick-1")
    df = rp.combined_results(rp.load_runs([base, cand]))
    per = rp.per_task_scores(df).set_index(["label", "scope"])["main_score"]
    assert per.to_dict() == pytest.approx({("base", "quick subset"): 70.0, ("base", "full split"): 80.0,
                                           ("cand", "quick subset"): 75.0})
    d = rp.delta_frame(df, "base")
    assert d.loc[("KalmDev-STSB-en", "quick subset"), "cand"] == pytest.approx(5.0)    # 75 - 70, not 75 - 75
    assert pd.isna(d.loc[("KalmDev-STSB-en", "full split"), "cand"])
    summary = rp.scoped_aggregate(df).set_index(["label", "scope"])["MTK"]
    assert summary.to_dict() == pytest.approx({("base", "full split"): 80.0, ("base", "quick subset"): 70.0,
                                               ("cand", "quick subset"): 75.0})
    ex = rp.ResultsExplorer(df, run_column="label")
    names = {tr.name for tr in ex.figure.data}
    assert names == {"base · quick subset", "base · full split", "cand · quick subset"}
