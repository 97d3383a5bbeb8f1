"""The explorers, driven programmatically: set widget values, check the FigureWidget's data follows."""

from __future__ import annotations

import math
import statistics

import pandas as pd
import plotly.graph_objects as go
import pytest
from scipy import stats

from kalm_lib import ablations, evaluation
from kalm_lib.report import widgets
from kalm_lib.runtime import HEADLESS_ENV, is_headless

# tidy evaluation results, as the report reads them (column names of kalm_lib.evaluation.load_results)
RESULTS = pd.DataFrame([
    # model, task, task_type, lang, main_score, ndcg
    ("base", "ret_en", "retrieval", "en", 0.40, 0.30),
    ("base", "ret_zh", "retrieval", "zh", 0.20, 0.10),
    ("base", "sts_zh", "sts", "zh", 0.50, 0.50),
    ("tuned", "ret_en", "retrieval", "en", 0.50, 0.35),
    ("tuned", "ret_zh", "retrieval", "zh", 0.45, 0.30),
    ("tuned", "sts_zh", "sts", "zh", 0.55, 0.60),
    ("soup", "ret_en", "retrieval", "en", 0.52, 0.40),
    ("soup", "ret_zh", "retrieval", "zh", 0.41, 0.20),
    ("soup", "sts_zh", "sts", "zh", 0.60, 0.62),
], columns=["model", "task", "task_type", "lang", "main_score", "ndcg"]).assign(split="test")


def bars(fig) -> dict:
    """{trace name: {x: y}} of a figure."""
    return {tr.name: dict(zip(tr.x, tr.y)) for tr in fig.data}


def test_results_explorer_follows_its_widgets():
    ex = widgets.ResultsExplorer(RESULTS)
    assert isinstance(ex.figure, go.FigureWidget)
    got = bars(ex.figure)
    assert set(got) == {"base", "tuned", "soup"}
    assert got["tuned"]["retrieval"] == pytest.approx((0.50 + 0.45) / 2)
    assert got["tuned"]["sts"] == pytest.approx(0.55)

    ex.runs.value = ("base", "tuned")
    assert set(bars(ex.figure)) == {"base", "tuned"}

    ex.baseline.value = "base"  # deltas per task, then mean per task type; the baseline is not drawn
    got = bars(ex.figure)
    assert set(got) == {"tuned"}
    assert got["tuned"]["retrieval"] == pytest.approx(((0.50 - 0.40) + (0.45 - 0.20)) / 2)
    assert got["tuned"]["sts"] == pytest.approx(0.05)
    assert "delta vs base" in ex.figure.layout.title.text

    ex.languages.value = ("zh",)
    ex.group_by.value = "task"
    assert bars(ex.figure) == {"tuned": pytest.approx({"ret_zh": 0.25, "sts_zh": 0.05})}

    ex.metric.value = "ndcg"
    assert bars(ex.figure)["tuned"] == pytest.approx({"ret_zh": 0.20, "sts_zh": 0.10})

    ex.baseline.value = None
    ex.runs.value = ("base", "tuned", "soup")
    ex.task_types.value = ("retrieval",)
    ex.group_by.value = "all"
    got = bars(ex.figure)
    assert got["soup"] == pytest.approx({"all": 0.20}) and got["base"] == pytest.approx({"all": 0.10})

    # the static fallback draws the same bars
    static = ex.static_figure()
    assert not isinstance(static, go.FigureWidget) and bars(static) == bars(ex.figure)


def test_results_explorer_bad_table():
    with pytest.raises(ValueError, match="needs a model/run column"):
        widgets.ResultsExplorer(RESULTS.drop(columns=["model"]))
    with pytest.raises(ValueError, match="metric 'map' is not a numeric column"):
        widgets.ResultsExplorer(RESULTS, metric="map")


def _fmt(v) -> str:
    """A switch value as results.csv writes it (booleans as on/off)."""
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


def _ablation_results() -> pd.DataFrame:
    spec = ablations.load_grid({"design": "factorial", "seeds": [0, 1],
                                "switches": {"bidirectional": [True, False], "pooling": ["mean", "last"]}})
    effect = {"full": 0.0, "pooling=last": -0.02, "bidirectional=off": -0.05,
              "bidirectional=off,pooling=last": -0.04}
    rows = []
    for cell, seed in ablations.expand_runs(spec):
        for task, tt, base in (("ret", "retrieval", 0.5), ("sts", "sts", 0.7)):
            rows.append({"cell": cell.name, "seed": seed, "task": task, "task_type": tt,
                         "score": base + effect[cell.name] + (0.01 * seed if tt == "sts" else 0.0),
                         **{f"sw.{k}": _fmt(v) for k, v in cell.switches.items()}})
    return pd.DataFrame(rows)


def test_ablation_explorer_dimension_toggles_level_and_baseline():
    df = _ablation_results()
    ex = widgets.AblationExplorer(df)
    assert set(ex.dimensions) == {"bidirectional", "pooling"}
    got = bars(ex.figure)
    assert got["MTK"] == pytest.approx({"pooling=last": -0.02, "bidirectional=off": -0.05,
                                        "bidirectional=off,pooling=last": -0.04})

    ex.dimensions["pooling"].value = False  # hide every cell that changes pooling
    assert set(bars(ex.figure)["MTK"]) == {"bidirectional=off"}
    ex.dimensions["pooling"].value = True

    ex.level.value = "task_type"
    got = bars(ex.figure)
    assert set(got) == {"retrieval", "sts"}
    assert got["sts"]["bidirectional=off"] == pytest.approx(-0.05)
    # error bars: the seeds shift sts equally in every cell, so paired deltas have zero spread
    sts = next(tr for tr in ex.figure.data if tr.name == "sts")
    assert list(sts.error_y.array) == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)

    ex.task_types.value = ("retrieval",)
    assert set(bars(ex.figure)) == {"retrieval"}

    ex.baseline.value = "bidirectional=off"  # deltas against another cell
    got = bars(ex.figure)["retrieval"]
    assert got["full"] == pytest.approx(0.05) and got["pooling=last"] == pytest.approx(0.03)


def test_ablation_explorer_spread_and_static_fallback():
    df = _ablation_results()
    # give one cell seed-dependent noise so its error bar is a real sample std
    mask = (df.cell == "pooling=last") & (df.task == "ret")
    df.loc[mask, "score"] += df.loc[mask, "seed"].map({0: 0.01, 1: -0.03})
    ex = widgets.AblationExplorer(df)
    ex.level.value = "task"
    ret = next(tr for tr in ex.figure.data if tr.name == "ret")
    i = list(ret.x).index("pooling=last")
    assert ret.y[i] == pytest.approx(-0.02 + statistics.mean([0.01, -0.03]))
    # error bar: the 95% interval of the mean paired delta over 2 seeds (t with 1 degree of freedom)
    half = stats.t.ppf(0.975, 1) * statistics.stdev([0.01, -0.03]) / math.sqrt(2)
    assert ret.error_y.array[i] == pytest.approx(half)
    assert bars(ex.static_figure()) == bars(ex.figure)


def test_ablation_explorer_reads_one_grid_of_a_shared_table():
    arch = _ablation_results().assign(grid="arch")
    other = arch.assign(grid="other", score=arch["score"] - 1.0)  # same cells, other scores
    both = pd.concat([other, arch], ignore_index=True)
    ex = widgets.AblationExplorer(both, grid="arch")
    assert bars(ex.figure) == bars(widgets.AblationExplorer(_ablation_results()).figure)
    assert "grid arch" in ex.figure.layout.title.text
    assert widgets.AblationExplorer(both).grid == "other"   # default: the first grid in the table
    with pytest.raises(ValueError, match="grid 'nope' not in the results"):
        widgets.AblationExplorer(both, grid="nope")


def test_headless_detection_and_show(monkeypatch):
    monkeypatch.setenv(HEADLESS_ENV, "1")
    assert is_headless() and widgets.is_headless is is_headless   # the one headless check (kalm_lib.runtime)
    monkeypatch.delenv(HEADLESS_ENV)
    assert is_headless()  # plain pytest process: no Jupyter kernel
    ex = widgets.ResultsExplorer(RESULTS)
    assert isinstance(widgets.show(ex), go.Figure) and not isinstance(widgets.show(ex), go.FigureWidget)
    assert widgets.show(ex, headless=False) is ex.widget


def test_results_explorer_weighs_tasks_equally():
    # a task may have several splits: it counts once, as the mean of its splits
    extra = RESULTS[(RESULTS.model == "tuned") & (RESULTS.task == "ret_en")].assign(split="dev", main_score=0.70)
    ex = widgets.ResultsExplorer(pd.concat([RESULTS, extra]))
    got = bars(ex.figure)["tuned"]
    assert got["retrieval"] == pytest.approx(((0.50 + 0.70) / 2 + 0.45) / 2)
    ex.group_by.value = "lang"
    assert bars(ex.figure)["tuned"]["en"] == pytest.approx(0.60)


def test_results_explorer_reads_load_results_as_is():
    """One column naming: a kalm_lib.evaluation table goes straight in (task_type, lang), no renaming."""
    ref = evaluation.load_reference_scores()
    ref = ref[ref["model"].str.startswith("sentence-transformers/all-MiniLM")]
    ex = widgets.ResultsExplorer(ref)
    per_task = evaluation.task_scores(ref)
    for (model, task_type), part in per_task.groupby(["model", "task_type"]):
        assert bars(ex.figure)[model][task_type] == pytest.approx(part["main_score"].mean())
    ex.group_by.value = "lang"
    assert set(bars(ex.figure)["sentence-transformers/all-MiniLM-L6-v2"]) == set(per_task["lang"])


# ---------------------------------------------------------------------------------------------- slow front ends
def _fallback_bars(area) -> dict:
    """{trace name: {x: y}} of the static figure in an explorer's fallback output (empty when none)."""
    if not area.fallback.outputs:
        return {}
    (out,) = area.fallback.outputs
    spec = out["data"]["application/vnd.plotly.v1+json"]
    return bars(go.Figure(spec["data"]))


def _ack(fig) -> None:
    """What plotly's front end sends after Plotly.newPlot drew a view (its layout back to Python)."""
    fig._js2py_layoutDelta = {"layout_delta": {"width": 700}, "layout_edit_id": fig._last_layout_edit_id}


@pytest.mark.parametrize("make", [lambda: widgets.ResultsExplorer(RESULTS),
                                  lambda: widgets.AblationExplorer(_ablation_results())])
def test_plot_that_did_not_initialise_falls_back_to_a_static_figure(monkeypatch, make):
    """Issue 14.7: no front-end view drew the widget within the timeout (anywidget's 2 s init on a loaded
    machine): the same figure appears statically, follows the controls, and goes once the widget draws."""
    import time

    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    ex = make()
    assert widgets.show(ex, headless=False, timeout_s=0.05) is ex.widget
    assert ex.area.box in ex.widget.children and ex.area.fallback in ex.area.box.children
    deadline = time.monotonic() + 10
    while not ex.area.fallback_shown and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ex.area.fallback_shown and _fallback_bars(ex.area) == bars(ex.figure) != {}
    before = bars(ex.figure)
    control = ex.controls[0]                      # runs (a multi-select) / the first switch (a checkbox)
    control.value = (control.options[0],) if isinstance(control.value, tuple) else not control.value
    assert bars(ex.figure) != before and _fallback_bars(ex.area) == bars(ex.figure)   # it follows the controls
    _ack(ex.figure)                                     # the widget finally drew: the fallback goes
    assert ex.area.drawn and not ex.area.fallback_shown and ex.area.fallback.outputs == ()
    control.value = (control.options[-1],) if isinstance(control.value, tuple) else not control.value
    assert ex.area.fallback.outputs == ()


def test_a_widget_that_draws_in_time_gets_no_fallback(monkeypatch):
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    ex = widgets.ResultsExplorer(RESULTS)
    _ack(ex.figure)
    widgets.show(ex, headless=False, timeout_s=0.01)
    assert ex.area.check() is False and ex.area.fallback.outputs == ()
