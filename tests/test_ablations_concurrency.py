"""No lost rows (issue 15): results.csv is read-merge-written under a lock; a grid runs once at a time per run dir.

The process tests start real ``kalm ablate`` processes with the toy runner of tests/fixtures, made to run at the
same time by its rendezvous / wait hooks (the scores never depend on them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kalm_lib import ablations as A
from kalm_lib import locking
from kalm_lib.ablations import run as run_mod
from kalm_lib.ablations import store

ROOT = Path(__file__).resolve().parent.parent
TOY = f"{ROOT / 'tests' / 'fixtures' / 'notebooks' / 'toy_ablation_runner.py'}:run"
RECIPE = {"seeds": [0, 1, 2], "switches": {"focal": [False], "hard_negative_mixing": ["off", "listwise"]}}
ARCH = {"seeds": [0, 1], "switches": {"temperature": [0.02, 0.05]}}
N_TASKS = 2   # the toy runner's tasks


def _grid(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _kalm(grid: Path, run_dir: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kalm_lib.cli", "ablate", "--grid", str(grid), "--run-dir",
                             str(run_dir), "--runner", TOY, *extra], cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _leftovers(run_dir: Path) -> list[str]:
    """Temporary files and lock files left in <run_dir>/ablations (none once every process is done)."""
    return sorted(str(p.relative_to(run_dir)) for p in (run_dir / "ablations").rglob("*")
                  if p.is_file() and (".tmp-" in p.name or p.suffix == ".lock"))


def test_two_grids_at_once_on_one_run_dir_keep_all_their_rows(tmp_path):
    recipe, arch, run_dir = _grid(tmp_path, "recipe", RECIPE), _grid(tmp_path, "arch", ARCH), tmp_path / "run"
    # both processes reach their first run before either writes a row, then keep writing side by side
    env = {"TOY_RUNNER_RENDEZVOUS": str(tmp_path / "rendezvous"), "TOY_RUNNER_PARTIES": "2",
           "TOY_RUNNER_SLEEP": "0.05"}
    procs = [_kalm(recipe, run_dir, env), _kalm(arch, run_dir, env)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    table = A.read_results(run_dir)
    want = {("recipe", c.name, s) for c, s in A.expand_runs(A.load_grid(recipe))} | \
           {("arch", c.name, s) for c, s in A.expand_runs(A.load_grid(arch))}
    assert len(want) == 4 * 3 + 3 * 2
    got = table.groupby(["grid", "cell", "seed"]).size()
    assert set(got.index) == want and (got == N_TASKS).all()
    assert len(table) == len(want) * N_TASKS and not table.duplicated(["grid", "cell", "seed", "task"]).any()
    # both grids' rows are the toy runner's scores, and nothing is left behind
    focal = table[(table.grid == "recipe") & (table.cell == "focal=off") & (table.seed == 2)]
    assert sorted(focal.score) == pytest.approx([0.5 + 0.02 - 0.1, 0.6 + 0.02 - 0.1])
    assert _leftovers(run_dir) == []


def test_the_same_grid_twice_is_refused_while_the_first_runs(tmp_path):
    grid, run_dir, release = _grid(tmp_path, "recipe", RECIPE), tmp_path / "run", tmp_path / "release"
    first = _kalm(grid, run_dir, {"TOY_RUNNER_WAIT_FOR": str(release)})
    try:
        lock = store.grid_lock(run_dir, "recipe")
        deadline = time.monotonic() + 240
        while not lock.is_file():   # the first process holds the grid (and waits in its first run)
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first process never took the grid lock"
            time.sleep(0.1)
        second = _kalm(grid, run_dir, {})
        out, err = second.communicate(timeout=300)
        assert second.returncode == 3, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert f"ablation grid recipe in {run_dir} is in use by another process (pid {first.pid} " in lines[0]
        assert out == ""
    finally:
        release.touch()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert len(A.read_results(run_dir)) == 4 * 3 * N_TASKS
    assert _leftovers(run_dir) == []


# ------------------------------------------------------------------------------ the merge, in one process
def _toy(cell_config, seed):
    return {"a": {"score": 0.5 + 0.01 * seed, "task_type": "sts"}}


def test_a_merge_keeps_rows_written_by_others_since_the_run_started(tmp_path):
    """The old writer kept the other grids' rows it had read at its start: rows written meanwhile were lost."""
    mine = A.load_grid({"name": "mine", "seeds": [0, 1], "switches": {"focal": [False]}})
    other = A.load_grid({"name": "other", "seeds": [0], "switches": {"pooling": ["last"]}})
    calls = []

    def interleaving(cell_config, seed):   # another grid finishes while this grid runs
        calls.append((cell_config["cell"], seed))
        if len(calls) == 2:
            A.run_grid(other, _toy, tmp_path, progress=False)
        return _toy(cell_config, seed)

    A.run_grid(mine, interleaving, tmp_path, progress=False)
    table = A.read_results(tmp_path)
    assert sorted(set(table.grid)) == ["mine", "other"]
    assert len(table[table.grid == "mine"]) == 4 and len(table[table.grid == "other"]) == 2
    # the file keeps grids where they first appear and each grid's rows in grid order (cells, then seeds)
    assert list(table.grid) == ["mine"] * 4 + ["other"] * 2
    assert list(zip(table.cell, table.seed))[:4] == [("full", 0), ("full", 1), ("focal=off", 0), ("focal=off", 1)]


def test_merge_rows_replaces_by_cell_and_seed_and_drops_only_what_keep_rejects(tmp_path):
    def row(grid, cell, seed, score, task="a"):
        return {"grid": grid, "cell": cell, "is_baseline": cell == "full", "seed": seed, "task": task,
                "task_type": "sts", "score": score, "overrides_hash": "h", "runner_hash": "r"}

    store.merge_rows(tmp_path, "g", [row("g", "full", 0, 1.0), row("g", "x", 0, 2.0)])
    store.merge_rows(tmp_path, "h", [row("h", "full", 0, 3.0)])
    got = store.merge_rows(tmp_path, "g", [row("g", "x", 0, 9.0), row("g", "x", 0, 8.0, task="b")],
                           rank=lambda cell, seed: (cell != "full", seed))
    assert list(zip(got.cell, got.task, got.score)) == [("full", "a", 1.0), ("x", "a", 9.0), ("x", "b", 8.0)]
    got = store.merge_rows(tmp_path, "g", [], keep=lambda r: r["cell"] == "full")
    assert list(got.cell) == ["full"]
    table = store.read_table(store.results_path(tmp_path))
    assert list(zip(table.grid, table.score)) == [("g", 1.0), ("h", 3.0)]
    assert _leftovers(tmp_path) == []


def test_a_writer_waits_for_the_results_lock_and_gives_up_naming_the_holder(tmp_path, monkeypatch):
    lock = tmp_path / store.RESULTS_LOCK
    with locking.hold(lock, what="someone else's merge"):
        with pytest.raises(locking.LockHeld, match=rf"pid {os.getpid()} .*lock {lock}"):
            with store.hold_waiting(lock, what="ablation results", wait_s=0.3):
                pass
    with store.hold_waiting(lock, what="ablation results", wait_s=0.3):   # free again: taken at once
        assert locking.holder(lock)["what"] == "ablation results"
    assert not lock.exists()
    # an error inside the block is not retried: it propagates, and the lock is released
    with pytest.raises(KeyError):
        with store.hold_waiting(lock, what="x"):
            raise KeyError("inside")
    assert not lock.exists()


def test_a_cell_run_is_refused_while_its_grid_or_the_same_cell_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(run_mod, "GRID_PROBE_S", 0.2)
    spec = A.load_grid({"name": "g", "seeds": [0, 1], "switches": {"focal": [False]}})
    with locking.hold(store.grid_lock(tmp_path, "g"), what="a whole-grid run"):
        with pytest.raises(locking.LockHeld, match="ablation grid g in .* is in use"):
            A.run_grid(spec, _toy, tmp_path, cells=["focal=off"], progress=False)
        with pytest.raises(locking.LockHeld, match="ablation grid g in .* is in use"):
            A.run_grid(spec, _toy, tmp_path, progress=False)
    with locking.hold(store.cell_lock(tmp_path, "g", "focal=off", 1), what="a cell run"):
        with pytest.raises(locking.LockHeld, match=r"ablation run \(grid g, cell focal=off, seed 1\)"):
            A.run_grid(spec, _toy, tmp_path, cells=["focal=off"], progress=False)
    # the run before the refused one was merged; nothing else was
    assert list(zip(*[A.read_results(tmp_path)[c] for c in ("cell", "seed")])) == [("focal=off", 0)]
    # the other cell of the grid is not blocked by that cell's lock
    with locking.hold(store.cell_lock(tmp_path, "g", "focal=off", 1), what="a cell run"):
        assert len(A.run_grid(spec, _toy, tmp_path, cells=["full"], progress=False)) == 2
