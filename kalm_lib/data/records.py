"""The unified training record: its fields, its task-type vocabulary, its one check and its one reader.

``{"id", "query", "pos": [...], "neg": [...], "task_type", "category", "instruction", "lang", "source"}``
(DESIGN.md §1.4). Every reader of record files (curation in memory and streaming, ``kalm mine``, the
trainer's ``load_records``) goes through :func:`record_problem` and :func:`read_records`, so a line is kept
or rejected for the same reason, under the same name, everywhere.

Required fields: ``query`` (a non-blank string) and ``pos`` (a non-empty list of non-blank strings). The
others are optional and filled in when absent: ``id`` = ``"<file name>:<line number>"``, ``neg`` = ``[]``,
``task_type`` = ``"retrieval"``, ``category`` / ``instruction`` / ``lang`` / ``source`` = ``""``. Present
fields must have their type (strings; ``neg`` a list of non-blank strings; ``task_type`` one of
:data:`TASK_TYPES`). Curated files always carry every field; hand-written training files need only the two.

Every line is accounted for: a non-blank line is a row, kept or rejected with one reason of
:data:`REJECTION_REASONS` (checked in this order: ``line_too_long``, ``invalid_utf8``, ``malformed_json``,
``not_an_object`` (``null``, numbers, strings, lists), then ``missing_field``, ``wrong_type``,
``invalid_utf8`` / ``nul_byte`` (inside a text), ``unknown_task_type``, ``empty_query``, ``no_positive``,
``empty_text`` and ``duplicate_id``); blank lines are counted apart. A :class:`Tally` keeps the counts, a
bounded sample of rejected rows (file, line, reason, field, excerpt) and the files that could not be read
at all (:data:`FILE_REJECTION_REASONS`); :func:`read_records` checks, per file, that the last line number
equals rows + blank lines and that rows = kept + rejected (:class:`AccountingError` otherwise).
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import json
import re
import zlib
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["TASK_TYPES", "SYMMETRIC_TASK_TYPES", "RECORD_FIELDS", "REQUIRED_FIELDS", "OPTIONAL_FIELDS", "RECORD_DEFAULTS",
           "REJECTION_REASONS", "FILE_REJECTION_REASONS", "MAX_LINE_BYTES", "DataFormatError", "AccountingError",
           "Tally", "bad_text", "make_record", "record_problem", "record_problem_detail", "complete_record",
           "accept_record", "account_line", "parse_record_line", "excerpt", "open_binary", "next_line", "iter_lines",
           "read_records", "load_records"]

# The one task-type vocabulary: unified records, training configs (per-task in-batch switch), ablation
# tables and evaluation (each evaluation type maps onto one of these).
TASK_TYPES = ("retrieval", "reranking", "sts", "pair_classification", "classification", "clustering", "nli",
              "pretrain")
# Symmetric tasks: both texts play the same role (the instruction policy treats both sides alike).
SYMMETRIC_TASK_TYPES = ("sts", "pair_classification")

# field -> type, in the order records are written (docs/CONTRACTS.md)
RECORD_FIELDS: dict[str, type] = {"id": str, "query": str, "pos": list, "neg": list, "task_type": str,
                                  "category": str, "instruction": str, "lang": str, "source": str}
REQUIRED_FIELDS = ("query", "pos")
# optional fields beyond the record's own, type-checked when present (never filled in): ``label``, the readable
# class text of an example-based classification/clustering record (the trainer's data.positives: label_text)
OPTIONAL_FIELDS: dict[str, type] = {"label": str}
# what an absent optional field becomes (``id`` is special: "<file name>:<line number>")
RECORD_DEFAULTS: dict[str, Any] = {"neg": [], "task_type": "retrieval", "category": "", "instruction": "",
                                   "lang": "", "source": ""}
REJECTION_REASONS = {
    "line_too_long": "the line is longer than MAX_LINE_BYTES (skipped in pieces, never read whole)",
    "invalid_utf8": "bytes that are not UTF-8 (in the line or a text)",
    "malformed_json": "the line is not JSON",
    "not_an_object": "the line is JSON but not an object (null, a number, a string, a list)",
    "missing_field": "query or pos is absent (the sample names which)",
    "wrong_type": "a field (or a pos/neg item) has the wrong type",
    "nul_byte": "a text holds a NUL character",
    "unknown_task_type": "task_type is not one of TASK_TYPES",
    "empty_query": "the query is blank",
    "no_positive": "pos is an empty list",
    "empty_text": "a positive or negative is blank",
    "duplicate_id": "the id was seen before in the same read",
}
# A whole file that cannot be read: in curation a rejected file (counted, named in the report; the rows
# read before the damage are kept), an error in strict mode and for a single training file.
FILE_REJECTION_REASONS = {
    "not_found": "the file does not exist",
    "not_a_file": "a directory (or other non-file) named like a shard",
    "unreadable": "the file cannot be opened or read (permissions, I/O error)",
    "empty_file": "no non-blank line (an empty shard)",
    "not_gzip": "named .gz but not gzip data",
    "truncated_gzip": "the gzip stream ends early (a cut download or copy)",
    "corrupt_gzip": "gzip data that fails to decompress or its checksum",
    "corrupt_parquet": "not a readable parquet file",
}
MAX_LINE_BYTES = 8 << 20     # a longer line is rejected (``line_too_long``): its first piece of this size is
# read (a reader holds ~2x this at most), the rest skipped in 1 MiB pieces
EXCERPT_CHARS = 200          # of a rejected line, in the rejected-row samples


class DataFormatError(ValueError):
    """A whole input that cannot be used (missing, empty, not gzip, wrong structure); names the file.

    ``reason``: one of :data:`FILE_REJECTION_REASONS` when the file can be skipped as a rejected file
    (None: a mistake that always stops the run); ``rows_read``: rows read before the damage.
    """

    def __init__(self, message: str, *, reason: str | None = None, path: str | Path | None = None):
        super().__init__(message)
        self.reason, self.path, self.rows_read = reason, path, 0


class AccountingError(RuntimeError):
    """The internal line accounting does not add up (a reader lost or double-counted a row): a bug."""


class Tally:
    """Counts per source: rows in, rows kept, rows rejected per reason (rows in = kept + rejected), blank
    lines, a bounded sample of rejected rows per (source, reason), and the files rejected as a whole."""

    def __init__(self, sample_limit: int = 5) -> None:
        self.rows_in: collections.Counter = collections.Counter()
        self.kept: collections.Counter = collections.Counter()
        self.rejected: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.blank: collections.Counter = collections.Counter()
        self.samples: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
        self.files_rejected: list[dict[str, Any]] = []
        self.sample_limit = sample_limit

    def seen(self, source: str, n: int = 1) -> None:
        self.rows_in[source] += n

    def keep(self, source: str, n: int = 1) -> None:
        self.kept[source] += n

    def reject(self, source: str, reason: str, n: int = 1, *, sample: dict[str, Any] | None = None) -> None:
        """``n`` rows of ``source`` rejected for ``reason``; ``sample`` (file, line, field, excerpt, id...) is
        kept while the (source, reason) bucket holds fewer than ``sample_limit``."""
        self.rejected[source][reason] += n
        if sample is not None:
            bucket = self.samples[(source, reason)]
            if len(bucket) < self.sample_limit:
                bucket.append({"source": source, "reason": reason, **sample})

    def reject_file(self, path: str | Path, reason: str, detail: str, rows_read: int = 0) -> None:
        """A file skipped as a whole (:data:`FILE_REJECTION_REASONS`); its rows read before stay counted."""
        self.files_rejected.append({"file": str(path), "reason": reason, "detail": detail, "rows_read": rows_read})

    def totals(self, source: str) -> tuple[int, int, int]:
        """``(rows in, kept, rejected)`` of one source so far."""
        return self.rows_in[source], self.kept[source], sum(self.rejected[source].values())

    def check(self) -> None:
        """Raise :class:`AccountingError` unless rows in = kept + rejected for every source."""
        for s in set(self.rows_in) | set(self.kept) | set(self.rejected):
            n_in, kept, rej = self.totals(s)
            if n_in != kept + rej or kept < 0:
                raise AccountingError(f"tally for {s}: rows in {n_in} != kept {kept} + rejected {rej}")

    def merge(self, other: "Tally") -> "Tally":
        """Add ``other``'s counts, samples and rejected files to this tally (returns self)."""
        self.rows_in.update(other.rows_in)
        self.kept.update(other.kept)
        self.blank.update(other.blank)
        for s, c in other.rejected.items():
            self.rejected[s].update(c)
        for key, rows in other.samples.items():
            self.samples[key].extend(rows[:max(0, self.sample_limit - len(self.samples[key]))])
        self.files_rejected.extend(other.files_rejected)
        return self

    def state(self) -> dict[str, Any]:
        """Counts, samples and rejected files as JSON-ready data (a training checkpoint keeps them so a resumed
        run goes on counting); :meth:`load_state` reads them back."""
        return {"rows_in": dict(self.rows_in), "kept": dict(self.kept), "blank": dict(self.blank),
                "rejected": {s: dict(c) for s, c in self.rejected.items() if c},
                "samples": self.rejected_samples(), "files_rejected": list(self.files_rejected)}

    def load_state(self, state: dict[str, Any]) -> "Tally":
        """Replace this tally's contents with a :meth:`state` (returns self)."""
        self.rows_in = collections.Counter(state.get("rows_in", {}))
        self.kept = collections.Counter(state.get("kept", {}))
        self.blank = collections.Counter(state.get("blank", {}))
        self.rejected = collections.defaultdict(collections.Counter,
                                                {s: collections.Counter(c) for s, c in state.get("rejected", {}).items()})
        self.samples = collections.defaultdict(list)
        for row in state.get("samples", []):
            self.samples[(row["source"], row["reason"])].append(row)
        self.files_rejected = list(state.get("files_rejected", []))
        return self

    def rejected_samples(self) -> list[dict[str, Any]]:
        """The kept samples of rejected rows, by source then reason."""
        return [row for key in sorted(self.samples) for row in self.samples[key]]

    def as_dict(self) -> dict[str, Any]:
        """Totals and per-source counts, each with ``rejected_by_reason``; rejected files by reason."""
        sources = sorted(set(self.rows_in) | set(self.kept) | set(self.rejected))
        per = {s: {"rows_in": self.rows_in[s], "kept": self.kept[s], "rejected": sum(self.rejected[s].values()),
                   "rejected_by_reason": dict(sorted(self.rejected[s].items()))} for s in sources}
        for s in sources:
            if self.blank[s]:
                per[s]["blank_lines"] = self.blank[s]
        reasons: collections.Counter = collections.Counter()
        for c in self.rejected.values():
            reasons.update(c)
        return {"rows_in": sum(self.rows_in.values()), "kept": sum(self.kept.values()),
                "rejected": sum(reasons.values()), "rejected_by_reason": dict(sorted(reasons.items())),
                "blank_lines": sum(self.blank.values()), "per_source": per,
                "files_rejected": len(self.files_rejected),
                "files_rejected_by_reason": dict(collections.Counter(f["reason"] for f in self.files_rejected)),
                "rejected_files": list(self.files_rejected)}


_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by surrogateescape


def bad_text(value: Any) -> str | None:
    """Reason a raw text value cannot be used, or None: ``wrong_type``, ``invalid_utf8``, ``nul_byte``."""
    if not isinstance(value, str):
        return "wrong_type"
    if _SURROGATE.search(value):
        return "invalid_utf8"
    if "\x00" in value:
        return "nul_byte"
    return None


def excerpt(text: Any, limit: int = EXCERPT_CHARS) -> str:
    """A printable, JSON-safe start of a rejected line or value (bytes that are not UTF-8 as ``\\xNN``)."""
    if not isinstance(text, str):
        text = json.dumps(text, ensure_ascii=False, default=str)
    text = text.rstrip("\r\n")
    cut = text[:limit] + ("…" if len(text) > limit else "")
    return cut.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def make_record(source: str, idx: int | str, query: str, pos: list[str], neg: list[str] | None = None, *,
                task_type: str, category: str, instruction: str, lang: str) -> dict[str, Any]:
    """A unified record (field order as in docs/CONTRACTS.md), id ``"<source>:<idx>"``."""
    assert task_type in TASK_TYPES, task_type
    return {"id": f"{source}:{idx}", "query": query, "pos": list(pos), "neg": list(neg or []),
            "task_type": task_type, "category": category, "instruction": instruction, "lang": lang,
            "source": source}


# ---------------------------------------------------------------------------------------------- the check
def record_problem_detail(obj: Any) -> tuple[str | None, str | None]:
    """THE record check: ``(reason, field)`` why a parsed JSON value is not a usable unified record, or
    ``(None, None)``. ``field`` names the offending field (``"pos"``, ``"neg[1]"``...) where there is one.

    Absent optional fields are fine (see :func:`complete_record`); reasons are those of
    :data:`REJECTION_REASONS` except the line-level ones and ``duplicate_id``.
    """
    if not isinstance(obj, dict):
        return "not_an_object", None
    for k in REQUIRED_FIELDS:
        if k not in obj:
            return "missing_field", k
    for k, t in {**RECORD_FIELDS, **OPTIONAL_FIELDS}.items():
        if k in obj and not isinstance(obj[k], t):
            return "wrong_type", k
    named = [("query", obj["query"]), *((f"pos[{i}]", t) for i, t in enumerate(obj["pos"])),
             *((f"neg[{i}]", t) for i, t in enumerate(obj.get("neg", [])))]
    for field, text in named:
        reason = bad_text(text)
        if reason:
            return reason, field
    if obj.get("task_type", RECORD_DEFAULTS["task_type"]) not in TASK_TYPES:
        return "unknown_task_type", "task_type"
    if not obj["query"].strip():
        return "empty_query", "query"
    if not obj["pos"]:
        return "no_positive", "pos"
    for field, text in named[1:]:
        if not text.strip():
            return "empty_text", field
    return None, None


def record_problem(obj: Any) -> str | None:
    """Why a parsed JSON value is not a usable unified record (a :data:`REJECTION_REASONS` name), or None
    (:func:`record_problem_detail` without the field)."""
    return record_problem_detail(obj)[0]


def complete_record(obj: dict[str, Any], default_id: str) -> dict[str, Any]:
    """A checked record with every field: absent optional fields take :data:`RECORD_DEFAULTS` (``id``:
    ``default_id``). A record that already has every field is returned as is."""
    missing = [k for k in RECORD_FIELDS if k not in obj]
    if not missing:
        return obj
    out = dict(obj)
    for k in missing:
        out[k] = default_id if k == "id" else (list(RECORD_DEFAULTS[k]) if k == "neg" else RECORD_DEFAULTS[k])
    return out


def accept_record(obj: Any, tally: Tally, source: str, seen_ids: Any, default_id: str,
                  where: dict[str, Any] | None = None, raw: Any = None) -> dict | None:
    """Check one parsed record and its id (against ``seen_ids``: a set or set-like, or None for no
    duplicate check); count it as kept or rejected under ``source``; the completed record or None.

    A rejection is sampled with ``where`` (``{"file", "line"}``), the field and an excerpt of ``raw``
    (the line; default: the value itself)."""
    reason, field = record_problem_detail(obj)
    if reason is None:
        obj = complete_record(obj, default_id)
        if seen_ids is not None:
            if obj["id"] in seen_ids:
                reason, field = "duplicate_id", "id"
            else:
                seen_ids.add(obj["id"])
    if reason:
        tally.reject(source, reason, sample={**(where or {}), "field": field,
                                             "excerpt": excerpt(obj if raw is None else raw)})
        return None
    tally.keep(source)
    return obj


def account_line(line: str, kind: str, tally: Tally, source: str, seen_ids: Any, default_id: str,
                 where: dict[str, Any]) -> dict | None:
    """One line of a record file (``kind`` as :func:`next_line` gives it) counted under ``source``: a blank
    line apart, a row kept (the completed record is returned) or rejected with its reason and a sample
    (``where``: ``{"file", "line"}``). Every reader of record lines goes through here."""
    if kind == "blank":
        tally.blank[source] += 1
        return None
    tally.seen(source)
    if kind == "too_long":
        tally.reject(source, "line_too_long", sample={**where, "field": None, "excerpt": excerpt(line)})
        return None
    obj, reason = parse_record_line(line)
    if reason:
        tally.reject(source, reason, sample={**where, "field": None, "excerpt": excerpt(line)})
        return None
    return accept_record(obj, tally, source, seen_ids, default_id=default_id, where=where, raw=line)


def parse_record_line(line: str) -> tuple[Any, str | None]:
    """One JSONL line -> ``(value, None)``, or ``(None, reason)``: ``invalid_utf8`` / ``malformed_json``."""
    if _SURROGATE.search(line):
        return None, "invalid_utf8"
    try:
        return json.loads(line), None
    except json.JSONDecodeError:
        return None, "malformed_json"


# ---------------------------------------------------------------------------------------------- the reader
_BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"


def open_binary(path: Path, stack: contextlib.ExitStack) -> IO[bytes]:
    """``path`` opened for reading bytes: gzip when it starts with the gzip magic, whatever its name; a
    missing / non-file / unreadable / empty / fake-gzip file is a :class:`DataFormatError` with a reason."""
    if not path.exists():
        raise DataFormatError(f"{path}: file not found", reason="not_found", path=path)
    if not path.is_file():
        raise DataFormatError(f"{path}: not a file (a directory?)", reason="not_a_file", path=path)
    try:
        f = stack.enter_context(open(path, "rb"))
        magic = f.read(2)
        f.seek(0)
    except OSError as e:
        raise DataFormatError(f"{path}: cannot be read ({e.strerror or e})", reason="unreadable", path=path) from None
    if not magic:
        raise DataFormatError(f"{path}: empty file (no rows)", reason="empty_file", path=path)
    if magic == _GZIP_MAGIC:
        return stack.enter_context(gzip.GzipFile(fileobj=f, mode="rb"))
    if path.suffix == ".gz":
        raise DataFormatError(f"{path}: named .gz but not gzip data", reason="not_gzip", path=path)
    return f


def _read_error(path: Path, e: BaseException, line_no: int) -> DataFormatError:
    """The :class:`DataFormatError` for a read that broke after ``line_no`` lines."""
    if isinstance(e, EOFError):
        reason, what = "truncated_gzip", "the gzip data ends early (truncated)"
    elif isinstance(e, (gzip.BadGzipFile, zlib.error)):
        reason, what = "corrupt_gzip", f"corrupt gzip data ({e})"
    else:
        reason, what = "unreadable", f"read error ({getattr(e, 'strerror', None) or e})"
    return DataFormatError(f"{path}: {what} after line {line_no}", reason=reason, path=path)


def _skip_rest_of_line(f: IO[bytes], piece: int) -> int:
    """Read up to the next newline in pieces of ``piece`` bytes, holding one piece at a time; returns the
    number of bytes skipped."""
    skipped = 0
    while True:
        chunk = f.readline(piece)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped
        del chunk  # before the next piece is read


def next_line(f: IO[bytes], max_line_bytes: int = MAX_LINE_BYTES) -> tuple[int, str, str] | None:
    """``(bytes read, text, kind)`` of the next line of a binary file, or None at its end (the line rules of
    :func:`iter_lines`: ``kind`` ``"row"``, ``"blank"`` or ``"too_long"``; BOM dropped; non-UTF-8 bytes kept as
    lone surrogates). ``bytes read`` lets a reader keep the byte offset of the next line (a resumable position)."""
    raw = f.readline(max_line_bytes + 1)
    if not raw:
        return None
    size = len(raw)
    if size > max_line_bytes and not raw.endswith(b"\n"):
        head = raw[:EXCERPT_CHARS * 4]
        del raw
        size += _skip_rest_of_line(f, min(max_line_bytes, 1 << 20))
        return size, head.decode("utf-8", errors="surrogateescape"), "too_long"
    if raw.startswith(_BOM):
        raw = raw[3:]
    if not raw.strip():
        return size, "", "blank"
    return size, raw.decode("utf-8", errors="surrogateescape"), "row"


def iter_lines(path: str | Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str, str]]:
    """``(line number, text, kind)`` of every line of a text file (gzip by its magic bytes), one at a time.

    ``kind``: ``"row"``; ``"blank"`` (whitespace only; text ``""``); ``"too_long"`` (over ``max_line_bytes``:
    read and dropped in pieces, text = its start). Lines end at ``\\n`` only (a JSON string may hold U+2028
    and other characters ``str.splitlines`` would split on; a ``\\r`` before it is JSON whitespace); a UTF-8
    BOM at the start of a line is dropped; bytes that are not UTF-8 survive as lone surrogates (see
    :func:`bad_text`). A file that cannot be read, or has no row, is a :class:`DataFormatError` with a
    reason of :data:`FILE_REJECTION_REASONS` (raised after the rows before the damage).
    """
    path = Path(path)
    rows = line_no = 0
    with contextlib.ExitStack() as stack:
        f = open_binary(path, stack)
        try:
            while (line := next_line(f, max_line_bytes)) is not None:
                line_no += 1
                _, text, kind = line
                rows += kind != "blank"
                yield line_no, text, kind
        except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise _read_error(path, e, line_no) from None
    if not rows:
        raise DataFormatError(f"{path}: empty file (no rows)", reason="empty_file", path=path)


def read_records(path: str | Path, tally: Tally, source: str | None = None, seen_ids: Any = None, *,
                 max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[dict]:
    """THE reader of unified-record JSONL files (curated sets, user shards, training files).

    Each non-blank line is counted under ``source`` (default: the file name) as kept or rejected with a
    reason of :data:`REJECTION_REASONS` (sampled with file, line, field and excerpt); kept records come out
    completed (:func:`complete_record`). Duplicate ids are rejected within the file, or across files when
    the caller passes one ``seen_ids``. At the end of the file (and before a :class:`DataFormatError` is
    passed on, with ``rows_read`` set) the file's lines are checked: last line = rows + blank lines, rows =
    kept + rejected. Nothing else may count under ``source`` in ``tally`` while the file is read.
    """
    path = Path(path)
    src = source or path.name
    seen = set() if seen_ids is None else seen_ids
    before, blank_before = tally.totals(src), tally.blank[src]
    last = 0
    try:
        for last, line, kind in iter_lines(path, max_line_bytes):
            rec = account_line(line, kind, tally, src, seen, default_id=f"{path.name}:{last}",
                               where={"file": str(path), "line": last})
            if rec is not None:
                yield rec
    except DataFormatError as e:
        e.rows_read = _check_file(tally, src, before, blank_before, last, path)
        raise
    _check_file(tally, src, before, blank_before, last, path)


def _check_file(tally: Tally, src: str, before: tuple[int, int, int], blank_before: int, last_line: int,
                path: Path) -> int:
    """The per-file accounting identity of :func:`read_records`; returns the file's rows."""
    n_in, kept, rej = (a - b for a, b in zip(tally.totals(src), before))
    blank = tally.blank[src] - blank_before
    if n_in + blank != last_line or n_in != kept + rej:
        raise AccountingError(f"{path}: {last_line} lines read but rows {n_in} + blank {blank}; "
                              f"rows {n_in} != kept {kept} + rejected {rej}")
    return n_in


def load_records(path: str | Path, strict: bool = True) -> list[dict]:
    """Unified records of a record JSONL file (``<out>/finetune.jsonl``...).

    ``strict``: any unusable line is an error naming the file, the reasons and the first bad lines;
    otherwise such lines are skipped (count them with :func:`read_records` and a :class:`Tally`).
    """
    tally = Tally()
    records = list(read_records(path, tally, source="records"))
    rejected = dict(tally.rejected["records"])
    if strict and rejected:
        first = ", ".join(f"line {s['line']} {s['reason']}" for s in
                          sorted(tally.rejected_samples(), key=lambda s: s["line"])[:3])
        raise DataFormatError(f"{path}: {sum(rejected.values())} unusable line(s): {rejected} ({first}, ...)")
    return records
