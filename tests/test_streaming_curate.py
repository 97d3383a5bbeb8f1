"""Hub datasets through curation into per-source shards, and on into the trainer: a hub-only data card read the
way a GPU box reads the hub (local parquet shards through datasets streaming, the card's columns), a stage
streamed by source (stream.stages), the run directory wiring, and the shipped hub cards."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from kalm_lib.config import ConfigError
from kalm_lib.data import cards
from kalm_lib.data.cards import load_registry
from kalm_lib.data.curate import curate, load_config, stream_curate_sources
from kalm_lib.data.records import TASK_TYPES
from kalm_lib.model import EmbeddingModel
from kalm_lib.train import load_config as train_config, run_dir_overrides, train
from kalm_lib.train.stream import stream_sources

REPO = Path(__file__).resolve().parent.parent
WORDS = "apple banana cherry dog cat house river mountain blue green red car train plane book music".split()


@pytest.fixture()
def hub_card(tmp_path, monkeypatch) -> dict:
    """A hub-only card ('hub-en-pairs') whose data lies as the hub serves a dataset (data/train-*.parquet, the
    dataset's own column names), beside the real cards (the bundled sources still need theirs)."""
    hub = tmp_path / "hub" / "org__pairs" / "data"
    hub.mkdir(parents=True)
    rows = [{"question": f"question {i}: {' '.join(WORDS[(i + k) % 16] for k in range(4))}",
             "answer": f"answer {i} is about {WORDS[i % 16]} and {WORDS[(3 * i) % 16]}"} for i in range(90)]
    rows[7]["answer"] = ""                      # rejected by the record check (empty_text)
    rows[8] = dict(rows[9])                     # an exact duplicate: rejected by dedup
    pq.write_table(pa.Table.from_pylist(rows[:45]), hub / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[45:]), hub / "train-00001-of-00002.parquet")
    cards_dir = tmp_path / "cards"
    cards_dir.mkdir()
    for card in sorted(cards.CARDS_DIR.glob("*.md")):
        (cards_dir / card.name).symlink_to(card)
    front = {"name": "hub-en-pairs", "license": "mit", "languages": ["en"],
             "hub": {"id": "parquet", "data_files": [str(hub / "train-*.parquet")], "split": "train",
                     "license": "mit", "columns": {"query": "question", "pos": "answer"}, "task_type": "pretrain",
                     "lang": "en", "rows": 90}}
    (cards_dir / "hub-en-pairs.md").write_text("---\n" + yaml.safe_dump(front) + "---\n\n# pairs\n")
    monkeypatch.setattr(cards, "CARDS_DIR", cards_dir)
    return {"rows": rows, "registry": load_registry(verify=True)}


def curation(stages: list[str], **more) -> dict:
    config = {"name": "t", "sources": [{"name": "mrpc", "stage": "pretrain", "max_rows": 40},
                                        {"name": "oppo", "stage": "pretrain", "max_rows": 40},
                                        {"name": "trec", "stage": "finetune", "max_rows": 30}],
              "inputs": [{"card": "hub-en-pairs", "stage": "pretrain"}],
              "filters": {"leakage": False}, "mining": {"enabled": False},
              "stream": {"expected_rows": 1000, "stages": stages}}
    config.update(more)
    return config


def test_a_hub_card_is_curated_into_one_file_per_source(hub_card, tmp_path):
    out = tmp_path / "run" / "curated"
    report = curate(load_config(curation(["pretrain"])), out, registry=hub_card["registry"], show_progress=False)
    files = sorted(p.name for p in (out / "pretrain").iterdir())
    assert files == ["hub-en-pairs.jsonl", "mrpc.jsonl", "oppo.jsonl"] and not (out / "pretrain.jsonl").exists()
    hub_rows = [json.loads(x) for x in (out / "pretrain" / "hub-en-pairs.jsonl").read_text().splitlines()]
    assert {r["source"] for r in hub_rows} == {"hub-en-pairs"} and len(hub_rows) == 88   # 90 - empty - duplicate
    assert hub_rows[0]["query"] == hub_card["rows"][0]["question"] and hub_rows[0]["pos"] == [hub_card["rows"][0]["answer"]]
    read, cur = report["read"], report["curate"]
    assert read["rows_in"] == read["kept"] + read["rejected"] and cur["rows_in"] == cur["kept"] + cur["rejected"]
    assert read["per_source"]["hub-en-pairs"] == {"rows_in": 90, "kept": 89, "rejected": 1,
                                                  "rejected_by_reason": {"empty_text": 1}}
    assert cur["rejected_by_reason"].get("exact_duplicate", 0) >= 1
    stage = report["stages"]["pretrain"]
    assert stage["records"] == sum(report["outputs"][f"pretrain/{f}"]["rows"] for f in files)
    assert report["stages"]["finetune"]["records"] == report["outputs"]["finetune.jsonl"]["rows"] > 0
    assert set(report["dedup"]["pretrain"]) == {"text_keys", "ids"}
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["data"]["hf:parquet"]["card"] == "hub-en-pairs"
    # the run directory wiring: the pre-training stage streams that folder, one source per file
    overrides = run_dir_overrides(tmp_path / "run", "pretrain", start_from=None)
    assert overrides["data.train_file"] == str(out / "pretrain")
    # the same config without stream.stages: one file again, the stale folder removed
    curate(load_config(curation([])), out, registry=hub_card["registry"], show_progress=False)
    assert (out / "pretrain.jsonl").is_file() and not (out / "pretrain").exists()
    assert run_dir_overrides(tmp_path / "run", "pretrain", start_from=None)["data.train_file"] == str(out / "pretrain.jsonl")


def test_streamed_curation_writes_the_same_per_source_files(hub_card, tmp_path):
    memory = curate(load_config(curation(["pretrain"])), tmp_path / "m", registry=hub_card["registry"],
                    show_progress=False)
    stream = stream_curate_sources(load_config(curation(["pretrain"])), tmp_path / "s", registry=hub_card["registry"])
    for name in ("hub-en-pairs.jsonl", "mrpc.jsonl", "oppo.jsonl"):
        assert (tmp_path / "m" / "pretrain" / name).read_bytes() == (tmp_path / "s" / "pretrain" / name).read_bytes()
    assert {k: v["rows"] for k, v in stream["outputs"].items() if k.startswith("pretrain/")} == \
        {k: v["rows"] for k, v in memory["outputs"].items() if k.startswith("pretrain/")}


def test_the_trainer_streams_the_curated_folder_per_source(hub_card, tmp_path):
    out = tmp_path / "run" / "curated"
    curate(load_config(curation(["pretrain"])), out, registry=hub_card["registry"], show_progress=False)
    tiny = tmp_path / "tiny"
    EmbeddingModel.tiny_decoder("qwen2", seed=0, max_length=32).save(tiny)
    config = {"stage": "pretrain", "model": {"name_or_path": str(tiny), "max_length": 32},
              "loss": {"temperature": 0.05}, "data": {"streaming": True},
              "train": {"seed": 0, "max_steps": 6, "batch_size": 8, "lr": 1e-3}, "log": {"progress_bar": False}}
    c = train_config(config, [f"{k}={v}" for k, v in run_dir_overrides(tmp_path / "run", "pretrain").items()])
    assert sorted(s.name for s in stream_sources(c)) == ["hub-en-pairs", "mrpc", "oppo"]
    result = train(c)
    acc = json.loads((result.output_dir / "data_accounting.json").read_text())
    assert acc["global_batches"] == 6 and acc["total"]["rejected"] == 0


def test_card_inputs_are_checked_before_any_work(hub_card, tmp_path):
    with pytest.raises(ConfigError, match="card 'hub-en-nothing' is not in data_cards"):
        curate(load_config(curation([], inputs=[{"card": "hub-en-nothing"}])), tmp_path / "o",
               registry=hub_card["registry"], show_progress=False)
    with pytest.raises(ConfigError, match="needs a path or a card"):
        load_config(curation([], inputs=[{"card": "hub-en-pairs", "path": "x.jsonl"}]))
    with pytest.raises(ConfigError, match="stream.stages"):
        load_config(curation(["pretraining"]))


def test_the_shipped_hub_cards_say_where_what_and_what_was_verified():
    """Every hub-only card: a hub id, a licence, a column mapping onto the record fields, a task type, and a
    statement of what the search verified; the GPU curation preset reads them all."""
    registry = load_registry(verify=False)
    hub_cards = {n: c for n, c in registry.items() if n.startswith("hub-")}
    assert len(hub_cards) >= 5
    for name, card in hub_cards.items():
        spec = card.hub
        assert spec is not None and "/" in spec.path and not card.splits, name
        assert spec.license and card.license == spec.license, name
        assert {"query", "pos"} <= set(spec.columns) and spec.task_type in TASK_TYPES, name
        assert "verified" in card.meta["hub"] and "by search" in card.meta["hub"]["verified"], name
        assert card.languages and spec.lang in card.languages, name
    gpu = load_config("gpu-qwen2-0.5b")
    assert {i.card for i in gpu.inputs} == set(hub_cards) and gpu.stream.stages == ["pretrain"]
    assert train_config(REPO / "configs/train/gpu-qwen2-0.5b/pretrain.yaml").data.streaming
