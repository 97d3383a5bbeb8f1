"""Training checkpoints: atomic, keep-last-K, and resumable bit for bit.

A checkpoint folder ``<output_dir>/checkpoint-<step>/`` is

- an :class:`~kalm_lib.model.EmbeddingModel` folder (safetensors weights, tokenizer, sentence-transformers
  module files): ``SentenceTransformer(str(path))``, ``EmbeddingModel.from_pretrained(path)`` and mteb load it;
- ``trainer_state/``: what ``accelerator.save_state`` writes (model, optimizer, scheduler, the RNG states of
  every process; DeepSpeed/FSDP shards where those are used);
- ``trainer_state.json``: step, epoch, data position, the config that produced it (and its hash), written
  last. A folder is *complete* only when it has this file.

Everything is written into ``.tmp-checkpoint-<step>`` and moved into place once complete
(:func:`kalm_lib.atomic.publish_dir`), so a run killed at any moment (kill -9) leaves either the previous
checkpoints or a finished new one, never half a checkpoint under the final name. ``<output_dir>/final`` (the
last checkpoint's model, without trainer state) is published the same way. Leftover temporaries are removed
on the next start.

Every write of a training run's model or state goes through this module (with :mod:`kalm_lib.train.setup`
holding the one ``accelerator.prepare``), so another engine changes these two places.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from kalm_lib.atomic import publish_dir, temp_sibling, write_json

STATE_FILE = "trainer_state.json"
STATE_DIR = "trainer_state"
FINAL_DIR = "final"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# what a killed run may leave: a checkpoint being written, a `final` being copied, an old folder set aside
_STALE = (".tmp-checkpoint-*", f".{FINAL_DIR}.tmp-*", ".checkpoint-*.old-*", f".{FINAL_DIR}.old-*")


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
                    save_model: Any = None) -> Path:
    """Write ``checkpoint-<step>`` atomically on every process's behalf; returns its final path.

    ``model`` is the unwrapped :class:`EmbeddingModel`; ``save_model(path)`` overrides how its folder is
    written (e.g. merging LoRA adapters). Must be called on all processes (``save_state`` gathers shards).
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / STATE_DIR), safe_serialization=True)
    if accelerator.is_main_process:
        (save_model or model.save)(tmp)
        write_json(tmp / STATE_FILE, state, sort_keys=True)  # written last: it marks the folder complete
        publish_dir(tmp, final)  # replaces e.g. a periodic save at the step of the end-of-run save
        if keep_last:
            for old in checkpoint_dirs(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states from a checkpoint; returns its trainer state."""
    accelerator.load_state(str(Path(checkpoint) / STATE_DIR))
    return read_state(checkpoint)


def model_saver(model: Any, *, lora: bool) -> Callable[[str | os.PathLike], Any]:
    """How a checkpoint's :class:`~kalm_lib.model.EmbeddingModel` folder is written: ``model.save``, or with
    LoRA the adapters merged into the weights of a copy (the trained model keeps its adapters)."""
    if not lora:
        return model.save

    def save_merged(path):
        merged = copy.deepcopy(model)
        merged.backbone = merged.backbone.merge_and_unload()
        return merged.save(path)

    return save_merged


def publish_final(checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """``<output_dir>/final``: a copy of the checkpoint's model folder (without trainer state), swapped in
    atomically; returns its path."""
    final = Path(output_dir) / FINAL_DIR
    tmp = temp_sibling(final)
    shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns(STATE_DIR))
    return publish_dir(tmp, final)
