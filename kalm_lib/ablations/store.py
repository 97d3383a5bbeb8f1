"""``<run_dir>/ablations/results.csv``: the one table every grid of a run writes, and the locks that keep it whole.

Every write is a read-merge-write under ``<run_dir>/ablations/.results.lock`` (:mod:`kalm_lib.locking`), through
the one atomic writer (:mod:`kalm_lib.atomic`, unique temporary names): a writer replaces only its own grid's rows
(the runs it re-ran, and stale rows it drops) and keeps every other row as it is on disk *at that moment*, never
from an earlier read. So grids, and single cells of one grid, can run side by side on one run directory without
losing rows. The results lock is held only for the merge (milliseconds), so a writer waits for it.

Two more locks decide who may run what (see :func:`kalm_lib.ablations.run_grid`): a whole-grid run holds
``.locks/<grid>.lock`` from start to end (the same grid never runs twice at once on one run directory), and each
(cell, seed) runs under ``.locks/<grid>/<cell>/seed<N>.lock`` (no run is trained by two processes).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from kalm_lib import atomic, locking
from kalm_lib.ablations.switches import GridError

RESULTS = "ablations/results.csv"
RESULT_COLUMNS = ["grid", "cell", "is_baseline", "seed", "task", "task_type", "score", "overrides_hash",
                  "runner_hash"]  # then one sw.<switch> column per switch the grid mentions
RESULTS_LOCK = "ablations/.results.lock"
LOCK_WAIT_S = 300.0   # how long a writer waits for the results lock (held by others only while they merge)
# read as text, so a value label such as "0.02" or a grid named "1" round-trips as written
_TEXT_COLUMNS = ("grid", "cell", "task", "task_type", "overrides_hash", "runner_hash")

Row = Mapping[str, Any]
Rank = Callable[[str, int], Any]


def safe_name(name: str) -> str:
    """A cell or grid name as one path component (cell folders, provenance, locks)."""
    return "".join(ch if ch.isalnum() or ch in "=.-_" else "_" for ch in str(name))


def results_path(run_dir: str | Path) -> Path:
    """``<run_dir>/ablations/results.csv``."""
    return Path(run_dir) / RESULTS


def grid_lock(run_dir: str | Path, grid: str) -> Path:
    """The lock a whole-grid run holds from start to end."""
    return Path(run_dir) / "ablations" / ".locks" / f"{safe_name(grid)}.lock"


def cell_lock(run_dir: str | Path, grid: str, cell: str, seed: int) -> Path:
    """The lock one (cell, seed) run holds while it trains and scores."""
    return Path(run_dir) / "ablations" / ".locks" / safe_name(grid) / safe_name(cell) / f"seed{int(seed)}.lock"


@contextlib.contextmanager
def hold_waiting(lock: Path, what: str, wait_s: float = LOCK_WAIT_S) -> Iterator[Path]:
    """:func:`kalm_lib.locking.hold`, retried while another process holds the lock, for up to ``wait_s`` seconds
    (then its :class:`~kalm_lib.locking.LockHeld`, which names the holder). For locks held only briefly."""
    deadline, delay = time.monotonic() + wait_s, 0.01
    while True:
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(locking.hold(lock, what=what))
            break
        except locking.LockHeld:
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 0.25)
    with stack:   # an error inside the block is the caller's, not a reason to retry
        yield lock


def read_table(path: str | Path) -> pd.DataFrame:
    """A results.csv as written: names, hashes and ``sw.*`` value labels as text; empty when there is none."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame()
    try:
        header = pd.read_csv(path, nrows=0).columns
        text = {c: str for c in header if c in _TEXT_COLUMNS or str(c).startswith("sw.")}
        return pd.read_csv(path, dtype=text)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise GridError(f"{path} is not a readable results table ({' '.join(str(e).split())}); move it aside "
                        f"and re-run") from None


def read_results(run_dir: str | Path, grid: str | None = None) -> pd.DataFrame:
    """``<run_dir>/ablations/results.csv`` as a DataFrame (FileNotFoundError naming the path); with
    ``grid``, only that grid's rows (ValueError listing the grids present when it has none)."""
    path = results_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no ablation results at {path}")
    df = read_table(path)
    if grid is None:
        return df
    part = df[df["grid"].astype(str) == grid].reset_index(drop=True) if "grid" in df else df.iloc[:0]
    if part.empty:
        grids = sorted(set(df["grid"].astype(str))) if "grid" in df else []
        raise ValueError(f"{path} has no rows of grid {grid!r} (grids: {grids})")
    return part


def run_key(row: Row) -> tuple[str, int, str, str]:
    """What identifies a run's rows: (cell, seed, overrides hash, runner hash)."""
    return str(row["cell"]), int(row["seed"]), str(row["overrides_hash"]), str(row.get("runner_hash"))


def _grid_rows(table: pd.DataFrame, grid: str) -> pd.Series:
    if table.empty or "grid" not in table:
        return pd.Series(False, index=table.index)
    return table["grid"].astype(str) == grid


def merge_rows(run_dir: str | Path, grid: str, new_rows: list[Row], *, keep: Callable[[Row], bool] | None = None,
               rank: Rank | None = None) -> pd.DataFrame:
    """Merge ``new_rows`` (all of ``grid``) into results.csv under the results lock; this grid's rows now on disk.

    The file then holds every other grid's rows exactly as on disk now, this grid's earlier rows that ``keep``
    accepts (default: all) and that no new row replaces (same cell and seed), and ``new_rows``. This grid's rows
    are sorted by ``rank(cell, seed)`` (stable: tasks keep their order), so the file does not depend on the order
    runs finished in; grids stay where they first appear in the file.
    """
    path = results_path(run_dir)
    with hold_waiting(Path(run_dir) / RESULTS_LOCK, what=f"ablation results {path}"):
        table = read_table(path)
        if not table.empty and "grid" not in table:
            raise GridError(f"{path} has no grid column (an older format); move it aside and re-run")
        mine = _grid_rows(table, grid)
        replaced = {(str(r["cell"]), int(r["seed"])) for r in new_rows}
        old = [r for r in table[mine].to_dict("records")
               if (str(r["cell"]), int(r["seed"])) not in replaced and (keep is None or keep(r))]
        rows = [*old, *new_rows]
        if rank is not None:
            rows.sort(key=lambda r: rank(str(r["cell"]), int(r["seed"])))
        ours = pd.DataFrame(rows)
        grids = list(dict.fromkeys([*(table["grid"].astype(str) if not table.empty else []), grid]))
        parts = [ours if g == grid else table[_grid_rows(table, g)] for g in grids]
        parts = [p for p in parts if not p.empty]
        if parts or path.is_file():
            out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=RESULT_COLUMNS)
            with atomic.open_atomic(path) as f:
                out.to_csv(f, index=False)
    return ours.reset_index(drop=True)
