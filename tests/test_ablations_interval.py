"""The 95% interval of each paired ablation delta and its `resolved` flag (issue 16), checked against scipy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kalm_lib import ablations as A

TASKS = {"t_ret": "retrieval", "t_sts": "sts", "t_cls": "classification"}
OLD_COLUMNS = ["cell", "group", "score_mean", "baseline_mean", "delta_mean", "delta_std", "n"]


def _toy_table(seed: int = 7) -> tuple[pd.DataFrame, dict[str, dict[int, float]]]:
    """Seeded noisy scores: a shared seed effect, a true effect per cell, noise per (cell, seed, task).
    Returns the table and each cell's MTK per seed (mean over the tasks), computed here by hand."""
    rng = np.random.default_rng(seed)
    effects = {"full": 0.0, "clear_loss": -0.9, "tiny_gain": 0.02, "one_seed": -0.5, "two_seeds": -0.3}
    seeds = {"full": range(5), "clear_loss": range(5), "tiny_gain": range(5), "one_seed": [0],
             "two_seeds": [1, 3]}
    seed_effect = {s: 5.0 * rng.random() for s in range(5)}
    rows, mtk = [], {}
    for cell, effect in effects.items():
        spread = 0.6 if cell == "tiny_gain" else 0.1
        for s in seeds[cell]:
            scores = [50.0 + seed_effect[s] + effect + spread * rng.standard_normal() for _ in TASKS]
            mtk.setdefault(cell, {})[s] = sum(scores) / len(scores)
            rows += [{"cell": cell, "seed": s, "task": t, "task_type": tt, "score": v}
                     for (t, tt), v in zip(TASKS.items(), scores)]
    return pd.DataFrame(rows), mtk


def test_interval_is_the_student_t_interval_of_the_paired_deltas():
    df, mtk = _toy_table()
    agg = A.aggregate(df, level="mtk").set_index("cell")
    outcomes = {}
    for cell in ("clear_loss", "tiny_gain", "two_seeds"):
        paired = sorted(set(mtk[cell]) & set(mtk["full"]))
        deltas = np.array([mtk[cell][s] - mtk["full"][s] for s in paired])
        n = len(deltas)
        low, high = stats.t.interval(0.95, n - 1, loc=deltas.mean(), scale=stats.sem(deltas))
        row = agg.loc[cell]
        assert row["n"] == n
        assert row["ci_low"] == pytest.approx(low, rel=1e-9, abs=1e-12)
        assert row["ci_high"] == pytest.approx(high, rel=1e-9, abs=1e-12)
        # resolved <=> the paired t-test rejects "no difference" at 5% <=> the interval excludes 0
        p = stats.ttest_rel([mtk[cell][s] for s in paired], [mtk["full"][s] for s in paired]).pvalue
        assert bool(row["resolved"]) == (p < 0.05)
        outcomes[cell] = bool(row["resolved"])
    # the seeded table holds both outcomes, so the flag is really tested
    assert outcomes == {"clear_loss": True, "tiny_gain": False, "two_seeds": outcomes["two_seeds"]}
    # one paired seed: no interval, never resolved; the baseline against itself: never resolved
    assert agg.loc["one_seed", "n"] == 1 and math.isnan(agg.loc["one_seed", "ci_low"])
    assert math.isnan(agg.loc["one_seed", "ci_high"]) and not agg.loc["one_seed", "resolved"]
    assert agg.loc["full", "ci_low"] == agg.loc["full", "ci_high"] == 0.0 and not agg.loc["full", "resolved"]


def test_interval_columns_are_added_and_the_old_columns_keep_their_values():
    df, _ = _toy_table()
    for level in A.LEVELS:
        agg = A.aggregate(df, level=level)
        assert list(agg.columns) == A.AGGREGATE_COLUMNS == [*OLD_COLUMNS, "ci_low", "ci_high", "resolved"]
        assert agg["resolved"].dtype == bool
        # the interval is centred on delta_mean and as wide as t * std / sqrt(n)
        ok = agg["n"] >= 2
        t = stats.t.ppf(0.975, agg.loc[ok, "n"] - 1)
        half = t * agg.loc[ok, "delta_std"] / np.sqrt(agg.loc[ok, "n"])
        np.testing.assert_allclose(agg.loc[ok, "ci_high"] - agg.loc[ok, "delta_mean"], half, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(agg.loc[ok, "delta_mean"] - agg.loc[ok, "ci_low"], half, rtol=1e-9, atol=1e-12)
        covers = (agg["ci_low"] <= 0) & (agg["ci_high"] >= 0)
        assert (agg["resolved"] == (ok & ~covers)).all()
    # several grids: each against its own baseline, with the interval too
    two = pd.concat([df.assign(grid="a"), df[df.cell.isin(["full", "clear_loss"])].assign(grid="b")])
    agg = A.aggregate(two, level="mtk").set_index(["grid", "cell"])
    assert agg.loc[("b", "clear_loss"), "ci_low"] == agg.loc[("a", "clear_loss"), "ci_low"]
    assert agg.loc[("b", "clear_loss"), "resolved"]


def test_delta_interval_is_the_one_computation():
    low, high, resolved = A.delta_interval([1.0, 1.0, 0.1, 2.0], [0.5, 0.5, 0.5, float("nan")], [4, 1, 4, 1])
    half = stats.t.ppf(0.975, 3) * 0.5 / 2
    np.testing.assert_allclose(low[[0, 2]], [1.0 - half, 0.1 - half])
    np.testing.assert_allclose(high[[0, 2]], [1.0 + half, 0.1 + half])
    assert np.isnan(low[[1, 3]]).all() and np.isnan(high[[1, 3]]).all()
    assert resolved.tolist() == [True, False, False, False]
    wider = A.delta_interval([1.0], [0.5], [4], confidence=0.99)
    assert wider[0][0] < low[0] and wider[1][0] > high[0]


def test_figure_draws_the_interval_and_labels_unresolved_cells_with_their_seed_count():
    df, _ = _toy_table()
    agg = A.aggregate(df, level="mtk")
    fig = A.delta_figure(agg)
    (bars,) = fig.data
    rows = agg.set_index("cell").loc[list(bars.x)]
    assert list(bars.x) == ["clear_loss", "tiny_gain", "one_seed", "two_seeds"]   # baseline not drawn
    np.testing.assert_allclose(bars.error_y.array, (rows["ci_high"] - rows["delta_mean"]).fillna(0.0))
    want = [f"n={n}" if ok else f"unresolved · n={n}" for n, ok in zip(rows["n"], rows["resolved"])]
    assert list(bars.text) == want
    assert want[:3] == ["n=5", "unresolved · n=5", "unresolved · n=1"]
