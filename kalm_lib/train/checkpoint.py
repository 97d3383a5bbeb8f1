"""Training checkpoints: atomic, keep-last-K, and resumable bit for bit.

A checkpoint folder ``<output_dir>/checkpoint-<step>/`` is

- an :class:`~kalm_lib.model.EmbeddingModel` folder (safetensors weights, tokenizer, sentence-transformers
  module files): ``SentenceTransformer(str(path))``, ``EmbeddingModel.from_pretrained(path)`` and mteb load it;
- ``trainer_state/``: what ``accelerator.save_state`` writes (model, optimizer, scheduler, the RNG states of
  every process): one file each for one process and DDP; every process's shard for FSDP2 (torch distributed
  checkpoint) and DeepSpeed ZeRO (its own checkpoint layout);
- ``trainer_state.json``: step, epoch, data position, engine and process count, the config that produced it
  (and its hash), written last. A folder is *complete* only when it has this file.

The model folder always holds the full weights: every process joins ``accelerator.get_state_dict`` (a
gather under FSDP2 and ZeRO-3) and the main process writes them. Every process writes its shard into the
same folder, so a run on several nodes needs a filesystem they all mount (configs/accelerate/README.md).

Everything is written into ``.tmp-checkpoint-<step>`` and moved into place once complete
(:func:`kalm_lib.atomic.publish_dir`), so a run killed at any moment (kill -9) leaves either the previous
checkpoints or a finished new one, never half a checkpoint under the final name. ``<output_dir>/final`` (the
last checkpoint's model, without trainer state) is published the same way. Leftover temporaries are removed
on the next start.

A fresh run (``checkpoint.resume=false``, or nothing to resume) into a folder that holds another run's outputs
first moves them to ``<output_dir>/superseded/<UTC time>/`` (:func:`move_previous_run`), so two runs never mix;
keep-last only ever deletes checkpoints of the running run older than the one just written.

Every write of a training run's model or state goes through this module; what differs between engines is
in :mod:`kalm_lib.train.engines`.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from kalm_lib.atomic import fsync_dir, publish_dir, temp_sibling, write_json
from kalm_lib.train import engines

STATE_FILE = "trainer_state.json"
STATE_DIR = "trainer_state"
FINAL_DIR = "final"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# what a killed run may leave: a checkpoint being written, a `final` being copied, an old folder set aside
_STALE = (".tmp-checkpoint-*", f".{FINAL_DIR}.tmp-*", ".checkpoint-*.old-*", f".{FINAL_DIR}.old-*")
SUPERSEDED_DIR = "superseded"   # the pipeline's name for outputs moved aside (kalm_lib/pipeline/rerun.py)
TRACKER_PROJECT = "kalm"        # accelerate trackers log under <output_dir>/<project>
# what one run writes into its output folder (the lock, superseded/ and a content-keyed teacher cache stay)
RUN_OUTPUTS = ("checkpoint-*", FINAL_DIR, "metrics.jsonl", "provenance.json", "data_accounting.json",
               TRACKER_PROJECT)


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first (by step)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The last complete checkpoint, or None."""
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else None


def read_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint."""
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def remove_stale_temp(output_dir: str | os.PathLike) -> list[Path]:
    """Delete half-written temporaries left by a killed run (checkpoints, ``final``); returns what was removed."""
    root = Path(output_dir)
    removed = []
    if root.is_dir():
        for pattern in _STALE:
            for p in root.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def save_checkpoint(accelerator: Any, model: Any, output_dir: str | os.PathLike, step: int,
                    state: dict[str, Any], *, keep_last: int | None = None,
                    save_model: Callable[[Path, dict], Any] | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically on every process's behalf; returns its final path.

    Must be called on all processes: ``model`` is the prepared model, whose state every process saves (its
    shard) and whose full weights every process helps gather. ``save_model(folder, state_dict)`` writes the
    model folder on the main process (:func:`model_saver`).
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / STATE_DIR), safe_serialization=True)
        weights = engines.full_state_dict(accelerator, model)
        accelerator.wait_for_everyone()  # every process's shard is written before the folder is published
        if accelerator.is_main_process:
            save_model(tmp, weights)
            write_json(tmp / STATE_FILE, state, sort_keys=True)  # written last: it marks the folder complete
            publish_dir(tmp, final)  # replaces e.g. a periodic save at the step of the end-of-run save
    except BaseException:
        if accelerator.is_main_process:  # e.g. a full disk: the half-written checkpoint goes, the previous stay
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process and keep_last:
        for old in prunable(root, step, keep_last):
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def prunable(output_dir: str | os.PathLike, step: int, keep_last: int) -> list[Path]:
    """The checkpoints keep-last deletes once ``checkpoint-<step>`` is written: those of lower steps beyond the
    newest ``keep_last - 1``. The one just written is always kept, and a checkpoint of a higher step (not this
    run's: it cannot continue past itself) is never deleted by this run."""
    earlier = [p for p in checkpoint_dirs(output_dir) if int(_NAME.match(p.name).group(1)) < step]
    return earlier[:max(0, len(earlier) - (keep_last - 1))]


def previous_run(output_dir: str | os.PathLike) -> list[Path]:
    """What another run left in ``output_dir`` (:data:`RUN_OUTPUTS`), sorted; empty when the folder is fresh."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted({p for pattern in RUN_OUTPUTS for p in root.glob(pattern)})


def move_previous_run(output_dir: str | os.PathLike) -> Path | None:
    """Move what a previous run left in ``output_dir`` to a new ``<output_dir>/superseded/<UTC time>/`` (renames:
    nothing copied, nothing deleted; ``superseded.json`` there lists what moved). Returns that folder, or None
    when there was nothing to move. Raises OSError (naming the path) if a move is impossible."""
    root = Path(output_dir)
    paths = previous_run(root)
    if not paths:
        return None
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder, n = root / SUPERSEDED_DIR / stamp, 1
    while True:
        try:
            folder.mkdir(parents=True)
            break
        except FileExistsError:
            n += 1
            folder = root / SUPERSEDED_DIR / f"{stamp}.{n}"
    moved = [p.name for p in paths]
    write_json(folder / "superseded.json", {"moved": moved, "from": str(root), "why": "a fresh run started here",
                                            "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    for p in paths:
        try:
            os.rename(p, folder / p.name)
        except OSError as e:
            raise OSError(f"cannot move {p} aside to {folder / p.name}: {e.strerror or e}") from None
    fsync_dir(root)
    return folder


def load_checkpoint(accelerator: Any, checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states from a checkpoint; returns its trainer state."""
    accelerator.load_state(str(Path(checkpoint) / STATE_DIR))
    return read_state(checkpoint)


def model_saver(model: Any, *, lora: bool) -> Callable[[Path, dict], Path]:
    """How a checkpoint's :class:`~kalm_lib.model.EmbeddingModel` folder is written from full weights.

    ``model`` is the model before ``accelerator.prepare`` (FSDP2 and ZeRO shard its parameters in place
    afterwards). A copy of it without storage (meta tensors) is kept; each save takes the gathered weights
    into a copy of that shell and writes it with ``EmbeddingModel.save``. With LoRA the adapters are merged
    into the weights of the copy (the trained model keeps its adapters).
    """
    shell = copy.deepcopy(model).to("meta")

    def save(path: Path, state_dict: dict) -> Path:
        folder = copy.deepcopy(shell)
        if lora:  # merging writes into the base weights: never into tensors the live model may share
            state_dict = {k: v.detach().clone() for k, v in state_dict.items()}
        folder.load_state_dict(state_dict, assign=True)
        if lora:
            folder.backbone = folder.backbone.merge_and_unload()
        return folder.save(path)

    return save


def publish_final(checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """``<output_dir>/final``: a copy of the checkpoint's model folder (without trainer state), swapped in
    atomically; returns its path."""
    final = Path(output_dir) / FINAL_DIR
    tmp = temp_sibling(final)
    try:
        shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns(STATE_DIR))
        return publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only there after a failure (a full disk): publish_dir moved it
