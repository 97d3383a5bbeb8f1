"""One hostile corpus through every reader: curation in memory, streaming curation and the trainer's reader.

The corpus: nulls and other JSON scalars, a BOM at the start of a plain and of a gzip shard (and mid-file),
CRLF line ends, invalid UTF-8, NUL bytes, missing fields, a 50 MB line, duplicate ids and duplicate texts,
a truncated gzip, a fake gzip, a gzip with a corrupt body, an empty shard, a blank-only shard and a
directory named like a shard. The expected outcome of every line and every shard is written out by hand
below; the tests check that every line is accounted for (rows in = kept + rejected, per file and in total),
every good row is kept, rejected rows are sampled with file, line, reason and field, and broken shards are
rejected files (or, in strict mode, one error) with no temporary file left behind.
"""

import gzip
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from kalm_lib.data import records as R
from kalm_lib.data.cards import load_registry
from kalm_lib.data.curate import curate, load_config, stream_curate_sources
from kalm_lib.data.streaming import iter_input
from kalm_lib.train.data import DataError
from kalm_lib.train.data import load_records as train_load_records

ROOT = Path(__file__).resolve().parent.parent
BIG = 50 * 1024 * 1024  # the 50 MB line


def good(i, **kw):
    return {"id": f"g{i}", "query": f"hostile corpus question number {i} about topic {i * 7 % 11}",
            "pos": [f"the answer passage number {i} explains topic {i * 7 % 11} in some detail"],
            "task_type": "retrieval", "lang": "en", "source": "hostile", **kw}


def line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


# shard a.jsonl: (line bytes, expected read outcome: None = kept, else the rejection reason, field)
A_LINES = [
    (b"\xef\xbb\xbf" + line(good(1)) + b"\r", (None, None)),                 # BOM + CRLF on the first line
    (b"null", ("not_an_object", None)),
    (b"42", ("not_an_object", None)),
    (b'"a string"', ("not_an_object", None)),
    (b"true", ("not_an_object", None)),
    (line(good(2)) + b"\r", (None, None)),                                    # CRLF
    (b"", "blank"),
    (line({"id": "mq", "pos": ["p"]}), ("missing_field", "query")),
    (line({"id": "mp", "query": "a query without positives"}), ("missing_field", "pos")),
    (line(good(3)).replace(b"question", b"ques\xff\xfetion"), ("invalid_utf8", None)),
    (line(good(4, query="nul \x00 inside")), ("nul_byte", "query")),
    (line(good(5, pos=["fine passage", "bad \x00 passage"])), ("nul_byte", "pos[1]")),
    (b"\xef\xbb\xbf" + line(good(6)), (None, None)),                          # a BOM mid-file (concatenated files)
    (line(good(2, query="same id as g2, other text")), ("duplicate_id", "id")),
    (line({**good(7), "id": "g7-copy"}), (None, None)),                       # same texts as g7: curation dedups
    (line(good(7)), (None, None)),
    (b"{broken", ("malformed_json", None)),
    (line(good(8, query="q" * BIG)), ("line_too_long", None)),               # 50 MB, read in pieces
    (b"   ", "blank"),
    (line(good(9)), (None, None)),
]
A_KEPT = ["g1", "g2", "g6", "g7-copy", "g7", "g9"]
A_CURATE_DROPS = {"g7": "exact_duplicate"}  # same query + positive as g7-copy, read before it
B_ROWS = [good(20), good(21)]          # b.jsonl.gz: gzip with a BOM on its first row
C_ROWS = [good(30 + i, pos=[f"truncated shard passage {i} " * 8]) for i in range(400)]  # c.jsonl.gz, cut
FILES_REJECTED = {"c.jsonl.gz": "truncated_gzip", "d.jsonl.gz": "not_gzip", "e.jsonl": "empty_file",
                  "f.jsonl": "empty_file", "g.jsonl": "not_a_file", "h.jsonl.gz": "corrupt_gzip"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The shard folder, and how many rows of the truncated shard are readable (computed with zlib)."""
    import zlib

    d = tmp_path_factory.mktemp("hostile") / "shards"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b"\n".join(raw for raw, _ in A_LINES) + b"\n")
    (d / "b.jsonl.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + b"\n".join(map(line, B_ROWS)) + b"\n"))
    full = gzip.compress(b"\n".join(map(line, C_ROWS)) + b"\n")
    cut = full[:len(full) // 2]
    (d / "c.jsonl.gz").write_bytes(cut)
    readable = zlib.decompressobj(31).decompress(cut).count(b"\n")  # complete lines before the cut
    (d / "d.jsonl.gz").write_bytes(line(good(40)) + b"\n")              # plain text named .gz
    (d / "e.jsonl").write_bytes(b"")
    (d / "f.jsonl").write_bytes(b"\n  \r\n\n")
    (d / "g.jsonl").mkdir()
    body = bytearray(gzip.compress(line(good(50)) * 50))
    body[20:40] = b"\x00" * 20                                            # header fine, deflate data broken
    (d / "h.jsonl.gz").write_bytes(bytes(body))
    return d, readable


def expected_read(readable):
    """Per file: (rows in, kept, rejected by reason), written from the tables above."""
    a_rej = {}
    for _, out in A_LINES:
        if out != "blank" and out[0]:
            a_rej[out[0]] = a_rej.get(out[0], 0) + 1
    return {"a.jsonl": (sum(out != "blank" for _, out in A_LINES), len(A_KEPT), a_rej),
            "b.jsonl.gz": (2, 2, {}), "c.jsonl.gz": (readable, readable, {})}


def kept_ids(readable):
    return A_KEPT + [r["id"] for r in B_ROWS] + [r["id"] for r in C_ROWS[:readable]]


def check_read(report_read, readable):
    for f, (n_in, kept, rej) in expected_read(readable).items():
        d = report_read["per_source"][f]
        assert (d["rows_in"], d["kept"], d["rejected_by_reason"]) == (n_in, kept, rej), f
        assert d["rows_in"] == d["kept"] + d["rejected"]
    assert report_read["rows_in"] == report_read["kept"] + report_read["rejected"]
    assert {f["file"].rsplit("/", 1)[-1]: f["reason"] for f in report_read["rejected_files"]} == FILES_REJECTED
    rows_read = {f["file"].rsplit("/", 1)[-1]: f["rows_read"] for f in report_read["rejected_files"]}
    assert rows_read == {**{f: 0 for f in FILES_REJECTED}, "c.jsonl.gz": readable}


@pytest.fixture(scope="module")
def registry():
    return load_registry(verify=False)


@pytest.fixture(scope="module")
def runs(corpus, registry, tmp_path_factory):
    """The corpus curated in memory and streamed (mining off: its model is tested elsewhere)."""
    d, _ = corpus
    cfg = load_config(None, ["mining.enabled=false", "filters.leakage=false", "filters.dedup_near=false"])
    out_m, out_s = tmp_path_factory.mktemp("mem"), tmp_path_factory.mktemp("stream")
    rep_m = curate(cfg, out_m, inputs=[str(d)], stage="finetune", registry=registry, show_progress=False)
    rep_s = stream_curate_sources(cfg, out_s, [str(d)], "finetune", registry=registry)
    return (out_m, rep_m), (out_s, rep_s)


def test_every_line_accounted_for_in_both_modes(corpus, runs):
    d, readable = corpus
    for out, rep in runs:
        check_read(rep["read"], readable)
        curated = [json.loads(x) for x in (out / "finetune.jsonl").read_text(encoding="utf-8").splitlines()]
        want = [i for i in kept_ids(readable) if i not in A_CURATE_DROPS]
        assert [r["id"] for r in curated] == want, rep["mode"]
        assert rep["curate"]["rows_in"] == len(kept_ids(readable)) == rep["read"]["kept"]
        assert rep["curate"]["rejected_by_reason"] == {"exact_duplicate": 1}
        assert rep["outputs"]["finetune.jsonl"]["rows"] == len(want)
        assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert runs[0][1]["read"] == runs[1][1]["read"]  # the same reader in both modes


def test_rejected_samples_name_file_line_reason_field(runs):
    for out, rep in runs:
        rows = [json.loads(x) for x in (out / "rejected_samples.jsonl").read_text(encoding="utf-8").splitlines()]
        assert rep["rejected_samples"]["rows"] == len(rows)
        got = {(r["line"], r["reason"], r["field"]) for r in rows if r["step"] == "read" and r["source"] == "a.jsonl"}
        want = {(n, out_[0], out_[1]) for n, (_, out_) in enumerate(A_LINES, 1) if out_ != "blank" and out_[0]}
        assert got == want
        by_reason = {}
        for r in rows:  # the first sample of each reason
            by_reason.setdefault(r["reason"], r)
        assert by_reason["not_an_object"]["excerpt"] == "null"
        assert by_reason["invalid_utf8"]["excerpt"].count("\\xff\\xfe") == 1   # the bad bytes, visible
        assert len(by_reason["line_too_long"]["excerpt"]) <= R.EXCERPT_CHARS + 1
        assert all(r["file"].endswith("a.jsonl") for r in rows if r["step"] == "read")
        dup = [r for r in rows if r["step"] == "curate"]
        assert [(r["id"], r["reason"]) for r in dup] == [("g7", "exact_duplicate")]


def test_the_trainers_reader_on_the_same_corpus(corpus):
    d, readable = corpus
    recs, counts = train_load_records(d / "a.jsonl")
    n_in, kept, rej = expected_read(readable)["a.jsonl"]
    assert [r["id"] for r in recs] == A_KEPT
    assert counts == {"rows_in": n_in, "kept": kept, **{f"rejected_{k}": v for k, v in rej.items()}}
    recs, _ = train_load_records(d / "b.jsonl.gz")
    assert [r["id"] for r in recs] == ["g20", "g21"]  # the BOM of the first gzip row is not part of it
    for name, reason in FILES_REJECTED.items():  # a broken training file: an error naming it, not a crash
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            train_load_records(d / name)


def test_same_records_from_every_reader(corpus):
    d, readable = corpus
    t = R.Tally()
    streamed = [r for r in iter_input(d, t, seen_ids=set()) if r["id"] in A_KEPT]
    trained, _ = train_load_records(d / "a.jsonl")
    assert streamed == trained == list(R.read_records(d / "a.jsonl", R.Tally()))
    t.check()
    assert t.blank["a.jsonl"] == 2 and t.blank["f.jsonl"] == 3


def test_strict_mode_stops_at_the_first_broken_shard(corpus, registry, tmp_path):
    d, _ = corpus
    cfg = load_config(None, ["mining.enabled=false", "filters.leakage=false", "strict=true"])
    for run in (lambda out: curate(cfg, out, inputs=[str(d)], registry=registry, show_progress=False),
                lambda out: stream_curate_sources(cfg, out, [str(d)], registry=registry)):
        out = tmp_path / f"o{id(run)}"
        with pytest.raises(R.DataFormatError, match=r"c\.jsonl\.gz: the gzip data ends early") as e:
            run(out)
        assert e.value.reason == "truncated_gzip"
        assert [p.name for p in out.iterdir()] == []  # no output, no temporary, no lock left


def test_a_50mb_line_is_never_held_whole(corpus):
    d, _ = corpus
    tracemalloc.start()
    try:
        t = R.Tally()
        list(R.read_records(d / "a.jsonl", t))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert t.rejected["a.jsonl"]["line_too_long"] == 1
    # one piece of MAX_LINE_BYTES at a time (x2 while the buffered reader joins it), not the 50 MB line
    assert peak < 2.5 * R.MAX_LINE_BYTES < BIG / 2


def test_cli_curates_a_users_jsonl_in_memory_and_names_rejected_shards(corpus, tmp_path):
    d, readable = corpus
    env_cmd = [sys.executable, "-m", "kalm_lib.cli", "curate", "--input", str(d), "--stage", "finetune",
               "--set", "mining.enabled=false", "--set", "filters.leakage=false"]
    p = subprocess.run(env_cmd + ["--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout)
    assert summary["read"]["files_rejected"] == len(FILES_REJECTED)
    assert sorted(x.rsplit("/", 1)[-1] for x in summary["rejected_files"]) == sorted(
        f"{f}: {r}" for f, r in FILES_REJECTED.items())
    p = subprocess.run(env_cmd + ["--out", str(tmp_path / "s"), "--strict"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]  # (after any progress bar)
    assert last.startswith("kalm curate: error: ") and "c.jsonl.gz" in last and "truncated" in last
