"""Data: cards + bundled data registry, readers to unified records, curation, mining, samplers, streaming.

Import the submodules directly (``kalm_lib.data.cards``, ``.readers``, ``.filters``, ``.curate``,
``.mining``, ``.samplers``, ``.streaming``, ``.summary``); :func:`load_records` reads a curated JSONL.
"""

from __future__ import annotations

from pathlib import Path


def load_records(path: str | Path, strict: bool = True) -> list[dict]:
    """Unified records of a curated JSONL file (``<out>/finetune.jsonl``...).

    ``strict``: any unusable line (malformed, missing field, wrong type, duplicate id) is an error naming
    the file and the reasons; otherwise such lines are skipped (and counted by ``readers.Tally``).
    """
    from kalm_lib.data.readers import DataFormatError, Tally, read_records_jsonl

    tally = Tally()
    records = list(read_records_jsonl(path, tally, source="records"))
    rejected = dict(tally.rejected["records"])
    if strict and rejected:
        raise DataFormatError(f"{path}: {sum(rejected.values())} unusable line(s): {rejected}")
    return records
