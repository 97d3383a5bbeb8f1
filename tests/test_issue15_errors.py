"""Issue 15: every user mistake or full disk ends in one line on stderr with an exit code != 0 and no traceback
(``--debug`` shows it), and no temporary file is left behind by a failed write.

The ``kalm train`` cases run the real CLI in a subprocess; the full disk is an ``OSError(ENOSPC)`` raised by the
atomic writer (patched in that subprocess only) when the second checkpoint's ``trainer_state.json`` is written.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kalm_lib import atomic, locking
from kalm_lib.config import ConfigError, load_yaml

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def _kalm_train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "kalm_lib.cli", "train", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)


def _one_line(done: subprocess.CompletedProcess) -> str:
    """The one error line on stderr (progress bars of model loading and saving aside)."""
    lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not re.search(r"\|.*\|.*\d+/\d+", ln)]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(lines) == 1, done.stderr[-2000:]
    return lines[0]


def _no_temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name or ".old-" in p.name or p.name.endswith(".lock")]


# ------------------------------------------------------------------------------------------ configs
def test_broken_yaml_is_one_line_naming_file_and_line(tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("stage: finetune\noutput_dir: out\n  model: [\n")
    done = _kalm_train(["--config", str(cfg)], tmp_path)
    assert done.returncode == 2
    line = _one_line(done)
    assert line.startswith(f"kalm train: error: {cfg}: not valid YAML") and "line 3" in line
    debug = _kalm_train(["--config", str(cfg), "--debug"], tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr  # --debug shows where it came from


def test_a_python_tag_in_a_config_is_refused_in_one_line_and_never_runs(tmp_path):
    cfg, marker = tmp_path / "tag.yaml", tmp_path / "RAN"
    cfg.write_text(f'stage: finetune\noutput_dir: !!python/object/apply:os.system ["touch {marker}"]\n')
    done = _kalm_train(["--config", str(cfg)], tmp_path)
    assert done.returncode == 2 and not marker.exists()
    line = _one_line(done)
    assert str(cfg) in line and "line 2" in line and "python/object/apply:os.system" in line
    with pytest.raises(ConfigError, match=r"tag\.yaml: not valid YAML.*line 2.*!!python tag would run code"):
        load_yaml(cfg)


# ------------------------------------------------------------------------------------------ data files
@pytest.mark.parametrize("name, content, expected", [
    ("missing.jsonl", None, "dataset not found"),
    ("bad.jsonl", b"\xff\xfe not text\n", "rejected_invalid_utf8"),
    ("empty.jsonl", b"", "empty.jsonl"),
    ("shards.jsonl", "dir", "no *.jsonl"),
])
def test_missing_or_invalid_training_data_is_one_line(tiny_dir, tmp_path, name, content, expected):
    data = tmp_path / name
    if content == "dir":
        data.mkdir()
    elif content is not None:
        data.write_bytes(content)
    done = _kalm_train(["--config", "smoke/finetune", f"data.train_file={data}", f"output_dir={tmp_path / 'out'}",
                        f"model.name_or_path={tiny_dir}"], tmp_path)
    assert done.returncode == 2
    line = _one_line(done)
    assert line.startswith("kalm train: error: ") and expected in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing was run


# ------------------------------------------------------------------------------------------ disk full
def test_disk_full_mid_checkpoint_is_one_line_and_keeps_the_last_checkpoint(tiny_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(16):
            f.write(json.dumps({"query": f"query {i}", "pos": [f"answer {i}"], "neg": [f"other {i}", f"else {i}"],
                                "task_type": "retrieval", "lang": "en", "source": "s"}) + "\n")
    out = tmp_path / "out"
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(textwrap.dedent(f"""
        import errno, os, sys
        from kalm_lib import atomic
        real, seen = atomic.open_atomic, []
        def full(path, *a, **k):  # the second checkpoint's state file meets a full disk
            if os.path.basename(path) == "trainer_state.json":
                seen.append(path)
                if len(seen) == 2:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(path, *a, **k)
        atomic.open_atomic = full
        from kalm_lib.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    args = ["train", "--config", "smoke/finetune", f"data.train_file={data}", f"output_dir={out}",
            f"model.name_or_path={tiny_dir}", "model.max_length=32", "train.max_steps=4", "train.batch_size=4",
            "checkpoint.every_steps=2", "checkpoint.keep_last=2", "log.progress_bar=false"]
    done = subprocess.run([PY, str(wrapper), *args], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 5, done.stderr[-3000:]
    line = _one_line(done)
    assert "No space left on device" in line and "trainer_state.json" in line and "checkpoint is kept" in line
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2"]  # complete; no final
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert _no_temporaries(out) == []  # the half-written checkpoint-4 is gone, the lock released
    again = _kalm_train(args[1:], tmp_path)  # the disk has room again: the run resumes from checkpoint-2
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["steps"] == 4


# ------------------------------------------------------------------------------------------ the atomic writer
def test_a_write_that_raises_midway_leaves_no_temporary_and_the_old_version(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    atomic.write_jsonl(path, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("the source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        atomic.write_jsonl(path, rows())
    assert path.read_text() == '{"a": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]

    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # the data reaches the disk only at the flush: there it fails
    with pytest.raises(OSError, match="No space left"):
        atomic.write_json(tmp_path / "new.json", {"big": "x" * 100_000})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_a_failed_folder_publish_puts_the_old_folder_back(tmp_path, monkeypatch):
    final, new = tmp_path / "model", tmp_path / ".model.build"
    final.mkdir()
    (final / "w.txt").write_text("old")
    new.mkdir()
    (new / "w.txt").write_text("new")
    real_replace = os.replace

    def fail_second(src, dst):
        if Path(src) == new:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError):
        atomic.publish_dir(new, final)
    assert (final / "w.txt").read_text() == "old" and not list(tmp_path.glob(".model.old-*"))


def test_a_lock_that_cannot_be_written_leaves_no_temporary(tmp_path, monkeypatch):
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space left"):
        with locking.hold(tmp_path / ".x.lock"):
            pass
    assert list(tmp_path.iterdir()) == []
