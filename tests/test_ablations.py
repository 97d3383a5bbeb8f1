"""Ablation grids: expansion counts, validation errors, run/resume with a pluggable run_fn, delta math."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from kalm_lib import ablations as A
from kalm_lib import provenance
from kalm_lib.ablations import cli as ablate_cli
from kalm_lib.ablations.cli import cli_main
from kalm_lib.config import ConfigError

GRIDS = Path(__file__).resolve().parent.parent / "configs" / "ablations"

TASKS = {"t_ret1": "retrieval", "t_ret2": "retrieval", "t_sts": "sts"}


def toy_run_fn(cell_config: dict, seed: int) -> dict:
    """A deterministic stand-in for training + evaluation: the score depends on the overrides and seed."""
    o = cell_config["overrides"]
    base = 0.5 + 0.01 * seed
    penalty = 0.1 * (o.get("loss.focal_gamma", 0.5) == 0.0) + 0.05 * (o.get("loss.mix_mode") == "none")
    return {t: {"score": base - penalty + 0.1 * i, "task_type": tt} for i, (t, tt) in enumerate(TASKS.items())}


# ------------------------------------------------------------------------------ expansion and validation
def test_one_at_a_time_expansion_counts_and_overrides():
    spec = A.load_grid({"seeds": [0, 1, 2], "base_overrides": {"model.name": "minilm"}, "switches": {
        "focal": [False], "hard_negative_mixing": ["off", "pairwise", "listwise"], "temperature": [0.02, 0.05]}})
    cells = A.expand(spec)
    # full + focal(1) + mixing(3 listed, 1 is the full recipe's -> 2) + temperature(2)
    assert [c.name for c in cells] == ["full", "focal=off", "hard_negative_mixing=off",
                                       "hard_negative_mixing=listwise", "temperature=0.02", "temperature=0.05"]
    assert len(A.expand_runs(spec)) == 6 * 3
    full, focal_off, mix_off = cells[0].overrides, cells[1].overrides, cells[2].overrides
    assert full == {"model.name": "minilm", "loss.focal_gamma": 0.5, "loss.mix_mode": "pairwise",
                    "loss.temperature": 0.01}
    assert focal_off == {**full, "loss.focal_gamma": 0.0}
    assert mix_off == {**full, "loss.mix_mode": "none"}
    assert cells[0].is_baseline and not cells[1].is_baseline
    spec = A.load_grid({"switches": {"stage1": [False], "soup": ["best_single"]},
                        "base_overrides": {"model.name_or_path": "minilm"}})
    trainer, adapter = A.split_overrides(A.expand(spec)[1].overrides)
    assert trainer == {"model.name_or_path": "minilm"}
    assert adapter == {"stages.pretrain.enabled": False, "soup.mode": "soup"}


def test_factorial_and_yaml_off_and_baseline_values():
    # the architectural claim as a 2x2: attention x pooling (full recipe = bidirectional + mean)
    spec = A.load_grid({"design": "factorial", "seeds": [0, 1],
                        "switches": {"bidirectional": [True, False], "pooling": ["mean", "last"]}})
    cells = A.expand(spec)
    assert len(cells) == 4 and cells[0].name == "full"
    assert {c.name for c in cells} == {"full", "pooling=last", "bidirectional=off",
                                       "bidirectional=off,pooling=last"}
    assert cells[-1].overrides == {"model.bidirectional": False, "model.pooling": "last"}
    # full recipe outside the listed product: added once
    spec = A.load_grid({"design": "factorial", "switches": {"temperature": [0.02, 0.05], "focal": [False]}})
    assert len(A.expand(spec)) == 2 + 1
    # YAML reads a bare `off` as false: still the 'off' choice
    spec = A.load_grid(yaml.safe_load("switches: {hard_negative_mixing: [off]}\nbaseline: {focal_gamma: 0.25}"))
    assert A.expand(spec)[1].overrides["loss.mix_mode"] == "none"
    assert A.expand(spec)[0].overrides == {"loss.mix_mode": "pairwise", "loss.focal_gamma": 0.25}
    # focal reads focal_gamma from the same cell
    spec = A.load_grid({"switches": {"focal": [False], "focal_gamma": [1.0]}})
    assert [c.overrides["loss.focal_gamma"] for c in A.expand(spec)] == [0.5, 0.0, 1.0]


@pytest.mark.parametrize("grid, match", [
    ({"switches": {"focal_loss": [False]}}, r"unknown switch\(es\) \['focal_loss'\]; known switches: \[.*'focal'"),
    ({"switches": {"focal": [False]}, "baseline": {"mixing": "off"}}, r"unknown switch\(es\) \['mixing'\]"),
    ({"switches": {"hard_negative_mixing": ["triplewise"]}},
     r"switch hard_negative_mixing takes one of \['off', 'pairwise', 'listwise'\], got 'triplewise'"),
    ({"switches": {"temperature": ["warm"]}}, r"switch temperature takes a number, got 'warm'"),
    ({"switches": {"focal": ["maybe"]}}, r"switch focal takes true/false"),
    ({"switches": {"architecture": ["causal_last"], "pooling": ["last"]}},
     r"switches architecture and pooling both set model\.pooling"),
    ({"switches": {"focal": [False]}, "seeds": [1, 1]}, r"seeds must be a non-empty list without repeats"),
    ({"switches": {"focal": []}}, r"switch focal lists no values"),
    ({"switches": {}}, r"varies no switch"),
    ({"switches": {"focal": [False]}, "desgin": "factorial"}, r"unknown key\(s\) \['desgin'\]"),
])
def test_bad_grids_are_errors(grid, match):
    with pytest.raises(ConfigError, match=match):  # GridError is a ConfigError
        A.load_grid(grid)


def test_shipped_grid_files_are_valid():
    files = sorted(GRIDS.glob("*.yaml"))
    assert files, "configs/ablations/ holds no grid"
    for f in files:
        spec = A.load_grid(f)
        assert len(A.expand(spec)) >= 2, f


def test_grids_are_found_by_the_one_config_resolver(tmp_path, monkeypatch):
    by_name = A.load_grid("smoke")
    assert by_name == A.load_grid(GRIDS / "smoke.yaml") == A.load_grid("configs/ablations/smoke.yaml")
    assert by_name.name == "smoke"
    monkeypatch.chdir(tmp_path)   # a notebook's working directory: repo-relative paths still resolve
    assert A.load_grid("configs/ablations/smoke.yaml") == by_name
    with pytest.raises(FileNotFoundError, match=r"config not found: nope .*known ablations configs: \[.*'smoke'"):
        A.load_grid("nope")
    # a dict grid is not modified by the checks (they normalise a copy)
    raw = {"switches": {"hard_negative_mixing": [False]}}
    assert A.expand(A.load_grid(raw))[1].switches["hard_negative_mixing"] == "off"
    assert raw == {"switches": {"hard_negative_mixing": [False]}}


# ------------------------------------------------------------------------------ running and resuming
def test_run_grid_writes_results_and_resumes(tmp_path):
    spec = A.load_grid({"seeds": [0, 1], "switches": {"focal": [False], "hard_negative_mixing": ["off"]}})
    calls = []

    def counted(cfg, seed):
        calls.append((cfg["cell"], seed))
        return toy_run_fn(cfg, seed)

    df = A.run_grid(spec, counted, tmp_path, progress=False)
    assert len(calls) == 3 * 2 and len(df) == 3 * 2 * len(TASKS)
    on_disk = pd.read_csv(tmp_path / "ablations" / "results.csv")
    assert len(on_disk) == len(df)
    assert set(on_disk.columns) >= {"cell", "seed", "task", "task_type", "score", "sw.focal",
                                    "sw.hard_negative_mixing"}
    row = on_disk[(on_disk.cell == "focal=off") & (on_disk.seed == 1) & (on_disk.task == "t_sts")].iloc[0]
    assert row.score == pytest.approx(0.5 + 0.01 - 0.1 + 0.2) and row.task_type == "sts" and row["sw.focal"] == "off"
    assert A.provenance_path(tmp_path, spec.name) == tmp_path / "ablations" / "provenance" / "grid.json"
    assert A.provenance_path(tmp_path, spec.name).is_file()

    # a second call finds every run done; a new seed runs only its own cells
    A.run_grid(spec, counted, tmp_path, progress=False)
    assert len(calls) == 6
    df = A.run_grid(spec, counted, tmp_path, seeds=[0, 1, 2], progress=False)
    assert len(calls) == 9 and sorted(set(df.seed)) == [0, 1, 2]

    # a different runner (or runner settings) re-runs everything and replaces the old rows
    def other(cfg, seed):
        calls.append(("other", cfg["cell"], seed))
        return {t: 0.0 for t in TASKS}
    again = A.run_grid(spec, other, tmp_path, progress=False)
    assert len(calls) == 9 + 6 and len(again) == 6 * len(TASKS) and set(again.score) == {0.0}
    assert len(pd.read_csv(tmp_path / "ablations" / "results.csv")) == 6 * len(TASKS)
    runner = A.TrainerRunFn("ft.yaml", tmp_path, eval_overrides=["tasks=[a]"])
    changed = A.TrainerRunFn("ft.yaml", tmp_path, eval_overrides=["tasks=[b]"])
    assert provenance.config_hash(runner.signature()) != provenance.config_hash(changed.signature())

    agg = A.aggregate(df, level="mtk")
    focal = agg[agg.cell == "focal=off"].iloc[0]
    assert focal.delta_mean == pytest.approx(-0.1) and focal.delta_std == pytest.approx(0.0, abs=1e-12)
    assert focal.n == 3


def test_two_grids_share_results_and_aggregate_separately(tmp_path):
    recipe = A.load_grid({"name": "recipe", "seeds": [0, 1], "switches": {"focal": [False]}})
    arch = A.load_grid({"name": "arch", "seeds": [0], "switches": {"bidirectional": [False]}})

    def arch_fn(cfg, seed):  # causal attention costs 0.3 on every task
        return {t: {"score": 0.8 - 0.3 * (cfg["overrides"].get("model.bidirectional") is False), "task_type": tt}
                for t, tt in TASKS.items()}

    seen = []
    A.run_grid(recipe, lambda c, s: seen.append(c["grid"]) or toy_run_fn(c, s), tmp_path, progress=False)
    got_arch = A.run_grid(arch, arch_fn, tmp_path, progress=False)
    assert set(seen) == {"recipe"} and set(got_arch.grid) == {"arch"} and len(got_arch) == 2 * len(TASKS)
    both = A.read_results(tmp_path)
    # the second grid kept the first grid's rows: 2 cells x 2 seeds + 2 cells x 1 seed
    assert len(both) == (2 * 2 + 2) * len(TASKS)
    assert len(A.read_results(tmp_path, grid="recipe")) == 2 * 2 * len(TASKS)
    with pytest.raises(ValueError, match=r"no rows of grid 'nope' \(grids: \['arch', 'recipe'\]\)"):
        A.read_results(tmp_path, grid="nope")
    # re-running (resuming) one grid leaves the other's rows alone
    A.run_grid(recipe, toy_run_fn, tmp_path, progress=False)
    assert len(A.read_results(tmp_path)) == len(both)

    agg = A.aggregate(both, level="mtk").set_index(["grid", "cell"])
    assert agg.loc[("arch", "bidirectional=off"), "delta_mean"] == pytest.approx(-0.3)
    assert agg.loc[("recipe", "focal=off"), "delta_mean"] == pytest.approx(-0.1)   # toy_run_fn's focal penalty
    assert agg.loc[("recipe", "full"), "n"] == 2 and agg.loc[("arch", "full"), "n"] == 1
    fig = A.delta_figure(A.aggregate(both, level="mtk"))
    assert list(fig.data[0].x) == ["recipe · focal=off", "arch · bidirectional=off"]
    assert A.provenance_path(tmp_path, "arch").is_file() and A.provenance_path(tmp_path, "recipe").is_file()


def test_bad_scores_are_errors(tmp_path):
    spec = A.load_grid({"switches": {"focal": [False]}})
    with pytest.raises(A.GridError, match=r"cell full, seed 0, task x: score nan is not a finite number"):
        A.run_grid(spec, lambda c, s: {"x": float("nan")}, tmp_path, progress=False)
    with pytest.raises(A.GridError, match="no scores"):
        A.run_grid(spec, lambda c, s: {}, tmp_path, progress=False)


def test_cli_dry_run_run_and_unknown_switch(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"seeds": [0, 1], "switches": {"focal": [False]}}))
    assert cli_main(["--grid", str(grid), "--dry-run"]) == 0
    assert "2 cells x 2 seeds = 4 runs" in capsys.readouterr().out
    assert cli_main(["--grid", str(grid), "--run-dir", str(tmp_path / "r"),
                       "--runner", "test_ablations:toy_run_fn"]) == 0
    assert len(pd.read_csv(tmp_path / "r" / "ablations" / "results.csv")) == 2 * 2 * len(TASKS)
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"switches": {"focal": [False], "warp_drive": [True]}}))
    assert cli_main(["--grid", str(bad), "--run-dir", str(tmp_path / "r2"),
                       "--runner", "test_ablations:toy_run_fn"]) == 2
    assert "unknown switch(es) ['warp_drive']" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()  # nothing was run or written


# ------------------------------------------------------------------------------ delta / spread math
def _table(rows):
    return pd.DataFrame([{"cell": c, "seed": s, "task": t, "task_type": TASKS[t], "score": v}
                         for c, s, t, v in rows])


RAW = {  # cell -> seed -> [t_ret1, t_ret2, t_sts]
    "full": {0: [0.50, 0.70, 0.40], 1: [0.60, 0.80, 0.50]},
    "focal=off": {0: [0.40, 0.70, 0.50], 1: [0.45, 0.90, 0.30]},
}


def test_aggregate_matches_hand_computation():
    df = _table([(c, s, t, v) for c, seeds in RAW.items() for s, vals in seeds.items()
                 for t, v in zip(TASKS, vals)])
    # MTK per seed: mean over the 3 tasks; delta paired by seed
    d_mtk = [statistics.mean(RAW["focal=off"][s]) - statistics.mean(RAW["full"][s]) for s in (0, 1)]
    assert d_mtk == pytest.approx([0.0, -1 / 12])  # by hand: 1.6/3-1.6/3, 1.65/3-1.9/3
    got = A.aggregate(df, level="mtk").set_index("cell")
    assert got.loc["focal=off", "delta_mean"] == pytest.approx(statistics.mean(d_mtk))
    assert got.loc["focal=off", "delta_std"] == pytest.approx(statistics.stdev(d_mtk))
    assert got.loc["focal=off", "delta_std"] == pytest.approx((1 / 12) / math.sqrt(2))
    assert got.loc["focal=off", "n"] == 2
    assert got.loc["full", "delta_mean"] == 0.0 and got.loc["full", "score_mean"] == pytest.approx(1.75 / 3)

    # MTY per seed: mean of (retrieval mean, sts)
    def mty(v):
        return (statistics.mean(v[:2]) + v[2]) / 2
    d_mty = [mty(RAW["focal=off"][s]) - mty(RAW["full"][s]) for s in (0, 1)]
    assert d_mty == pytest.approx([0.025, -0.1125])
    got = A.aggregate(df, level="mty").set_index("cell")
    assert got.loc["focal=off", "delta_mean"] == pytest.approx(-0.04375)
    assert got.loc["focal=off", "delta_std"] == pytest.approx(statistics.stdev(d_mty))

    # per task type and per task
    got = A.aggregate(df, level="task_type").set_index(["cell", "group"])
    assert got.loc[("focal=off", "sts"), "delta_mean"] == pytest.approx(((0.5 - 0.4) + (0.3 - 0.5)) / 2)
    assert got.loc[("focal=off", "retrieval"), "delta_std"] == pytest.approx(
        statistics.stdev([(0.4 + 0.7 - 0.5 - 0.7) / 2, (0.45 + 0.9 - 0.6 - 0.8) / 2]))
    got = A.aggregate(df, level="task").set_index(["cell", "group"])
    assert got.loc[("focal=off", "t_ret2"), "delta_mean"] == pytest.approx(0.05)

    # seeds are paired: a seed the baseline lacks is not counted
    extra = pd.concat([df, _table([("focal=off", 7, t, 0.0) for t in TASKS])])
    assert A.aggregate(extra, level="mtk").set_index("cell").loc["focal=off", "n"] == 2
    with pytest.raises(ValueError, match="baseline cell 'nope' is not in the results"):
        A.aggregate(df, baseline="nope")


def test_deltas_are_paired_by_seed_not_spread_of_a_cells_own_scores():
    """Seeds move every cell alike (here by up to 9 points); the paired delta's spread removes that shared
    variation, the unpaired spread of a cell's own scores does not (issue 11: -0.9 ± 0.1, not ± 4.1)."""
    rng = np.random.default_rng(0)
    seed_effect = {s: 9.0 * rng.random() for s in range(5)}
    noise = {s: 0.1 * rng.standard_normal() for s in range(5)}
    rows = [(c, s, t, 50.0 + seed_effect[s] + (-0.9 + noise[s] if c == "focal=off" else 0.0))
            for c in ("full", "focal=off") for s in range(5) for t in TASKS]
    df = _table(rows)
    got = A.aggregate(df, level="mtk").set_index("cell").loc["focal=off"]
    deltas = [-0.9 + noise[s] for s in range(5)]
    assert got.delta_mean == pytest.approx(statistics.mean(deltas))
    assert got.delta_std == pytest.approx(statistics.stdev(deltas)) and got.n == 5
    unpaired = statistics.stdev([50.0 + seed_effect[s] - 0.9 + noise[s] for s in range(5)])
    assert got.delta_std < 0.2 < 1.0 < unpaired
    # the notebook's table is the same numbers, baseline rows left out
    table = A.delta_table(df, ("mtk", "mty")).set_index(["level", "cell"])
    assert list(table.index) == [("mtk", "focal=off"), ("mty", "focal=off")]
    assert table.loc[("mtk", "focal=off"), "delta_std"] == got.delta_std
    assert list(A.aggregate(df).columns) == A.AGGREGATE_COLUMNS


def test_aggregate_needs_only_the_columns_of_its_level():
    df = _table([(c, s, t, v) for c, seeds in RAW.items() for s, vals in seeds.items()
                 for t, v in zip(TASKS, vals)])
    bare = df.drop(columns=["task_type"])   # e.g. a results table written without task types
    pd.testing.assert_frame_equal(A.aggregate(bare, level="mtk"), A.aggregate(df, level="mtk"))
    pd.testing.assert_frame_equal(A.aggregate(bare, level="task"), A.aggregate(df, level="task"))
    with pytest.raises(ValueError, match=r"lack column\(s\) \['task_type'\] needed at level 'mty'"):
        A.aggregate(bare, level="mty")


def test_delta_figure_bars_and_error_bars():
    df = _table([(c, s, t, v) for c, seeds in RAW.items() for s, vals in seeds.items()
                 for t, v in zip(TASKS, vals)])
    agg = A.aggregate(df, level="task_type")
    fig = A.delta_figure(agg)
    assert [tr.name for tr in fig.data] == ["retrieval", "sts"]
    sts = fig.data[1]
    assert list(sts.x) == ["focal=off"]  # the baseline is not drawn against itself
    assert sts.y[0] == pytest.approx(-0.05)
    # error bars: the 95% Student t interval of the mean of the 2 paired deltas (+0.1, -0.2), not their std
    low, high = stats.t.interval(0.95, 1, loc=-0.05, scale=statistics.stdev([0.1, -0.2]) / math.sqrt(2))
    assert sts.error_y.array[0] == pytest.approx(high + 0.05) and high + 0.05 > 5 * statistics.stdev([0.1, -0.2])
    assert list(sts.text) == ["unresolved · n=2"]   # the interval covers 0


def test_runner_from_module_or_file_and_bad_runner(tmp_path):
    assert A.load_run_fn("test_ablations:toy_run_fn") is toy_run_fn
    f = tmp_path / "my_runner.py"
    f.write_text("def run(cell_config, seed):\n    return {'t': seed / 10}\n")
    assert A.load_run_fn(f"{f}:run")({}, 3) == {"t": 0.3}
    for bad, match in [("nocolon", "must look like"), ("kalm_lib.nope:fn", "cannot be loaded"),
                       (f"{tmp_path}/absent.py:run", "cannot be loaded"), (f"{f}:absent", "cannot be loaded")]:
        with pytest.raises(A.GridError, match=match):
            A.load_run_fn(bad)


# ------------------------------------------------------------------------------ the real trainer as run_fn
def _records(n: int):
    topics = ["apple pie recipe", "football match", "stock market", "rainy weather", "guitar chords",
              "python code", "mountain hiking", "coffee beans"]
    return [{"id": f"r{i}", "query": f"question about {topics[i % 8]} {i}", "pos": [f"text on {topics[i % 8]}"],
             "neg": [f"text on {topics[(i + 1) % 8]}", f"text on {topics[(i + 3) % 8]}"],
             "task_type": "retrieval", "category": "toy", "instruction": "Find the text", "lang": "en",
             "source": "test"} for i in range(n)]


def test_trainer_run_fn_trains_each_cell_with_its_overrides(tmp_path):
    import json

    from kalm_lib.model import EmbeddingModel

    data = tmp_path / "finetune.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(16)))
    config = {"stage": "finetune", "model": {"name_or_path": "tiny:qwen2", "max_length": 24},
              "loss": {"num_hard_negatives": 2, "num_mix": 1, "mix_mode": "pairwise"},
              "data": {"train_file": str(data)},
              "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3}, "log": {"progress_bar": False}}
    seen = []

    def evaluate_fn(model_dir, out_dir):  # real encoding of the trained model: top-1 accuracy on 8 queries
        m = EmbeddingModel.from_pretrained(str(model_dir))
        seen.append((model_dir, m.bidirectional, m.pooling))
        recs = _records(8)
        q = m.encode([r["query"] for r in recs])
        d = m.encode([r["pos"][0] for r in recs])
        return {"toy_top1": {"score": float(((q @ d.T).argmax(1) == range(8)).mean()), "task_type": "retrieval"}}

    spec = A.load_grid({"seeds": [0], "base_overrides": {"model.name_or_path": "tiny:qwen2"},
                        "switches": {"architecture": ["causal_last"]}})
    run_fn = A.TrainerRunFn(config, tmp_path / "run", evaluate_fn=evaluate_fn)
    df = A.run_grid(spec, run_fn, tmp_path / "run", progress=False)
    assert list(df.cell) == ["full", "architecture=causal_last"]
    assert 0.0 <= df.score.min() and df.score.max() <= 1.0
    # each cell trained its own model, with the architecture its overrides asked for
    assert [(b, p) for _, b, p in seen] == [(True, "mean"), (False, "last")]
    assert seen[1][0] == run_fn.cell_dir("architecture=causal_last", 0, "grid") / "finetune" / "final"
    assert run_fn.cell_dir("architecture=causal_last", 0, "grid") == \
        tmp_path / "run" / "ablations" / "cells" / "grid" / "architecture=causal_last" / "seed0"
    # once scored, a cell's model folders are deleted (keep_models=False); its logs stay
    assert not seen[0][0].exists() and not list(seen[0][0].parent.glob("checkpoint-*"))
    assert (seen[1][0].parent / "metrics.jsonl").is_file()

    with pytest.raises(A.GridError, match="stage1 needs a pretrain_config"):
        A.run_grid(A.load_grid({"switches": {"stage1": [False]}}), run_fn, tmp_path / "r2", progress=False)
    assert not (tmp_path / "r2").exists()


def test_stage1_switch_without_per_cell_pretraining_starts_from_the_config_model(tmp_path):
    """No pretrain_config: cells start from the run's stage-1 model (finetune_overrides) and ``stage1`` off starts
    from the fine-tuning config's own model instead; both starts are real model folders, trained from."""
    from kalm_lib.model import EmbeddingModel

    data = tmp_path / "finetune.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(8)))
    base, stage1 = tmp_path / "base", tmp_path / "run" / "train" / "pretrain" / "final"
    EmbeddingModel.tiny_decoder("qwen2", seed=0, max_length=24).save(base)
    EmbeddingModel.tiny_decoder("qwen2", seed=1, max_length=24).save(stage1)
    config = tmp_path / "ft.yaml"
    config.write_text(f"stage: finetune\nmodel: {{name_or_path: {base}, max_length: 24}}\n"
                      f"loss: {{num_hard_negatives: 1}}\ndata: {{train_file: {data}}}\n"
                      "train: {max_steps: 1, batch_size: 4, lr: 1.0e-3}\nlog: {progress_bar: false}\n")
    starts = []

    def fake_train(cfg):   # record each cell's start, then train for real
        starts.append(cfg.model.name_or_path)
        return real_train(cfg)

    from kalm_lib import train as trainer
    real_train = trainer.train
    spec = A.load_grid({"seeds": [0], "switches": {"stage1": [False]}})
    run_fn = A.TrainerRunFn(str(config), tmp_path / "run", evaluate_fn=lambda m, o: {"t": 0.0},
                            finetune_overrides={"model.name_or_path": str(stage1)})
    trainer.train = fake_train
    try:
        df = A.run_grid(spec, run_fn, tmp_path / "run", progress=False)
    finally:
        trainer.train = real_train
    assert list(df.cell) == ["full", "stage1=off"] and starts == [str(stage1), str(base)]
    # starting from the config's own model in every cell would make on and off the same: refused
    same = A.TrainerRunFn(str(config), tmp_path / "run3", evaluate_fn=lambda m, o: {"t": 0.0})
    with pytest.raises(A.GridError, match="stage1 needs a pretrain_config"):
        A.run_grid(spec, same, tmp_path / "run3", progress=False)


def test_trainer_runner_refuses_cells_the_train_config_rejects_before_any_work(tmp_path):
    """Knob values are validated once, by kalm_lib.train's config checks, for every cell before training."""
    data = tmp_path / "finetune.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(4)))
    config = {"stage": "finetune", "model": {"name_or_path": "tiny:qwen2"}, "data": {"train_file": str(data)},
              "train": {"max_steps": 1, "batch_size": 2}}
    trained = []

    def evaluate_fn(model_dir, out_dir):
        trained.append(model_dir)
        return {"t": 0.0}

    for switches, match in [({"temperature": [0]}, r"cell temperature=0.0: .*loss.temperature.*must be > 0"),
                            ({"focal_gamma": [-1]}, r"cell focal_gamma=-1.0: .*loss.focal_gamma.*must be >= 0"),
                            ({"matryoshka": [[0, 8]]}, r"cell matryoshka=\[0,8\]: .*loss.matryoshka_dims")]:
        spec = A.load_grid({"switches": switches})   # the grid itself only checks each value's form
        run_fn = A.TrainerRunFn(config, tmp_path / "run", evaluate_fn=evaluate_fn)
        with pytest.raises(A.GridError, match=match):
            A.run_grid(spec, run_fn, tmp_path / "run", progress=False)
    assert not trained and not (tmp_path / "run").exists()


def test_make_run_fn_trainer_uses_the_run_dirs_curated_data(tmp_path):
    with pytest.raises(A.GridError, match="runner 'trainer' needs a finetune_config"):
        A.make_run_fn("trainer", tmp_path)
    (tmp_path / "curated").mkdir()
    (tmp_path / "curated" / "finetune.jsonl").write_text("{}\n")
    fn = A.make_run_fn("trainer", tmp_path, finetune_config="cpu-demo/finetune",
                       train_overrides={"train.max_steps": 3})
    assert fn.finetune_overrides == {"train.max_steps": 3,
                                     "data.train_file": str(tmp_path / "curated" / "finetune.jsonl")}
    assert fn.pretrain_overrides == {"train.max_steps": 3}  # no curated/pretrain.jsonl here
    assert A.make_run_fn("test_ablations:toy_run_fn", tmp_path) is toy_run_fn


def test_make_run_fn_finds_configs_with_the_one_resolver(tmp_path, monkeypatch):
    want = provenance.REPO_ROOT / "configs" / "train" / "cpu-demo" / "finetune.yaml"
    monkeypatch.chdir(tmp_path)   # notebooks run from notebooks/: repo-relative paths and names both resolve
    for spec in ("configs/train/cpu-demo/finetune.yaml", "cpu-demo/finetune", str(want)):
        fn = A.make_run_fn("trainer", tmp_path, finetune_config=spec, eval_config="quick")
        assert fn.finetune_config == str(want) and fn.pretrain_config is None
        assert fn.eval_config == str(provenance.REPO_ROOT / "configs" / "eval" / "quick.yaml")
    with pytest.raises(FileNotFoundError, match=r"config not found: configs/train/x.yaml"):  # before any work
        A.make_run_fn("trainer", tmp_path, finetune_config="configs/train/x.yaml")


def test_cli_overrides_use_the_one_override_syntax(tmp_path, monkeypatch):
    seen = {}

    def fake_make_run_fn(runner, run_dir, **kwargs):
        seen.update(kwargs["train_overrides"])
        return toy_run_fn

    monkeypatch.setattr(ablate_cli, "make_run_fn", fake_make_run_fn)
    assert cli_main(["--grid", "smoke", "--run-dir", str(tmp_path), "-o", "loss.temperature=5e-2",
                     "-o", "train.max_steps=3", "-o", "loss.matryoshka_dims=[8, 16]"]) == 0
    assert seen == {"loss.temperature": 0.05, "train.max_steps": 3, "loss.matryoshka_dims": [8, 16]}
    assert type(seen["loss.temperature"]) is float   # YAML 1.1 alone would read "5e-2" as a string
    assert cli_main(["--grid", "smoke", "--run-dir", str(tmp_path), "-o", "no-equals-sign"]) == 2


def test_soup_switch_scores_the_uniform_soup_or_the_best_checkpoint(tmp_path):
    import json

    import torch
    from safetensors.torch import load_file

    data = tmp_path / "finetune.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(16)))
    config = {"stage": "finetune", "model": {"name_or_path": "tiny:qwen2", "max_length": 24},
              "data": {"train_file": str(data)}, "checkpoint": {"every_steps": 1, "keep_last": 3},
              "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2}, "log": {"progress_bar": False}}
    KEY = "embed_tokens.weight"
    seen = {}

    def weights(model_dir):
        return load_file(str(Path(model_dir) / "model.safetensors"))

    def evaluate_fn(model_dir, out_dir):  # a score read off the weights, so the test can recompute it
        w = weights(model_dir)
        key = next(k for k in w if k.endswith(KEY))
        seen[str(model_dir)] = w
        out_dir.mkdir(parents=True, exist_ok=True)
        return {"w": {"score": float(w[key].double().sum()), "task_type": "sts"}}

    spec = A.load_grid({"name": "g", "seeds": [0], "switches": {"soup": ["best_single"]}})
    run_fn = A.TrainerRunFn(config, tmp_path / "run", evaluate_fn=evaluate_fn, keep_models=True)
    df = A.run_grid(spec, run_fn, tmp_path / "run", progress=False).set_index("cell")
    cells = {c: run_fn.cell_dir(c, 0, "g") for c in ("full", "soup=best_single")}

    # full recipe = the uniform soup of the three checkpoints, element for element
    ckpts = [weights(cells["full"] / "finetune" / f"checkpoint-{s}") for s in (1, 2, 3)]
    soup = weights(cells["full"] / "soup")
    for k in soup:
        want = torch.stack([c[k].double() for c in ckpts]).mean(0)
        torch.testing.assert_close(soup[k].double(), want, rtol=0, atol=1e-6)
    assert str(cells["full"] / "soup") in seen
    key = next(k for k in soup if k.endswith(KEY))
    assert df.loc["full", "score"] == pytest.approx(float(soup[key].double().sum()))
    # best single = the checkpoint with the highest score, each scored into its own folder
    singles = {s: float(weights(cells["soup=best_single"] / "finetune" / f"checkpoint-{s}")[key].double().sum())
               for s in (1, 2, 3)}
    assert df.loc["soup=best_single", "score"] == pytest.approx(max(singles.values()))
    assert all((cells["soup=best_single"] / "eval" / f"checkpoint-{s}").is_dir() for s in (1, 2, 3))
    assert len(set(singles.values())) == 3   # the checkpoints really differ

    # too few checkpoints kept: refused before any training
    few = {**config, "checkpoint": {"every_steps": 0}}
    with pytest.raises(A.GridError, match=r"needs >= 2 fine-tuning checkpoints per cell; the finetune config "
                                          r"keeps 0 \(checkpoint.every_steps=0"):
        A.run_grid(spec, A.TrainerRunFn(few, tmp_path / "r3", evaluate_fn=evaluate_fn), tmp_path / "r3",
                   progress=False)
    assert not (tmp_path / "r3").exists()


def test_every_preset_ablation_stage_passes_the_runner_checks(tmp_path):
    """The grids the presets run (GPU included) are accepted by the trainer runner before any work."""
    from kalm_lib import pipeline

    checked = []
    for preset in sorted((GRIDS.parent / "presets").glob("*.yaml")):
        for name, stage in yaml.safe_load(preset.read_text())["stages"].items():
            notebook = stage.get("notebook") or pipeline.STAGE_NOTEBOOKS.get(name)
            if notebook != "05_ablations.ipynb":
                continue
            p = stage.get("parameters", {})
            spec = A.load_grid(p.get("grid", "smoke"))
            run_fn = A.make_run_fn(p.get("runner", "trainer"), tmp_path,
                                   finetune_config=p.get("finetune_config", "configs/train/cpu-demo/finetune.yaml"),
                                   pretrain_config=p.get("pretrain_config"),
                                   train_overrides=p.get("train_overrides"),
                                   run_dir_paths=p.get("run_dir_paths"))
            run_fn.check(spec)
            checked.append((preset.stem, name))
    assert {("cpu-demo", "ablate"), ("cpu-demo", "ablate_architecture"), ("gpu-qwen2-0.5b", "ablate"),
            ("smoke", "ablate")} <= set(checked)
