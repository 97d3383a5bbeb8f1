"""Data: cards + bundled data registry, record check, format readers, curation, mining, samplers, streaming.

Submodules: ``records`` (the unified record, its one check and reader), ``cards`` (data cards),
``formats`` (one reader per card file format), ``readers`` (sources -> records), ``filters``, ``curate``,
``mining``, ``samplers``, ``streaming``, ``summary``; ``cli`` holds ``kalm curate`` / ``kalm mine``.
"""

from __future__ import annotations

from kalm_lib.data.records import (REJECTION_REASONS, SYMMETRIC_TASK_TYPES, TASK_TYPES, DataFormatError, Tally,
                                   load_records, read_records, record_problem)

__all__ = ["TASK_TYPES", "SYMMETRIC_TASK_TYPES", "REJECTION_REASONS", "DataFormatError", "Tally", "load_records",
           "read_records", "record_problem"]
