"""The one lock for outputs a process writes: run directories, training output folders, shared result tables.

A lock is a file holding the holder's pid, host and start time as JSON, created in one step (the record is written
to a unique temporary file, then hard-linked to the lock name: atomic on local and NFS filesystems, and the lock never
exists without its record). A second holder is refused with an error that names the holder. A lock left by
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
import time
import uuid
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


def _try_create(lock: Path, record: dict[str, Any]) -> bool:
    """Create ``lock`` holding ``record`` in one step: the record is written to a unique temporary file, which is
    then hard-linked to the lock name (``os.link`` fails if the name exists). So the lock never exists without its
    holder record, and a reader can never mistake a lock being created for a stale one."""
    tmp = lock.with_name(f".{lock.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:  # a failed write (disk full) leaves no temporary behind either
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _take_over_if_stale(lock: Path) -> bool:
    """Remove ``lock`` if its holder is gone; True when it was removed (by us or by a concurrent taker).

    The lock is first renamed aside (atomic: of two takers only one succeeds), then its record is read again from
    the renamed file: had a live holder replaced it in between, the rename is undone.
    """
    info = holder(lock)
    if info is None:
        return True
    if _alive(info):
        return False
    aside = lock.with_name(f".{lock.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return True  # another taker got there first
    if _alive(holder(aside) or {}):  # a live holder re-created it between our read and our rename
        try:
            os.link(aside, lock)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def hold(lock: str | os.PathLike, what: str = "output", *, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold ``lock`` for the duration of the block; :class:`LockHeld` if a live process holds it.

    ``what`` describes the protected output in the holder record and in the error message; ``wait_s`` waits up
    to that many seconds for a live holder to finish before giving up (0: refuse at once).
    """
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
              "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    deadline = time.monotonic() + max(0.0, wait_s)
    while not _try_create(lock, record):
        if _take_over_if_stale(lock):
            continue
        if time.monotonic() < deadline:
            time.sleep(0.05)
            continue
        info = holder(lock) or {}
        raise LockHeld(f"{what} is in use by another process (pid {info.get('pid')} on {info.get('host')} since "
                       f"{info.get('since')}; lock {lock}). Wait for it, or delete the lock file if that process "
                       f"is gone.")
    try:
        yield lock
    finally:
        if (holder(lock) or {}).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)
