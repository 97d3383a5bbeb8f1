"""Training checkpoints: atomic, keep-last-K, and resumable bit for bit.

A checkpoint folder ``<output_dir>/checkpoint-<step>/`` is

- an :class:`~kalm_lib.model.EmbeddingModel` folder (safetensors weights, tokenizer, sentence-transformers
  module files): ``SentenceTransformer(str(path))``, ``EmbeddingModel.from_pretrained(path)`` and mteb load it;
- ``trainer_state/``: what ``accelerator.save_state`` writes (model, optimizer, scheduler, the RNG states of
  every process; DeepSpeed/FSDP shards where those are used);
- ``trainer_state.json``: step, epoch, data position, the config that produced it (and its hash), written
  last. A folder is *complete* only when it has this file.

Everything is written into ``.tmp-checkpoint-<step>`` and renamed (``os.replace``) once complete, so a run
killed at any moment (kill -9) leaves either the previous checkpoints or a finished new one, never half a
checkpoint under the final name. Stale ``.tmp-*`` folders are removed on the next start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
STATE_DIR = "trainer_state"
_NAME = re.compile(r"^checkpoint-(\d+)$")


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
    """Delete half-written ``.tmp-checkpoint-*`` folders left by a killed run; returns what was removed."""
    root = Path(output_dir)
    removed = []
    if root.is_dir():
        for p in root.glob(".tmp-checkpoint-*"):
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
        _write_json_atomic(tmp / STATE_FILE, state)
        if final.exists():  # e.g. the end-of-run save at a step that was also a periodic one
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if keep_last:
            for old in checkpoint_dirs(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states from a checkpoint; returns its trainer state."""
    accelerator.load_state(str(Path(checkpoint) / STATE_DIR))
    return read_state(checkpoint)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
