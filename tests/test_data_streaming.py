"""Streaming curation: Bloom filter, shard formats, equivalence with the in-memory filter, datasets streaming."""

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalm_lib.data.cli import curate_main as cli_main
from kalm_lib.data.filters import FilterConfig, RecordFilter
from kalm_lib.data.leakage import LeakageIndex
from kalm_lib.data.records import DataFormatError, Tally, make_record
from kalm_lib.data.streaming import BloomFilter, iter_hub_records, iter_input, stream_curate

FX = Path(__file__).parent / "fixtures" / "data"


def test_bloom_filter_no_false_negatives_and_low_fp():
    b = BloomFilter(capacity=20_000, error_rate=1e-3)
    keys = [f"key-{i}" for i in range(10_000)]
    assert sum(b.add(k) for k in keys) <= 30        # fresh keys: "present" only by a (rare) false positive
    assert all(b.add(k) for k in keys)              # no false negatives
    fp = sum(b.add(f"other-{i}") for i in range(10_000))
    assert fp <= 30                                  # expected ~ 10k * 1e-3 (half load) -> well under 30


def _records(n, start=0, dup_every=10):
    out = []
    for i in range(start, start + n):
        j = i - 1 if dup_every and i % dup_every == 0 and i > start else i  # some exact duplicates
        out.append(make_record("gen", i, f"query number {j} about topic {j % 7}", [f"passage {j} text body"],
                               task_type="pretrain", category="weak", instruction="", lang="en"))
    return out


def _write_shards(d: Path, recs):
    d.mkdir()
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:100]))
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs[100:200])
    pq.write_table(pa.Table.from_pylist(recs[200:]), d / "c.parquet")


def test_stream_equals_in_memory(tmp_path):
    recs = _records(300)
    recs.append(dict(recs[5], id="leak", query="A man is playing a large flute."))
    _write_shards(tmp_path / "in", recs)
    leak = LeakageIndex(["A man is playing a large flute."])
    t = Tally()
    got = stream_curate(iter_input(tmp_path / "in", t, seen_ids=set()), tmp_path / "out.jsonl",
                        FilterConfig(dedup_near=False), leakage=leak)
    out = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    t2 = Tally()
    f = RecordFilter(FilterConfig(dedup_near=False), leak, t2)
    expect = [k for k, _ in map(f.process, recs) if k is not None]
    assert out == expect
    assert got["rows_in"] == 301 and got["rows_out"] == len(expect)
    assert got["curate"]["rejected_by_reason"] == {"exact_duplicate": 29, "leakage": 1}
    assert t.as_dict()["rows_in"] == 301


def test_stream_bad_inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(FX / "bad_records.jsonl", d / "bad.jsonl")
    t = Tally()
    res = stream_curate(iter_input(d, t, seen_ids=set()), tmp_path / "o.jsonl")
    assert t.as_dict()["per_source"]["bad"]["kept"] == 2 and t.as_dict()["rows_in"] == 12
    assert res["rows_in"] == 2
    (d / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataFormatError, match="empty.jsonl.*empty"):
        stream_curate(iter_input(d, Tally()), tmp_path / "o2.jsonl")
    assert not (tmp_path / "o2.jsonl").exists()  # no half-written output


def test_datasets_streaming_path(tmp_path):
    rows = [{"anchor": f"a{i} sentence", "positive": f"p{i} sentence"} for i in range(20)]
    f = tmp_path / "x.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = Tally()
    recs = list(iter_hub_records("json:train", {"query": "anchor", "pos": "positive", "source_name": "x"}, t,
                                 data_files=str(f)))
    assert [(r["query"], r["pos"]) for r in recs] == [(r["anchor"], [r["positive"]]) for r in rows]
    assert t.kept["x"] == 20


def test_cli_stream_input(tmp_path):
    _write_shards(tmp_path / "in", _records(250))
    out = tmp_path / "out"
    assert cli_main(["--config", "smoke", "--out", str(out), "--stream", "--input", str(tmp_path / "in")]) == 0
    rep = json.loads((out / "curation_report.json").read_text())
    assert rep["outputs"]["pretrain.jsonl"]["rows"] == 250 - 24
    assert rep["outputs"]["finetune.jsonl"]["rows"] == 0
    assert rep["curate"]["rows_in"] == rep["curate"]["kept"] + rep["curate"]["rejected"] == 250
