"""Honest figures (issue 14.4): one panel per training metric, every ablation delta with its interval and seed
count ("unresolved" when the interval covers zero), and the soup's held-apart scores kept apart from the tasks
its search selected on."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from scipy import stats

from kalm_lib import report as rp


def _metrics(run: Path, stage: str, rows: list[dict]) -> None:
    (run / "train" / stage).mkdir(parents=True, exist_ok=True)
    (run / "train" / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_one_panel_per_training_metric(tmp_path):
    run = tmp_path / "run"
    _metrics(run, "finetune", [{"step": s, "loss": 1.0 / (s + 1), "lr": 1e-5, "memory_mb": 570.0 + s,
                                "grad_norm": 2.0, "accuracy": float("nan"), "tokens_per_s": 900.0 + s}
                               for s in range(5)])
    _metrics(run, "pretrain", [{"step": s, "loss": 2.0 - 0.1 * s, "memory_mb": 1200.0} for s in range(5)])
    loaded = rp.load_run(run)
    metrics = rp.training_metrics([loaded])
    assert metrics[0] == "loss" and set(metrics) == {"loss", "lr", "memory_mb", "grad_norm", "tokens_per_s"}
    fig = rp.fig_training([loaded])
    assert [a.text for a in fig.layout.annotations] == metrics           # one titled panel per metric
    axes = {}
    for tr in fig.data:
        axes.setdefault(tr.yaxis, set()).add(tuple(tr.y))
    assert len(axes) == len(metrics)                                     # each metric on its own y axis
    loss_axis = next(tr.yaxis for tr in fig.data if list(tr.y)[:2] == [1.0, 0.5])
    memory_axis = next(tr.yaxis for tr in fig.data if list(tr.y)[0] == 570.0)
    assert loss_axis != memory_axis
    # both stages drawn in the loss panel, one legend entry per stage
    assert sum(tr.yaxis == loss_axis for tr in fig.data) == 2
    assert sorted(tr.name for tr in fig.data if tr.showlegend) == ["run/finetune", "run/pretrain"]


def _ablation_run(tmp_path: Path) -> Path:
    """Grid "tiny": a single-seed +0.004 cell (the issue's case); grid "real": three seeds, a clear -3 effect
    and a noisy cell whose interval covers zero."""
    run = tmp_path / "abl"
    (run / "ablations").mkdir(parents=True)
    rows = ["grid,cell,seed,task,task_type,score",
            "tiny,full,0,A,sts,60.000", "tiny,focal=off,0,A,sts,60.004"]
    for seed, (full, off, noisy) in enumerate([(60.0, 57.1, 61.0), (61.0, 58.0, 59.5), (59.0, 55.9, 60.2)]):
        rows += [f"real,full,{seed},A,sts,{full}", f"real,pooling=last,{seed},A,sts,{off}",
                 f"real,mixing=off,{seed},A,sts,{noisy}"]
    (run / "ablations" / "results.csv").write_text("\n".join(rows) + "\n")
    return run


def test_ablation_deltas_carry_interval_seed_count_and_resolution(tmp_path):
    run = _ablation_run(tmp_path)
    loaded = rp.load_run(run)
    fig = rp.fig_ablations([loaded])
    tiny, real = fig.data
    # the single-seed +0.004: grey, "unresolved · n=1", no error bar, on an axis spanning at least ±0.6 (1% of 60)
    i = list(tiny.x).index("focal=off")
    assert tiny.y[i] == pytest.approx(0.004)
    assert tiny.text[i] == "unresolved · n=1" and tiny.marker.color[i] == rp.figures.UNRESOLVED
    lo, hi = fig.layout.yaxis.range
    assert hi >= 0.6 and lo <= -0.6 and 0.004 / (hi - lo) < 0.01
    # three seeds: pooling=last is resolved (interval by hand: t_{0.975,2} * sd / sqrt(3)), mixing=off is not
    deltas = {"pooling=last": [57.1 - 60, 58 - 61, 55.9 - 59], "mixing=off": [1.0, -1.5, 1.2]}
    for cell, ds in deltas.items():
        k = list(real.x).index(cell)
        half = stats.t.ppf(0.975, 2) * statistics.stdev(ds) / 3 ** 0.5
        assert real.y[k] == pytest.approx(statistics.mean(ds))
        assert real.error_y.array[k] == pytest.approx(half)
    k_pool, k_mix = list(real.x).index("pooling=last"), list(real.x).index("mixing=off")
    assert real.text[k_pool] == "n=3" and real.marker.color[k_pool] == rp.figures.NEG
    assert real.text[k_mix] == "unresolved · n=3" and real.marker.color[k_mix] == rp.figures.UNRESOLVED
    lo2, hi2 = fig.layout.yaxis2.range
    assert hi2 >= abs(statistics.mean(deltas["pooling=last"])) + real.error_y.array[k_pool]
    # the HTML table marks the unresolved rows and keeps the interval columns
    page = rp.build_report([run], tmp_path / "r.html").read_text()
    assert "<td>focal=off</td>" in page and "<td class='unresolved n'>+0.00</td>" in page
    assert "<th>ci_low</th><th>ci_high</th><th>resolved</th>" in page


def _soup_run(tmp_path: Path) -> Path:
    """A run whose soup search selected on task S (held-apart task H), with eval results of the soup and of
    the fine-tuned model on S, H and K."""
    run = tmp_path / "souprun"
    (run / "soup").mkdir(parents=True)
    (run / "soup" / "soup.json").write_text(json.dumps({
        "recipe": "greedy", "scorer": "mteb:quick:instr=1:seed=42:KalmDev-STSB-en",
        "heldout_scorer": "mteb:quick:instr=1:seed=42:KalmDev-MRPC-en",
        "ingredients": [{"name": "a"}, {"name": "b"}], "weights": [0.6, 0.4],
        "chosen": {"source": "greedy", "weights": [0.6, 0.4], "score": 81.0, "tasks": {"KalmDev-STSB-en": 81.0}},
        "evaluations": [{"source": "ingredient", "weights": [1, 0], "score": 79.0, "tasks": {}},
                        {"source": "greedy", "weights": [0.6, 0.4], "score": 81.0, "tasks": {}}],
        "heldout": {"chosen": {"weights": [0.6, 0.4], "heldout_score": 70.0, "selection_score": 81.0,
                               "tasks": {"KalmDev-MRPC-en": 70.0}},
                    "best_ingredient": {"weights": [1, 0], "heldout_score": 70.5, "selection_score": 79.0,
                                        "tasks": {"KalmDev-MRPC-en": 70.5}},
                    "gain_selection": 2.0, "gain_heldout": -0.5},
        "provenance": {"config": {"scorer": "evaluate", "selection_tasks": ["KalmDev-STSB-en"]}}}))
    scores = {"kalm__soup-model": {"KalmDev-STSB-en": 0.81, "KalmDev-MRPC-en": 0.70, "KalmDev-Banking77-en": 0.60},
              "kalm__finetune-final": {"KalmDev-STSB-en": 0.79, "KalmDev-MRPC-en": 0.705,
                                       "KalmDev-Banking77-en": 0.62}}
    for model, tasks in scores.items():
        folder = run / "eval" / model / "rev"
        folder.mkdir(parents=True)
        for task, v in tasks.items():
            (folder / f"{task}.json").write_text(json.dumps({"task_name": task, "dataset_revision": "0",
                                                             "scores": {"test": [{"main_score": v}]}}))
        (folder / "kalm_eval.json").write_text(json.dumps({"config": {"quick": True}}))
    return run


def test_soup_held_apart_scores_are_kept_apart(tmp_path):
    run = _soup_run(tmp_path)
    loaded = rp.load_run(run)
    assert rp.soup_selection_tasks([loaded]) == ["KalmDev-STSB-en"]
    held = rp.heldout_frame(loaded.soup).set_index("soup")
    assert held.loc["chosen", "selection_score"] == 81.0 and held.loc["chosen", "heldout_score"] == 70.0
    assert set(held["selection_scope"]) == set(held["heldout_scope"]) == {"quick subset"}
    assert held.attrs == {"gain_selection": 2.0, "gain_heldout": -0.5}
    page = rp.build_report([run], tmp_path / "r.html").read_text()
    summary = page[page.index("<section id='summary'>"):]
    summary = summary[:summary.index("</section>")]
    held_part = summary[summary.index("Held-apart tasks"):summary.index("All tasks")]
    # held apart: MRPC (en, pair_classification) and Banking77 (en, classification) only, for both models
    soup_mtk, ft_mtk = (70.0 + 60.0) / 2, (70.5 + 62.0) / 2
    assert f"<td class='n'>{soup_mtk:.2f}</td>" in held_part and f"<td class='n'>{ft_mtk:.2f}</td>" in held_part
    assert f"<td class='n'>{(81 + 70 + 60) / 3:.2f}</td>" not in held_part          # the in-sample mean is not there
    assert f"<td class='n'>{(81 + 70 + 60) / 3:.2f}</td>" in summary                # ... it is in the all-tasks table
    assert "KalmDev-STSB-en (soup selection task)" in page                # the heatmap marks it
    soup = page[page.index("<section id='soup'>"):]
    assert "held-apart check" in soup and "<th>selection_score</th>" in soup and "<th>heldout_score</th>" in soup
    # said plainly: this soup (-0.5 held apart) did not beat its best ingredient
    assert "does NOT beat its best single ingredient on the held-apart tasks (-0.50)" in soup
    assert rp.sections.soup_verdict(0.3).startswith("The chosen soup beats its best single ingredient")
