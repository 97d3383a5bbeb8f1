"""The one lock for outputs a process writes: run directories, training output folders, shared result tables.

A lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ filesystems) holding the holder's
pid, host and start time as JSON. A second holder is refused with an error that names the holder. A lock left by
a killed process on this host (its pid is gone) is stale and taken over; a lock held from another host cannot be
checked from here, so it is refused and the message says how to remove it by hand.

    with locking.hold(out_dir / ".kalm.lock", what="training output"):
        ...                                     # only one process writes here
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["LockHeld", "hold", "holder"]


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message names it (pid, host, since when, what)."""


def holder(lock: str | os.PathLike) -> dict[str, Any] | None:
    """The recorded holder of ``lock`` (``{"pid", "host", "since", "what"}``), or None when it is not held.

    A lock file from an older format that holds only a pid is read as that pid on this host.
    """
    try:
        text = Path(lock).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text) if text.startswith("{") else {"pid": int(text or 0)}
    except (ValueError, json.JSONDecodeError):
        return {"pid": 0, "host": socket.gethostname(), "since": None, "what": "unreadable lock file"}
    info.setdefault("host", socket.gethostname())
    return info


def _alive(info: dict[str, Any]) -> bool:
    """Whether the holder may still be running (always True for another host: it cannot be checked here)."""
    if info.get("host") != socket.gethostname():
        return True
    pid = int(info.get("pid") or 0)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0 only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


@contextlib.contextmanager
def hold(lock: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Hold ``lock`` for the duration of the block; :class:`LockHeld` if a live process holds it.

    ``what`` describes the protected output in the holder record and in the error message.
    """
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
              "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            info = holder(lock)
            if info is None:
                continue  # released between our open and our read
            if not _alive(info):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise LockHeld(f"{what} is in use by another process (pid {info.get('pid')} on {info.get('host')} since "
                           f"{info.get('since')}; lock {lock}). Wait for it, or delete the lock file if that process "
                           f"is gone.") from None
    else:
        raise LockHeld(f"cannot take the lock {lock} for {what}")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(record))
    try:
        yield lock
    finally:
        if (holder(lock) or {}).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)
