"""The training loop of every stage (pre-train, fine-tune, distill; DESIGN.md §1.2-1.3), top to bottom.

    result = train(load_config("cpu-demo/pretrain", ["train.max_steps=50"]))   # a notebook or a script
    kalm train --config configs/train/smoke/finetune.yaml train.max_steps=20    # the CLI (kalm_lib.train.cli)

:func:`train` = :func:`~kalm_lib.train.setup.setup` (checks, model, optimizer, resume), then the loop: the next
batch from the run's feed (:class:`~kalm_lib.train.data.MemoryFeed`, or :class:`~kalm_lib.train.stream.StreamFeed`
with ``data.streaming``), compute gradients (:mod:`~kalm_lib.train.step`, the objective of :mod:`~kalm_lib.train.objective`),
step, log, checkpoint (:mod:`~kalm_lib.train.checkpoint`: atomic, resumable bit for bit).
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from kalm_lib.atomic import write_text
from kalm_lib.config import to_dict
from kalm_lib.runtime import progress_bar
from kalm_lib.train import checkpoint as ckpt
from kalm_lib.train.config import StageConfig, load_config, validate_config
from kalm_lib.train.data import MemoryFeed
from kalm_lib.train.objective import make_objective, step_seed
from kalm_lib.train.setup import Run, setup
from kalm_lib.train.stream import StreamFeed, make_gather
from kalm_lib.train.step import StepResult, apply_update, compute_gradients

MetricsCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    """What :func:`train` returns: where things are and the last logged metrics."""

    output_dir: Path
    final_model: Path | None
    last_checkpoint: Path | None
    steps: int
    metrics: dict[str, Any]
    resumed_from: Path | None = None


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient) became NaN/Inf; the message names the step and the batch's record ids."""


def train(config: StageConfig | str | os.PathLike | dict[str, Any], overrides: list[str] | None = None, *,
          callbacks: list[MetricsCallback] | None = None) -> TrainResult:
    """Run one stage; returns the output dir, the final model folder and the last metrics.

    ``config``: a :class:`StageConfig`, or anything :func:`load_config` reads (with ``overrides``).
    Re-running the same config on the same ``output_dir`` resumes from its last complete checkpoint
    (``checkpoint.resume``). ``callbacks`` get every logged metrics dict on the main process (live plots).
    Raises ConfigError/DataError before any work, NonFiniteLossError when the loss diverges.
    """
    run = setup(_as_config(config, overrides))
    C, T = run.config, run.config.train
    with run.resources:  # the output folder's lock, released however the run ends
        log = MetricsLog(run, callbacks)
        feed = open_feed(run)
        step = run.start.step
        last_ckpt = ckpt.latest_checkpoint(run.output_dir)
        metrics: dict[str, Any] = {}
        while step < run.max_steps:
            t0 = time.perf_counter()
            batch = feed.next()
            lr = run.scheduler.get_last_lr()[0]
            result = compute_gradients(run, batch, make_objective(C, step_seed=step_seed(T.seed, step)))
            result = apply_update(run, result)  # clip + optimizer step, unless loss or gradient is NaN/Inf
            if result.failure:
                log.close()
                raise NonFiniteLossError(
                    f"non-finite {result.failure} at step {step + 1} ({feed.where}); record ids: {batch.ids}. "
                    f"Last good checkpoint: {last_ckpt or 'none'} (kept; nothing was saved after it)")
            step, seconds = step + 1, time.perf_counter() - t0
            log.progress(result.loss)
            if step % C.log.every_steps == 0 or step == run.max_steps:
                metrics = log.write(_metrics_row(run, step, feed.epoch, lr, result, n_pairs=len(batch.ids),
                                                 seconds=seconds))
            if (C.checkpoint.every_steps and step % C.checkpoint.every_steps == 0) or step == run.max_steps:
                last_ckpt = _save(run, step, feed, metrics)
        log.close()
        feed.finish(run.output_dir)
        return _finish(run, step, last_ckpt, metrics)


def open_feed(run: Run) -> MemoryFeed | StreamFeed:
    """The run's batches from its start position: streamed per process (``data.streaming``), or in memory."""
    accelerator, C = run.accelerator, run.config
    rank, world = accelerator.process_index, accelerator.num_processes
    if C.data.streaming:
        return StreamFeed.open(C, rank=rank, world=world, per_device=run.per_device_batch,
                               gather=make_gather(accelerator), resume_state=run.resume_state)
    return MemoryFeed(run.records, C, global_batch=run.global_batch, epoch=run.start.epoch,
                      batch_in_epoch=run.start.batch_in_epoch, rank=rank, world=world, teacher=run.teacher)


def _as_config(config: StageConfig | str | os.PathLike | dict[str, Any], overrides: list[str] | None) -> StageConfig:
    if not isinstance(config, StageConfig):
        return load_config(config, overrides)
    if overrides:
        return load_config(to_dict(config), overrides)
    validate_config(config)
    return config


def _save(run: Run, step: int, feed: MemoryFeed | StreamFeed, metrics: dict[str, Any]) -> Path:
    state = {**run.state_base, "step": step, **feed.position(), "metrics": metrics}
    return ckpt.save_checkpoint(run.accelerator, run.model, run.output_dir, step, state,
                                keep_last=run.config.checkpoint.keep_last, save_model=run.save_model)


def _finish(run: Run, step: int, last_ckpt: Path | None, metrics: dict[str, Any]) -> TrainResult:
    """Publish ``<output_dir>/final`` from the last checkpoint, close the trackers, say where things are."""
    accelerator, out = run.accelerator, run.output_dir
    if accelerator.is_main_process and last_ckpt is not None:
        ckpt.publish_final(last_ckpt, out)
    accelerator.wait_for_everyone()
    if run.config.log.trackers:
        accelerator.end_training()
    if not metrics and last_ckpt is not None:  # a finished run re-run: its last metrics from the checkpoint
        metrics = ckpt.read_state(last_ckpt).get("metrics", {})
    final = out / ckpt.FINAL_DIR
    return TrainResult(output_dir=out, final_model=final if final.exists() else None, last_checkpoint=last_ckpt,
                       steps=step, metrics=metrics, resumed_from=run.resumed_from)


# ============================================================================================ metrics
def _metrics_row(run: Run, step: int, epoch: int, lr: float, result: StepResult, *, n_pairs: int,
                 seconds: float) -> dict[str, Any]:
    """One line of ``metrics.jsonl``: the loss and its parts, optimisation state, throughput, memory."""
    d, chunks = result.details, result.chunks
    n_tok = sum(c.num_tokens for c in chunks)
    row = {"step": step, "epoch": epoch, "loss": float(result.loss), "lr": lr,
           "loss_cl": float(d.get("loss_cl", result.loss)),
           "focal_weight_mean": float(d.get("focal_weight_mean", float("nan"))),
           "accuracy": float(d.get("accuracy", float("nan"))),
           "grad_norm": float(result.grad_norm) if result.grad_norm is not None else None,
           "pairs_per_s": n_pairs / seconds, "tokens_per_s": n_tok * run.accelerator.num_processes / seconds,
           "padding_fraction": 1 - n_tok / max(1, sum(c.padded_tokens for c in chunks)),
           "step_time_s": seconds, "memory_mb": _memory_mb(run.accelerator.device)}
    if "loss_kl" in d:
        row["loss_kl"] = float(d["loss_kl"])
    return row


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MetricsLog:
    """``<output_dir>/metrics.jsonl`` (main process), the trackers, the callbacks and the progress bar."""

    def __init__(self, run: Run, callbacks: list[MetricsCallback] | None):
        self.run, self.callbacks = run, list(callbacks or [])
        self.path = run.output_dir / "metrics.jsonl"
        self.main = run.accelerator.is_main_process
        if self.main:
            if run.resumed_from is not None:
                _truncate_metrics(self.path, run.start.step)  # the steps after the checkpoint are logged again
            else:
                self.path.unlink(missing_ok=True)
        self.bar = None
        if run.config.log.progress_bar and self.main:
            self.bar = progress_bar()(total=run.max_steps, initial=run.start.step, desc=f"train {run.config.stage}",
                                      unit="step", dynamic_ncols=True)

    def progress(self, loss: torch.Tensor) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(loss):.4f}")

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            for callback in self.callbacks:
                callback(dict(row))
        if self.run.config.log.trackers:
            self.run.accelerator.log({k: v for k, v in row.items() if v is not None}, step=row["step"])
        return row

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after ``step`` (a resumed run logs those steps again)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = [ln for ln in lines if (n := _logged_step(ln)) is not None and n <= step]
    write_text(path, "".join(ln + "\n" for ln in keep))


def _logged_step(line: str) -> int | None:
    """The step of one ``metrics.jsonl`` line; None for a torn line (a run killed mid-append) or a blank one."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return None
