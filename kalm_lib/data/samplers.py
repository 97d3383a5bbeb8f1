"""Batch samplers: task-homogeneous and semi-homogeneous batching (KaLM V1), distributed-aware.

A sampler yields lists of row indices (a torch ``batch_sampler``). Per epoch (``set_epoch``) and seed the
order is deterministic, and:

- every batch is built from one task (e.g. the record's ``source``): in-batch negatives then come from
  the same task, which is what the contrastive loss expects;
- with ``homogeneous_ratio < 1`` a fraction ``1 - ratio`` of each batch's slots is swapped with slots of
  a batch of another task (batches are paired; each pair swaps the same number of slots), so each batch
  keeps ``round(ratio * size)`` examples of its own task and examples are never duplicated or lost;
- distributed: batches are *global* (``batch_size * world_size`` examples of one task), and rank ``r`` gets
  slice ``r`` of each, so all ranks see the same task at the same step (cross-device negatives stay
  homogeneous) and the same number of batches;
- ``max_tokens`` (with ``lengths``) sizes batches by a token budget instead: examples of similar length are
  grouped (sorted inside windows of shuffled data) and a batch holds as many as fit
  ``size * longest <= max_tokens`` per rank, capped at ``batch_size``.

Each example appears exactly once per epoch when ``drop_last=False`` (leftovers smaller than a batch are
pooled across tasks into mixed tail batches); with ``world_size > 1`` the very last partial batch is padded
by repeating its first indices so every rank gets the same count (as torch's DistributedSampler does).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

__all__ = ["record_lengths", "TaskBatchSampler"]


def record_lengths(records: Sequence[dict], chars_per_token: float = 3.0) -> list[int]:
    """A cheap token-count estimate per record (longest of query/positive), for the token budget."""
    return [max(1, int(max(len(r["query"]), *(len(p) for p in r["pos"])) / chars_per_token)) for r in records]


class TaskBatchSampler:
    """Yields this rank's list of indices per batch; see the module docstring for the semantics."""

    def __init__(self, tasks: Sequence[str], batch_size: int, *, homogeneous_ratio: float = 1.0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False, lengths: Sequence[int] | None = None,
                 max_tokens: int | None = None, length_window: int = 50):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= homogeneous_ratio <= 1.0:
            raise ValueError(f"homogeneous_ratio must be in [0, 1], got {homogeneous_ratio}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if max_tokens is not None and (lengths is None or len(lengths) != len(tasks)):
            raise ValueError("max_tokens needs lengths, one per example")
        self.tasks = list(tasks)
        self.batch_size, self.ratio, self.seed = batch_size, homogeneous_ratio, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.max_tokens, self.length_window = max_tokens, length_window
        self.epoch = 0
        names = sorted(set(self.tasks))
        self._task_id = np.array([names.index(t) for t in self.tasks], dtype=np.int64)
        self._names = names

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (call before iterating each epoch, as with DistributedSampler)."""
        self.epoch = epoch

    # ------------------------------------------------------------------ global batches
    def _global_size_for(self, idx: np.ndarray) -> int:
        """How many of ``idx`` (sorted by length) start the next global batch under the token budget."""
        g = self.batch_size * self.world_size
        if self.max_tokens is None:
            return g
        n = 0
        longest = 0
        for i in idx[:g]:
            longest = max(longest, int(self.lengths[i]))
            per_rank = (n + 1 + self.world_size - 1) // self.world_size
            if per_rank * longest > self.max_tokens and n >= self.world_size:
                break
            n += 1
        return max(self.world_size, n - n % self.world_size)

    def global_batches(self) -> list[list[int]]:
        """All global batches of the current epoch, in order (before slicing to this rank)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        full: list[list[int]] = []
        leftovers: list[int] = []
        for t in range(len(self._names)):
            idx = np.flatnonzero(self._task_id == t)
            idx = idx[rng.permutation(len(idx))]
            if self.max_tokens is not None:  # sort by length inside windows: similar lengths, still random
                w = self.length_window * self.batch_size * self.world_size
                idx = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")]
                                      for c in np.array_split(idx, max(1, -(-len(idx) // w)))]) if len(idx) else idx
            pos = 0
            while pos < len(idx):
                n = self._global_size_for(idx[pos:])
                if len(idx) - pos < n:
                    break
                full.append(idx[pos:pos + n].tolist())
                pos += n
            leftovers.extend(idx[pos:].tolist())
        if self.ratio < 1.0:
            self._swap(full, rng)
        tail: list[list[int]] = []
        if leftovers and not self.drop_last:
            leftovers = [leftovers[i] for i in rng.permutation(len(leftovers))]
            g = self.batch_size * self.world_size
            for s in range(0, len(leftovers), g):
                tail.append(leftovers[s:s + g])
            last = tail[-1]
            if len(last) % self.world_size:  # pad so every rank gets the same number of examples
                pad = self.world_size - len(last) % self.world_size
                tail[-1] = last + (last * pad)[:pad]
        order = rng.permutation(len(full))
        return [full[i] for i in order] + tail

    def _swap(self, batches: list[list[int]], rng: np.random.Generator) -> None:
        """Pair batches of different tasks and swap ``round((1-ratio)*size)`` slots within each pair."""
        order = [int(i) for i in rng.permutation(len(batches))]
        task_of = [int(self._task_id[b[0]]) for b in batches]
        unpaired = list(order)
        while len(unpaired) >= 2:
            a = unpaired.pop(0)
            j = next((k for k, b in enumerate(unpaired) if task_of[b] != task_of[a]), None)
            if j is None:
                break  # only one task left: nothing to mix with
            b = unpaired.pop(j)
            n = min(len(batches[a]), len(batches[b]))
            k = int(round((1.0 - self.ratio) * n))
            if k == 0:
                continue
            sa = rng.choice(len(batches[a]), size=k, replace=False)
            sb = rng.choice(len(batches[b]), size=k, replace=False)
            for x, y in zip(sa, sb):
                batches[a][x], batches[b][y] = batches[b][y], batches[a][x]

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[list[int]]:
        for g in self.global_batches():
            per = len(g) // self.world_size
            yield g[self.rank * per:(self.rank + 1) * per]

    def __len__(self) -> int:
        return len(self.global_batches())
