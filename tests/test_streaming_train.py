"""Streamed training (data.streaming): config checks, a resumed run continues from the saved data position
bit for bit (in process, and after kill -9 of 2 processes), every row accounted for, hub sources by data card."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from kalm_lib.config import ConfigError
from kalm_lib.data import cards
from kalm_lib.train import DataError, load_config, train
from kalm_lib.train.stream import hub_spec, stream_sources

REPO = Path(__file__).resolve().parent.parent
WORDS = ("apple banana cherry dog cat house river mountain blue green red car train plane book music sun moon "
         "star tree stone water fire cloud").split()


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def rows(src: str, n: int, task: str, seed: int, n_neg: int = 2) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.sample(WORDS, 3)
        out.append({"id": f"{src}-{i}", "query": " ".join(topic) + f" question {i}",
                    "pos": [" ".join(topic) + " answer " + " ".join(rng.sample(WORDS, rng.randint(1, 6)))],
                    "neg": [" ".join(rng.sample(WORDS, 5)) for _ in range(n_neg)], "task_type": task,
                    "category": task, "instruction": "Find the matching text" if i % 3 else "", "lang": "en",
                    "source": src})
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Three sources: 'qa' in two JSONL shards (with a broken line), 'cls' in parquet, 'nli' gzip JSONL."""
    d = tmp_path_factory.mktemp("stream-shards")
    qa = rows("qa", 40, "retrieval", 0)
    (d / "qa-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa[:22]) + "{broken\n")
    (d / "qa-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa[22:]))
    pq.write_table(pa.Table.from_pylist(rows("cls", 30, "classification", 1)), d / "cls.parquet", row_group_size=8)
    import gzip
    with gzip.open(d / "nli.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows("nli", 26, "nli", 2))
    return d


def stream_config(tiny_dir: Path, shards: Path, out: Path, **sections) -> dict:
    config = {
        "stage": "finetune", "output_dir": str(out),
        "model": {"name_or_path": str(tiny_dir), "max_length": 64},
        "loss": {"temperature": 0.05, "num_hard_negatives": 2, "focal_gamma": 0.5},
        "data": {"streaming": True, "train_files": [str(shards / "*")], "temperature": 1.0},
        "train": {"seed": 0, "max_steps": 16, "batch_size": 8, "lr": 1e-3, "chunk_size": 16},
        "checkpoint": {"every_steps": 4, "keep_last": 10},
        "log": {"progress_bar": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_streaming_config_rules_are_checked_before_any_work(tiny_dir, shards, tmp_path):
    base = stream_config(tiny_dir, shards, tmp_path / "run")
    with pytest.raises(ConfigError, match="train.max_steps: is required with data.streaming"):
        load_config(base, ["train.max_steps=null"])
    with pytest.raises(ConfigError, match="data.streaming: data.sources / data.train_files are streamed"):
        load_config(base, ["data.streaming=false"])
    with pytest.raises(ConfigError, match="distillation"):
        load_config(base, ["loss.distill_weight_kl=0.5", "distill.teacher=x"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].*exactly one of files, card, hub"):
        load_config(base, ["data.sources=[{name: a, files: [x], hub: y}]"])
    with pytest.raises(ConfigError, match="source names must be unique"):
        load_config(base, ["data.sources=[{name: a, files: [x]}, {name: a, files: [y]}]"])
    with pytest.raises(DataError, match="matches no file"):
        train(load_config(base, [f"data.train_files=[{tmp_path / 'none-*.jsonl'}]"]))
    with pytest.raises(ConfigError, match="clash"):
        stream_sources(load_config(base, [f"data.sources=[{{name: qa, files: [{shards / 'cls.parquet'}]}}]"]))
    names = {s.name: len(s.files) for s in stream_sources(load_config(base))}
    assert names == {"qa": 2, "cls": 1, "nli": 1}                     # one source per file name, shard numbers dropped


def test_a_streamed_run_resumed_from_a_checkpoint_is_bit_identical(tiny_dir, shards, tmp_path):
    """The straight run crosses pass ends of every source; a copy cut back to its step-8 checkpoint resumes from
    the saved per-source positions and must end with the same weights, losses and row counts."""
    config = stream_config(tiny_dir, shards, tmp_path / "straight")
    straight = train(load_config(config))
    state = json.loads((straight.output_dir / "checkpoint-16" / "trainer_state.json").read_text())
    saved = state["data_stream"]["ranks"][0]
    assert saved["k"] == 16 and max(s["pass"] for s in saved["sources"].values()) >= 1   # passes restarted
    cut = tmp_path / "cut"
    shutil.copytree(straight.output_dir, cut)
    for name in ("checkpoint-12", "checkpoint-16", "final", "data_accounting.json"):
        shutil.rmtree(cut / name, ignore_errors=True) if (cut / name).is_dir() else (cut / name).unlink()
    resumed = train(load_config({**config, "output_dir": str(cut)}))
    assert resumed.resumed_from == cut / "checkpoint-8"
    a, b = weights(cut / "final"), weights(straight.final_model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(cut) == losses(straight.output_dir)
    acc = json.loads((cut / "data_accounting.json").read_text())
    assert acc == json.loads((straight.output_dir / "data_accounting.json").read_text())
    assert acc["total"]["rejected_by_reason"] == {"malformed_json": 1}   # the broken line, counted once
    per = acc["total"]["per_source"]
    assert per["qa"]["rows_in"] == per["qa"]["kept"] + 1
    # the saved position is what the resumed run reads from: the same cut with the position of step 0 differs
    lost = tmp_path / "lost"
    shutil.copytree(cut, lost)
    for name in ("checkpoint-12", "checkpoint-16", "final", "data_accounting.json"):
        shutil.rmtree(lost / name, ignore_errors=True) if (lost / name).is_dir() else (lost / name).unlink()
    state_file = lost / "checkpoint-8" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    start = state["data_stream"]["ranks"][0]
    start.update(k=0, batches_in_pass={}, dropped={},
                 sources={s: {"pass": 0, "file": 0, "offset": None} for s in start["sources"]})
    state_file.write_text(json.dumps(state))
    train(load_config({**config, "output_dir": str(lost)}))
    c = weights(lost / "final")
    assert any(not torch.equal(c[k], b[k]) for k in b)


def test_provenance_names_the_streamed_files_and_resume_needs_the_same_process_count(tiny_dir, shards, tmp_path):
    config = stream_config(tiny_dir, shards, tmp_path / "run", train={"max_steps": 2},
                           checkpoint={"every_steps": 1})
    train(load_config(config))
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    sources = prov["data"]["sources"]
    assert set(sources) == {"qa", "cls", "nli"} and sources["qa"][0]["bytes"] == (shards / "qa-00000.jsonl").stat().st_size
    state = tmp_path / "run" / "checkpoint-2" / "trainer_state.json"
    saved = json.loads(state.read_text())
    saved["world_size"] = 2
    state.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="streamed data.*--num_processes 2"):
        train(load_config(config))


def test_a_hub_source_named_by_a_data_card_is_read_with_the_cards_columns(tiny_dir, tmp_path, monkeypatch):
    """A hub-only card (no bundled files) whose hub: block points at parquet shards laid out as the hub serves
    them; the trainer reads them through datasets streaming with the card's column mapping."""
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    pairs = [{"anchor": f"{' '.join(random.Random(i).sample(WORDS, 3))} {i}", "positive": f"answer {i}"}
             for i in range(24)]
    pq.write_table(pa.Table.from_pylist(pairs[:12]), hub / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(pairs[12:]), hub / "train-00001-of-00002.parquet")
    cards_dir = tmp_path / "cards"
    cards_dir.mkdir()
    front = {"name": "en-pairs-hub", "license": "mit", "languages": ["en"],
             "hub": {"id": "parquet", "data_files": [str(hub / "*.parquet")], "split": "train", "license": "mit",
                     "columns": {"query": "anchor", "pos": "positive"}, "task_type": "retrieval", "lang": "en",
                     "rows": 24}}
    (cards_dir / "en-pairs-hub.md").write_text("---\n" + yaml.safe_dump(front) + "---\n\n# pairs\n")
    monkeypatch.setattr(cards, "CARDS_DIR", cards_dir)
    config = {"stage": "pretrain", "output_dir": str(tmp_path / "run"),
              "model": {"name_or_path": str(tiny_dir), "max_length": 64}, "loss": {"temperature": 0.05},
              "data": {"streaming": True, "sources": [{"name": "pairs", "card": "en-pairs-hub"}]},
              "train": {"seed": 0, "max_steps": 4, "batch_size": 8, "lr": 1e-3}, "log": {"progress_bar": False}}
    spec = hub_spec(load_config(config).data.sources[0])
    assert (spec.path, spec.columns, spec.rows) == ("parquet", {"query": "anchor", "pos": "positive"}, 24)
    train(load_config(config))
    acc = json.loads((tmp_path / "run" / "data_accounting.json").read_text())
    # 3 batches of 8 exhaust the 24 rows; the 4th comes from the second pass: 32 rows read, all kept
    assert acc["total"]["per_source"]["pairs"] == {"rows_in": 32, "kept": 32, "rejected": 0, "rejected_by_reason": {}}
    assert acc["global_batches"] == 4


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_kill_9_of_two_streaming_processes_then_resume_is_bit_identical(tiny_dir, shards, tmp_path):
    """accelerate launch, 2 gloo processes, each reading its own share; the whole process group is killed with
    SIGKILL after a checkpoint, the same command resumes from every process's saved data position."""
    def launch(config: dict, name: str) -> list[str]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2", "--num_machines", "1",
                "-m", "kalm_lib.train", "--config", str(path)]

    config = stream_config(tiny_dir, shards, tmp_path / "killed", train={"max_steps": 40, "batch_size": 4},
                           checkpoint={"every_steps": 3, "keep_last": 2})
    cmd = launch(config, "killed")
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "checkpoint-6").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)   # the launcher and both training processes, mid-step or mid-save
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "killed" / "provenance.json").read_text())["resumed_from"]   # not from scratch
    straight_cfg = {**config, "output_dir": str(tmp_path / "straight")}
    done = subprocess.run(launch(straight_cfg, "straight"), cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(tmp_path / "killed" / "final"), weights(tmp_path / "straight" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    acc = json.loads((tmp_path / "killed" / "data_accounting.json").read_text())
    assert acc == json.loads((tmp_path / "straight" / "data_accounting.json").read_text())
    assert acc["world_size"] == 2 and len(acc["per_process"]) == 2
