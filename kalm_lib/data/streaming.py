"""Streaming curation with bounded memory: JSONL / parquet shards or a hub dataset via ``datasets`` streaming.

The paper's stage-1 data has ~470M pairs; nothing here holds the input in memory. Records are read by the
one record reader (:func:`kalm_lib.data.records.read_records`), flow one at a time through the same
:class:`~kalm_lib.data.filters.RecordFilter` as the in-memory pipeline and are written line by line
(atomically: the output appears complete or not at all). What differs, so memory stays flat:

- exact dedup (and the record-id check) use a scalable Bloom filter (:class:`ScalableBloomFilter`) sized
  from the expected row count with a stated false-positive rate: a unique row is wrongly rejected as a
  duplicate with probability at most ``error_rate``, however many rows come (the filter grows when the
  expectation was too low; memory ~1.44 log2(1/p) bits per row), never the reverse;
- near-duplicate removal (MinHash index grows with the data) is off;
- mining is a separate pass (``kalm mine``) over the curated output.

Inputs: a directory of ``*.jsonl``, ``*.jsonl.gz`` or ``*.parquet`` shards (sorted by name), one such file,
or a hub dataset: ``hf:<dataset id>[:<config>]:<split>`` with a column mapping to the unified record, or a
data card's ``hub:`` block (:class:`~kalm_lib.data.cards.HubSpec`; needs the hub, so
``HF_DATASETS_OFFLINE=0`` on a GPU box); local files can also go through ``datasets`` streaming
(``iter_hub_records("json:train", ..., data_files=...)``). A shard that cannot be read (empty, truncated or
fake gzip, a directory named like a shard, corrupt parquet) is a rejected file in the tally, its rows
read before the damage kept, unless ``strict``. Output: one file, or one file per record source
(:class:`SourceShards`: what the trainer streams as separate sources). ``kalm curate --stream``
(:func:`kalm_lib.data.curate.stream_curate_sources`) puts the pieces together.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from kalm_lib.atomic import open_atomic, publish_dir, temp_sibling
from kalm_lib.data.cards import HubSpec
from kalm_lib.data.filters import FilterConfig, RecordFilter
from kalm_lib.data.records import MAX_LINE_BYTES, DataFormatError, Tally, accept_record, read_records

__all__ = ["BloomFilter", "ScalableBloomFilter", "BloomSet", "SHARD_SUFFIXES", "shard_files", "iter_parquet_records",
           "parse_hub_spec", "open_hub_dataset", "check_hub_columns", "hub_row_record", "iter_hub_records",
           "iter_input", "SourceShards", "stream_curate"]

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
_SAFE_NAME = re.compile(r"[^\w.-]+")


def _hash_pair(key: str) -> tuple[int, int]:
    """Two 64-bit hashes of ``key`` (double hashing derives every bit position from them)."""
    d = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little") | 1


class BloomFilter:
    """Fixed-memory set membership (no false negatives), sized for ``capacity`` keys at ``error_rate``.

    ``add`` returns True if the key was (probably) there. Past ``capacity`` keys the false-positive rate
    climbs above ``error_rate`` (:attr:`current_fpr`); :class:`ScalableBloomFilter` grows instead.
    """

    def __init__(self, capacity: int = 10_000_000, error_rate: float = 1e-4):
        if capacity < 1 or not 0 < error_rate < 1:
            raise ValueError(f"BloomFilter: capacity must be >= 1 and 0 < error_rate < 1 "
                             f"(got {capacity}, {error_rate})")
        self.capacity, self.error_rate = capacity, error_rate
        self.num_bits = max(64, int(math.ceil(-capacity * math.log(error_rate) / math.log(2) ** 2)))
        self.num_hashes = max(1, int(round(self.num_bits / capacity * math.log(2))))
        self.bits = bytearray((self.num_bits + 7) // 8)
        self.count = 0  # keys inserted (false positives are not inserted)

    def contains_hashed(self, h1: int, h2: int) -> bool:
        m, bits = self.num_bits, self.bits
        for i in range(self.num_hashes):
            p = (h1 + i * h2) % m
            if not bits[p >> 3] & (1 << (p & 7)):
                return False
        return True

    def insert_hashed(self, h1: int, h2: int) -> None:
        m, bits = self.num_bits, self.bits
        for i in range(self.num_hashes):
            p = (h1 + i * h2) % m
            bits[p >> 3] |= 1 << (p & 7)
        self.count += 1

    def add(self, key: str) -> bool:
        h1, h2 = _hash_pair(key)
        if self.contains_hashed(h1, h2):
            return True
        self.insert_hashed(h1, h2)
        return False

    @property
    def current_fpr(self) -> float:
        """The false-positive rate of the next lookup of a new key at the current fill."""
        return (1.0 - math.exp(-self.num_hashes * self.count / self.num_bits)) ** self.num_hashes

    @property
    def nbytes(self) -> int:
        return len(self.bits)


class ScalableBloomFilter:
    """A Bloom filter that keeps its false-positive rate whatever the number of keys (Almeida et al. 2007).

    The first filter holds ``expected_rows`` keys at ``error_rate * (1 - tightening)``; when the newest is
    full, a new one with ``growth`` times the capacity and ``tightening`` times the error rate is added.
    A new key is a false positive if any filter says "present": probability at most
    ``sum_i error_rate (1 - r) r^i < error_rate`` for every lookup. Sized right, it is one filter.
    """

    def __init__(self, expected_rows: int = 10_000_000, error_rate: float = 1e-4, *, growth: int = 2,
                 tightening: float = 0.5):
        if expected_rows < 1 or not 0 < error_rate < 1 or growth < 1 or not 0 < tightening < 1:
            raise ValueError(f"ScalableBloomFilter: need expected_rows >= 1, 0 < error_rate < 1, growth >= 1, "
                             f"0 < tightening < 1 (got {expected_rows}, {error_rate}, {growth}, {tightening})")
        self.expected_rows, self.error_rate = expected_rows, error_rate
        self.growth, self.tightening = growth, tightening
        self.filters = [BloomFilter(expected_rows, error_rate * (1 - tightening))]

    def add(self, key: str) -> bool:
        h1, h2 = _hash_pair(key)
        if any(f.contains_hashed(h1, h2) for f in self.filters):
            return True
        last = self.filters[-1]
        if last.count >= last.capacity:
            last = BloomFilter(last.capacity * self.growth, last.error_rate * self.tightening)
            self.filters.append(last)
        last.insert_hashed(h1, h2)
        return False

    @property
    def count(self) -> int:
        return sum(f.count for f in self.filters)

    @property
    def current_fpr(self) -> float:
        """Bound on the false-positive rate of the next lookup (union bound over the filters)."""
        return min(1.0, sum(f.current_fpr for f in self.filters))

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.filters)

    def stats(self) -> dict[str, Any]:
        """What the curation report states: sizing, stated bound, keys, filters, memory, FPR now."""
        return {"expected_rows": self.expected_rows, "target_fpr": self.error_rate, "keys": self.count,
                "filters": len(self.filters), "bytes": self.nbytes, "fpr_bound_now": self.current_fpr}


class BloomSet:
    """The ``set`` interface RecordFilter and the id check use (``in`` + ``add``), over a Bloom filter."""

    def __init__(self, bloom: BloomFilter | ScalableBloomFilter):
        self.bloom = bloom
        self._last: tuple[Any, bool] | None = None

    def __contains__(self, key: Any) -> bool:
        # callers do `key in s` then `s.add(key)`: insert here and remember the answer
        present = self.bloom.add(str(key))
        self._last = (key, present)
        return present

    def add(self, key: Any) -> None:
        if self._last is None or self._last[0] != key:
            self.bloom.add(str(key))


# ---------------------------------------------------------------------------------------------- inputs
def shard_files(path: str | Path) -> list[Path]:
    """Shard files of a directory (names ending in :data:`SHARD_SUFFIXES`, sorted; hidden names skipped) or
    a single file. A directory named like a shard is listed too: reading it rejects it (``not_a_file``).
    A missing input or a directory without shards is a :class:`DataFormatError` (always fatal)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataFormatError(f"input not found: {p}")
    files = sorted(f for f in p.iterdir() if f.name.endswith(SHARD_SUFFIXES) and not f.name.startswith("."))
    if not files:
        raise DataFormatError(f"{p}: no {', '.join('*' + s for s in SHARD_SUFFIXES)} shards")
    return files


def iter_parquet_records(path: Path, tally: Tally, source: str, seen_ids: set | None,
                         batch_rows: int = 8192) -> Iterator[dict]:
    """Unified records from a parquet file, one record batch in memory at a time (the one record check).
    A file that is not parquet is a :class:`DataFormatError` (``corrupt_parquet``, ``not_a_file``...)."""
    import pyarrow as pa  # optional dependency, only for parquet shards
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: not a file (a directory?)", reason="not_a_file", path=path)
    row = 0
    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=batch_rows):
            for obj in batch.to_pylist():
                row += 1
                tally.seen(source)
                rec = accept_record(obj, tally, source, seen_ids, default_id=f"{path.name}:{row}",
                                    where={"file": str(path), "line": row})
                if rec is not None:
                    yield rec
    except (pa.ArrowException, OSError) as e:
        err = DataFormatError(f"{path}: not a readable parquet file ({' '.join(str(e).split())[:200]})",
                              reason="corrupt_parquet", path=path)
        err.rows_read = row
        raise err from None
    if row == 0:
        raise DataFormatError(f"{path}: empty file (no rows)", reason="empty_file", path=path)


def parse_hub_spec(spec: str, mapping: dict[str, str] | None = None, **fields: Any) -> HubSpec:
    """``hf:<dataset id>[:<config>]:<split>`` (or ``json:train`` with ``data_files``) -> a :class:`HubSpec`."""
    parts = spec.split(":")
    if parts[0] == "hf":
        parts = parts[1:]
    if len(parts) not in (2, 3) or not all(parts):
        raise DataFormatError(f"{spec}: expected hf:<dataset id>[:<config>]:<split>")
    mapping = {k: v for k, v in (mapping or {}).items() if k != "source_name"}
    return HubSpec(path=parts[0], config=parts[1] if len(parts) == 3 else None, split=parts[-1], columns=mapping,
                   **fields)


def open_hub_dataset(spec: HubSpec, where: str) -> Any:
    """``datasets`` streaming over ``spec`` (an IterableDataset); a dataset that cannot be opened is a
    :class:`DataFormatError` naming it (datasets raises many types: not found, offline, bad split...)."""
    from datasets import load_dataset  # heavy optional dependency: only when a hub dataset is streamed

    try:
        return load_dataset(spec.path, spec.config, split=spec.split, streaming=True, revision=spec.revision,
                            data_files=spec.data_files)
    except Exception as e:
        raise DataFormatError(f"{where}: cannot open the dataset ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]})") from None


def check_hub_columns(where: str, row: dict, mapping: dict[str, str]) -> None:
    """A column mapping that names columns the dataset lacks is a mistake: say which, and what there is."""
    for field in ("query", "pos") + (("neg",) if "neg" in mapping else ()):
        col = mapping.get(field, field)
        if col not in row:
            raise DataFormatError(f"{where}: no column {col!r} for the record field {field!r}; the dataset's "
                                  f"columns: {sorted(row)} (map them with --columns query=COL,pos=COL)")


def hub_row_record(row: dict, spec: HubSpec, source: str, k: int) -> dict:
    """A dataset row -> a unified record (not yet checked): a row that already is one passes as it is;
    otherwise the mapped columns (a string ``pos``/``neg`` becomes a 1-list) and the spec's defaults.
    Absent columns stay absent (the record check names them)."""
    if all(f in row for f in ("id", "task_type")) and "query" in row:
        rec = row
    else:
        cols = spec.columns
        pos, neg = row.get(cols.get("pos", "pos")), row.get(cols.get("neg", "neg"), []) or []
        rec = {"id": f"{source}:{k}", "query": row.get(cols.get("query", "query")),
               "pos": [pos] if isinstance(pos, str) else pos, "neg": [neg] if isinstance(neg, str) else neg,
               "task_type": spec.task_type, "category": spec.category, "instruction": spec.instruction,
               "lang": spec.lang, "source": source}
    return {f: v for f, v in rec.items() if v is not None}  # an absent column is a missing field


def iter_hub_records(spec: str | HubSpec, mapping: dict[str, str] | None, tally: Tally, *,
                     task_type: str = "pretrain", category: str = "weak_pairs", instruction: str = "",
                     lang: str = "en", data_files: Any = None, source: str | None = None) -> Iterator[dict]:
    """Records from ``datasets`` streaming: a :class:`HubSpec` (a card's ``hub:`` block), or
    ``hf:<id>[:<config>]:<split>`` (or a local builder such as ``json`` / ``parquet`` with ``data_files``)
    with ``mapping`` from record fields to dataset columns (``{"query": "anchor", "pos": "positive"}``).
    A dataset that cannot be opened, or a mapping naming absent columns, is a :class:`DataFormatError`."""
    where = spec if isinstance(spec, str) else f"hf:{spec.path}"
    if isinstance(spec, str):
        spec = parse_hub_spec(spec, mapping, task_type=task_type, category=category, instruction=instruction,
                              lang=lang, data_files=data_files)
    source = source or (mapping or {}).get("source_name") or spec.path.split("/")[-1]
    rows = iter(open_hub_dataset(spec, where))
    try:
        first = next(rows, None)
    except Exception as e:  # the first read is where datasets finds a missing/broken file
        raise DataFormatError(f"{where}: cannot open the dataset ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]})") from None
    if first is None:
        raise DataFormatError(f"{where}: the dataset has no rows", reason="empty_file")
    check_hub_columns(where, first, spec.columns)
    for k, row in enumerate(_chain(first, rows)):
        tally.seen(source)
        rec = accept_record(hub_row_record(row, spec, source, k), tally, source, None, default_id=f"{source}:{k}",
                            where={"file": where, "line": k + 1})
        if rec is not None:
            yield rec


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def iter_input(spec: str | Path, tally: Tally, seen_ids: Any = None, *, strict: bool = False,
               mapping: dict[str, str] | None = None, max_line_bytes: int = MAX_LINE_BYTES,
               **hub_kwargs: Any) -> Iterator[dict]:
    """Records from a shard directory/file or ``hf:...`` spec, streamed; counted per file (the file name
    is the tally's source). A shard that cannot be read is a rejected file in ``tally`` (its rows read
    before the damage were already passed on) unless ``strict``, where it is the error."""
    if str(spec).startswith("hf:"):
        yield from iter_hub_records(str(spec), mapping, tally, **hub_kwargs)
        return
    for f in shard_files(spec):
        try:
            if f.name.endswith(".parquet"):
                yield from iter_parquet_records(f, tally, f.name, seen_ids)
            else:  # line by line, never the whole file
                yield from read_records(f, tally, f.name, seen_ids, max_line_bytes=max_line_bytes)
        except DataFormatError as e:
            if strict or e.reason is None:
                raise
            tally.reject_file(f, e.reason, str(e), e.rows_read)


class SourceShards:
    """A folder with one JSONL file per record source (``<folder>/<source>.jsonl``): what the trainer streams
    as separate sources (every global batch from one of them). Written into a hidden temporary folder and
    published whole by :meth:`publish` (:func:`kalm_lib.atomic.publish_dir`); :meth:`discard` drops it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.tmp = temp_sibling(self.folder)
        self.tmp.mkdir(parents=True)
        self.files: dict[str, IO[str]] = {}
        self.rows: dict[str, int] = {}

    def write(self, rec: dict, line: str) -> None:
        name = _SAFE_NAME.sub("_", rec.get("source") or "unnamed").strip("._") or "unnamed"
        f = self.files.get(name)
        if f is None:
            f = self.files[name] = open(self.tmp / f"{name}.jsonl", "w", encoding="utf-8")
            self.rows[name] = 0
        f.write(line)
        self.rows[name] += 1

    def _close(self) -> None:
        for f in self.files.values():
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()

    def publish(self) -> dict[str, int]:
        """Move the finished folder into place (an old one is replaced whole); rows per file name."""
        self._close()
        publish_dir(self.tmp, self.folder)
        return {f"{name}.jsonl": n for name, n in sorted(self.rows.items())}

    def discard(self) -> None:
        self._close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- pipeline
def stream_curate(records: Iterator[dict], out: str | Path | IO[str] | SourceShards,
                  filter_cfg: FilterConfig | None = None, *,
                  leakage: Any = None, expected_rows: int = 10_000_000, dedup_fpr: float = 1e-4,
                  tally: Tally | None = None, on_progress: Callable[[int], None] | None = None,
                  progress_every: int = 100_000) -> dict:
    """Filter a record stream into ``out`` (a path, written atomically, an open text file, or
    :class:`SourceShards`: one file per source); returns the curate tally, counts and the dedup filter's
    sizing and stated false-positive rate.

    The filters are those of the in-memory curation (:class:`~kalm_lib.data.filters.RecordFilter`) with
    near-duplicate removal off and exact dedup on a :class:`ScalableBloomFilter` sized for
    ``expected_rows`` at ``dedup_fpr``. ``tally``: count into this one (several stages, one report).
    ``on_progress(rows_seen)`` is called every ``progress_every`` input rows (the memory benchmark samples
    the resident set size there).
    """
    cfg = replace(filter_cfg or FilterConfig(), dedup_near=False)
    bloom = ScalableBloomFilter(expected_rows, dedup_fpr)
    tally = tally if tally is not None else Tally()
    filt = RecordFilter(cfg, leakage, tally, exact_set=BloomSet(bloom))
    n_in = n_out = 0
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        f: Any = stack.enter_context(open_atomic(out)) if isinstance(out, (str, Path)) else out
        for rec in records:
            n_in += 1
            kept, _ = filt.process(rec)
            if kept is not None:
                line = json.dumps(kept, ensure_ascii=False) + "\n"
                if isinstance(out, SourceShards):
                    out.write(kept, line)
                else:
                    f.write(line)
                n_out += 1
            if on_progress and n_in % progress_every == 0:
                on_progress(n_in)
        tally.check()
    return {"curate": tally.as_dict(), "rows_in": n_in, "rows_out": n_out, "bloom_bytes": bloom.nbytes,
            "dedup": bloom.stats(), "seconds": round(time.perf_counter() - t0, 2),
            "negatives_dropped": filt.neg_dropped}
