"""Curation filters, the leakage check and the `kalm curate` smoke preset end to end (tiny decoder)."""

import json
import unicodedata

import pytest

from kalm_lib.config import ConfigError
from kalm_lib.data.cards import dev_eval_splits, load_registry
from kalm_lib.data.cli import curate_main as cli_main
from kalm_lib.data.curate import load_config
from kalm_lib.data.filters import FilterConfig, MinHashDeduper, RecordFilter, length_reason, match_key, normalize_text
from kalm_lib.data.leakage import LeakageIndex, build_leakage_index, split_texts
from kalm_lib.data.records import Tally, make_record


def rec(q, p, neg=(), src="s", i=0, tt="retrieval"):
    return make_record(src, i, q, [p], list(neg), task_type=tt, category="c", instruction="I", lang="en")


def test_normalize_nfkc_and_controls():
    assert normalize_text("ＡＢＣ１２３，  x\x07y\u3000 ") == "ABC123, xy"
    s = "ｶﾞ"  # half-width katakana + voiced mark compose under NFKC
    assert normalize_text(s) == unicodedata.normalize("NFKC", s) == "ガ"
    assert normalize_text("a\nb") == "a\nb"


def test_length_reasons():
    assert length_reason("", 2, 10) == "empty_text"
    assert length_reason("a", 2, 10) == "too_short"
    assert length_reason("a" * 11, 2, 10) == "too_long"
    assert length_reason("abc", 2, 10) is None


def test_minhash_near_duplicates():
    d = MinHashDeduper(threshold=0.8, seed=0)
    base = "The committee approved the new budget for the public library on Tuesday evening."
    assert d.add(base) is None
    assert d.add(base.replace("Tuesday", "tuesday") + " ") == 0     # case/space only: duplicate of #0
    assert d.add(base.replace("evening", "evening!!")) == 0          # tiny edit
    assert d.add("A completely different sentence about rivers and mountains in spring.") is None


def test_record_filter_reasons_and_accounting():
    leak = LeakageIndex(["A man is playing a large flute."], min_chars=8)
    t = Tally()
    f = RecordFilter(FilterConfig(min_chars=2, max_chars=120), leak, t)
    inputs = [
        rec("what is a cat, and why do people keep them", "a cat is a small domesticated carnivorous animal",
            neg=["x" * 500, "a dog"]),                                          # kept, long neg dropped
        rec("WHAT  is a cat, and why do people keep them", "A cat is a small domesticated carnivorous animal", i=1),                      # exact duplicate (case/space)
        rec("a man is playing a LARGE flute.", "music", i=2),                  # leakage (normalised match)
        rec("q", "p" * 50, i=3),                                               # too_short
        rec("x" * 1_000_000, "p", i=4),                                        # 1 MB text: too_long
        rec("", "p", i=5),                                                     # empty
        rec("nul\x00", "p", i=6),                                              # nul_byte
        rec("what is a cat, and why do people keep them?", "a cat is a small domesticated carnivorous animal", i=7),                     # near duplicate of #0
    ]
    out = [f.process(r) for r in inputs]
    assert [reason for _, reason in out] == [None, "exact_duplicate", "leakage", "too_short", "too_long",
                                             "empty_text", "nul_byte", "near_duplicate"]
    assert out[0][0]["neg"] == ["a dog"] and f.neg_dropped == {"s": 1}
    t.check()
    assert t.rows_in["s"] == 8 and t.kept["s"] == 1


def test_leakage_index_covers_every_dev_eval_split():
    reg = load_registry(verify=False)
    idx = build_leakage_index(reg)
    for card, split in dev_eval_splits(reg):
        texts = [t for t in split_texts(reg[card], split) if len(match_key(t)) >= 30]
        assert texts, (card, split)
        assert texts[0] in idx and texts[-1] in idx, (card, split)
    # a train-role text that is not in any dev-eval split is not flagged
    assert "An invented sentence that appears in no evaluation set at all, 12345." not in idx
    # PAWS-X test, STS-B test and Banking77 test are protected
    en_test = next(iter(t for t in split_texts(reg["stsb-multi-mt"], "en_test") if len(t) > 20))
    assert idx.where(en_test.upper()) is not None


def test_config_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nsources:\n  - {name: nope, stage: pretrain}\n")
    with pytest.raises(ConfigError, match="unknown source 'nope'"):
        load_config(p)
    p.write_text("name: x\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(p)
    p.write_text("name: x\nsources:\n  - {name: banking77, stage: pretrain, max_rows: many}\n")
    with pytest.raises(ConfigError, match="max_rows"):
        load_config(p)


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("cur")
    assert cli_main(["--config", "smoke", "--out", str(out)]) == 0
    return out


def test_smoke_outputs_and_report(smoke_out):
    rep = json.loads((smoke_out / "curation_report.json").read_text())
    for part in ("read", "curate"):
        assert rep[part]["rows_in"] == rep[part]["kept"] + rep[part]["rejected"]
        for s, d in rep[part]["per_source"].items():
            assert d["rows_in"] == d["kept"] + sum(d["rejected_by_reason"].values()), (part, s)
    rows = {st: [json.loads(l) for l in (smoke_out / f"{st}.jsonl").read_text().splitlines()]
            for st in ("pretrain", "finetune")}
    assert sum(len(v) for v in rows.values()) == rep["curate"]["kept"]
    for st, rs in rows.items():
        assert rep["outputs"][f"{st}.jsonl"]["rows"] == len(rs) > 0
        assert len({r["id"] for r in rs}) == len(rs)
    # mined negatives: finetune pair/retrieval records got negatives, never their own positive or query
    for r in rows["finetune"]:
        assert not {match_key(n) for n in r["neg"]} & {match_key(p) for p in r["pos"]}
        assert match_key(r["query"]) not in {match_key(n) for n in r["neg"]}
    assert all(r["neg"] for r in rows["finetune"] if r["source"] in ("scifact", "afqmc"))
    # independent leakage check: no training text equals a dev-eval text (recomputed from the cards)
    reg = load_registry(verify=False)
    dev = {match_key(t) for c, s in dev_eval_splits(reg) for t in split_texts(reg[c], s) if len(match_key(t)) >= 8}
    for rs in rows.values():
        for r in rs:
            assert match_key(r["query"]) not in dev and not any(match_key(p) in dev for p in r["pos"])
    prov = json.loads((smoke_out / "provenance.json").read_text())
    assert prov["config"]["name"] == "smoke" and prov["data"]


def test_summary_tables_match_report(smoke_out):
    from kalm_lib.data import summary

    rep, frames, sims = summary.load_run(smoke_out)
    tab = summary.source_table(rep)
    assert tab["raw_rows"].sum() == rep["read"]["rows_in"]
    assert tab["records_kept"].sum() == rep["curate"]["kept"] == sum(len(f) for f in frames.values())
    rej = summary.rejection_table(rep)
    assert rej.loc[rej.step == "curate", "count"].sum() == rep["curate"]["rejected"]
    samples = summary.rejected_samples(smoke_out)
    assert len(samples) == rep["rejected_samples"]["rows"] > 0
    assert "curate" in set(samples["step"]) <= {"read", "curate"} and samples["reason"].notna().all()
    for (step, src, reason), n in samples.groupby(["step", "source", "reason"]).size().items():
        assert n <= min(5, rep[step]["per_source"][src]["rejected_by_reason"][reason])  # bounded, and real
    cons = summary.consistency_table(rep)
    assert set(cons["source"]) == set(rep["mining"]) and not cons["filtered"].any()  # smoke: top_k is null
    figs = summary.figures(rep, frames, sims)
    assert {"rejections", "mix", "lengths", "mining"} <= set(figs)
    assert sum(len(d["neg_sim"]) for d in sims.values()) == sum(d["mined"] for d in rep["mining"].values())


def test_config_inputs_beside_bundled_sources(tmp_path):
    """A user's record file named in a config (``inputs:``) is curated in memory with the bundled sources."""
    mine = tmp_path / "mine.jsonl"
    rows = [{"id": f"u{i}", "query": f"my own question number {i} on a subject of mine {i * 13}",
             "pos": [f"my own answer {i} that is long enough {i * 17}"], "lang": "en"} for i in range(5)]
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows) + "null\n")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"name: mine\nsources:\n  - {{name: trec, stage: finetune, max_rows: 20}}\n"
                        f"inputs:\n  - {{path: {mine}, stage: finetune}}\nmining: {{enabled: false}}\n")
    rep = cli_main(["--config", str(cfg_path), "--out", str(tmp_path / "o")])
    assert rep == 0
    rep = json.loads((tmp_path / "o" / "curation_report.json").read_text())
    assert rep["read"]["per_source"]["mine.jsonl"] == {"rows_in": 6, "kept": 5, "rejected": 1,
                                                      "rejected_by_reason": {"not_an_object": 1}}
    out = [json.loads(x) for x in (tmp_path / "o" / "finetune.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out if r["id"].startswith("u")] == [f"u{i}" for i in range(5)]
    assert {r["source"] for r in out} == {"trec", ""}  # absent optional fields take the documented defaults
    prov = json.loads((tmp_path / "o" / "provenance.json").read_text())
    assert str(mine) in prov["data"] and "en-trec/train" in prov["data"]
