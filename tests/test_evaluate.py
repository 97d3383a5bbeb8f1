"""kalm_lib.evaluation: real mteb evaluators on the bundled dev-eval data, real MiniLM.

The comparability tests run the full public split with no instruction (as the public evaluation did) and
compare with the published all-MiniLM-L6-v2 score read from data/reference-scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from kalm_lib import evaluation as ev
from kalm_lib.data.records import TASK_TYPES
from kalm_lib.config import ConfigError
from kalm_lib.evaluation import tasks as et
from kalm_lib.evaluation.cli import cli_main
from kalm_lib.model import EmbeddingModel, instruction_prompt
from kalm_lib.prompts import load_instruction_set


@pytest.fixture(scope="module")
def minilm():
    return EmbeddingModel.from_pretrained("minilm")


# ---------------------------------------------------------------------------------------------- data
def test_subsample_keeps_smallest_sha256_in_input_order():
    items = [f"text {i}" for i in range(50)]
    got = et.subsample(items, 7, key=str)
    by_hash = sorted(items, key=lambda s: hashlib.sha256(s.encode()).hexdigest())[:7]
    assert got == [x for x in items if x in set(by_hash)]
    assert et.subsample(items, 7, key=str) == got          # deterministic
    assert et.subsample(items, None, key=str) == items     # full mode keeps everything


@pytest.mark.parametrize("name", ["KalmDev-STSB-en", "KalmDev-Banking77-en", "KalmDev-MRPC-en", "KalmDev-PAWSX-zh",
                                  "KalmDev-STSB-zh", "KalmDev-LCQMC-zh", "KalmDev-TNews-zh", "KalmDev-CSLTitles-zh"])
def test_reader_row_count_matches_data_card(name):
    """Every row of the card's dev-eval file becomes one task item (the card's row count is independent)."""
    from kalm_lib.data.cards import load_registry

    spec = et.TASKS_BY_NAME[name]
    card = load_registry(verify=False)[spec.card]
    for card_split in spec.splits.values():
        assert card.splits[card_split].role == "dev-eval"
        path = et.split_file(spec.card, card_split, "dev-eval")
        reader = {"sts": et.read_pair_score, "pair_classification": et.read_pair_label}.get(spec.type, et.read_text_label)
        assert len(reader(path, spec.reader)) == card.splits[card_split].rows


def test_eval_refuses_a_training_split():
    with pytest.raises(et.EvalDataError, match="role 'train'"):
        et.split_file("en-banking77", "train", "dev-eval")


def test_retrieval_readers_are_consistent():
    q, c, r = et.read_scifact(et.split_file("en-scifact", "claims_dev"), et.split_file("en-scifact", "corpus"))
    assert len(c) == 5183 and set(r) == set(q) and all(d in c for docs in r.values() for d in docs)
    assert not c["4983"]["text"].startswith("[")            # list repr was turned into plain text
    q, c, r, top = et.read_trecqa(et.split_file("en-trecqa", "dev"))
    for qid in q:
        assert set(r[qid]) == set(top[qid]) and {0, 1} == set(r[qid].values())


# ---------------------------------------------------------------------------------------------- prompts
def test_prompt_selection_rules(minilm):
    enc = ev.MtebEncoder(minilm, name="t/m", revision="r", use_instructions=True,
                         instructions=ev.InstructionConfig(symmetric="both", per_type={"clustering": "Group them"},
                                                           per_task={"T-ret": "Find docs"},
                                                           symmetric_per_task={"T-sts-none": "none"}))
    assert enc.prompt_for("T-ret", "retrieval", "query") == "Instruct: Find docs \n Query: "
    assert enc.prompt_for("T-ret", "retrieval", "document") == ""
    assert enc.prompt_for("T-rr", "reranking", "document") == ""
    assert enc.prompt_for("T-sts", "sts", None, "Own words") == instruction_prompt("Own words")
    assert enc.prompt_for("T-sts-none", "sts", None, "Own words") == ""
    assert enc.prompt_for("T-clu", "clustering", None) == instruction_prompt("Group them")
    assert enc.prompt_for("T-cls", "classification", None) == instruction_prompt(
        load_instruction_set().types["Classification"])
    # a task of the instruction set gets the set's instruction, before its own mteb prompt
    assert enc.prompt_for("TNews", "Classification", None, "Own words") == instruction_prompt(
        load_instruction_set().tasks["TNews"][1])
    no_set = ev.MtebEncoder(minilm, name="t/m", revision="r",
                            instructions=ev.InstructionConfig(instruction_set="", per_type={"retrieval": "Q"}))
    assert no_set.prompt_for("TNews", "classification", None, "Own words") == instruction_prompt("Own words")
    assert no_set.prompt_for("T2Retrieval", "retrieval", "query") == instruction_prompt("Q")
    off = ev.MtebEncoder(minilm, name="t/m", revision="r", use_instructions=False)
    assert off.prompt_for("T-ret", "retrieval", "query") == ""
    none = ev.MtebEncoder(minilm, name="t/m", revision="r", instructions=ev.InstructionConfig(symmetric="none"))
    assert none.prompt_for("x", "pair_classification", None) == ""


# ---------------------------------------------------------------------------------------------- mteb runs
def test_sts_through_mteb_equals_independent_spearman(minilm, tmp_path):
    """mteb's STS evaluator on our adapter == spearman of cosine computed here from model.encode."""
    spec = dataclasses.replace(et.TASKS_BY_NAME["KalmDev-STSB-en"], quick_max=40)
    enc = ev.MtebEncoder(minilm, name="test/minilm", revision="r1", use_instructions=True)
    summary = ev.evaluate_encoder(enc, [et.build_task(spec, quick=True)], tmp_path)
    assert summary["errors"] == {}
    saved = json.loads((summary["results_dir"] / "KalmDev-STSB-en.json").read_text())
    got = saved["scores"]["test"][0]["cosine_spearman"]

    rows = et.subsample(et.read_pair_score(et.split_file("stsb-multi-mt", "en_test"), "csv_pair_score"), 40,
                        key=lambda r: r[0] + "\t" + r[1])
    prompt = instruction_prompt(spec.instruction)
    a = minilm.encode([r[0] for r in rows], prompt=prompt)
    b = minilm.encode([r[1] for r in rows], prompt=prompt)
    expected = spearmanr([r[2] for r in rows], (a * b).sum(1)).statistic
    assert got == pytest.approx(expected, abs=1e-6)
    assert enc.prompts_used["KalmDev-STSB-en"] == {"symmetric": prompt}
    meta = json.loads((summary["results_dir"] / "model_meta.json").read_text())
    assert meta["name"] == "test/minilm" and meta["revision"] == "r1"
    prov = json.loads((summary["record_dir"] / "kalm_eval.json").read_text())
    assert prov["prompts"]["KalmDev-STSB-en"]["symmetric"] == prompt and prov["git"]["commit"]
    assert not (summary["results_dir"] / "kalm_eval.json").exists()   # our records stay out of mteb's folders


def test_retrieval_instructs_queries_only_and_matryoshka_dim(minilm, tmp_path):
    spec = dataclasses.replace(et.TASKS_BY_NAME["KalmDev-CMRC2018-zh"], quick_max=4)
    enc = ev.MtebEncoder(minilm, name="test/minilm", revision="r1", use_instructions=True, dim=64)
    summary = ev.evaluate_encoder(enc, [et.build_task(spec, quick=True)], tmp_path)
    assert summary["errors"] == {}
    assert enc.prompts_used["KalmDev-CMRC2018-zh"] == {"query": instruction_prompt(spec.instruction), "document": ""}
    assert json.loads((summary["results_dir"] / "model_meta.json").read_text())["embed_dim"] == 64
    df = ev.load_results([tmp_path])
    assert set(df["task"]) == {"KalmDev-CMRC2018-zh"} and df["task_type"].iloc[0] == "retrieval"
    assert 0 <= df["main_score"].iloc[0] <= 100


def test_failing_task_is_recorded_and_others_go_on(minilm, tmp_path):
    good = dataclasses.replace(et.TASKS_BY_NAME["KalmDev-STSB-en"], quick_max=10)
    bad = dataclasses.replace(good, name="KalmDev-Broken-en", card="no-such-card")
    enc = ev.MtebEncoder(minilm, name="test/minilm", revision="r1", use_instructions=False)
    summary = ev.evaluate_encoder(enc, [et.build_task(bad, quick=True), et.build_task(good, quick=True)], tmp_path)
    assert summary["tasks_ok"] == ["KalmDev-STSB-en"]
    assert "no-such-card" in summary["errors"]["KalmDev-Broken-en"]
    errors = json.loads((summary["record_dir"] / "errors.json").read_text())
    assert set(errors) == {"KalmDev-Broken-en"}


# ---------------------------------------------------------------------------------------------- results
def test_result_tables_speak_the_record_vocabulary():
    """One task-type vocabulary (kalm_lib.data.records.TASK_TYPES) and one column naming (task_type, lang)."""
    assert {t.type for t in et.OFFLINE_TASKS} <= set(TASK_TYPES)
    assert set(et.MTEB_TYPE_TO_OURS.values()) <= set(TASK_TYPES)
    assert ev.task_type_of("PairClassification") == "pair_classification" and ev.task_type_of("STS") == "sts"
    assert ev.task_type_of("BitextMining") == "bitext_mining"        # mteb-only types keep mteb's name
    assert ev.lang_of(["cmn-Hans"]) == "zh" and ev.lang_of(["eng-Latn", "cmn-Hans"]) == "multi"
    assert ev.task_info("STSBenchmark") | {"mteb_equivalent": None} == {
        "task_type": "sts", "lang": "en", "mteb_equivalent": None, "known": True}   # from mteb's registry
    ref = ev.load_reference_scores()
    assert list(ref.columns) == ev.COLUMNS and {"type", "language"}.isdisjoint(ref.columns)
    assert set(ref.loc[ref["known"].astype(bool), "task_type"]) <= set(TASK_TYPES)
    for table in (ev.task_scores(ref), ev.reference_for(["KalmDev-STSB-en"]), ev.aggregate(ref)):
        assert {"type", "language"}.isdisjoint(table.columns)
    assert {"task_type", "lang"} <= set(ev.task_scores(ref).columns)


def test_evaluate_model_gives_the_scores_it_wrote(minilm, tmp_path, monkeypatch):
    """The notebooks' helper: a config by repo-relative path from any folder, overrides, per-task scores
    equal to the main_score of the mteb file it wrote."""
    monkeypatch.chdir(tmp_path)   # notebooks run from notebooks/: the config path is repo-relative
    got = ev.evaluate_model(minilm, "configs/eval/smoke.yaml", tmp_path / "eval", name="kalm/test-start",
                            overrides=["tasks=[KalmDev-STSB-en]", "batch_size=16"])
    assert list(got.columns) == ["run", "model", "revision", "task", "task_type", "lang", "scope", "main_score"]
    assert got.attrs["errors"] == {} and len(got.attrs["results_dirs"]) == 1
    row = got.iloc[0]
    assert (row["run"], row["model"], row["task"], row["task_type"], row["lang"]) == (
        "kalm/test-start", "kalm/test-start", "KalmDev-STSB-en", "sts", "en")
    saved = json.loads((got.attrs["results_dirs"][0] / "KalmDev-STSB-en.json").read_text())
    assert row["main_score"] == pytest.approx(100 * saved["scores"]["test"][0]["main_score"])
    prov = json.loads(next((tmp_path / "eval" / ev.RECORDS_DIR).rglob("kalm_eval.json")).read_text())
    assert prov["config"]["batch_size"] == 16 and prov["config"]["quick"] is True


def test_eval_config_by_name_path_or_none():
    assert ev.load_eval_config("smoke") == ev.load_eval_config("configs/eval/smoke.yaml")
    assert ev.load_eval_config("smoke").tasks == ["KalmDev-STSB-en", "KalmDev-STSB-zh"]
    assert ev.load_eval_config(None, ["dims=[64]"]) == ev.EvalConfig(dims=[64])
    with pytest.raises(FileNotFoundError, match="known eval configs"):
        ev.load_eval_config("no-such-preset")


def test_aggregate_mtk_mty_by_hand():
    rows = [("a", "sts", 80.0), ("b", "sts", 60.0), ("c", "classification", 40.0)]
    df = pd.DataFrame([{"run": "r", "model": "m", "revision": "x", "task": t, "task_type": ty, "lang": "en",
                        "split": "test", "subset": "default", "main_score": s} for t, ty, s in rows])
    # a task with two splits counts once, as the mean of its splits
    df = pd.concat([df, df.iloc[[2]].assign(split="validation", main_score=20.0)], ignore_index=True)
    out = ev.aggregate(df).iloc[0]
    assert out["MTK"] == pytest.approx((80 + 60 + 30) / 3)
    assert out["MTY"] == pytest.approx(((80 + 60) / 2 + 30) / 2)
    assert (out["n_tasks"], out["n_types"]) == (3, 2)


def test_reference_loader_reads_both_layouts_and_maps_only_identical_tasks():
    ref = ev.load_reference_scores()
    old = ref[(ref["model"] == "BAAI/bge-base-zh-v1.5") & (ref["task"] == "STSB")]
    assert old["main_score"].iloc[0] == pytest.approx(78.3059741794318)       # old layout: cos_sim.spearman
    mapped = ev.reference_for(["KalmDev-STSB-en", "KalmDev-MRPC-en", "KalmDev-PAWSX-zh"])
    assert set(mapped["task"]) == {"KalmDev-STSB-en", "KalmDev-PAWSX-zh"}      # MRPC is not a public task here
    mini = mapped[(mapped["model"] == "sentence-transformers/all-MiniLM-L6-v2") & (mapped["task"] == "KalmDev-STSB-en")]
    assert mini["main_score"].iloc[0] == pytest.approx(82.03247283076371) and mini["split"].iloc[0] == "test"


def _published(task: str) -> float:
    ref = ev.reference_for([task])
    return float(ref.loc[ref["model"] == "sentence-transformers/all-MiniLM-L6-v2", "main_score"].iloc[0])


@pytest.mark.slow
def test_minilm_stsbenchmark_full_matches_published(tmp_path):
    """`kalm eval minilm` on the full STSBenchmark test split, no instruction: within 1 point of MTEB."""
    assert cli_main(["minilm", "--tasks", "KalmDev-STSB-en", "--out", str(tmp_path)]) == 0
    df = ev.load_results([tmp_path])
    ours = float(df["main_score"].iloc[0])
    assert abs(ours - _published("KalmDev-STSB-en")) < 1.0
    prov = json.loads(next(tmp_path.rglob("kalm_eval.json")).read_text())
    assert prov["use_instructions"] is False and prov["data"]["stsb-multi-mt/en_test"]


@pytest.mark.slow
def test_minilm_banking77_full_matches_published(minilm, tmp_path):
    """Full Banking77 test split, no instruction, mteb's protocol (logistic regression on 8 train examples per
    label, experiment i = the i-th seeded undersampling). To stay fast only the first 2 of the 10 experiments
    run; each must match the published per-experiment accuracy (scores_per_experiment) within 1 point."""
    task = et.build_task("KalmDev-Banking77-en", quick=False)
    task.n_experiments = 2
    enc = ev.MtebEncoder(minilm, name="test/minilm", revision="r1", use_instructions=False)
    summary = ev.evaluate_encoder(enc, [task], tmp_path)
    assert summary["errors"] == {}
    ours = json.loads((summary["results_dir"] / "KalmDev-Banking77-en.json").read_text())["scores"]["test"][0]
    ref = ev.reference_for(["KalmDev-Banking77-en"])
    src = ref.loc[ref["model"] == "sentence-transformers/all-MiniLM-L6-v2", "source"].iloc[0]
    published = json.loads(open(src).read())["scores"]["test"][0]["scores_per_experiment"]
    assert len(ours["scores_per_experiment"]) == 2
    for mine, theirs in zip(ours["scores_per_experiment"], published):
        assert abs(mine["accuracy"] - theirs["accuracy"]) < 0.01


def test_unknown_task_or_config_is_a_clear_cli_error(tmp_path, capsys):
    assert cli_main(["minilm", "--tasks", "NoSuchTask", "--out", str(tmp_path)]) == 2
    assert "NoSuchTask" in capsys.readouterr().err
    assert cli_main(["minilm", "--config", "no-such-preset", "--out", str(tmp_path)]) == 2
    assert "known eval configs" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_quick_suite_covers_every_type_in_both_languages():
    specs = [et.TASKS_BY_NAME[n] for n in et.offline_task_names(quick=True)]
    have = {(s.lang, s.type) for s in specs}
    for lang in ("en", "zh"):
        for ty in ("sts", "pair_classification", "classification", "clustering", "retrieval", "reranking"):
            assert (lang, ty) in have, (lang, ty)
    assert all("Quick subset" in et.build_task(s, quick=True).metadata.description for s in specs)


def test_mteb_result_cache_reuses_finished_tasks(minilm, tmp_path):
    spec = dataclasses.replace(et.TASKS_BY_NAME["KalmDev-STSB-en"], quick_max=10)
    enc = ev.MtebEncoder(minilm, name="test/minilm", revision="r1", use_instructions=False)
    first = ev.evaluate_encoder(enc, [et.build_task(spec, quick=True)], tmp_path / "a", mteb_cache=tmp_path / "cache")
    enc.model = None  # any encode call would now fail: the second run must come from mteb's cache
    second = ev.evaluate_encoder(enc, [et.build_task(spec, quick=True)], tmp_path / "b", mteb_cache=tmp_path / "cache")
    assert first["errors"] == {} and second["errors"] == {}
    a, b = (ev.load_results([tmp_path / d])["main_score"].iloc[0] for d in ("a", "b"))
    assert a == b


@pytest.mark.parametrize("name", ["KalmDev-STSB-en", "KalmDev-TNews-zh"])
def test_quick_cap_keeps_a_prefix_of_the_quick_subset(name):
    """quick_cap (an ablation grid's cheaper cells): at most cap items per split, the same sha256-first items the
    uncapped quick subset starts with, and the size in the revision so capped and uncapped scores never mix."""
    full, capped = (et.build_task(name, quick=True, quick_cap=cap) for cap in (None, 7))
    full.load_data(), capped.load_data()
    assert capped.metadata.revision == "quick-7" != full.metadata.revision
    for split, rows in capped.dataset.items():
        # a classifier's train split is the whole card split in both (mteb samples from it per experiment)
        assert rows.num_rows == (full.dataset[split].num_rows if split == "train" else 7)
        kept, everything = rows.to_pandas(), full.dataset[split].to_pandas()
        key = list(kept.columns)
        assert set(map(tuple, kept[key].astype(str).values)) <= set(map(tuple, everything[key].astype(str).values))


def test_quick_cap_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="quick_cap: must be >= 1"):
        ev.load_eval_config("quick", ["quick_cap=0"])
