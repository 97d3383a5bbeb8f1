"""The one record check: every reader of record files (curation / ``kalm mine``, streaming, the trainer) keeps
the same rows and rejects the others for the same reasons, under the same names."""

import gzip
import json

import pytest

from kalm_lib.data import records as R
from kalm_lib.data.streaming import iter_input
from kalm_lib.train.data import _record_problem
from kalm_lib.train.data import load_records as train_load_records

FULL = {"id": "full", "query": "what is a cat", "pos": ["a cat is an animal"], "neg": ["a car is a vehicle"],
        "task_type": "retrieval", "category": "qa", "instruction": "Find", "lang": "en", "source": "fx"}


def _line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


# (line bytes, expected reason or None when kept); the reasons are written out by hand, independently
HOSTILE = [
    (b"\xef\xbb\xbf" + _line(FULL), None),                                           # BOM on the first line
    (b'{"id": "b", "query": "broken json"', "malformed_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (_line({"query": "only the two required fields", "pos": ["p"]}), None),          # optional fields filled in
    (_line({"id": "nq", "pos": ["p"]}), "missing_field"),
    (_line({"id": "np", "query": "q"}), "missing_field"),
    (_line({**FULL, "id": "t1", "pos": "not a list"}), "wrong_type"),
    (_line({**FULL, "id": "t2", "query": 123}), "wrong_type"),
    (_line({**FULL, "id": "t3", "neg": [1]}), "wrong_type"),
    (_line({**FULL, "id": "t4", "instruction": None}), "wrong_type"),
    (_line({**FULL, "id": 7}), "wrong_type"),
    (_line({**FULL, "id": "nul", "query": "nul\x00byte"}), "nul_byte"),
    (_line({**FULL, "id": "u8"}).replace(b"a cat is", b"a \xff\xfe is"), "invalid_utf8"),
    (_line({**FULL, "id": "tt", "task_type": "poetry"}), "unknown_task_type"),
    (_line({**FULL, "id": "eq", "query": "   "}), "empty_query"),
    (_line({**FULL, "id": "ep", "pos": []}), "no_positive"),
    (_line({**FULL, "id": "bp", "pos": [" "]}), "empty_text"),
    (_line({**FULL, "id": "bn", "neg": ["fine", ""]}), "empty_text"),
    (_line(FULL), "duplicate_id"),
    (_line({**FULL, "id": "ls", "query": "line\u2028separator\u0085inside"}), None),  # not a line break
    (_line({**FULL, "id": "crlf"}) + b"\r", None),                                    # CRLF line ending
    (_line({**FULL, "id": "extra", "score": 0.5}), None),                             # extra fields kept
    (b"null", "not_an_object"),                                                      # never dropped silently
    (b"3.5", "not_an_object"),
    (_line({**FULL, "id": "long", "query": "x" * (R.MAX_LINE_BYTES + 10)}), "line_too_long"),
]


@pytest.fixture
def hostile(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    path = d / "hostile.jsonl"
    body = b"\n".join(line for line, _ in HOSTILE[:5]) + b"\n\n   \n" + b"\n".join(line for line, _ in HOSTILE[5:])
    path.write_bytes(body + b"\n")
    return path


def _expected_counts():
    reasons = {}
    for _, r in HOSTILE:
        if r:
            reasons[r] = reasons.get(r, 0) + 1
    return sum(r is None for _, r in HOSTILE), reasons


def test_three_readers_agree_on_a_hostile_file(hostile):
    n_kept, reasons = _expected_counts()

    t1 = R.Tally()  # curation side (kalm mine, kalm_lib.data.load_records)
    curated = list(R.read_records(hostile, t1, source="hostile"))
    t2 = R.Tally()  # streaming shards (counted per file)
    streamed = list(iter_input(hostile.parent, t2, seen_ids=set()))
    trained, counts = train_load_records(hostile)  # the trainer

    assert curated == streamed == trained
    assert len(curated) == n_kept
    for t, src in ((t1, "hostile"), (t2, "hostile.jsonl")):
        t.check()
        assert dict(t.rejected[src]) == reasons and t.rows_in[src] == len(HOSTILE) and t.blank[src] == 2
    assert counts == {"rows_in": len(HOSTILE), "kept": n_kept, **{f"rejected_{r}": n for r, n in reasons.items()}}
    assert set(reasons) <= set(R.REJECTION_REASONS)
    assert set(R.REJECTION_REASONS) - set(reasons) == set()  # the corpus exercises every reason

    # every kept record is complete, with the documented defaults for what was absent
    assert all(set(R.RECORD_FIELDS) <= set(r) for r in curated)
    minimal = curated[1]
    assert minimal == {"query": "only the two required fields", "pos": ["p"], "id": "hostile.jsonl:5", "neg": [],
                       "task_type": "retrieval", "category": "", "instruction": "", "lang": "", "source": ""}
    assert curated[0] == FULL  # the BOM is not part of the first line
    assert curated[2]["query"] == "line\u2028separator\u0085inside" and curated[-1]["score"] == 0.5


def test_the_check_is_the_same_function_everywhere():
    for line, reason in HOSTILE:
        if reason == "line_too_long":  # a property of the line's length, seen by the reader only
            continue
        obj, line_reason = R.parse_record_line(line.decode("utf-8", "surrogateescape").lstrip("\ufeff"))
        got = line_reason or R.record_problem(obj)
        assert got == (None if reason == "duplicate_id" else reason), line
        assert _record_problem(obj) == R.record_problem(obj)


def test_gzip_and_strict_load(hostile, tmp_path):
    gz = tmp_path / "hostile.jsonl.gz"
    gz.write_bytes(gzip.compress(hostile.read_bytes()))
    t1, t2 = R.Tally(), R.Tally()
    plain = list(R.read_records(hostile, t1, source="h"))
    assert [r["id"] for r in R.read_records(gz, t2, source="h")] == [r["id"] for r in plain][:1] + [
        "hostile.jsonl.gz:5"] + [r["id"] for r in plain][2:]
    assert t1.as_dict() == t2.as_dict()
    n_kept, reasons = _expected_counts()
    with pytest.raises(R.DataFormatError, match=rf"hostile.jsonl: {sum(reasons.values())} unusable line.*line 2 "
                                                r"malformed_json, line 3 not_an_object"):
        R.load_records(hostile)
    assert len(R.load_records(hostile, strict=False)) == n_kept


def test_rejections_are_sampled_with_file_line_and_field(hostile):
    t = R.Tally(sample_limit=10)
    list(R.read_records(hostile, t, source="h"))
    samples = t.rejected_samples()
    assert sum(len(v) for v in t.samples.values()) == len(samples) == sum(t.rejected["h"].values())
    missing = sorted((s["line"], s["field"]) for s in samples if s["reason"] == "missing_field")
    assert missing == [(8, "query"), (9, "pos")]  # "nq" has no query, "np" no pos (after 5 rows, 2 blank lines)
    wrong = {s["excerpt"][:40]: s["field"] for s in samples if s["reason"] == "wrong_type"}
    assert sorted(wrong.values()) == ["id", "instruction", "neg[0]", "pos", "query"]
    assert {s["field"] for s in samples if s["reason"] == "nul_byte"} == {"query"}
    assert [s["excerpt"] for s in samples if s["reason"] == "not_an_object"] == ["[1, 2, 3]", '"just a string"', "null",
                                                                                "3.5"]
    assert all(s["file"] == str(hostile) for s in samples)
    json.dumps(samples)  # JSON-safe (the invalid UTF-8 excerpt too)
    t2 = R.Tally(sample_limit=1)
    list(R.read_records(hostile, t2, source="h"))
    assert len(t2.samples["h", "not_an_object"]) == 1 and t2.rejected["h"]["not_an_object"] == 4  # bounded


def test_the_accounting_check_can_fail(hostile, monkeypatch):
    t = R.Tally()
    t.seen("s", 2)
    t.keep("s")
    with pytest.raises(R.AccountingError, match="rows in 2 != kept 1"):
        t.check()
    # a reader that loses a row (neither kept nor rejected) is caught at the end of the file
    monkeypatch.setattr(R, "accept_record", lambda obj, *a, **k: None)
    with pytest.raises(R.AccountingError, match="hostile.jsonl"):
        list(R.read_records(hostile, R.Tally()))


@pytest.mark.parametrize("name,content,reason", [
    ("empty.jsonl", b"", "empty_file"),
    ("blank.jsonl", b"\n \r\n", "empty_file"),
    ("fake.jsonl.gz", b'{"query": "q", "pos": ["p"]}\n', "not_gzip"),
    ("cut.jsonl.gz", None, "truncated_gzip"),
    ("dir.jsonl", "dir", "not_a_file"),
    ("absent.jsonl", "absent", "not_found"),
])
def test_files_that_cannot_be_read_have_a_reason(tmp_path, name, content, reason):
    p = tmp_path / name
    if content == "dir":
        p.mkdir()
    elif content is None:
        p.write_bytes(gzip.compress(b"".join(_line({**FULL, "id": f"r{i}"}) + b"\n" for i in range(2000)))[:600])
    elif content != "absent":
        p.write_bytes(content)
    t = R.Tally()
    got = []
    with pytest.raises(R.DataFormatError, match=str(p)) as e:
        got.extend(R.read_records(p, t))
    assert e.value.reason == reason and reason in R.FILE_REJECTION_REASONS
    assert e.value.rows_read == len(got) == t.kept[name]  # rows before the damage came out, counted
    assert (len(got) > 0) == (reason == "truncated_gzip")


def test_gzip_is_read_by_its_magic_bytes(tmp_path):
    p = tmp_path / "named-plain.jsonl"
    p.write_bytes(gzip.compress(_line(FULL) + b"\n"))
    assert list(R.read_records(p, R.Tally())) == [FULL]


def test_curated_records_pass_the_check():
    rec = R.make_record("s", 1, "q", ["p"], ["n"], task_type="sts", category="c", instruction="", lang="en")
    assert R.record_problem(rec) is None and R.complete_record(rec, "x") is rec
    assert list(rec) == list(R.RECORD_FIELDS)


# ---------------------------------------------------------------------------------------------- the package
def test_public_api_is_curated():
    import kalm_lib.data as data

    names = data.__all__
    assert len(set(names)) == len(names) and not [n for n in names if n.startswith("_")]
    assert all(hasattr(data, n) for n in names) and "cli_main" not in names
    assert data.TASK_TYPES is R.TASK_TYPES and data.record_problem is R.record_problem


def test_data_modules_form_no_circle():
    """Imports between kalm_lib.data modules go one way (no cycle), at the top of the module (no
    function-local imports of our own modules), and argparse lives only in kalm_lib/data/cli.py."""
    import ast
    from pathlib import Path

    import kalm_lib.data as data

    folder = Path(data.__file__).parent
    graph = {}
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        nested = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and n not in top]
        own = [n for n in nested if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("kalm_lib")]
        assert not own, (path.name, [n.module for n in own])
        imported = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert ("argparse" in imported) == (path.name == "cli.py"), path.name
        graph[path.stem] = {m.split(".")[2] for m in imported if m.startswith("kalm_lib.data.")}
        graph[path.stem] |= {a.name for n in top if isinstance(n, ast.ImportFrom) and n.module == "kalm_lib.data"
                             for a in n.names if (folder / f"{a.name}.py").exists()}
    graph.pop("__init__")
    done, stack = set(), []

    def visit(m):
        assert m not in stack, f"import cycle: {' -> '.join(stack + [m])}"
        if m in done:
            return
        stack.append(m)
        for dep in graph.get(m, ()):
            visit(dep)
        stack.pop()
        done.add(m)

    for m in graph:
        visit(m)
    assert "curate" not in graph["streaming"] | graph["mining"] | graph["readers"] | graph["filters"]
