"""The one atomic writer: a file or folder appears complete under its final name, or not at all.

Everything is first written to a temporary sibling with a unique name (pid + random suffix, so two
processes never share one), flushed and fsync'ed, then renamed with ``os.replace`` (atomic on POSIX within
one filesystem). A failure removes the temporary and leaves any previous version untouched; a killed
process leaves only a ``.tmp-*`` sibling, which never shadows a real output.

Use :func:`write_text` / :func:`write_bytes` / :func:`write_json` / :func:`write_jsonl` for files,
:func:`open_atomic` for streamed writes, :func:`publish_dir` to move a finished folder into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["temp_sibling", "open_atomic", "write_text", "write_bytes", "write_json", "write_jsonl", "fsync_dir",
           "publish_dir"]


def temp_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A unique, hidden temporary name next to ``path`` (same filesystem, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """``with open_atomic(p) as f: f.write(...)``: ``p`` is replaced only if the block finishes."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomic: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with open_atomic(path) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with open_atomic(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON (UTF-8, non-ASCII kept readable, ``default=str``) atomically."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> int:
    """Write one JSON object per line atomically; returns the number of rows written."""
    n = 0
    with open_atomic(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a finished folder ``tmp`` to ``final``; an existing ``final`` is replaced only after the move.

    The old folder is renamed aside first and deleted last, so at every instant either the old or the new
    complete folder is reachable (a crash in between leaves the old one under a ``.old-*`` name; a failed move
    puts it back). ``tmp`` stays the caller's to remove if the move fails.
    """
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = temp_sibling(final, "old")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:  # the new folder could not move in: the old one goes back under its name
            os.replace(old, final)
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final
