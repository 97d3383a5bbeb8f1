"""kalm_lib.atomic (the one atomic writer) and kalm_lib.locking (the one lock): real files, real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from kalm_lib import atomic, locking


def test_write_json_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "out.json"
    atomic.write_json(path, {"x": 1})
    atomic.write_json(path, {"x": 2, "text": "中文"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"x": 2, "text": "中文"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_failed_write_keeps_previous_version(tmp_path):
    path = tmp_path / "out.jsonl"
    assert atomic.write_jsonl(path, [{"i": 0}, {"i": 1}]) == 2
    before = path.read_bytes()

    def rows():
        yield {"i": 5}
        raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.write_jsonl(path, rows())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_temp_names_are_unique_per_call(tmp_path):
    names = {atomic.temp_sibling(tmp_path / "x.csv").name for _ in range(50)}
    assert len(names) == 50 and all(n.startswith(".x.csv.tmp-") for n in names)


def test_publish_dir_replaces_a_folder(tmp_path):
    final = tmp_path / "model"
    for version in ("old", "new"):
        tmp = tmp_path / f".build-{version}"
        tmp.mkdir()
        (tmp / "weights.txt").write_text(version)
        atomic.publish_dir(tmp, final)
    assert (final / "weights.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


HOLD = """
import sys, time
from kalm_lib import locking
with locking.hold(sys.argv[1], what="toy output"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_second_holder_is_refused_while_first_lives(tmp_path):
    lock = tmp_path / ".kalm.lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        info = locking.holder(lock)
        assert info["pid"] == proc.pid and info["host"] == socket.gethostname() and info["what"] == "toy output"
        with pytest.raises(locking.LockHeld, match=rf"toy output is in use by another process \(pid {proc.pid}"):
            with locking.hold(lock, what="toy output"):
                pass
    finally:
        proc.kill()
        proc.wait()
    # the holder was killed (-9): its lock is stale and is taken over
    assert lock.exists()
    with locking.hold(lock, what="toy output") as held:
        assert locking.holder(held)["pid"] == os.getpid()
    assert not lock.exists()


def test_lock_from_another_host_is_not_taken_over(tmp_path):
    lock = tmp_path / ".kalm.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "some-other-node", "since": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(locking.LockHeld, match="some-other-node"):
        with locking.hold(lock):
            pass
    assert lock.exists()  # never removed: it may be alive over there


def test_released_lock_can_be_taken_again(tmp_path):
    lock = tmp_path / "x.lock"
    for _ in range(20):
        with locking.hold(lock):
            assert locking.holder(lock)["pid"] == os.getpid()
        assert not lock.exists()


COUNT = """
import sys
from pathlib import Path
from kalm_lib import locking
lock, counter, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    with locking.hold(lock, what="counter", wait_s=60):
        value = int(counter.read_text())       # read-modify-write: loses updates without mutual exclusion
        counter.write_text(str(value + 1))
"""


def test_mutual_exclusion_under_contention(tmp_path):
    """Two processes increment one counter 300 times each under the lock: no update is lost."""
    lock, counter = tmp_path / ".counter.lock", tmp_path / "counter.txt"
    counter.write_text("0")
    procs = [subprocess.Popen([sys.executable, "-c", COUNT, str(lock), str(counter), "300"]) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert int(counter.read_text()) == 600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter.txt"]  # no lock, no temporaries left
