"""Streamed training data (``data.streaming: true``): every process reads only its own share of every source, from
a position saved in each checkpoint, with memory that does not grow with the data.

    data:
      streaming: true
      sources:                                   # each source: its own task-homogeneous global batches
        - {name: all-nli, files: ["shards/all-nli/*.parquet"]}
        - {name: afqmc, card: zh-afqmc-hub}      # a data card's hub: block (id, revision, columns)
        - {name: gooaq, hub: sentence-transformers/gooaq, columns: {query: question, pos: answer}}
      train_files: ["curated/pretrain/*.jsonl"]  # shorthand: one source per file name (shard numbers dropped)
      temperature: 1.0                           # draw weight = weight * rows ** (1 / temperature)

The pieces: :mod:`kalm_lib.data.shards` (a process's share of a source, read through the one record check, with
an exact position), :mod:`kalm_lib.data.mixture` (which source each global batch comes from, the same on every
process; pass ends agreed through one small collective per batch), :func:`~kalm_lib.train.data.build_stream_batch`
(negatives and prompts). :class:`StreamFeed` is what the training loop sees; its :meth:`~StreamFeed.position`
goes into every checkpoint (every process's reading position and row counts), so a resumed run sees exactly the
rows the uninterrupted run would have seen. A streamed run resumes on the same number of processes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import gather_object

from kalm_lib.atomic import write_json
from kalm_lib.config import ConfigError
from kalm_lib.data.cards import HubSpec, load_registry
from kalm_lib.data.mixture import Gather, MixtureError, StreamMixture, source_weights
from kalm_lib.data.records import DataFormatError, Tally
from kalm_lib.data.shards import FileSource, HubSource, estimate_rows, expand_files, source_name
from kalm_lib.train.config import StageConfig, StreamSourceConfig
from kalm_lib.train.data import Batch, DataError, build_stream_batch

STATE_KEY = "data_stream"   # the key of a checkpoint's trainer_state.json that holds the streamed position


def stream_sources(config: StageConfig) -> list[StreamSourceConfig]:
    """The run's sources: ``data.sources``, then the files of ``data.train_files`` (or of ``data.train_file``
    when neither is given) grouped into one source per file name (:func:`kalm_lib.data.shards.source_name`)."""
    D = config.data
    sources = list(D.sources)
    patterns = D.train_files or ([] if D.sources else [D.train_file])
    if patterns:
        by_name: dict[str, list[str]] = {}
        for f in _expand(patterns, "data.train_files"):
            by_name.setdefault(source_name(f), []).append(str(f))
        taken = {s.name for s in sources}
        for name, files in by_name.items():
            if name in taken:
                raise ConfigError(f"data.train_files: files of source {name!r} ({files[0]}) clash with the "
                                  f"data.sources entry of that name")
            sources.append(StreamSourceConfig(name=name, files=files))
    return sources


def check_sources(config: StageConfig) -> list[StreamSourceConfig]:
    """The run's sources, checked before any work: files found, cards found with a hub block, and a size for
    every hub source when there are several sources (the draw weights need it)."""
    sources = stream_sources(config)
    for s in sources:
        if s.files:
            _expand(s.files, f"data.sources: {s.name!r}")
        elif not (s.rows or hub_spec(s).rows) and len(sources) > 1:
            raise ConfigError(f"data.sources: {s.name!r}: a hub source among others needs its size for the draw "
                              f"weights: set rows: (or the card's hub.rows)")
    return sources


def hub_spec(source: StreamSourceConfig) -> HubSpec:
    """The :class:`HubSpec` of a hub source: its data card's ``hub:`` block (``card``) with the source's own
    settings on top, or the source's settings alone (``hub``)."""
    base = HubSpec(path=source.hub or "")
    if source.card:
        registry = load_registry(verify=False)
        if source.card not in registry:
            raise ConfigError(f"data.sources: {source.name!r}: no data card {source.card!r} in data_cards/")
        base = registry[source.card].hub
        if base is None:
            raise ConfigError(f"data.sources: {source.name!r}: data card {source.card!r} has no hub: block")
    mine = {"path": source.hub, "config": source.hub_config, "revision": source.revision,
            "data_files": source.data_files, "columns": source.columns or None, "task_type": source.task_type,
            "lang": source.lang, "instruction": source.instruction}
    mine["split"] = source.split if source.split != "train" or not source.card else None
    return dataclasses.replace(base, **{k: v for k, v in mine.items() if v is not None})


class StreamFeed:
    """This process's streamed batches (the interface of :class:`kalm_lib.train.data.MemoryFeed`)."""

    def __init__(self, config: StageConfig, mixture: StreamMixture, tally: Tally, *, rank: int, world: int,
                 gather: Gather):
        self.config, self.mixture, self.tally = config, mixture, tally
        self.rank, self.world, self.gather = rank, world, gather
        self.last: tuple[str, int, int] | None = None

    @classmethod
    def open(cls, config: StageConfig, *, rank: int, world: int, per_device: int, gather: Gather,
             resume_state: dict[str, Any] | None = None) -> "StreamFeed":
        """The feed of process ``rank`` of ``world``, at the start or at a checkpoint's position."""
        D, tally = config.data, Tally()
        readers, rows, weights = {}, {}, {}
        for s in stream_sources(config):
            if s.files:
                files = _expand(s.files, f"data.sources: {s.name!r}")
                readers[s.name] = FileSource(s.name, files, rank=rank, world=world, tally=tally,
                                             seed=config.train.seed, batch_rows=D.read_batch_rows)
                rows[s.name] = s.rows or estimate_rows(files)
            else:
                spec = hub_spec(s)
                readers[s.name] = HubSource(s.name, spec, rank=rank, world=world, tally=tally)
                rows[s.name] = s.rows or spec.rows or 1   # a single hub source (check_sources)
            weights[s.name] = s.weight
        mixture = StreamMixture(readers, source_weights(rows, weights, D.temperature), seed=config.train.seed,
                                per_device=per_device, gather=gather)
        feed = cls(config, mixture, tally, rank=rank, world=world, gather=gather)
        if resume_state is not None:
            feed.load(resume_state)
        return feed

    def next(self) -> Batch:
        try:
            piece = self.mixture.next()
        except (MixtureError, DataFormatError) as e:
            raise DataError(str(e)) from None
        self.last = (piece.source, piece.pass_no, self.mixture.k - 1)
        return build_stream_batch(piece.rows, self.config, pass_no=piece.pass_no, ids=piece.ids,
                                  task_types=piece.task_types)

    @property
    def epoch(self) -> int:
        return self.mixture.epoch

    @property
    def where(self) -> str:
        source, pass_no, k = self.last or ("-", 0, -1)
        return f"global batch {k}, source {source!r} pass {pass_no}"

    def position(self) -> dict[str, Any]:
        """What a checkpoint records (a collective: every process's position and counts, in rank order)."""
        ranks = self.gather({**self.mixture.state(), "tally": self.tally.state()})
        return {"epoch": self.epoch, "batch_in_epoch": self.mixture.k,
                STATE_KEY: {"world_size": self.world, "ranks": ranks}}

    def load(self, state: dict[str, Any]) -> None:
        saved = state.get(STATE_KEY)
        if saved is None:
            raise ConfigError("the checkpoint has no streamed data position (it was trained from in-memory data)")
        if saved["world_size"] != self.world:
            raise ConfigError(f"a streamed run resumes on the process count that wrote its checkpoint "
                              f"({saved['world_size']}), not {self.world}: each process's reading position is its own")
        mine = saved["ranks"][self.rank]
        try:
            self.mixture.load_state(mine)
        except MixtureError as e:
            raise ConfigError(f"cannot resume the streamed data: {e}") from None
        self.tally.load_state(mine["tally"])

    def finish(self, output_dir: Path) -> None:
        """``<output_dir>/data_accounting.json``: every process's rows read, kept and rejected (by reason), and
        dropped at pass ends, per source (a collective; the main process writes)."""
        self.tally.check()
        parts = self.gather({"tally": self.tally.state(), "dropped": dict(self.mixture.dropped)})
        if self.rank == 0:
            total = Tally()
            for p in parts:
                total.merge(Tally().load_state(p["tally"]))
            total.check()
            write_json(Path(output_dir) / "data_accounting.json",
                       {"world_size": self.world, "global_batches": self.mixture.k, "total": total.as_dict(),
                        "per_process": [{"read": Tally().load_state(p["tally"]).as_dict(), "dropped": p["dropped"]}
                                        for p in parts]}, indent=1)


def make_gather(accelerator: Accelerator) -> Gather:
    """Every process's object in rank order (``accelerate``'s ``gather_object``; one process: ``[obj]``)."""
    if accelerator.num_processes == 1:
        return lambda obj: [obj]
    return lambda obj: gather_object([obj])


def stream_identity(config: StageConfig) -> dict[str, Any]:
    """What identifies streamed data in provenance without reading it: every file's size and modification
    time, every hub source's spec (id, config, split, revision). Hashing ~1 TB at start is not an option."""
    out: dict[str, Any] = {}
    for s in stream_sources(config):
        if s.files:
            out[s.name] = [{"file": str(f), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
                           for f in _expand(s.files, f"data.sources: {s.name!r}")]
        else:
            out[s.name] = {"hub": {k: v for k, v in dataclasses.asdict(hub_spec(s)).items() if v not in (None, {}, "")}}
    return {"streaming": True, "sources": out}


def _expand(patterns: list[str], where: str) -> list[Path]:
    try:
        return expand_files([os.fspath(p) for p in patterns], where)
    except DataFormatError as e:
        raise DataError(str(e)) from None
