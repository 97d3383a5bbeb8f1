"""Issue 15: a fresh training run into a used folder never mixes runs, keep-last keeps the newest run's checkpoints,
and kill -9 at seeded random moments still resumes bit for bit.

A tiny random-init Qwen2 (the session's ``tiny_dir``) on a small JSONL; torch single-threaded (``one_thread``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kalm_lib.train import load_config, train
from kalm_lib.train import checkpoint as ckpt
from kalm_lib.train.setup import LOCK_FILE

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def _records(path: Path, n: int = 32) -> Path:
    rng = random.Random(0)
    words = "apple banana cherry dog cat house river mountain blue green red car train plane book".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            topic = rng.sample(words, 3)
            f.write(json.dumps({"id": f"r{i}", "query": " ".join(topic) + f" q{i}",
                                "pos": [" ".join(topic) + " answer"], "neg": [" ".join(rng.sample(words, 4))
                                                                             for _ in range(3)],
                                "task_type": "retrieval", "instruction": "Find it", "lang": "en",
                                "source": "src"}) + "\n")
    return path


def _config(tiny_dir: Path, data: Path, out: Path, *, max_steps: int, seed: int = 0, every: int = 1,
            keep_last: int = 1) -> dict:
    return {"stage": "finetune", "output_dir": str(out), "model": {"name_or_path": str(tiny_dir), "max_length": 32},
            "loss": {"temperature": 0.05, "num_hard_negatives": 2, "mix_mode": "none"},
            "data": {"train_file": str(data)},
            "train": {"seed": seed, "max_steps": max_steps, "batch_size": 4, "lr": 1e-3, "chunk_size": 8},
            "checkpoint": {"every_steps": every, "keep_last": keep_last}, "log": {"progress_bar": False}}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _same(a: Path, b: Path) -> bool:
    x, y = _weights(a), _weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_keep_last_prunes_only_older_checkpoints_of_this_run(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / ckpt.STATE_FILE).write_text("{}")
    names = lambda paths: [p.name for p in paths]  # noqa: E731
    # checkpoint-4 just written while 6 and 8 (another run's) are there: sorting by step would delete 4 itself
    assert names(ckpt.prunable(tmp_path, 4, keep_last=1)) == ["checkpoint-2"]
    assert names(ckpt.prunable(tmp_path, 8, keep_last=2)) == ["checkpoint-2", "checkpoint-4"]
    assert names(ckpt.prunable(tmp_path, 2, keep_last=1)) == []


def test_no_resume_into_a_used_folder_moves_the_old_run_aside(tiny_dir, tmp_path):
    """Run A to step 6, then ``kalm train --no-resume`` run B (another seed) to step 4 with keep_last=1 into the same
    folder: the folder holds only B's checkpoint, final, metrics and provenance; A is intact under superseded/."""
    data, out = _records(tmp_path / "d.jsonl"), tmp_path / "run"
    a = train(load_config(_config(tiny_dir, data, out, max_steps=6)))
    assert a.steps == 6
    a_metrics = (out / "metrics.jsonl").read_text()
    a_prov = (out / "provenance.json").read_text()
    reference = tmp_path / "a-final"
    os.link(out / "final" / "model.safetensors", tmp_path / "a-final.safetensors")  # A's bytes, kept by a link
    reference.mkdir()
    os.rename(tmp_path / "a-final.safetensors", reference / "model.safetensors")

    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(_config(tiny_dir, data, out, max_steps=4, seed=1)))
    done = subprocess.run([PY, "-m", "kalm_lib.train", "--config", str(path), "--no-resume"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (aside,) = (out / "superseded").iterdir()
    said = [ln for ln in done.stderr.splitlines() if "moved to" in ln]
    assert len(said) == 1 and str(aside) in said[0], done.stderr[-2000:]

    # the folder: B's run only (keep-last did not delete B's checkpoint-4 for A's higher checkpoint-6)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "final", "metrics.jsonl", "provenance.json",
                                                     "superseded"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seed"] == 1 and prov["superseded"] == str(aside) and prov["max_steps"] == 4
    assert ckpt.read_state(out / "checkpoint-4")["config"]["train"]["seed"] == 1
    assert _same(out / "final", out / "checkpoint-4") and not _same(out / "final", reference)
    assert not (out / LOCK_FILE).exists()

    # the old run, intact, in its own folder
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-6", "final", "metrics.jsonl", "provenance.json",
                                                       "superseded.json"]
    assert (aside / "metrics.jsonl").read_text() == a_metrics and (aside / "provenance.json").read_text() == a_prov
    assert _same(aside / "final", reference) and _same(aside / "checkpoint-6", reference)
    assert json.loads((aside / "superseded.json").read_text())["moved"] == ["checkpoint-6", "final",
                                                                            "metrics.jsonl", "provenance.json"]
    # the new run is a clean run: bit-identical to B trained alone in an empty folder
    alone = train(load_config(_config(tiny_dir, data, tmp_path / "alone", max_steps=4, seed=1)))
    assert _same(out / "final", alone.final_model)


def test_a_run_that_cannot_move_the_old_run_aside_is_refused_in_one_line(tiny_dir, tmp_path):
    data, out = _records(tmp_path / "d.jsonl"), tmp_path / "run"
    train(load_config(_config(tiny_dir, data, out, max_steps=2)))
    (out / "superseded").write_text("a file where the folder should be")  # mkdir under it fails
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(_config(tiny_dir, data, out, max_steps=2, seed=1)))
    done = subprocess.run([PY, "-m", "kalm_lib.train", "--config", str(path), "--no-resume"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("kalm train: error: output_dir") and "cannot be moved aside" in lines[-1]
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "final", "metrics.jsonl", "provenance.json",
                                                     "superseded"]  # the old run untouched


@pytest.mark.slow
def test_kill_9_at_seeded_random_moments_then_resume_is_bit_identical(tiny_dir, tmp_path):
    """Three SIGKILLs at seeded random delays after the run starts writing (mid-step, mid-checkpoint, mid-append),
    each followed by the same command: the end result equals an uninterrupted run bit for bit."""
    rng = random.Random(15)
    data, out = _records(tmp_path / "d.jsonl"), tmp_path / "killed"
    config = _config(tiny_dir, data, out, max_steps=40, every=2, keep_last=2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [PY, "-m", "kalm_lib.train", "--config", str(path)]
    kills, metrics = 0, out / "metrics.jsonl"
    stamp = lambda: metrics.stat().st_mtime_ns if metrics.exists() else None  # noqa: E731
    for _ in range(3):
        before = stamp()
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while stamp() in (None, before):  # this process is training (it has written metrics) ...
            if proc.poll() is not None:  # finished before any kill: nothing left to interrupt
                break
            assert time.time() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))  # ... then a random moment: mid-step, mid-checkpoint or mid-append
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        proc.stderr.close()
    assert kills >= 1
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    straight = train(load_config({**config, "output_dir": str(tmp_path / "straight")}))
    assert _same(out / "final", straight.final_model)
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == [json.loads(x)["loss"] for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".*.tmp-*")) and not (out / "superseded").exists()
