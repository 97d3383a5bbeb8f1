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
from kalm_lib.data.streaming import BloomFilter, ScalableBloomFilter, iter_hub_records, iter_input, stream_curate

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
    assert t.as_dict()["per_source"]["bad.jsonl"]["kept"] == 2 and t.as_dict()["rows_in"] == 12
    assert res["rows_in"] == 2
    (d / "empty.jsonl").write_bytes(b"")  # an empty shard is a rejected file, the others are read
    t = Tally()
    res = stream_curate(iter_input(d, t), tmp_path / "o2.jsonl")
    assert res["rows_out"] == 2 and t.as_dict()["files_rejected_by_reason"] == {"empty_file": 1}
    with pytest.raises(DataFormatError, match="empty.jsonl.*empty"):  # unless strict
        stream_curate(iter_input(d, Tally(), strict=True), tmp_path / "o3.jsonl")
    assert not (tmp_path / "o3.jsonl").exists()  # no half-written output
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    with pytest.raises(DataFormatError, match="input not found"):
        list(iter_input(tmp_path / "nowhere", Tally()))


# ---------------------------------------------------------------------------------------------- dedup sizing
N_UNIQUE, TARGET = 200_000, 1e-3


def _false_rejections(bloom, n):
    """Unique keys a filter calls "already seen": each one a unique row wrongly rejected as a duplicate."""
    return sum(bloom.add(f"unique row {i}") for i in range(n))


@pytest.mark.parametrize("expected_rows", [N_UNIQUE, N_UNIQUE // 20])  # sized right, and 20x too small
def test_dedup_false_rejections_stay_within_the_stated_rate(expected_rows):
    b = ScalableBloomFilter(expected_rows, TARGET)
    fp = _false_rejections(b, N_UNIQUE)
    assert fp <= TARGET * N_UNIQUE                      # the stated bound, at N unique rows
    assert b.current_fpr <= TARGET                      # and for the next row
    assert all(b.add(f"unique row {i}") for i in range(0, N_UNIQUE, 97))  # no false negatives
    assert (len(b.filters) == 1) == (expected_rows == N_UNIQUE)
    assert b.stats()["keys"] == N_UNIQUE - fp


def test_a_fixed_filter_past_its_capacity_breaks_the_rate():
    """Why the filters are sized (and grow): the old fixed size, 20x too small, rejects far more."""
    fixed = BloomFilter(N_UNIQUE // 20, TARGET)
    assert _false_rejections(fixed, N_UNIQUE) > 20 * TARGET * N_UNIQUE
    assert fixed.current_fpr > 0.1


def test_stream_report_states_the_dedup_rate(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    recs = [make_record("gen", i, f"unique query {i}", [f"unique passage {i}"], task_type="pretrain",
                        category="weak", instruction="", lang="en") for i in range(20_000)]
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out"
    assert cli_main(["--config", "smoke", "--out", str(out), "--stream", "--input", str(d),
                     "--set", "stream.expected_rows=1000", "--set", "stream.dedup_fpr=1e-2",
                     "--set", "filters.leakage=false"]) == 0
    rep = json.loads((out / "curation_report.json").read_text())
    dd = rep["dedup"]
    assert dd["stated_fpr"] == 1e-2 and dd["expected_rows"] == 1000
    for part in ("text_keys", "ids"):
        st = dd["pretrain"][part]
        assert st["target_fpr"] == 1e-2 and st["filters"] > 1 and st["fpr_bound_now"] <= 1e-2
    wrong = rep["curate"]["rejected_by_reason"].get("exact_duplicate", 0)
    wrong_ids = rep["read"]["rejected_by_reason"].get("duplicate_id", 0)
    assert wrong <= 1e-2 * 20_000 and wrong_ids <= 1e-2 * 20_000
    assert rep["outputs"]["pretrain.jsonl"]["rows"] == 20_000 - wrong - wrong_ids


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
    assert rep["read"]["per_source"].keys() == {"a.jsonl", "b.jsonl.gz", "c.parquet"}  # counted per file
    assert rep["dedup"]["stated_fpr"] == 1e-4 and rep["dedup"]["pretrain"]["text_keys"]["filters"] == 1
