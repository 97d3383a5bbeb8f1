"""Cells in parallel: one worker process per device, each pinned before it starts.

The choice (issue 13): **one cell per GPU in parallel**. Worker ``i`` is a fresh (spawned) process that sees only
the ``i``-th visible GPU (``CUDA_VISIBLE_DEVICES``; round-robin when there are more workers than GPUs), so each
cell trains on its own GPU with the code path of a one-GPU run. Without GPUs the CPU threads are split evenly
between the workers (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``), so N workers do not oversubscribe the cores.
The settings go into the worker's environment before it starts, before torch is imported there.

A cell that needs several GPUs itself (a model too large for one) is run as its own multi-GPU job instead: see
``kalm ablate --emit-commands`` (one command per (cell, seed) for a scheduler) and configs/ablations/README.md.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["visible_gpus", "worker_envs", "run_in_workers"]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (its own list when set)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    return [str(i) for i in range(torch.cuda.device_count())]   # NVML count: does not initialise CUDA here


def worker_envs(workers: int) -> list[dict[str, str]]:
    """The environment each of ``workers`` processes starts with: its own GPU, or its share of the CPU threads."""
    if workers < 1:
        raise ValueError(f"parallel workers must be >= 1, got {workers}")
    gpus = visible_gpus()
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(workers)]
    threads = str(max(1, torch.get_num_threads() // workers))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(workers)]


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated for the block (a spawned child copies the environment when it starts)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_in_workers(fn: Callable[..., Any], tasks: Sequence[tuple], workers: int) -> Iterator[tuple[int, Any]]:
    """``fn(*task)`` for every task in ``workers`` processes (see :func:`worker_envs`); yields ``(task index,
    result)`` as each finishes. ``fn`` and the tasks must pickle (a module-level function, plain data).

    A task that raises stops new tasks from starting; the tasks already running finish and are yielded, then
    the first error is raised (with the worker's traceback as its cause).
    """
    envs = worker_envs(workers)
    spawn = multiprocessing.get_context("spawn")   # fresh interpreters: CUDA is never forked, the env applies
    pools: list[cf.ProcessPoolExecutor | None] = [None] * workers
    queue = list(enumerate(tasks))[::-1]
    running: dict[cf.Future, tuple[int, int]] = {}
    error: BaseException | None = None

    def start_next(slot: int) -> None:
        index, task = queue.pop()
        if pools[slot] is None:   # the one process of this slot starts on its first task, inside its env
            with _environ(envs[slot]):
                pools[slot] = cf.ProcessPoolExecutor(max_workers=1, mp_context=spawn)
                running[pools[slot].submit(fn, *task)] = (index, slot)
        else:
            running[pools[slot].submit(fn, *task)] = (index, slot)

    try:
        for slot in range(min(workers, len(queue))):
            start_next(slot)
        while running:
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                index, slot = running.pop(future)
                try:
                    result = future.result()
                except BaseException as e:  # re-raised once the tasks still running are collected
                    error = error or e
                    continue
                if queue and error is None:
                    start_next(slot)
                yield index, result
        if error is not None:
            raise error
    finally:
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
