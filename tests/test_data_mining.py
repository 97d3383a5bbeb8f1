"""Hard-negative mining: window scaling, exact search, never a positive or the query, window respected,
ranking-consistency filtering (checked against an independent numpy ranking)."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from kalm_lib.config import ConfigError
from kalm_lib.data.filters import match_key
from kalm_lib.data.mining import (MiningConfig, check_mining_config, exact_search, load_model, mine_hard_negatives,
                                  remine, resolve_device, scaled_top_k, scaled_window)
from kalm_lib.data.records import DataFormatError, make_record
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
    # a random model ranks at chance: the language check would skip its filter, so it is off here
    cfg = MiningConfig(num_neg=3, window_ref_size=600, consistency_top_k=50, min_top_k=5, max_length=None,
                       use_faiss=False, consistency_min_lift=None)
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
                       use_faiss=False, consistency_skip_langs=["en"], consistency_min_lift=None)
    out, stats = mine_hard_negatives(recs, model, cfg)
    assert len(out) == len(recs) and stats["dropped_inconsistent"] == 0
    assert stats["consistency_by_lang"]["en"]["skipped_sources"] == {"src": "in consistency_skip_langs"}


def test_a_random_miner_filters_nothing_by_default(model):
    """The tiny random decoder ranks at chance: with the default language check its filter is skipped."""
    recs = _records()
    cfg = MiningConfig(num_neg=3, window_ref_size=600, consistency_top_k=50, min_top_k=5, max_length=None,
                       use_faiss=False)
    out, stats = mine_hard_negatives(recs, model, cfg)
    assert len(out) == len(recs) and stats["dropped_inconsistent"] == 0
    d = stats["per_source"]["src"]["consistency"]["en"]
    assert not d["filtered"] and "cannot rank" in d["why"] and d["lift"] < 0.25
    assert d["chance"] == pytest.approx(5 / 61, abs=0.01)  # top 5 of a 61-passage pool


# ---------------------------------------------------------------------------------------------- languages
class HalfBlindMiner:
    """A miner that ranks English (a query embeds like its positive; "bad" records like its negation) and
    is blind to Chinese (every text a random vector): an English-only model mining Chinese."""

    def __init__(self, recs, dim=32):
        self.dim, self.target = dim, {}
        for r in recs:
            if r["lang"] == "en":
                self.target[format_query(r["instruction"], r["query"])] = (r["pos"][0], -1 if "bad" in r["id"] else 1)

    def _vec(self, text):
        g = np.random.default_rng(int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little"))
        return g.standard_normal(self.dim)

    def encode(self, texts, batch_size=32, show_progress=False):
        out = []
        for t in texts:
            pos, sign = self.target.get(t, (None, 1))
            out.append(sign * self._vec(pos) if pos is not None else self._vec(t))
        v = np.asarray(out, dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def _bilingual(n=150, bad=10):
    recs = []
    for k in range(n):
        rid = "bad" if k < bad else "ok"
        recs.append(make_record("en-src", f"{rid}{k}", f"english question {k}", [f"english passage {k}"],
                                task_type="retrieval", category="qa", instruction="Find", lang="en"))
        recs.append(make_record("zh-src", k, f"中文问题 {k} 关于主题 {k % 13}", [f"中文段落 {k} 讲述主题 {k % 13}"],
                                task_type="retrieval", category="qa", instruction="检索", lang="zh"))
    return recs


def test_languages_the_miner_cannot_rank_are_never_filtered():
    recs = _bilingual()
    miner = HalfBlindMiner(recs)
    cfg = MiningConfig(num_neg=3, window_ref_size=1500, consistency_top_k=50, min_top_k=5, use_faiss=False)
    out, stats = mine_hard_negatives(recs, miner, cfg)
    dropped = {r["id"] for r in recs} - {r["id"] for r in out}
    assert dropped == {f"en-src:bad{k}" for k in range(10)}  # exactly the English records ranked last
    en, zh = (stats["per_source"][s]["consistency"][lang] for s, lang in (("en-src", "en"), ("zh-src", "zh")))
    assert en["filtered"] and en["recall_at_k"] == pytest.approx(140 / 150, abs=1e-4)
    assert not zh["filtered"] and "cannot rank" in zh["why"] and abs(zh["lift"]) < 0.1
    assert stats["consistency_by_lang"] == {
        "en": {"filtered_sources": ["en-src"], "skipped_sources": {}},
        "zh": {"filtered_sources": [], "skipped_sources": {"zh-src": zh["why"]}}}
    # without the check, the blind miner would drop almost every Chinese record
    _, blind = mine_hard_negatives(recs, miner, dataclasses.replace(cfg, consistency_min_lift=None))
    assert blind["per_source"]["zh-src"]["dropped_inconsistent"] > 0.8 * 150
    # the miner's languages, given: only English is filtered, whatever the check says
    _, given = mine_hard_negatives(recs, miner, dataclasses.replace(cfg, consistency_min_lift=None,
                                                                     consistency_langs=["en"]))
    assert given["per_source"]["zh-src"]["dropped_inconsistent"] == 0
    assert given["per_source"]["en-src"]["dropped_inconsistent"] == 10


# ---------------------------------------------------------------------------------------------- device, re-mining
def test_device_option():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
    m = load_model("tiny-qwen2", 32, device="auto")
    assert m.device.type == resolve_device("auto").split(":")[0] and m.max_length == 32
    with pytest.raises(ConfigError, match="device"):
        check_mining_config(MiningConfig(device="tpu"))
    g = torch.Generator().manual_seed(2)
    q = torch.nn.functional.normalize(torch.randn(9, 8, generator=g), dim=1).numpy()
    c = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1).numpy()
    s1, i1 = exact_search(q, c, 5, chunk_size=4, use_faiss=False, device=resolve_device("auto"))
    s2, i2 = exact_search(q, c, 5, use_faiss=False)
    assert np.array_equal(i1, i2) and np.allclose(s1, s2, atol=1e-5)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "curated").mkdir(parents=True)
    recs = _records(40)
    (run / "curated" / "finetune.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    EmbeddingModel.tiny_decoder("qwen2", seed=3).save(run / "train" / "pretrain" / "final")
    return run, recs


def test_remine_with_the_runs_own_model(run_dir):
    run, recs = run_dir
    cfg = MiningConfig(num_neg=2, window_ref_size=400, consistency_top_k=10, min_top_k=5, max_length=None,
                       use_faiss=False, consistency_min_lift=None)
    report = remine(run, config=cfg)
    got = [json.loads(x) for x in (run / "remine" / "finetune.jsonl").read_text().splitlines()]
    # the same as mining by hand with the stage-1 folder loaded the same way
    model = EmbeddingModel.from_pretrained(run / "train" / "pretrain" / "final")
    expect, stats = mine_hard_negatives(recs, model, cfg)
    assert got == expect and report["kept"] == len(expect) and report["records_in"] == len(recs)
    assert report["model"].endswith("train/pretrain/final") and report["device"] == resolve_device("auto")
    saved = json.loads((run / "remine" / "report.json").read_text())
    assert saved["consistency_by_lang"] == stats["consistency_by_lang"] and saved["read"]["rows_in"] == len(recs)
    # curation's own mining left the records before mining: re-mining starts from those
    (run / "curated" / "finetune.unmined.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:10]))
    assert remine(run, config=cfg)["records_in"] == 10
    assert not [p for p in (run / "remine").iterdir() if ".tmp" in p.name or p.name == ".kalm.lock"]
    assert sorted(p.name for p in (run / "remine").iterdir()) == ["finetune.jsonl", "report.json"]
    # fine-tuning and distillation read the re-mined records; pre-training still reads curation's
    from kalm_lib.train import run_dir_overrides
    assert run_dir_overrides(run, "finetune")["data.train_file"] == str(run / "remine" / "finetune.jsonl")
    assert run_dir_overrides(run, "distill")["data.train_file"] == str(run / "remine" / "finetune.jsonl")
    assert "remine" not in run_dir_overrides(run, "pretrain").get("data.train_file", "")


def test_remine_mistakes_are_clear(tmp_path):
    with pytest.raises(DataFormatError, match="no curated fine-tuning records"):
        remine(tmp_path)
    (tmp_path / "curated").mkdir()
    (tmp_path / "curated" / "finetune.jsonl").write_text(json.dumps({"query": "q", "pos": ["p"]}) + "\n")
    with pytest.raises(FileNotFoundError, match="no stage-1 model"):
        remine(tmp_path)
    with pytest.raises(ConfigError, match="window_start"):
        remine(tmp_path, model="tiny-qwen2", config={"window_start": 9, "window_end": 3})
