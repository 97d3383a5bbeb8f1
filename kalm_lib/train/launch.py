"""Placing a stage in a run directory, and running it in this process or with ``accelerate launch``.

    launch("configs/train/cpu-demo/finetune.yaml", run_dir_overrides("runs/x", "finetune"))

One process (CPU, one GPU): :func:`~kalm_lib.train.loop.train` in this process, callbacks live. Several
GPUs: ``accelerate launch -m kalm_lib.train`` as a subprocess, followed through its ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kalm_lib.data.mining import REMINE_DIR
from kalm_lib.train import checkpoint as ckpt
from kalm_lib.train.config import load_config
from kalm_lib.train.loop import MetricsCallback, TrainResult, train


def run_dir_overrides(run_dir: str | os.PathLike, stage: str, *, start_from: str | None = "auto") -> dict[str, str]:
    """The overrides that place a stage in a run directory (docs/CONTRACTS.md "Run directory").

    ``output_dir`` -> ``<run_dir>/train/<stage>``; ``data.train_file`` -> for fine-tuning and distillation
    ``<run_dir>/remine/finetune.jsonl`` (the re-mining stage's output) when it exists, else
    ``<run_dir>/curated/<pretrain|finetune>/`` (a stage curated one file per source) or
    ``<run_dir>/curated/<pretrain|finetune>.jsonl``, when it exists; ``model.name_or_path`` -> the previous stage's ``final`` model when it exists (fine-tune
    starts from pre-training, distillation from fine-tuning) unless ``start_from`` names a model or is None.
    """
    run_dir = Path(run_dir)
    out = {"output_dir": str(run_dir / "train" / stage)}
    data = run_dir / "curated" / ("pretrain" if stage == "pretrain" else "finetune")
    remined = run_dir / REMINE_DIR / "finetune.jsonl"
    if stage != "pretrain" and remined.is_file():  # the remine stage's output wins over curation's
        out["data.train_file"] = str(remined)
    elif data.is_dir():  # a stage curated per source (stream.stages): streamed per source with data.streaming
        out["data.train_file"] = str(data)
    elif data.with_suffix(".jsonl").is_file():
        out["data.train_file"] = str(data.with_suffix(".jsonl"))
    previous = {"finetune": "pretrain", "distill": "finetune"}.get(stage)
    if start_from == "auto":
        if previous and (run_dir / "train" / previous / ckpt.FINAL_DIR).is_dir():
            out["model.name_or_path"] = str(run_dir / "train" / previous / ckpt.FINAL_DIR)
    elif start_from:
        out["model.name_or_path"] = str(start_from)
    return out


def launch(config: str | os.PathLike, overrides: list[str] | dict[str, Any] | None = None, *,
           num_processes: int | None = None, accelerate_config: str | None = None,
           callbacks: list[MetricsCallback] | None = None) -> TrainResult:
    """Run a stage in this process, or with ``accelerate launch`` when several processes are asked for.

    ``num_processes`` None: the number of visible GPUs (1 on CPU). In-process runs call ``callbacks`` live;
    a launched run is followed through its ``metrics.jsonl`` (callbacks get each new row as it appears).
    The config is loaded and validated here first, so a bad one fails before anything is launched.
    """
    if isinstance(overrides, dict):
        overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    overrides = list(overrides or [])
    if num_processes is None:
        num_processes = max(1, torch.cuda.device_count())
    resolved = load_config(config, overrides)
    if num_processes <= 1:
        return train(resolved, callbacks=callbacks)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    cmd += ["--config_file", accelerate_config] if accelerate_config else ["--multi_gpu"]
    cmd += ["-m", "kalm_lib.train", "--config", str(config), *overrides]
    out = Path(resolved.output_dir)
    returncode = _follow(subprocess.Popen(cmd), out / "metrics.jsonl", callbacks or [])
    if returncode != 0:
        raise RuntimeError(f"accelerate launch exited with {returncode}: {' '.join(cmd)}")
    last = ckpt.latest_checkpoint(out)
    state = ckpt.read_state(last) if last else {}
    final = out / ckpt.FINAL_DIR
    return TrainResult(output_dir=out, final_model=final if final.exists() else None, last_checkpoint=last,
                       steps=state.get("step", 0), metrics=state.get("metrics", {}))


def _follow(proc: subprocess.Popen, metrics: Path, callbacks: list[MetricsCallback], every_s: float = 2.0) -> int:
    """Wait for ``proc``, handing each new row of ``metrics`` to the callbacks; returns its exit code."""
    seen = 0
    while True:
        done = proc.poll() is not None
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            for line in lines[seen:]:
                if line.strip():
                    for callback in callbacks:
                        callback(json.loads(line))
            seen = len(lines)
        if done:
            return proc.returncode
        time.sleep(every_s)
