"""Cells as units of work (issues 12, 13): `--cell/--seed`, `--emit-commands` for a scheduler, `--parallel N`
(one cell per GPU; CPU threads split), and one-line errors for user mistakes in `kalm ablate`."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from kalm_lib import ablations as A
from kalm_lib.ablations import cli as ablate_cli
from kalm_lib.ablations import parallel
from kalm_lib.ablations.cli import cli_main

ROOT = Path(__file__).resolve().parent.parent
TOY_FILE = ROOT / "tests" / "fixtures" / "notebooks" / "toy_ablation_runner.py"
TOY = f"{TOY_FILE}:run"
GRID = {"seeds": [0, 1], "switches": {"focal": [False], "hard_negative_mixing": ["off"]}}


@pytest.fixture
def grid(tmp_path) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(GRID))
    return path


@pytest.fixture
def log(tmp_path, monkeypatch) -> Path:
    """The toy runner's log: one JSON line per run, in a file per process."""
    monkeypatch.setenv("TOY_RUNNER_LOG", str(tmp_path / "log"))
    return tmp_path / "log"


def _runs(log: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(log.glob("*.jsonl")) for line in f.read_text().splitlines()]


def _csv(run_dir: Path) -> bytes:
    return (run_dir / A.RESULTS).read_bytes()


# ------------------------------------------------------------------------------ --cell / --seed / --emit-commands
def test_cell_and_seed_run_exactly_one_run_and_merge_its_rows(grid, tmp_path, log, capsys):
    run_dir = tmp_path / "run"
    assert cli_main(["--grid", str(grid), "--run-dir", str(run_dir), "--runner", TOY,
                     "--cell", "focal=off", "--seed", "1"]) == 0
    assert [(r["cell"], r["seed"]) for r in _runs(log)] == [("focal=off", 1)]
    table = A.read_results(run_dir)
    assert list(zip(table.cell, table.seed, table.task)) == [("focal=off", 1, "toy_retrieval"),
                                                             ("focal=off", 1, "toy_sts")]
    assert table.score.tolist() == pytest.approx([0.5 + 0.01 - 0.1, 0.6 + 0.01 - 0.1])
    assert "grid g, cell focal=off: seeds [1], 2 rows" in capsys.readouterr().out
    # done: running it again does nothing; another cell's run leaves this one's rows alone
    assert cli_main(["--grid", str(grid), "--run-dir", str(run_dir), "--runner", TOY,
                     "--cell", "focal=off", "--seed", "1"]) == 0
    assert cli_main(["--grid", str(grid), "--run-dir", str(run_dir), "--runner", TOY, "--cell", "full",
                     "--seed", "0"]) == 0
    assert [(r["cell"], r["seed"]) for r in _runs(log)] == [("focal=off", 1), ("full", 0)]
    assert len(A.read_results(run_dir)) == 4


def test_emitted_commands_are_the_pending_runs_and_rebuild_the_whole_grid(grid, tmp_path, log, capsys):
    cells_dir, whole_dir = tmp_path / "cells", tmp_path / "whole"
    base = ["--grid", str(grid), "--run-dir", str(cells_dir), "--runner", TOY]
    assert cli_main([*base, "--cell", "full", "--seed", "1"]) == 0
    capsys.readouterr()
    assert cli_main([*base, "--emit-commands"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    want = [(c.name, s) for c, s in A.expand_runs(A.load_grid(grid)) if (c.name, s) != ("full", 1)]
    assert len(lines) == len(want) == 5 and out.endswith("\n")
    parsed = [shlex.split(line) for line in lines]
    assert all(p[:2] == ["kalm", "ablate"] for p in parsed)
    assert [(p[p.index("--cell") + 1], int(p[p.index("--seed") + 1])) for p in parsed] == want
    assert all(p[p.index("--run-dir") + 1] == str(cells_dir.resolve()) for p in parsed)
    # every command, run as a scheduler would (here in this process), then the whole grid elsewhere
    for p in parsed:
        assert cli_main(p[2:]) == 0
    assert cli_main(["--grid", str(grid), "--run-dir", str(whole_dir), "--runner", TOY]) == 0
    assert _csv(cells_dir) == _csv(whole_dir)   # same rows, same order, same bytes
    capsys.readouterr()
    assert cli_main([*base, "--emit-commands"]) == 0
    assert capsys.readouterr().out == ""        # nothing pending
    n_runs = len(_runs(log))
    assert cli_main(base) == 0                 # the whole grid finds every cell run done
    assert len(_runs(log)) == n_runs
    capsys.readouterr()
    # --emit-commands for one cell, or a seed the grid does not list
    assert cli_main([*base, "--emit-commands", "--cell", "focal=off", "--seeds", "1", "7"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        shlex.join(["kalm", "ablate", "--grid", str(grid), "--run-dir", str(cells_dir.resolve()), "--runner", TOY,
                    "--cell", "focal=off", "--seed", "7"])]


def test_emitted_trainer_commands_keep_the_runner_settings_from_any_working_directory(tmp_path, monkeypatch):
    """The runner hash (what makes a run 'done') must not depend on how paths were spelled or where the
    scheduler starts the command."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "curated").mkdir(parents=True)
    (tmp_path / "run" / "curated" / "finetune.jsonl").write_text("{}\n")
    argv = ["--grid", "smoke", "--run-dir", "run", "--finetune-config", "cpu-demo/finetune", "--eval-config",
            str(ROOT / "configs" / "eval" / "quick.yaml"), "-o", "train.max_steps=3", "--eval-override",
            "tasks=[KalmDev-STSB-en]"]
    args = ablate_cli._parser().parse_args(argv)

    def runner(a):
        return A.make_run_fn(a.runner, a.run_dir, finetune_config=a.finetune_config, eval_config=a.eval_config,
                             train_overrides=dict(o.split("=") for o in a.override), eval_overrides=a.eval_override)

    line = ablate_cli.cell_command(args, "focal=off", 0)
    emitted = ablate_cli._parser().parse_args(shlex.split(line)[2:])
    assert emitted.cell == "focal=off" and emitted.seed == 0 and emitted.run_dir == str(tmp_path / "run")
    here = runner(args).signature()   # the original command, from where it was typed
    monkeypatch.chdir(ROOT / "notebooks")
    assert runner(emitted).signature() == here
    assert here["finetune_overrides"]["data.train_file"] == str(tmp_path / "run" / "curated" / "finetune.jsonl")


# ------------------------------------------------------------------------------ --parallel
def test_worker_envs_pin_one_gpu_per_worker_or_split_the_cpu_threads(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert parallel.visible_gpus() == ["4", "6"]
    assert parallel.worker_envs(3) == [{"CUDA_VISIBLE_DEVICES": g} for g in ("4", "6", "4")]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parallel.worker_envs(2) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert parallel.worker_envs(3) == [{"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}] * 3
    assert parallel.worker_envs(16)[0]["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")          # no GPU allowed: the CPU plan
    assert parallel.worker_envs(2)[0] == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    with pytest.raises(ValueError, match="workers must be >= 1"):
        parallel.worker_envs(0)


def test_parallel_runs_give_exactly_the_rows_of_a_sequential_run(grid, tmp_path, log, monkeypatch):
    spec, run_fn = A.load_grid(grid), A.load_run_fn(TOY)
    monkeypatch.setenv("TOY_RUNNER_SLEEP", "0.2")   # both workers get runs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU plan even on a GPU box
    par = A.run_grid(spec, run_fn, tmp_path / "par", parallel=2, progress=False)
    workers = {r["pid"]: r["OMP_NUM_THREADS"] for r in _runs(log)}
    monkeypatch.delenv("TOY_RUNNER_LOG")
    seq = A.run_grid(spec, run_fn, tmp_path / "seq", progress=False)
    pd.testing.assert_frame_equal(par, seq, check_exact=True)
    assert _csv(tmp_path / "par") == _csv(tmp_path / "seq")
    # the runs ran in 2 other processes, each with its share of the CPU threads
    assert len(workers) == 2 and os.getpid() not in workers
    assert set(workers.values()) == {str(max(1, torch.get_num_threads() // 2))}
    assert sorted((r["cell"], r["seed"]) for r in _runs(log)) == sorted((c.name, s) for c, s in A.expand_runs(spec))


@pytest.mark.slow
def test_parallel_workers_each_see_their_own_gpu_from_the_cli(grid, tmp_path, log, monkeypatch):
    """GPU pinning end to end on any machine: worker i starts with CUDA_VISIBLE_DEVICES = the i-th visible GPU
    (ids here are only names: the toy runner does not touch CUDA)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setenv("TOY_RUNNER_SLEEP", "0.2")
    assert cli_main(["--grid", str(grid), "--run-dir", str(tmp_path / "run"), "--runner", TOY,
                     "--parallel", "2"]) == 0
    seen = {}
    for r in _runs(log):
        seen.setdefault(r["pid"], set()).add(r["CUDA_VISIBLE_DEVICES"])
    assert sorted(map(frozenset, seen.values())) == [frozenset({"3"}), frozenset({"5"})]
    assert len(A.read_results(tmp_path / "run")) == 6 * 2


def test_parallel_needs_a_run_fn_workers_can_load(grid, tmp_path):
    with pytest.raises(A.GridError, match="parallel runs need a run_fn that worker processes can load"):
        A.run_grid(A.load_grid(grid), lambda c, s: {"t": 1.0}, tmp_path, parallel=2, progress=False)
    with pytest.raises(A.GridError, match="parallel must be a whole number >= 1"):
        A.run_grid(A.load_grid(grid), A.load_run_fn(TOY), tmp_path, parallel=0, progress=False)
    assert not (tmp_path / "ablations").exists()


@pytest.mark.slow
def test_a_failing_worker_run_is_raised_after_the_running_ones_are_merged(tmp_path, monkeypatch):
    runner = tmp_path / "flaky.py"
    runner.write_text("def run(cell_config, seed):\n"
                      "    if cell_config['cell'] != 'full':\n"
                      "        raise RuntimeError('cell ' + cell_config['cell'] + ' broke')\n"
                      "    return {'t': 0.5 + seed}\n")
    spec = A.load_grid({"name": "g", "seeds": [0], "switches": {"focal": [False]}})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match="cell focal=off broke"):
        A.run_grid(spec, A.load_run_fn(f"{runner}:run"), tmp_path / "run", parallel=2, progress=False)
    assert list(A.read_results(tmp_path / "run").cell) == ["full"]   # the run that finished was kept


# ------------------------------------------------------------------------------ user mistakes
@pytest.mark.parametrize("argv, message", [
    (["--grid", "nope", "--run-dir", "{run}"], "config not found: nope"),
    (["--grid", "{bad}", "--run-dir", "{run}"], "unknown switch(es) ['warp_drive']"),
    (["--grid", "smoke", "--run-dir", "{run}", "--cell", "warp=on"], "grid smoke has no cell 'warp=on'; its cells:"),
    (["--grid", "smoke", "--run-dir", "{run}", "-o", "no-equals-sign"], "must look like key=value"),
    (["--grid", "smoke", "--run-dir", "{run}", "-o", "=3"], "empty key"),
    (["--grid", "smoke"], "--run-dir is required"),
    (["--grid", "smoke", "--run-dir", "{file}"], "exists and is not a directory"),
    (["--grid", "smoke", "--run-dir", "{file}/sub", "--runner", TOY], "Not a directory"),
    (["--run-dir", "{run}"], "--grid is required"),
    (["--grid", "smoke", "--run-dir", "{run}", "--seed", "1", "--seeds", "2"], "give --seed or --seeds"),
    (["--grid", "smoke", "--run-dir", "{run}", "--parallel", "0"], "--parallel must be >= 1"),
    (["--grid", "smoke", "--run-dir", "{run}", "--runner", "nocolon"], "must look like module:function"),
    (["--grid", "smoke", "--run-dir", "{run}", "--finetune-config", "nope"], "config not found: nope"),
    (["--grid", "smoke", "--run-dir", "{run}", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["--grid", "smoke", "--run-dir", "{run}", "--level", "avg"], "argument --level: invalid choice: 'avg'"),
    (["--grid", "smoke", "--run-dir", "{run}", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_user_mistakes_are_one_line_errors(argv, message, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"switches": {"focal": [False], "warp_drive": [True]}}))
    (tmp_path / "a_file").write_text("")
    argv = [a.format(run=tmp_path / "run", bad=bad, file=tmp_path / "a_file") for a in argv]
    try:
        code = cli_main(argv)
    except SystemExit as e:   # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("kalm ablate: error: ") and message in err
    assert not (tmp_path / "run").exists()   # nothing was run or written


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(A.GridError, match="has no cell 'warp'"):
        cli_main(["--grid", "smoke", "--run-dir", str(tmp_path), "--cell", "warp", "--debug"])


def test_the_kalm_command_prints_one_line_and_exits_2_for_a_mistake(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kalm_lib.cli", "ablate", "--grid", "smoke", "--run-dir",
                           str(tmp_path), "--cell", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "kalm ablate: error: grid smoke has no cell 'nope'; its cells: ['full', 'focal=off']"]
