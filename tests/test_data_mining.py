"""Hard-negative mining: window scaling, exact search, never a positive or the query, window respected,
ranking-consistency filtering (checked against an independent numpy ranking)."""

import numpy as np
import pytest
import torch

from kalm_lib.data.filters import match_key
from kalm_lib.data.mining import MiningConfig, exact_search, mine_hard_negatives, scaled_top_k, scaled_window
from kalm_lib.data.records import make_record
from kalm_lib.model import EmbeddingModel, format_query


def test_scaled_window_by_hand():
    assert scaled_window(10000, 50, 100, 10000, 7) == (50, 100)
    assert scaled_window(50000, 50, 100, 10000, 7) == (50, 100)
    assert scaled_window(1000, 50, 100, 10000, 7) == (5, 12)   # 50*0.1=5, max(10, 5+7)=12
    assert scaled_window(300, 50, 100, 10000, 7) == (2, 9)     # round(1.5)=2, max(3, 9)=9
    assert scaled_window(5, 50, 100, 10000, 7) == (0, 5)       # smaller than M: the whole pool
    assert scaled_top_k(300, 50, 10000, 10) == 10 and scaled_top_k(5000, 50, 10000, 10) == 25
    assert scaled_top_k(4, 50, 10000, 10) == 4


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_exact_search_matches_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(23, 16, generator=g), dim=1).numpy()
    c = torch.nn.functional.normalize(torch.randn(57, 16, generator=g), dim=1).numpy()
    s, i = exact_search(q, c, 10, chunk_size=chunk, use_faiss=False)
    sim = q @ c.T
    ref = np.argsort(-sim, axis=1, kind="stable")[:, :10]
    assert np.array_equal(i, ref)
    assert np.allclose(s, np.take_along_axis(sim, ref, 1), atol=1e-6)


@pytest.fixture(scope="module")
def model():
    return EmbeddingModel.tiny_decoder("qwen2", seed=0)


def _records(n=60):
    recs = []
    for k in range(n):
        recs.append(make_record("src", k, f"question {k} about subject {k % 9} and item {k * 7 % 13}",
                                [f"answer text {k} on subject {k % 9} with detail {k * 3 % 11}"],
                                task_type="retrieval", category="qa", instruction="Find the answer", lang="en"))
    # record 0's query text is also a passage of record 1: it must never be mined as record 0's negative
    recs[1]["pos"].append(recs[0]["query"])
    # an existing hard negative is kept and counted towards M
    recs[2]["neg"] = ["a given hard negative text"]
    recs.append(make_record("cls", 0, "a classification text", ["same class text"], ["other class"],
                            task_type="classification", category="c", instruction="Classify", lang="en"))
    return recs


def _ranks(model, recs, src="src"):
    """Independent ranking with numpy: pool of unique positives, cosine of formatted query vs passage."""
    pool, seen = [], set()
    for r in recs:
        if r["source"] != src:
            continue
        for p in r["pos"]:
            if match_key(p) not in seen:
                seen.add(match_key(p))
                pool.append(p)
    q = model.encode([format_query(r["instruction"], r["query"]) for r in recs if r["source"] == src])
    p = model.encode(pool)
    return pool, q @ p.T


def test_mined_negatives_window_and_exclusions(model):
    recs = _records()
    cfg = MiningConfig(num_neg=4, window_start=50, window_end=100, window_ref_size=600, consistency_top_k=None,
                       max_length=None, use_faiss=False)
    out, stats = mine_hard_negatives(recs, model, cfg)
    assert len(out) == len(recs)
    st = stats["per_source"]["src"]
    s, e = st["window"]
    assert (s, e) == scaled_window(60 + 1, 50, 100, 600, 4) == (5, 10)
    pool, sim = _ranks(model, recs)
    for row, (r_in, r) in enumerate(zip(recs[:60], out[:60])):
        assert r["neg"][:len(r_in["neg"])] == r_in["neg"]                   # given negatives kept first
        assert len(r["neg"]) == 4
        pos_keys = {match_key(p) for p in r["pos"]}
        mined = r["neg"][len(r_in["neg"]):]
        assert not {match_key(n) for n in mined} & pos_keys                  # never a positive
        assert match_key(r["query"]) not in {match_key(n) for n in mined}    # never the query itself
        # rank among candidates after removing positives and the query, by the independent ranking
        order = [pool[j] for j in np.argsort(-sim[row], kind="stable")]
        cands = [t for t in order if match_key(t) not in pos_keys and match_key(t) != match_key(r["query"])]
        for n in mined:
            assert s <= cands.index(n) < e, (row, cands.index(n))
    assert recs[0]["query"] not in out[0]["neg"]
    assert out[-1] == recs[-1]  # classification records pass through untouched


def test_consistency_filter_drops_exactly_the_inconsistent(model):
    recs = _records()
    cfg = MiningConfig(num_neg=3, window_ref_size=600, consistency_top_k=50, min_top_k=5, max_length=None,
                       use_faiss=False)
    out, stats = mine_hard_negatives(recs, model, cfg)
    k = stats["per_source"]["src"]["top_k"]
    assert k == scaled_top_k(61, 50, 600, 5) == 5
    pool, sim = _ranks(model, recs)
    expect_kept = []
    for row, r in enumerate(recs[:60]):
        top = {match_key(pool[j]) for j in np.argsort(-sim[row], kind="stable")[:k]}
        if top & {match_key(p) for p in r["pos"]}:
            expect_kept.append(r["id"])
    kept = [r["id"] for r in out if r["source"] == "src"]
    assert kept == expect_kept
    assert stats["per_source"]["src"]["dropped_inconsistent"] == 60 - len(expect_kept) > 0


def test_kalm_mine_cli(tmp_path):
    import json

    from kalm_lib.data.cli import mine_main as cli_main

    recs = _records(30)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs) + "{broken\n")
    out = tmp_path / "out.jsonl"
    assert cli_main(["--in", str(inp), "--out", str(out), "--model", "tiny-qwen2", "--num-neg", "2",
                     "--top-k", "0"]) == 0
    got = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"] for r in got] == [r["id"] for r in recs]  # the broken line is counted, not fatal
    assert all(len(r["neg"]) >= 2 for r in got if r["source"] == "src")


def test_faiss_search_matches_torch():
    pytest.importorskip("faiss")  # optional dependency (pip install faiss-cpu)
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(9, 8, generator=g), dim=1).numpy()
    c = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1).numpy()
    s1, i1 = exact_search(q, c, 5, use_faiss=True)
    s2, i2 = exact_search(q, c, 5, use_faiss=False)
    assert np.array_equal(i1, i2) and np.allclose(s1, s2, atol=1e-5)


def test_consistency_skip_langs(model):
    recs = _records()
    cfg = MiningConfig(num_neg=3, window_ref_size=600, consistency_top_k=50, min_top_k=5, max_length=None,
                       use_faiss=False, consistency_skip_langs=["en"])
    out, stats = mine_hard_negatives(recs, model, cfg)
    assert len(out) == len(recs) and stats["dropped_inconsistent"] == 0
