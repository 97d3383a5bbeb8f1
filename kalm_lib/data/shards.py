"""Each process's share of a training source, read as a stream from a resumable position.

A *source* is a set of unified-record files (``*.jsonl``, ``*.jsonl.gz``, ``*.parquet``) or a hub dataset. Each of
the ``world`` processes reads its own share of every file, so the shares are disjoint and together they are the
whole source, and no process reads another's rows:

- plain JSONL: the byte range ``[size*r/world, size*(r+1)/world)``; a line belongs to the process whose range holds
  its first byte (the input-split rule of Hadoop), so no line is cut or read twice and the shares are balanced in
  bytes; a process seeks straight to its range;
- gzip JSONL (a gzip stream cannot be entered in the middle): every process decompresses the file and keeps the
  lines ``j % world == r`` (prefer plain JSONL or parquet at scale);
- parquet: the row range ``[n*r/world, n*(r+1)/world)``; row groups outside it are not read;
- a hub dataset (:class:`HubSource`): ``datasets`` streaming split by
  :func:`datasets.distributed.split_dataset_by_node` (whole shards per process when their number divides by
  ``world``; otherwise every process reads all rows and keeps one in ``world``).

Every line or row goes through the one record check (:func:`kalm_lib.data.records.account_line`,
:func:`~kalm_lib.data.records.accept_record`) and is counted under the source's name in the process's
:class:`~kalm_lib.data.records.Tally` (no duplicate-id check: that needs memory growing with the data; curation
deduplicates). A reader's :meth:`~FileSource.state` is exact: a reader created from it yields exactly the rows the
first one would have yielded next. Files are read in a new order on every pass (seeded). Memory: one line, or one
parquet record batch of ``batch_rows`` rows, per source, whatever the size of the data.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import random
import re
import zlib
from pathlib import Path
from typing import Any, Iterator

from kalm_lib.data.cards import HubSpec
from kalm_lib.data.records import (MAX_LINE_BYTES, DataFormatError, Tally, accept_record, account_line, next_line,
                                   open_binary)
from kalm_lib.data.streaming import SHARD_SUFFIXES, check_hub_columns, hub_row_record, open_hub_dataset

__all__ = ["expand_files", "source_name", "estimate_rows", "FileSource", "HubSource"]

# a trailing shard number: name-00003, name_00003, name-00003-of-00016 (five digits, as the hub and `datasets` write
# them), name.part-3; a name like mmarco-2022 keeps its number
_SHARD_NUMBER = re.compile(r"([-_.]\d{5}(-of-\d{5})?|[-_.]part-?\d+)$")
_SAMPLE_BYTES, _CHUNK = 1 << 20, 1 << 16


def source_name(path: str | Path) -> str:
    """The source a shard file belongs to: its name without the record suffix and a trailing shard number
    (``all-nli-00003-of-00016.jsonl`` -> ``all-nli``; ``afqmc.parquet`` -> ``afqmc``; ``mmarco-2022.jsonl`` ->
    ``mmarco-2022``)."""
    name = Path(path).name
    for suffix in sorted(SHARD_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    return _SHARD_NUMBER.sub("", name) or name


def expand_files(patterns: list[str], where: str) -> list[Path]:
    """The record files ``patterns`` name (globs, files, or folders of shards), sorted and without repeats.
    A pattern that matches nothing, or an empty file, is a :class:`DataFormatError` naming ``where``."""
    found: dict[str, Path] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern), recursive=True))
        if not matches:
            raise DataFormatError(f"{where}: {pattern!r} matches no file")
        for m in map(Path, matches):
            files = sorted(f for f in m.iterdir() if f.name.endswith(SHARD_SUFFIXES) and not f.name.startswith(".")) \
                if m.is_dir() else [m]
            for f in files:
                if not f.name.endswith(SHARD_SUFFIXES):
                    raise DataFormatError(f"{where}: {f} is not a record file ({', '.join(SHARD_SUFFIXES)})")
                if f.stat().st_size == 0:
                    raise DataFormatError(f"{where}: {f}: empty file", reason="empty_file", path=f)
                found[str(f)] = f
    if not found:
        raise DataFormatError(f"{where}: no record files in {patterns}")
    return [found[k] for k in sorted(found)]


def estimate_rows(files: list[Path]) -> int:
    """Rows in ``files``, for source weights: exact for parquet (its metadata) and for JSONL files up to 1 MiB;
    larger JSONL files are estimated from the lines in their first MiB (gzip: per compressed byte)."""
    total = 0
    for f in files:
        if f.name.endswith(".parquet"):
            import pyarrow.parquet as pq  # optional dependency, only for parquet shards

            total += pq.ParquetFile(f).metadata.num_rows
            continue
        with contextlib.ExitStack() as stack:
            fh = open_binary(f, stack)
            lines, last = 0, b"\n"
            for _ in range(_SAMPLE_BYTES // _CHUNK):   # 64 KiB at a time: the estimate holds no more
                chunk = fh.read(_CHUNK)
                if not chunk:
                    break
                lines, last = lines + chunk.count(b"\n"), chunk[-1:]
            raw = getattr(fh, "fileobj", None)  # a gzip file: how much of the compressed file that was
            read = raw.tell() if raw is not None else fh.tell()
            size = f.stat().st_size
            lines += last != b"\n"
            total += lines if read >= size else int(lines * size / max(1, read))
    return total


class FileSource:
    """One source's share for process ``rank`` of ``world``: its records, one pass after another.

    ``take(n)`` returns the next ``n`` records of the current pass (fewer at its end); ``next_pass()`` starts the
    next pass (files in a new seeded order). ``state()`` / ``load_state()``: the exact reading position.
    """

    def __init__(self, name: str, files: list[Path], *, rank: int, world: int, tally: Tally, seed: int = 0,
                 max_line_bytes: int = MAX_LINE_BYTES, batch_rows: int = 1024):
        self.name, self.files, self.rank, self.world = name, list(files), rank, world
        self.tally, self.seed, self.max_line_bytes, self.batch_rows = tally, seed, max_line_bytes, batch_rows
        self.pass_no, self.file_no, self.offset = 0, 0, None   # offset None: the start of this share of the file
        self._rows: Iterator[dict] | None = None

    def take(self, n: int) -> list[dict]:
        if self._rows is None:
            self._rows = self._iter()
        return list(itertools.islice(self._rows, n))

    def next_pass(self) -> None:
        self.pass_no, self.file_no, self.offset, self._rows = self.pass_no + 1, 0, None, None

    def state(self) -> dict[str, Any]:
        return {"pass": self.pass_no, "file": self.file_no, "offset": self.offset}

    def load_state(self, state: dict[str, Any]) -> None:
        self.pass_no, self.file_no, self.offset, self._rows = state["pass"], state["file"], state["offset"], None

    def order(self) -> list[Path]:
        """The files of the current pass, in its seeded order (the same on every process)."""
        files = list(self.files)
        random.Random(f"kalm-shards-{self.seed}-{self.name}-{self.pass_no}").shuffle(files)
        return files

    # ------------------------------------------------------------------ reading
    def _iter(self) -> Iterator[dict]:
        """The records of the pass from the current position; the position moves before each is yielded."""
        files = self.order()
        while self.file_no < len(files):
            path = files[self.file_no]
            try:
                if path.name.endswith(".parquet"):
                    yield from self._parquet_rows(path)
                else:
                    yield from self._lines(path)
            except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                raise DataFormatError(f"training source {self.name!r}: {path} cannot be read "
                                      f"({type(e).__name__}: {e}); curate it again", path=path) from None
            self.file_no, self.offset = self.file_no + 1, None

    def _lines(self, path: Path) -> Iterator[dict]:
        with contextlib.ExitStack() as stack:
            f = open_binary(path, stack)
            if hasattr(f, "fileobj"):  # gzip: every process decompresses, keeps lines j % world == rank
                yield from self._strided_lines(path, f)
            else:
                yield from self._byte_range_lines(path, f)

    def _byte_range_lines(self, path: Path, f: Any) -> Iterator[dict]:
        size = path.stat().st_size
        start, end = size * self.rank // self.world, size * (self.rank + 1) // self.world
        if self.offset is not None:
            pos = self.offset
            f.seek(pos)
        elif start == 0:
            pos = 0
        else:  # the line holding byte start-1 belongs to the process before: skip to the next line start
            f.seek(start - 1)
            line = next_line(f, self.max_line_bytes)
            pos = start - 1 + (line[0] if line else 0)
        while pos < end and (line := next_line(f, self.max_line_bytes)) is not None:
            size_read, text, kind = line
            where = {"file": str(path), "byte": pos}
            pos += size_read
            rec = account_line(text, kind, self.tally, self.name, None, default_id=f"{path.name}@{where['byte']}",
                               where=where)
            if rec is not None:
                self.offset = pos
                yield rec
        self.offset = pos

    def _strided_lines(self, path: Path, f: Any) -> Iterator[dict]:
        j, first = 0, self.offset or 0
        while (line := next_line(f, self.max_line_bytes)) is not None:
            j += 1  # line j (1-based) is the process's when (j - 1) % world == rank
            if j <= first or (j - 1) % self.world != self.rank:
                continue
            _, text, kind = line
            rec = account_line(text, kind, self.tally, self.name, None, default_id=f"{path.name}:{j}",
                               where={"file": str(path), "line": j})
            if rec is not None:
                self.offset = j
                yield rec
        self.offset = j

    def _parquet_rows(self, path: Path) -> Iterator[dict]:
        import pyarrow as pa  # optional dependency, only for parquet shards
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise DataFormatError(f"training source {self.name!r}: {path} is not a readable parquet file ({e})",
                                  reason="corrupt_parquet", path=path) from None
        n = pf.metadata.num_rows
        start, end = n * self.rank // self.world, n * (self.rank + 1) // self.world
        row = self.offset if self.offset is not None else start   # the next row of the file to read
        group_start = 0
        for g in range(pf.num_row_groups):
            group_end = group_start + pf.metadata.row_group(g).num_rows
            at = group_start
            if group_end > row and group_start < end:  # only the row groups that hold rows of this share
                for batch in pf.iter_batches(batch_size=self.batch_rows, row_groups=[g]):
                    lo, hi = max(row, at), min(end, at + batch.num_rows)
                    rows = batch.slice(lo - at, hi - lo).to_pylist() if lo < hi else []
                    for i, obj in enumerate(rows, start=lo):
                        self.tally.seen(self.name)
                        rec = accept_record(obj, self.tally, self.name, None, default_id=f"{path.name}:{i + 1}",
                                            where={"file": str(path), "line": i + 1})
                        if rec is not None:
                            self.offset = i + 1
                            yield rec
                    at += batch.num_rows
                    if at >= end:
                        break
            group_start = group_end
            if group_start >= end:
                break
        self.offset = max(row, end)


class HubSource:
    """One hub dataset's share for process ``rank`` (``datasets`` streaming + ``split_dataset_by_node``), with the
    interface of :class:`FileSource`. The position is ``datasets``' own ``state_dict`` (exact without a shuffle
    buffer; none is used). Rows are mapped to records by the spec's columns (:func:`hub_row_record`)."""

    def __init__(self, name: str, spec: HubSpec, *, rank: int, world: int, tally: Tally):
        self.name, self.spec, self.rank, self.world, self.tally = name, spec, rank, world, tally
        self.pass_no, self.rows_read, self.ds_state = 0, 0, None
        self._rows: Iterator[dict] | None = None
        self._ds: Any = None

    def take(self, n: int) -> list[dict]:
        if self._rows is None:
            self._rows = self._iter()
        return list(itertools.islice(self._rows, n))

    def next_pass(self) -> None:
        self.pass_no, self.rows_read, self.ds_state, self._rows = self.pass_no + 1, 0, None, None

    def state(self) -> dict[str, Any]:
        return {"pass": self.pass_no, "rows": self.rows_read,
                "datasets": self._ds.state_dict() if self._ds is not None and self._rows is not None else self.ds_state}

    def load_state(self, state: dict[str, Any]) -> None:
        self.pass_no, self.rows_read, self.ds_state, self._rows = state["pass"], state["rows"], state["datasets"], None

    def _iter(self) -> Iterator[dict]:
        from datasets.distributed import split_dataset_by_node  # heavy optional dependency: hub sources only

        where = f"training source {self.name!r} (hf:{self.spec.path})"
        self._ds = split_dataset_by_node(open_hub_dataset(self.spec, where), rank=self.rank, world_size=self.world)
        if self.ds_state is not None:
            self._ds.load_state_dict(self.ds_state)
        checked = False
        for row in self._ds:
            if not checked:
                check_hub_columns(where, row, self.spec.columns)
                checked = True
            self.rows_read += 1
            self.tally.seen(self.name)
            k = f"r{self.rank}-{self.rows_read}"
            rec = accept_record(hub_row_record(row, self.spec, self.name, k), self.tally, self.name, None,
                                default_id=f"{self.name}:{k}", where={"file": where, "line": self.rows_read})
            if rec is not None:
                yield rec
        self.ds_state = self._ds.state_dict()
