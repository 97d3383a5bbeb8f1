"""The GPU preset rehearsed on CPU (issue 13.7), and the GPU wiring it rehearses (13.3-13.6).

Fast tests check the presets against each other (same stages, notebooks and inputs; training configs key for key;
GPU settings: accelerate launch, one ablation cell per GPU, device-side scoring, online MTEB stages only online).
The slow test runs ``kalm pipeline --preset gpu-rehearsal`` end to end once (tiny stand-ins in a temporary Hugging
Face cache, 2 processes) and the tests after it check each stage's outputs, down to the HTML report.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from kalm_lib import data, pipeline, soup
from kalm_lib.evaluation import load_eval_config
from kalm_lib.soup import run as soup_run
from kalm_lib.soup import scoring as soup_scoring

ROOT = Path(__file__).resolve().parent.parent
GPU, REHEARSAL = "gpu-qwen2-0.5b", "gpu-rehearsal"
TRAINING = ("pretrain", "finetune", "distill")
MTEB = {"mteb_cmn_v1": ("cmn-v1", "MTEB(cmn, v1)"), "mteb_eng_v1": ("eng-v1", "MTEB(eng, v1)"),
        "mteb_eng_v2": ("eng-v2", "MTEB(eng, v2)")}
# the keys a rehearsal training config may set to other values than its GPU twin: sizes and the stand-ins
SIZE_KEYS = {"output_dir", "model.name_or_path", "model.max_length", "loss.num_hard_negatives", "loss.num_mix",
             "loss.matryoshka_dims", "loss.matryoshka_weights", "data.train_file", "distill.teacher",
             "distill.teacher_batch_size", "train.max_steps", "train.epochs", "train.batch_size", "train.lr",
             "train.chunk_size", "train.chunk_tokens", "checkpoint.every_steps", "checkpoint.keep_last"}


def stages(preset: str) -> dict[str, pipeline.StageSpec]:
    return pipeline.load_preset(preset)[1].stages


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "in_batch_by_task":
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------- the presets
def test_the_rehearsal_runs_every_stage_of_the_gpu_preset_in_the_same_order():
    gpu, reh = stages(GPU), stages(REHEARSAL)
    assert list(reh) == ["setup", "standins", *[s for s in gpu if s != "setup"]]
    assert {"remine", "distill", "soup", "ablate", "ablate_distill", "report", *MTEB} <= set(gpu)
    for name, st in gpu.items():
        assert reh[name].notebook == st.notebook, name               # the same notebook, so the same code
        assert reh[name].produces == st.produces, name
        assert set(st.needs) <= set(reh[name].needs), name
    # the stage between pre-training and fine-tuning, and fine-tuning on its output
    assert list(gpu).index("pretrain") < list(gpu).index("remine") < list(gpu).index("finetune")
    mined = "remine/finetune.jsonl"
    assert gpu["remine"].notebook == "02b_remine.ipynb" and gpu["remine"].produces[:2] == ["remine", mined]
    for name in ("finetune", "distill", "ablate", "ablate_distill"):
        assert mined in gpu[name].needs, name
    for name in ("ablate", "ablate_distill"):
        assert gpu[name].parameters["run_dir_paths"]["finetune"]["data.train_file"] == mined
    # the report reads the MTEB results (so a changed benchmark result re-runs it)
    assert {f"mteb/{folder}/results" for folder, _ in MTEB.values()} <= set(gpu["report"].needs)


def test_rehearsal_training_configs_are_the_gpu_configs_key_for_key():
    for stage in TRAINING:
        g = flat(yaml.safe_load((ROOT / "configs/train" / GPU / f"{stage}.yaml").read_text()))
        r = flat(yaml.safe_load((ROOT / "configs/train" / REHEARSAL / f"{stage}.yaml").read_text()))
        g = {k: v for k, v in g.items() if not k.startswith("log.")}
        r = {k: v for k, v in r.items() if not k.startswith("log.")}
        assert set(g) - SIZE_KEYS == set(r) - SIZE_KEYS, (stage, (set(g) ^ set(r)) - SIZE_KEYS)
        differ = {k for k in set(g) & set(r) if g[k] != r[k]}
        assert differ <= SIZE_KEYS, (stage, {k: (g[k], r[k]) for k in differ - SIZE_KEYS})
        # the code paths that matter on a GPU are the same: precision, checkpointing, attention, pooling
        for key in ("train.mixed_precision", "train.gradient_checkpointing", "model.bidirectional", "model.pooling"):
            assert g[key] == r[key], (stage, key)


def test_gpu_stages_use_the_devices():
    gpu, reh = stages(GPU), stages(REHEARSAL)
    for name in TRAINING:   # accelerate launch, one process per GPU (the rehearsal: 2 on CPU)
        assert gpu[name].parameters["accelerate_config"] == reh[name].parameters["accelerate_config"] \
            == "configs/accelerate/ddp.yaml"
        assert "num_processes" not in gpu[name].parameters and reh[name].parameters["num_processes"] == 2
    for name in ("ablate", "ablate_distill"):   # one cell per GPU
        assert gpu[name].parameters["parallel"] == "auto" and reh[name].parameters["parallel"] == 2
    for name, (folder, benchmark) in MTEB.items():   # online for these stages only, on the device
        p, q = gpu[name].parameters, reh[name].parameters
        assert (p["online"], q["online"], p["name"], q["name"]) == (True, False, folder, folder)
        online, stand_in = load_eval_config(p["eval_config"]), load_eval_config(q["eval_config"])
        assert online.benchmark == benchmark and not online.tasks
        assert stand_in.benchmark is None and stand_in.tasks and stand_in.quick
        assert (online.device, online.dtype, online.instructions) == \
            (stand_in.device, stand_in.dtype, stand_in.instructions)
        assert online.device == "auto" and online.gpu_batch_size >= 128
    assert not any(st.parameters.get("online") for n, st in gpu.items() if n not in MTEB)
    for name in ("soup",):
        cfg = soup.load_config(gpu[name].parameters["config"])
        assert cfg.device == "auto" and cfg.gpu_batch_size >= 128
    mining = data.load_config("gpu-qwen2-0.5b", gpu["remine"].parameters["overrides"]).mining
    assert mining.device == "auto" and mining.consistency_langs is None   # every language the model can rank


def test_soup_scores_on_its_device_with_the_gpu_batch_size(monkeypatch, tmp_path):
    cfg = soup.load_config(REHEARSAL, {"run_dir": str(tmp_path)})
    assert soup.scoring_batch_size(cfg) == cfg.batch_size == 32          # this machine has no GPU
    assert soup.selection_scorer_for(cfg).batch_size == 32
    monkeypatch.setattr(soup_run, "resolve_device", lambda device: "cuda")
    assert soup.scoring_batch_size(cfg) == cfg.gpu_batch_size == 256
    assert soup.selection_scorer_for(cfg).batch_size == soup.heldout_scorer_for(cfg).batch_size == 256
    # a score computed on a GPU is its own cache entry; CPU scores keep the bare id (old caches stay valid)
    scorer = soup.EvaluateScorer(["KalmDev-STSB-en"])
    ingredients = [SimpleNamespace(sha256="a" * 64), SimpleNamespace(sha256="b" * 64)]
    on_cpu = soup.SoupEvaluator(ingredients, scorer, device="cpu")
    assert on_cpu.scorer_id == soup.scorer_id(scorer) and on_cpu.device == "cpu"
    monkeypatch.setattr(soup_scoring, "resolve_device", lambda device: "cuda:1")
    on_gpu = soup.SoupEvaluator(ingredients, scorer, device="auto")
    assert on_gpu.scorer_id == soup.scorer_id(scorer) + "@cuda" and on_gpu.device == "cuda:1"
    keys = {soup.ScoreCache.key([i.sha256 for i in ingredients], [0.5, 0.5], e.scorer_id) for e in (on_cpu, on_gpu)}
    assert len(keys) == 2
    assert on_gpu.with_scorer(scorer).scorer_id == on_gpu.scorer_id


def test_distillation_is_optional_and_one_flag_turns_off_stage_and_grid(tmp_path):
    """`-p distillation=false` (the V2 recipe): notebook 03b records that it skipped and trains nothing, notebook 05
    skips a grid varying the distillation switch while the other grids run; parallel: auto is one worker per
    visible GPU (1 here)."""
    runner = f"{ROOT / 'tests/fixtures/notebooks/toy_ablation_runner.py'}:run"
    grids = tmp_path / "grids"
    grids.mkdir()
    (grids / "recipe.yaml").write_text(yaml.safe_dump({"switches": {"focal": [False]}}))
    (grids / "distill.yaml").write_text(yaml.safe_dump({"switches": {"distillation": ["kl_only"]}}))
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "p.yaml").write_text(yaml.safe_dump({"stages": {
        "distill": {"notebook": "03b_distill.ipynb", "parameters": {"preset": "smoke"},
                    "produces": ["train/distill", "train/distill/skipped.json"]},
        "ablate": {"parameters": {"grid": str(grids / "recipe.yaml"), "runner": runner, "parallel": "auto"},
                   "produces": ["ablations/results.csv"]},
        "ablate_distill": {"notebook": "05_ablations.ipynb", "produces": ["ablations/results.csv"],
                           "parameters": {"grid": str(grids / "distill.yaml"), "runner": runner}}}}, sort_keys=False))
    result = pipeline.run_pipeline("p", run_dir=tmp_path / "run", presets_dir=presets, progress=False,
                                   overrides=["distillation=false"], log=lambda *_: None)
    assert result.ran == ["distill", "ablate", "ablate_distill"]
    assert sorted(p.name for p in (tmp_path / "run" / "train" / "distill").iterdir()) == ["skipped.json"]
    rows = pd.read_csv(tmp_path / "run" / "ablations" / "results.csv")
    assert set(rows["grid"]) == {"recipe"} and set(rows["cell"]) == {"full", "focal=off"}


# ---------------------------------------------------------------------------------------------- the rehearsal
@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """``kalm pipeline --preset gpu-rehearsal`` once, with its stand-ins in a temporary Hugging Face cache."""
    root = tmp_path_factory.mktemp("rehearsal")
    started = time.time()
    saved = {k: os.environ.get(k) for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "KALM_ONLINE")}
    os.environ.update(HF_HUB_CACHE=str(root / "hf-cache"), HF_HUB_OFFLINE="1")
    os.environ.pop("KALM_ONLINE", None)
    try:
        result = pipeline.run_pipeline(REHEARSAL, run_dir=root / "run", progress=False, log=lambda *_: None)
        yield SimpleNamespace(result=result, run=result.run_dir, cache=root / "hf-cache", started=started)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_every_stage_of_the_rehearsal_ran(rehearsal):
    assert rehearsal.result.ran == list(stages(REHEARSAL))
    assert all(rehearsal.result.manifest["stages"][s]["status"] == "ok" for s in stages(REHEARSAL))
    page = (rehearsal.run / "report" / "report.html").read_text(encoding="utf-8")
    assert "kalm/soup" in page and "distillation=kl_only" in page and len(page) > 100_000


@pytest.mark.slow
def test_models_were_loaded_by_hub_id_from_the_local_cache(rehearsal):
    placed = _json(rehearsal.run / "standins" / "standins.json")["models"]
    for repo_id, rec in placed.items():
        repo = rehearsal.cache / ("models--" + repo_id.replace("/", "--"))
        assert (repo / "refs" / "main").read_text() == rec["commit"]
        assert Path(rec["folder"]) == repo / "snapshots" / rec["commit"]
    pre = _json(rehearsal.run / "train" / "pretrain" / "provenance.json")
    assert pre["model"]["name_or_path"] == "kalm-rehearsal/tiny-qwen2"
    # the stage's "before" check evaluated the hub id itself: its results are filed under the snapshot's commit
    commit = placed["kalm-rehearsal/tiny-qwen2"]["commit"]
    assert list((rehearsal.run / "train" / "pretrain" / "eval" / "results").glob(f"*/{commit}/*.json"))


@pytest.mark.slow
def test_training_stages_ran_as_two_processes(rehearsal):
    for stage in TRAINING:
        prov = _json(rehearsal.run / "train" / stage / "provenance.json")
        assert (prov["world_size"], prov["engine"]) == (2, "ddp"), stage
        assert (rehearsal.run / "train" / stage / "final" / "model.safetensors").is_file(), stage


@pytest.mark.slow
def test_remine_used_the_runs_stage1_model(rehearsal):
    rep = _json(rehearsal.run / "remine" / "report.json")
    assert rep["model"] == str(rehearsal.run / "train" / "pretrain" / "final") and rep["device"] == "cpu"
    assert rep["input"] == str(rehearsal.run / "curated" / "finetune.unmined.jsonl")
    kept = [json.loads(x) for x in (rehearsal.run / "remine" / "finetune.jsonl").read_text().splitlines()]
    assert len(kept) == rep["kept"] == rep["records_in"] - rep["dropped_inconsistent"]
    assert {"en", "zh"} <= set(rep["consistency_by_lang"])      # every language checked, none skipped by list


@pytest.mark.slow
def test_finetune_and_distill_trained_on_the_remined_records(rehearsal):
    mined = str(rehearsal.run / "remine" / "finetune.jsonl")
    for stage in ("finetune", "distill"):
        assert _json(rehearsal.run / "train" / stage / "provenance.json")["data"]["train_file"] == mined, stage
    # the distillation grid's cells read the teacher scores the distill stage cached (same data, same key)
    cached = _json(rehearsal.run / "train" / "distill" / "provenance.json")["teacher_cache"]
    cell = rehearsal.run / "ablations" / "cells" / "gpu-rehearsal-distill" / "full" / "seed0" / "finetune"
    assert _json(cell / "provenance.json")["teacher_cache"] == cached


@pytest.mark.slow
def test_distillation_scored_the_teacher_stand_in(rehearsal):
    prov = _json(rehearsal.run / "train" / "distill" / "provenance.json")
    key = _json(Path(prov["teacher_cache"]).with_suffix(".json"))
    assert key["teacher"]["name_or_path"] == "kalm-rehearsal/tiny-gte"
    metrics = [json.loads(x) for x in (rehearsal.run / "train" / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["loss_kl"] > 0 for m in metrics)


@pytest.mark.slow
def test_soup_was_scored_on_the_device_and_written(rehearsal):
    rec = _json(rehearsal.run / "soup" / "soup.json")
    assert rec["provenance"]["device"] == "cpu" and rec["provenance"]["config"]["device"] == "auto"
    assert len(rec["ingredients"]) == 3          # the stage-1 model + the two fine-tuning checkpoints kept
    assert (rehearsal.run / "soup" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_mteb_stand_in_stages_wrote_mtebs_layout_for_the_final_models(rehearsal):
    for name, (folder, _) in MTEB.items():
        config = load_eval_config(stages(REHEARSAL)[name].parameters["eval_config"])
        results = rehearsal.run / "mteb" / folder / "results"
        models = sorted(p.name for p in results.iterdir())
        assert models == ["kalm__distill-final", "kalm__soup-model"], (name, models)
        for model in models:
            written = {p.stem for p in results.glob(f"{model}/*/*.json")} - {"model_meta"}
            assert written == set(config.tasks), (name, model, written)


@pytest.mark.slow
def test_ablation_grids_ran_in_workers_on_the_runs_data(rehearsal):
    rows = pd.read_csv(rehearsal.run / "ablations" / "results.csv")
    cells = rows.groupby("grid")["cell"].apply(set).to_dict()
    assert cells == {"gpu-rehearsal": {"full", "focal=off", "positives=label_text"},
                     "gpu-rehearsal-distill": {"full", "distillation=kl_only", "distillation=cl_only"}}
    base = rehearsal.run / "ablations" / "cells"
    mined = str(rehearsal.run / "remine" / "finetune.jsonl")
    for cell in ("full", "focal=off", "positives=label_text"):
        assert _json(base / "gpu-rehearsal" / cell / "seed0" / "finetune" / "provenance.json")["data"]["train_file"] \
            == mined
        streamed = _json(base / "gpu-rehearsal" / cell / "seed0" / "pretrain" / "provenance.json")["data"]
        assert streamed["streaming"] and streamed["sources"]          # the run's curated shards, one per source
        assert all(str(rehearsal.run / "curated" / "pretrain") in json.dumps(v) for v in streamed["sources"].values())
    label_text = _json(base / "gpu-rehearsal" / "positives=label_text" / "seed0" / "finetune" / "provenance.json")
    assert label_text["config"]["data"]["positives"] == "label_text"
    labelled = [json.loads(x) for x in (rehearsal.run / "remine" / "finetune.jsonl").read_text().splitlines()]
    assert any(r.get("label") for r in labelled if r["task_type"] in ("classification", "clustering"))
    start = str(rehearsal.run / "train" / "finetune" / "final")
    stage_of = {"full": "distill", "distillation=kl_only": "distill", "distillation=cl_only": "finetune"}
    for cell, stage in stage_of.items():
        prov = _json(base / "gpu-rehearsal-distill" / cell / "seed0" / "finetune" / "provenance.json")
        assert (prov["model"]["name_or_path"], prov["stage"]) == (start, stage), cell
        cache = prov["teacher_cache"]
        assert (cache is None) == (cell == "distillation=cl_only"), cell
        assert cache is None or Path(cache).parent == rehearsal.run / "train" / "distill" / "teacher_cache"


@pytest.mark.slow
def test_the_report_shows_the_mteb_stage_results(rehearsal):
    page = (rehearsal.run / "report" / "report.html").read_text(encoding="utf-8")
    cmn = rehearsal.run / "mteb" / "cmn-v1" / "results"
    assert "KalmDev-LCQMC-zh" in page    # a task only the MTEB(cmn, v1) stand-in scores
    assert str(next(cmn.glob("kalm__soup-model/*/KalmDev-LCQMC-zh.json"))) in page   # read from the stage's folder


@pytest.mark.slow
def test_a_finished_rehearsal_skips_every_stage(rehearsal):
    """Dry-run again: every stage unchanged (unless kalm_lib was edited meanwhile: then it says so)."""
    edited = any(p.stat().st_mtime > rehearsal.started for p in (ROOT / "kalm_lib").rglob("*.py"))
    for d in pipeline.explain_pipeline(REHEARSAL, rehearsal.run)[3]:
        assert d.action == "skip" or (edited and d.reasons[0].startswith("code changed: ")), (d.stage, d.reasons)
