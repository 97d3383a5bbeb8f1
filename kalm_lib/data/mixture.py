"""Task-homogeneous global batches from streamed sources, the same on every process.

Every process holds one reader per source over its own share of the source (:mod:`kalm_lib.data.shards`). Global
batch ``k`` comes from one source, drawn by a generator seeded with ``(seed, k)`` with probability proportional to
the source's weight: the draw is the same on every process, so every process's slice of a global batch comes from
the same source (task-homogeneous batches across processes, as :class:`~kalm_lib.data.samplers.TaskBatchSampler`
makes them in memory). Each process then takes its ``per_device`` rows from its share.

Weights (:func:`source_weights`): ``weight * rows ** (1 / temperature)``. ``temperature`` 1 draws in proportion to
the source sizes (one pass over everything is one epoch); larger temperatures flatten the mixture toward uniform
(small sources repeat), as in multilingual sampling.

When any process's share of a source runs out, all of them know it from the one small collective per batch
(``gather``: every process's ``(full?, [(id, task type)...])``): the partial slices are dropped and counted, and every
process starts the source's next pass (files in a new order) and takes again. A pass that cannot fill a single batch
is a :class:`MixtureError`. So a source runs out and restarts on its own; the run's length is its step count.

The state (:meth:`StreamMixture.state`) is the batch counter, the dropped counts and every reader's exact position,
for one process: a mixture loaded from it continues with exactly the batches the first one would have made.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

__all__ = ["MixtureError", "Slice", "source_weights", "StreamMixture"]

Gather = Callable[[Any], list[Any]]   # every process's object, in rank order (one process: [obj])


class MixtureError(ValueError):
    """Sources that cannot make batches (a whole pass smaller than the batch on some process)."""


class Reader(Protocol):
    name: str
    pass_no: int

    def take(self, n: int) -> list[dict]: ...
    def next_pass(self) -> None: ...
    def state(self) -> dict[str, Any]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...


@dataclass
class Slice:
    """This process's rows of one global batch, and what every process's rows are (ids, task types)."""

    source: str
    pass_no: int
    rows: list[dict]
    ids: list[str]             # the global batch's record ids, in rank order
    task_types: list[str]      # the global batch's task types, in rank order


def source_weights(rows: dict[str, int], weight: dict[str, float], temperature: float) -> dict[str, float]:
    """Draw probabilities: ``weight * rows ** (1 / temperature)``, normalised (rows of an empty source: 0)."""
    raw = {s: weight.get(s, 1.0) * float(max(0, n)) ** (1.0 / temperature) for s, n in rows.items()}
    total = sum(raw.values())
    if total <= 0:
        raise MixtureError(f"no source has rows to draw from: {rows}")
    return {s: w / total for s, w in raw.items()}


class StreamMixture:
    """Global batches over ``readers`` (one per source, this process's share); see the module docstring."""

    def __init__(self, readers: dict[str, Reader], probabilities: dict[str, float], *, seed: int, per_device: int,
                 gather: Gather):
        self.readers, self.seed, self.per_device, self.gather = readers, seed, per_device, gather
        self.names = list(readers)
        self.p = np.asarray([probabilities[s] for s in self.names], dtype=np.float64)
        self.k = 0                                   # global batches made so far
        self.batches_in_pass: collections.Counter = collections.Counter()
        self.dropped: collections.Counter = collections.Counter()   # rows read but dropped at a pass end

    def choose(self) -> str:
        """The source of global batch ``k`` (the same draw on every process)."""
        return self.names[int(np.random.default_rng([self.seed, self.k]).choice(len(self.names), p=self.p))]

    def next(self) -> Slice:
        """This process's slice of the next global batch (a collective: every process calls it together)."""
        name = self.choose()
        reader = self.readers[name]
        while True:
            rows = reader.take(self.per_device)
            full = len(rows) == self.per_device
            everyone = self.gather((full, [(str(r["id"]), r.get("task_type", "retrieval")) for r in rows]))
            if all(ok for ok, _ in everyone):
                break
            if self.batches_in_pass[name] == 0:
                short = [r for r, (ok, _) in enumerate(everyone) if not ok]
                raise MixtureError(f"training source {name!r}: a whole pass holds fewer than {self.per_device} "
                                   f"rows for process(es) {short} (the per-process batch); add data, lower "
                                   f"train.batch_size, or drop the source")
            self.dropped[name] += len(rows)
            self.batches_in_pass[name] = 0
            reader.next_pass()
        self.k += 1
        self.batches_in_pass[name] += 1
        meta = [m for _, part in everyone for m in part]
        return Slice(source=name, pass_no=reader.pass_no, rows=rows, ids=[i for i, _ in meta],
                     task_types=[t for _, t in meta])

    @property
    def epoch(self) -> int:
        """Passes completed by every source (the least of the sources' pass numbers)."""
        return min(r.pass_no for r in self.readers.values())

    def state(self) -> dict[str, Any]:
        """This process's exact position (JSON-ready)."""
        return {"k": self.k, "batches_in_pass": dict(self.batches_in_pass), "dropped": dict(self.dropped),
                "sources": {s: r.state() for s, r in self.readers.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state` of the same sources (a source missing from it is an error)."""
        missing = sorted(set(self.readers) - set(state["sources"]))
        if missing:
            raise MixtureError(f"the saved data position has no source(s) {missing}")
        self.k = state["k"]
        self.batches_in_pass = collections.Counter(state["batches_in_pass"])
        self.dropped = collections.Counter(state["dropped"])
        for s, r in self.readers.items():
            r.load_state(state["sources"][s])
