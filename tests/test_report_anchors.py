"""Published anchors in the report (issue 14.3): the vendored copy, its loader, the paper's table, ranks, and our
scores beside published ones only where task, split and revision are the same.

Expected values come from the CSV files read here with the csv module (not the loader), from SOURCE.txt's
text, and from the paper's table in DESIGN.md §1.5.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from kalm_lib import report as rp
from kalm_lib.report import anchors

ROOT = Path(__file__).resolve().parent.parent
ANCHORS = ROOT / "data" / "reference-scores" / "anchors"
SHARED = ROOT.parent / "shared" / "reference" / "anchor-scores"
ENG2 = "MTEB(eng, v2)"


def _rows(name: str) -> list[dict]:
    with open(ANCHORS / name, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _scores(bench: str, model: str) -> dict[str, tuple[str, float]]:
    return {r["task"]: (r["type"], float(r["main_score"])) for r in _rows("main_scores.csv")
            if r["benchmark"] == bench and r["model"] == model}


def _mtk_mty(scores: dict[str, tuple[str, float]]) -> tuple[float, float]:
    by_type = defaultdict(list)
    for t, s in scores.values():
        by_type[t].append(s)
    return (statistics.mean(s for _, s in scores.values()),
            statistics.mean(statistics.mean(v) for v in by_type.values()))


def test_vendored_copy_matches_its_card_and_source():
    card = (ANCHORS / "README.md").read_text(encoding="utf-8")
    listed = re.findall(r"\{file: (\S+), bytes: (\d+), sha256: ([0-9a-f]{64})\}", card)
    assert {f for f, _, _ in listed} >= {"LICENSE", "SOURCE.txt", "main_scores.csv", "coverage.csv", "models.csv",
                                          "tasks.csv", "paper_table.csv"}
    for name, size, digest in listed:
        data = (ANCHORS / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (int(size), digest), name
    assert "license: cc0-1.0" in card and "CC0" in (ANCHORS / "LICENSE").read_text(encoding="utf-8")[:200]
    if SHARED.is_dir():  # the copy is byte for byte the shared original
        for name in ("main_scores.csv", "coverage.csv", "SOURCE.txt"):
            assert (ANCHORS / name).read_bytes() == (SHARED / name).read_bytes(), name


def test_loader_reads_every_row_and_coverage_agrees():
    raw = _rows("main_scores.csv")
    df = rp.load_anchor_scores()
    assert len(df) == len(raw) == 1087
    assert sorted(df["main_score"].round(6)) == sorted(round(float(r["main_score"]), 6) for r in raw)
    assert set(df["task_type"]) == {"retrieval", "sts", "classification", "clustering", "reranking",
                                    "pair_classification", "summarization"}
    # tasks per (benchmark, model, revision) from main_scores == coverage.csv's non-zero counts (it has no revision)
    counts = Counter((r["benchmark"], r["model"], r["revision"]) for r in raw)
    mine = Counter((b, m, n) for (b, m, _), n in counts.items())
    theirs = Counter((r["benchmark"], r["model"], int(r["tasks_scored"])) for r in _rows("coverage.csv")
                     if int(r["tasks_scored"]) > 0)
    assert mine == theirs
    n_bench = Counter(r["benchmark"] for r in _rows("tasks.csv"))
    assert n_bench == {"MTEB(cmn, v1)": 31, "MTEB(eng, v1)": 56, ENG2: 41}


def test_benchmark_means_reproduce_source_and_paper():
    """SOURCE.txt's check and the paper's table (DESIGN.md §1.5), from the per-task scores."""
    s = rp.anchor_summary()
    v2 = "HIT-TMG/KaLM-embedding-multilingual-mini-instruct-v2"
    for bench, model in (("MTEB(cmn, v1)", v2), ("MTEB(eng, v1)", v2), (ENG2, "Qwen/Qwen3-Embedding-0.6B"),
                         (ENG2, "sentence-transformers/all-MiniLM-L6-v2")):
        row = s[(s["benchmark"] == bench) & (s["model"] == model)].iloc[0]
        assert (row["MTK"], row["MTY"]) == pytest.approx(_mtk_mty(_scores(bench, model)), abs=1e-9)
    source = (ANCHORS / "SOURCE.txt").read_text()
    cmn = s[(s["benchmark"] == "MTEB(cmn, v1)") & (s["model"] == v2)].iloc[0]
    assert f"cmn {cmn['MTK']:.2f}/{cmn['MTY']:.2f}" in source   # "cmn 68.13/69.28"
    paper = rp.paper_check().set_index("model")
    row = paper.loc["KaLM mini-instruct V2"]
    assert row["cmn_mtk"] == 68.15 and row["eng_mty"] == 64.14      # as DESIGN.md §1.5 prints them
    for col in ("cmn_mtk", "cmn_mty", "eng_mtk", "eng_mty"):
        assert abs(row[col] - row[f"{col}_recomputed"]) < 0.03, col
    design = ROOT.parent / "shared" / "DESIGN.md"
    if design.is_file():   # the transcription is the table DESIGN.md §1.5 prints
        assert "| **KaLM mini-instruct V2** | 494M | **68.15 / 69.28** | **67.47 / 64.14** |" in design.read_text()


def test_ranks_only_complete_rows_with_sizes():
    s = rp.anchor_summary()
    eng2 = s[s["benchmark"] == ENG2]
    complete = eng2[eng2["n_tasks"] == 41]
    assert list(complete["rank"]) == list(range(1, len(complete) + 1))
    assert complete["MTK"].is_monotonic_decreasing
    assert eng2[eng2["n_tasks"] < 41]["rank"].isna().all()        # partial: no rank
    models = {(r["model"], r["revision"]): r for r in _rows("models.csv")}
    for row in s.itertuples():
        m = models[(row.model, row.revision)]
        assert (row.n_parameters, row.embed_dim, row.max_tokens) == (
            int(m["n_parameters"]), int(m["embed_dim"]), int(m["max_tokens"]))
    minilm = s[(s["model"] == "sentence-transformers/all-MiniLM-L6-v2") & (s["benchmark"] == ENG2)].iloc[0]
    assert (minilm["n_parameters"], minilm["embed_dim"], minilm["max_tokens"]) == (22713216, 384, 256)


def _write_result(folder: Path, task: str, revision: str, splits: dict[str, dict[str, float]]) -> None:
    """An mteb 2.x result file: {split: {subset: main score 0-1}}."""
    folder.mkdir(parents=True, exist_ok=True)
    scores = {sp: [{"main_score": v, "hf_subset": sub, "languages": ["eng-Latn"]} for sub, v in subs.items()]
              for sp, subs in splits.items()}
    (folder / f"{task}.json").write_text(json.dumps({"task_name": task, "dataset_revision": revision,
                                                     "mteb_version": "2.26.24", "scores": scores}))


def _benchmark_run(tmp_path: Path, scores: dict[str, tuple[str, float]], drop: str | None = None) -> Path:
    """A run whose eval/ holds full-split results of every MTEB(eng, v2) task, on the benchmark's splits, subsets
    and dataset revisions, with the given per-task scores (one value on every split and subset)."""
    run = tmp_path / "ours"
    folder = run / "eval" / "kalm__minilm-copy" / "rev0"
    for t in _rows("tasks.csv"):
        if t["benchmark"] != ENG2 or t["task"] == drop:
            continue
        v = scores[t["task"]][1] / 100
        _write_result(folder, t["task"], t["dataset_revision"],
                      {sp: {sub: v for sub in t["hf_subsets"].split()} for sp in t["eval_splits"].split()})
    (folder / "model_meta.json").write_text(json.dumps({"name": "kalm/minilm-copy", "n_parameters": 22713216,
                                                        "embed_dim": 384, "max_tokens": 256}))
    return run


def test_our_complete_benchmark_run_is_ranked_beside_the_anchors(tmp_path):
    minilm = _scores(ENG2, "sentence-transformers/all-MiniLM-L6-v2")
    run = _benchmark_run(tmp_path, minilm)
    df = rp.combined_results(rp.load_runs([run]))
    assert set(df["scope"]) == {"full split"}
    table = rp.ranked_table(df, rp.model_info(df))
    eng2 = table[table["benchmark"] == ENG2].set_index("model")
    ours = eng2.loc["ours"]
    mtk, mty = _mtk_mty(minilm)
    assert (ours["MTK"], ours["MTY"], ours["n_tasks"]) == (pytest.approx(mtk), pytest.approx(mty), 41)
    assert (ours["source"], ours["n_parameters"], ours["embed_dim"], ours["max_tokens"]) == ("ours", 22713216, 384,
                                                                                             256)
    published = eng2.loc["sentence-transformers/all-MiniLM-L6-v2"]
    assert {ours["rank"], published["rank"]} == {7, 8}             # the same scores: side by side, below 6 others
    assert sorted(eng2["rank"].dropna()) == list(range(1, 9))
    # one task missing: a partial row, shown but not ranked
    partial = rp.combined_results(rp.load_runs([_benchmark_run(tmp_path / "p", minilm, drop="STSBenchmark")]))
    t2 = rp.ranked_table(partial)
    row = t2[(t2["benchmark"] == ENG2) & (t2["model"] == "ours")].iloc[0]
    assert row["n_tasks"] == 40 and pd_isna(row["rank"])


def pd_isna(v) -> bool:
    import pandas as pd

    return bool(pd.isna(v))


def _kalmdev(tmp_path: Path, name: str, task: str, splits: dict[str, float], quick: bool) -> Path:
    """An offline task's result as the evaluation writes it: dataset revision quick-<n> or full."""
    run = tmp_path / name
    folder = run / "eval" / "results" / "sentence-transformers__all-MiniLM-L6-v2" / "gt-abc"
    _write_result(folder, task, "quick-250" if quick else "full", {sp: {"default": v} for sp, v in splits.items()})
    return run


def test_only_full_split_same_split_scores_are_compared(tmp_path):
    """KalmDev-STSB-en is an offline copy of STSBenchmark test: compared when full split; the quick subset never;
    KalmDev-Emotion-en is Emotion *validation*, the benchmarks score *test*: never compared."""
    full = _kalmdev(tmp_path, "full", "KalmDev-STSB-en", {"test": 0.8203}, quick=False)
    quick = _kalmdev(tmp_path, "quick", "KalmDev-STSB-en", {"test": 0.7908}, quick=True)
    emo = _kalmdev(tmp_path, "emo", "KalmDev-Emotion-en", {"validation": 0.4}, quick=False)
    df = rp.combined_results(rp.load_runs([full, quick, emo]))
    assert dict(zip(df["label"], df["scope"])) == {"full": "full split", "quick": "quick subset",
                                                   "emo": "full split"}
    comp = rp.comparable_scores(df)
    assert set(comp["label"]) == {"full"} and set(comp["task"]) == {"STSBenchmark"}
    assert set(comp["benchmark"]) == {"MTEB(eng, v1)", ENG2}
    assert comp["main_score"].tolist() == pytest.approx([82.03, 82.03])
    assert set(comp["match"]) == {"offline copy (same data and split per data card)"}
    skipped = rp.not_compared(df)
    why = {label: set(part["reason"]) for label, part in skipped.groupby("label")}
    assert why["quick"] == {"quick subset (published scores are full split)"}
    assert why["emo"] == {"splits validation are not the benchmark's test"}
    long = rp.task_comparison(df)
    published = {r["model"]: float(r["main_score"]) for r in _rows("main_scores.csv")
                 if r["benchmark"] == ENG2 and r["task"] == "STSBenchmark"}
    eng2 = long[long["benchmark"] == ENG2].set_index("who")
    assert eng2.loc["full", "main_score"] == pytest.approx(82.03)
    assert {w: s for w, s in eng2["main_score"].items() if w != "full"} == pytest.approx(published)
    assert eng2.loc["full", "rank"] == 1 + sum(v > 82.03 for v in published.values())


def test_public_task_with_another_dataset_revision_is_not_compared(tmp_path):
    run = tmp_path / "pub"
    _write_result(run / "eval" / "m" / "r", "STSBenchmark", "some-other-revision", {"test": {"default": 0.8}})
    df = rp.combined_results(rp.load_runs([run]))
    assert rp.comparable_scores(df).empty
    assert "dataset revision" in rp.not_compared(df)["reason"].iloc[0]


def test_report_shows_paper_table_and_sortable_ranked_tables(tmp_path):
    full = _kalmdev(tmp_path, "full", "KalmDev-STSB-en", {"test": 0.8203}, quick=False)
    page = rp.build_report([full], tmp_path / "r.html").read_text()
    anchors_html = page[page.index("<section id='anchors'>"):]
    anchors_html = anchors_html[:anchors_html.index("</section>")]
    assert "The paper's summary table" in anchors_html and "<td class='n'>68.15</td>" in anchors_html
    for bench in anchors.BENCHMARK_LANG:
        assert f"<h3>{bench}: ranked by MTK</h3>" in anchors_html
    assert anchors_html.count("class='tbl sortable'") >= 4
    for col in ("n_parameters", "embed_dim", "max_tokens", "zero_shot_percent"):
        assert f"<th>{col}</th>" in anchors_html
    assert "<td class='n' data-v='22713216.0'>23M</td>" in anchors_html          # MiniLM's size, raw value for sorting
    assert "offline copy (same data and split per data card)" in anchors_html
