"""Numbers the field's own tools reproduce: mteb's ResultCache reads `kalm eval` output, stock mteb on a saved
folder gives `kalm eval`'s scores, quick subsets never pass for full splits, saved folders carry a model card."""

from __future__ import annotations

import json

import mteb
import pandas as pd
import pytest
from sentence_transformers import SentenceTransformer

from kalm_lib import evaluation as ev
from kalm_lib.evaluation.cli import cli_main
from kalm_lib.model import EmbeddingModel
from kalm_lib.prompts import default_prompt_table, instruction_prompt


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A small model saved by the workbench (random-init 2-layer Qwen2: fast to encode; scores are not the point)."""
    folder = tmp_path_factory.mktemp("model") / "final"
    model = EmbeddingModel.tiny_decoder("qwen2", seed=3)
    model.card = {"base_model": "tiny:qwen2", "recipe": {"stage": "finetune", "loss": {"temperature": 0.05}},
                  "data": ["en-banking77", "zh-lcqmc"], "scores": {"KalmDev-STSB-en": 12.5}, "language": ["en", "zh"]}
    return model.save(folder)


def _kalm_eval(folder, tasks, out, *extra) -> None:
    assert cli_main([str(folder), "--tasks", *tasks, "--out", str(out), "--device", "cpu", *extra]) == 0


def test_result_cache_loads_kalm_eval_output_with_the_same_scores(saved_model, tmp_path, capsys):
    out = tmp_path / "eval"
    _kalm_eval(saved_model, ["KalmDev-STSB-en", "KalmDev-LCQMC-zh", "KalmDev-TrecQA-en"], out, "--quick")
    ours = ev.task_scores(ev.load_results([out]))
    loaded = mteb.ResultCache(out).load_results()        # default arguments
    assert len(loaded.model_results) == 1
    theirs = {r.task_name: 100 * r.get_score() for r in loaded.model_results[0].task_results}
    assert theirs == pytest.approx(dict(zip(ours["task"], ours["main_score"])), abs=1e-9)
    assert (loaded.model_results[0].model_name, loaded.model_results[0].model_revision) == (
        ours["model"].iloc[0], ours["revision"].iloc[0])
    # mteb's own files only, where mteb globs; ours beside them
    results_dir = next((out / ev.RESULTS_DIR).glob("*/*"))
    assert sorted(p.name for p in results_dir.iterdir()) == sorted(
        ["KalmDev-STSB-en.json", "KalmDev-LCQMC-zh.json", "KalmDev-TrecQA-en.json", "model_meta.json",
         "run_settings.jsonl"])
    meta = json.loads((results_dir / "model_meta.json").read_text())
    assert meta["experiment_kwargs"] is None and meta["n_parameters"] > 0 and meta["embed_dim"] == 64
    settings = [json.loads(line) for line in (results_dir / "run_settings.jsonl").read_text().splitlines()]
    by_task = {s["task"]: s for s in settings}
    assert set(by_task) == {"KalmDev-STSB-en", "KalmDev-LCQMC-zh", "KalmDev-TrecQA-en"}
    assert by_task["KalmDev-STSB-en"]["version"]["mteb"] == mteb.__version__
    enc = by_task["KalmDev-STSB-en"]["encode_kwargs"]
    assert enc["device"] == "cpu" and enc["batch_size"] == 32 and enc["prompts"]["symmetric"].startswith("Instruct:")
    record = next((out / ev.RECORDS_DIR).rglob("kalm_eval.json"))
    assert record.parent.relative_to(out / ev.RECORDS_DIR) == results_dir.relative_to(out / ev.RESULTS_DIR)
    assert "mteb.ResultCache" in capsys.readouterr().out


def test_quick_subset_and_full_split_have_distinct_revisions_and_scopes(saved_model, tmp_path):
    _kalm_eval(saved_model, ["KalmDev-TrecQA-en"], tmp_path / "quick", "--quick")
    _kalm_eval(saved_model, ["KalmDev-TrecQA-en"], tmp_path / "full")
    quick, full = (ev.load_results([tmp_path / d]) for d in ("quick", "full"))
    spec = ev.TASKS_BY_NAME["KalmDev-TrecQA-en"]
    assert quick["dataset_revision"].iloc[0] == f"quick-{spec.quick_max}" and quick["scope"].iloc[0] == "quick subset"
    assert full["dataset_revision"].iloc[0] == "full" and full["scope"].iloc[0] == "full split"
    both = ev.task_scores(pd.concat([quick, full], ignore_index=True))
    assert sorted(both["scope"]) == ["full split", "quick subset"]              # never averaged together
    published = ev.load_reference_scores()
    assert "quick" not in set(published["dataset_revision"].astype(str).str[:5])  # published: full splits only
    assert set(published["scope"]) == {"full split"}


def _stock_mteb_score(folder, task_name: str) -> float:
    """Stock mteb on SentenceTransformer(folder): no kalm_lib in the encoding path, the folder's prompts."""
    [task] = ev.resolve_tasks(ev.EvalConfig(tasks=[task_name], quick=True))
    result = mteb.evaluate(SentenceTransformer(str(folder), device="cpu"), task, cache=None,
                           overwrite_strategy="always", show_progress_bar=False)
    return 100 * result.task_results[0].get_score()


def _kalm_eval_score(folder, task_name: str, out, *extra) -> float:
    _kalm_eval(folder, [task_name], out, "--quick", "--no-progress", *extra)
    return float(ev.task_scores(ev.load_results([out]))["main_score"].iloc[0])


def test_stock_mteb_on_the_saved_folder_equals_kalm_eval_sts(saved_model, tmp_path):
    stock = _stock_mteb_score(saved_model, "KalmDev-STSB-zh")
    assert stock == pytest.approx(_kalm_eval_score(saved_model, "KalmDev-STSB-zh", tmp_path / "auto"), abs=1e-3)
    record = json.loads(next((tmp_path / "auto").rglob("kalm_eval.json")).read_text())
    spec = ev.TASKS_BY_NAME["KalmDev-STSB-zh"]
    assert record["prompts"]["KalmDev-STSB-zh"] == {"symmetric": instruction_prompt(spec.instruction)}
    # the instruction matters: without it the same folder scores differently
    assert stock != pytest.approx(_kalm_eval_score(saved_model, "KalmDev-STSB-zh", tmp_path / "off", "--instructions",
                                                   "off"), abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["KalmDev-MRPC-en", "KalmDev-Banking77-en", "KalmDev-20News-en",
                                       "KalmDev-CMRC2018-zh", "KalmDev-TrecQA-en"])
def test_stock_mteb_on_the_saved_folder_equals_kalm_eval_every_type(saved_model, tmp_path, task_name):
    """One offline task per remaining type (pair classification, classification, clustering, retrieval,
    reranking): the prompts travel with the folder, so both paths give the same score."""
    assert _stock_mteb_score(saved_model, task_name) == pytest.approx(
        _kalm_eval_score(saved_model, task_name, tmp_path), abs=1e-3)


def test_saved_folder_carries_prompts_versions_and_a_model_card(saved_model):
    cfg = json.loads((saved_model / "config_sentence_transformers.json").read_text())
    assert set(cfg["__version__"]) == {"sentence_transformers", "transformers", "pytorch"}
    assert all(cfg["__version__"].values())
    assert cfg["prompts"] == default_prompt_table()
    st = SentenceTransformer(str(saved_model), device="cpu")
    assert st.prompts["KalmDev-CMRC2018-zh-query"].startswith("Instruct: ") and st.prompts["Retrieval-document"] == ""
    card = (saved_model / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: sentence-transformers" in front and "base_model: tiny:qwen2" in front
    assert "en-banking77" in front and "temperature: 0.05" in card and "| KalmDev-STSB-en | 12.50 |" in card
    reloaded = EmbeddingModel.from_pretrained(saved_model)
    assert reloaded.card["recipe"]["stage"] == "finetune"      # the card travels with the folder too
