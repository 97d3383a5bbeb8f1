"""Data: data cards, the unified training record, file formats, training sources, curation, mining, streaming.

Modules, one job each (imports only go down this list, plus core):
:mod:`~kalm_lib.data.records` (the unified record: task types, the one record check and reader),
:mod:`~kalm_lib.data.cards` (data cards and the bundled-data registry),
:mod:`~kalm_lib.data.formats` (one reader per card file format, shared with evaluation),
:mod:`~kalm_lib.data.sources` (the training-source registry),
:mod:`~kalm_lib.data.readers` (a source's file -> records), :mod:`~kalm_lib.data.filters` (text filters,
:class:`RecordFilter`), :mod:`~kalm_lib.data.leakage` (dev-eval texts kept out of training),
:mod:`~kalm_lib.data.mining` (hard negatives), :mod:`~kalm_lib.data.streaming` (bounded-memory filtering, hub
datasets), :mod:`~kalm_lib.data.shards` (each process's share of a training source, resumable),
:mod:`~kalm_lib.data.mixture` (task-homogeneous global batches over streamed sources),
:mod:`~kalm_lib.data.curate` (the curation run), :mod:`~kalm_lib.data.samplers` (task-homogeneous batches),
:mod:`~kalm_lib.data.summary` (report tables and figures), :mod:`~kalm_lib.data.cli` (``kalm curate``,
``kalm mine``).
"""

from __future__ import annotations

from kalm_lib.data.cards import DataCard, DataCardError, load_registry
from kalm_lib.data.curate import CurationConfig, InputSpec, StreamConfig, curate, load_config, stream_curate_sources
from kalm_lib.data.mining import MiningConfig, mine_hard_negatives, remine
from kalm_lib.data.records import (FILE_REJECTION_REASONS, RECORD_FIELDS, REJECTION_REASONS, SYMMETRIC_TASK_TYPES,
                                   TASK_TYPES, AccountingError, DataFormatError, Tally, load_records, read_records,
                                   record_problem)
from kalm_lib.data.samplers import TaskBatchSampler
from kalm_lib.data.sources import SOURCES, SourceDef

__all__ = [
    # the unified record
    "TASK_TYPES", "SYMMETRIC_TASK_TYPES", "RECORD_FIELDS", "REJECTION_REASONS", "FILE_REJECTION_REASONS",
    "record_problem", "read_records", "load_records", "Tally", "DataFormatError", "AccountingError",
    # cards and sources
    "DataCard", "DataCardError", "load_registry", "SOURCES", "SourceDef",
    # curation
    "CurationConfig", "InputSpec", "StreamConfig", "load_config", "curate", "stream_curate_sources",
    "MiningConfig", "mine_hard_negatives", "remine",
    "TaskBatchSampler",
]
