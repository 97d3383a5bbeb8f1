"""The unified training record: its fields, its task-type vocabulary, its one check and its one reader.

``{"id", "query", "pos": [...], "neg": [...], "task_type", "category", "instruction", "lang", "source"}``
(DESIGN.md §1.4). Every reader of record files (curation and ``kalm mine``, streaming shards, the trainer's
``load_records``) goes through :func:`record_problem` and :func:`read_records`, so a line is kept or
rejected for the same reason, under the same name, everywhere.

Required fields: ``query`` (a non-blank string) and ``pos`` (a non-empty list of non-blank strings). The
others are optional and filled in when absent: ``id`` = ``"<file name>:<line number>"``, ``neg`` = ``[]``,
``task_type`` = ``"retrieval"``, ``category`` / ``instruction`` / ``lang`` / ``source`` = ``""``. Present
fields must have their type (strings; ``neg`` a list of non-blank strings; ``task_type`` one of
:data:`TASK_TYPES`). Curated files always carry every field; hand-written training files need only the two.

Rejection reasons (:data:`REJECTION_REASONS`), checked in this order:
``invalid_utf8``, ``malformed_json``, ``not_an_object`` (a line), then ``missing_field``, ``wrong_type``,
``invalid_utf8`` / ``nul_byte`` (inside a text), ``unknown_task_type``, ``empty_query``, ``no_positive``,
``empty_text`` (a blank positive or negative), and ``duplicate_id`` (an id seen before in the same read).
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import zlib
from pathlib import Path
from typing import Any, Iterator

__all__ = ["TASK_TYPES", "SYMMETRIC_TASK_TYPES", "RECORD_FIELDS", "REQUIRED_FIELDS", "RECORD_DEFAULTS",
           "REJECTION_REASONS", "DataFormatError", "Tally", "bad_text", "make_record", "record_problem",
           "complete_record", "accept_record", "parse_record_line", "iter_lines", "read_records", "load_records"]

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
# what an absent optional field becomes (``id`` is special: "<file name>:<line number>")
RECORD_DEFAULTS: dict[str, Any] = {"neg": [], "task_type": "retrieval", "category": "", "instruction": "",
                                   "lang": "", "source": ""}
REJECTION_REASONS = {
    "invalid_utf8": "bytes that are not UTF-8 (in the line or a text)",
    "malformed_json": "the line is not JSON",
    "not_an_object": "the line is JSON but not an object",
    "missing_field": "query or pos is absent",
    "wrong_type": "a field (or a pos/neg item) has the wrong type",
    "nul_byte": "a text holds a NUL character",
    "unknown_task_type": "task_type is not one of TASK_TYPES",
    "empty_query": "the query is blank",
    "no_positive": "pos is an empty list",
    "empty_text": "a positive or negative is blank",
    "duplicate_id": "the id was seen before in the same read",
}


class DataFormatError(ValueError):
    """A whole input that cannot be used (missing, empty, not gzip, wrong structure); names the file."""


class Tally:
    """Counts per source: rows in, rows used/kept, rows rejected per reason (rows in = kept + rejected)."""

    def __init__(self) -> None:
        self.rows_in: collections.Counter = collections.Counter()
        self.kept: collections.Counter = collections.Counter()
        self.rejected: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def seen(self, source: str, n: int = 1) -> None:
        self.rows_in[source] += n

    def keep(self, source: str, n: int = 1) -> None:
        self.kept[source] += n

    def reject(self, source: str, reason: str, n: int = 1) -> None:
        self.rejected[source][reason] += n

    def check(self) -> None:
        """Assert the accounting identity for every source."""
        for s in set(self.rows_in) | set(self.kept) | set(self.rejected):
            r = sum(self.rejected[s].values())
            if self.rows_in[s] != self.kept[s] + r:
                raise AssertionError(f"tally for {s}: rows in {self.rows_in[s]} != kept {self.kept[s]} + rejected {r}")

    def as_dict(self) -> dict[str, Any]:
        """Totals and per-source counts, each with ``rejected_by_reason``."""
        sources = sorted(set(self.rows_in) | set(self.kept) | set(self.rejected))
        per = {s: {"rows_in": self.rows_in[s], "kept": self.kept[s], "rejected": sum(self.rejected[s].values()),
                   "rejected_by_reason": dict(sorted(self.rejected[s].items()))} for s in sources}
        reasons: collections.Counter = collections.Counter()
        for c in self.rejected.values():
            reasons.update(c)
        return {"rows_in": sum(self.rows_in.values()), "kept": sum(self.kept.values()),
                "rejected": sum(reasons.values()), "rejected_by_reason": dict(sorted(reasons.items())),
                "per_source": per}


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


def make_record(source: str, idx: int | str, query: str, pos: list[str], neg: list[str] | None = None, *,
                task_type: str, category: str, instruction: str, lang: str) -> dict[str, Any]:
    """A unified record (field order as in docs/CONTRACTS.md), id ``"<source>:<idx>"``."""
    assert task_type in TASK_TYPES, task_type
    return {"id": f"{source}:{idx}", "query": query, "pos": list(pos), "neg": list(neg or []),
            "task_type": task_type, "category": category, "instruction": instruction, "lang": lang,
            "source": source}


# ---------------------------------------------------------------------------------------------- the check
def record_problem(obj: Any) -> str | None:
    """THE record check: why a parsed JSON value is not a usable unified record, or None.

    Absent optional fields are fine (see :func:`complete_record`); reasons are those of
    :data:`REJECTION_REASONS` except the line-level ones and ``duplicate_id``.
    """
    if not isinstance(obj, dict):
        return "not_an_object"
    if any(k not in obj for k in REQUIRED_FIELDS):
        return "missing_field"
    for k, t in RECORD_FIELDS.items():
        if k in obj and not isinstance(obj[k], t):
            return "wrong_type"
    texts = [obj["query"], *obj["pos"], *obj.get("neg", [])]
    if any(not isinstance(t, str) for t in texts):
        return "wrong_type"
    reason = next((r for r in map(bad_text, texts) if r), None)
    if reason:
        return reason
    if obj.get("task_type", RECORD_DEFAULTS["task_type"]) not in TASK_TYPES:
        return "unknown_task_type"
    if not obj["query"].strip():
        return "empty_query"
    if not obj["pos"]:
        return "no_positive"
    if any(not t.strip() for t in texts[1:]):
        return "empty_text"
    return None


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


def accept_record(obj: Any, tally: Tally, source: str, seen_ids: Any, default_id: str) -> dict | None:
    """Check one parsed record and its id (against ``seen_ids``: a set or set-like, or None for no
    duplicate check); count it as kept or rejected under ``source``; the completed record or None."""
    reason = record_problem(obj)
    if reason is None:
        obj = complete_record(obj, default_id)
        if seen_ids is not None:
            if obj["id"] in seen_ids:
                reason = "duplicate_id"
            else:
                seen_ids.add(obj["id"])
    if reason:
        tally.reject(source, reason)
        return None
    tally.keep(source)
    return obj


def parse_record_line(line: str) -> tuple[Any, str | None]:
    """One JSONL line -> ``(value, None)``, or ``(None, reason)``: ``invalid_utf8`` / ``malformed_json``."""
    if _SURROGATE.search(line):
        return None, "invalid_utf8"
    try:
        return json.loads(line), None
    except json.JSONDecodeError:
        return None, "malformed_json"


# ---------------------------------------------------------------------------------------------- the reader
def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of the non-blank lines of a text file (gzip by suffix), read one at a time.

    Lines end at ``\\n`` only (a JSON string may hold U+2028 and other characters ``str.splitlines`` would
    split on); a UTF-8 BOM is dropped; bytes that are not UTF-8 survive as lone surrogates (see
    :func:`bad_text`). A missing file, a broken gzip file and a file without any non-blank line are a
    :class:`DataFormatError`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    empty = True
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue
                empty = False
                yield line_no, raw.decode("utf-8", errors="surrogateescape")
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: not a valid gzip file ({e})") from None
    if empty:
        raise DataFormatError(f"{path}: empty file (no rows)")


def read_records(path: str | Path, tally: Tally, source: str | None = None,
                 seen_ids: Any = None) -> Iterator[dict]:
    """THE reader of unified-record JSONL files (curated sets, user shards, training files).

    Each non-blank line is counted under ``source`` (default: the file name) as kept or rejected with a
    reason of :data:`REJECTION_REASONS`; kept records come out completed (:func:`complete_record`).
    Duplicate ids are rejected within the file, or across files when the caller passes one ``seen_ids``.
    """
    path = Path(path)
    src = source or path.name
    seen = set() if seen_ids is None else seen_ids
    for line_no, line in iter_lines(path):
        tally.seen(src)
        obj, reason = parse_record_line(line)
        if reason:
            tally.reject(src, reason)
            continue
        rec = accept_record(obj, tally, src, seen, default_id=f"{path.name}:{line_no}")
        if rec is not None:
            yield rec


def load_records(path: str | Path, strict: bool = True) -> list[dict]:
    """Unified records of a record JSONL file (``<out>/finetune.jsonl``...).

    ``strict``: any unusable line is an error naming the file and the reasons; otherwise such lines are
    skipped (count them with :func:`read_records` and a :class:`Tally`).
    """
    tally = Tally()
    records = list(read_records(path, tally, source="records"))
    rejected = dict(tally.rejected["records"])
    if strict and rejected:
        raise DataFormatError(f"{path}: {sum(rejected.values())} unusable line(s): {rejected}")
    return records
