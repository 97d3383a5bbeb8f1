"""Streaming curation with bounded memory: JSONL / parquet shards or a hub dataset via ``datasets`` streaming.

The paper's stage-1 data has ~470M pairs; nothing here holds the input in memory. Records are read by the
one record reader (:func:`kalm_lib.data.records.read_records`), flow one at a time through the same
:class:`~kalm_lib.data.filters.RecordFilter` as the in-memory pipeline and are written line by line
(atomically: the output appears complete or not at all). What differs, so memory stays flat:

- exact dedup uses a fixed-size Bloom filter (:class:`BloomFilter`; false-positive rate set by
  ``capacity``/``error_rate``, so a few unique rows may be dropped as duplicates, never the reverse);
- near-duplicate removal (MinHash index grows with the data) is off;
- mining is a separate pass (``kalm mine``) over the curated output.

Inputs: a directory of ``*.jsonl``, ``*.jsonl.gz`` or ``*.parquet`` shards (sorted by name), one such file,
or ``hf:<dataset id>[:<config>]:<split>`` with a column mapping to the unified record (needs the hub, so
``HF_DATASETS_OFFLINE=0`` on a GPU box); local files can also go through ``datasets`` streaming
(``iter_hub_records("json:train", ..., data_files=...)``). ``kalm curate --stream``
(:func:`kalm_lib.data.curate.stream_curate_sources`) puts the pieces together.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from kalm_lib.atomic import open_atomic
from kalm_lib.data.filters import FilterConfig, RecordFilter
from kalm_lib.data.records import Tally, accept_record, read_records

__all__ = ["BloomFilter", "BloomSet", "shard_files", "iter_parquet_records", "iter_hub_records", "iter_input",
           "stream_curate"]


class BloomFilter:
    """Fixed-memory set membership (no false negatives). ``add`` returns True if the key was (probably) there."""

    def __init__(self, capacity: int = 10_000_000, error_rate: float = 1e-4):
        m = int(math.ceil(-capacity * math.log(error_rate) / math.log(2) ** 2))
        self.num_bits = max(64, m)
        self.num_hashes = max(1, int(round(self.num_bits / capacity * math.log(2))))
        self.bits = np.zeros((self.num_bits + 7) // 8, dtype=np.uint8)

    def _positions(self, key: str) -> list[int]:
        d = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        h1, h2 = int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little") | 1
        return [(h1 + i * h2) % self.num_bits for i in range(self.num_hashes)]  # double hashing

    def add(self, key: str) -> bool:
        present = True
        for p in self._positions(key):
            byte, bit = p >> 3, 1 << (p & 7)
            if not self.bits[byte] & bit:
                present = False
                self.bits[byte] |= bit
        return present

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)


class BloomSet:
    """The ``set`` interface RecordFilter uses for exact dedup (``in`` + ``add``), over a Bloom filter."""

    def __init__(self, bloom: BloomFilter):
        self.bloom = bloom
        self._last: tuple[Any, bool] | None = None

    def __contains__(self, key: Any) -> bool:
        # RecordFilter calls `key in s` then `s.add(key)`: insert here and remember the answer
        present = self.bloom.add(str(key))
        self._last = (key, present)
        return present

    def add(self, key: Any) -> None:
        if self._last is None or self._last[0] != key:
            self.bloom.add(str(key))


# ---------------------------------------------------------------------------------------------- inputs
def shard_files(path: str | Path) -> list[Path]:
    """Shard files of a directory (``*.jsonl``, ``*.jsonl.gz``, ``*.parquet``, sorted) or a single file."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"streaming input not found: {p}")
    files = sorted(f for f in p.iterdir() if f.name.endswith((".jsonl", ".jsonl.gz", ".parquet")))
    if not files:
        raise FileNotFoundError(f"{p}: no *.jsonl, *.jsonl.gz or *.parquet shards")
    return files


def iter_parquet_records(path: Path, tally: Tally, source: str, seen_ids: set | None,
                         batch_rows: int = 8192) -> Iterator[dict]:
    """Unified records from a parquet file, one record batch in memory at a time (the one record check)."""
    import pyarrow.parquet as pq  # optional dependency, only for parquet shards

    pf = pq.ParquetFile(path)
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        for obj in batch.to_pylist():
            row += 1
            tally.seen(source)
            rec = accept_record(obj, tally, source, seen_ids, default_id=f"{path.name}:{row}")
            if rec is not None:
                yield rec


def iter_hub_records(spec: str, mapping: dict[str, str] | None, tally: Tally, *, task_type: str = "pretrain",
                     category: str = "weak_pairs", instruction: str = "", lang: str = "en",
                     data_files: Any = None) -> Iterator[dict]:
    """Records from ``datasets`` streaming (``hf:<id>[:<config>]:<split>``, or a local builder such as
    ``json`` / ``parquet`` with ``data_files``); ``mapping`` maps record fields to dataset columns
    (``{"query": "anchor", "pos": "positive"}``); a string column for ``pos``/``neg`` becomes a 1-list."""
    from datasets import load_dataset  # heavy optional dependency: only when a hub spec is streamed

    parts = spec.split(":")
    if parts[0] == "hf":
        parts = parts[1:]
    name, split = parts[0], parts[-1]
    config = parts[1] if len(parts) == 3 else None
    ds = load_dataset(name, config, split=split, streaming=True, data_files=data_files)
    mapping = mapping or {}
    source = mapping.get("source_name", name.split("/")[-1])
    for k, row in enumerate(ds):
        tally.seen(source)
        try:
            q = row[mapping.get("query", "query")]
            pos = row[mapping.get("pos", "pos")]
            neg = row.get(mapping.get("neg", "neg"), []) or []
        except KeyError:
            tally.reject(source, "missing_field")
            continue
        pos = [pos] if isinstance(pos, str) else pos
        neg = [neg] if isinstance(neg, str) else neg
        rec = row if all(f in row for f in ("id", "task_type")) and "query" in row else {
            "id": f"{source}:{k}", "query": q, "pos": pos, "neg": neg, "task_type": task_type,
            "category": category, "instruction": instruction, "lang": lang, "source": source}
        rec = accept_record(rec, tally, source, None, default_id=f"{source}:{k}")
        if rec is not None:
            yield rec


def iter_input(spec: str | Path, tally: Tally, seen_ids: Any = None, **hub_kwargs: Any) -> Iterator[dict]:
    """Records from a shard directory/file or ``hf:...`` spec, streamed."""
    mapping = hub_kwargs.pop("mapping", None)
    if str(spec).startswith("hf:"):
        yield from iter_hub_records(str(spec), mapping, tally, **hub_kwargs)
        return
    for f in shard_files(spec):
        src = f.name.split(".")[0]
        if f.name.endswith(".parquet"):
            yield from iter_parquet_records(f, tally, src, seen_ids)
        else:  # line by line, never the whole file
            yield from read_records(f, tally, src, seen_ids)


# ---------------------------------------------------------------------------------------------- pipeline
def stream_curate(records: Iterator[dict], out_path: str | Path, filter_cfg: FilterConfig | None = None, *,
                  leakage: Any = None, bloom_capacity: int = 10_000_000, bloom_error: float = 1e-4,
                  on_progress: Callable[[int], None] | None = None, progress_every: int = 100_000) -> dict:
    """Filter a record stream into ``out_path`` (JSONL, written atomically); returns the curate tally + stats.

    The filters are those of the in-memory curation (:class:`~kalm_lib.data.filters.RecordFilter`) with
    near-duplicate removal off and exact dedup on a Bloom filter. ``on_progress(rows_seen)`` is called every
    ``progress_every`` input rows (the memory benchmark samples the resident set size there).
    """
    cfg = replace(filter_cfg or FilterConfig(), dedup_near=False)
    bloom = BloomFilter(bloom_capacity, bloom_error)
    tally = Tally()
    filt = RecordFilter(cfg, leakage, tally, exact_set=BloomSet(bloom))
    n_in = n_out = 0
    t0 = time.perf_counter()
    with open_atomic(out_path) as f:
        for rec in records:
            n_in += 1
            kept, _ = filt.process(rec)
            if kept is not None:
                f.write(json.dumps(kept, ensure_ascii=False) + "\n")
                n_out += 1
            if on_progress and n_in % progress_every == 0:
                on_progress(n_in)
    tally.check()
    return {"curate": tally.as_dict(), "rows_in": n_in, "rows_out": n_out, "bloom_bytes": bloom.nbytes,
            "seconds": round(time.perf_counter() - t0, 2), "negatives_dropped": filt.neg_dropped}
