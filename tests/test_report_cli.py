"""``kalm report`` on bad input (issue 14.6): one line on stderr, exit code != 0, no report written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kalm_lib.report.cli import cli_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("case", ["missing", "file", "empty", "missing-among-good"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    good = tmp_path / "good"
    (good / "train" / "ft").mkdir(parents=True)
    (good / "train" / "ft" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    args = {"missing": [str(tmp_path / "nope")], "file": [str(tmp_path / "a-file")],
            "empty": [str(tmp_path / "empty")], "missing-among-good": [str(good), str(tmp_path / "nope")]}[case]
    out = tmp_path / "out" / "report.html"
    assert cli_main([*args, "-o", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kalm report: ") and "Traceback" not in captured.err
    assert {"missing": "run directory not found", "file": "not a directory", "empty": "nothing to report",
            "missing-among-good": "run directory not found"}[case] in lines[0]
    assert captured.out == "" and not out.exists() and not (tmp_path / "out").exists()


def test_kalm_command_exit_code_and_no_default_report(tmp_path):
    """Through the real entry point: the default output (reports/<name>.html) is not created either."""
    name = "no-such-run-dir-for-the-cli-test"
    proc = subprocess.run([sys.executable, "-m", "kalm_lib.cli", "report", str(tmp_path / name)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"kalm report: run directory not found: {tmp_path / name}"
    assert not (tmp_path / "reports").exists()


def test_good_input_still_writes(tmp_path, capsys):
    good = tmp_path / "good"
    (good / "train" / "ft").mkdir(parents=True)
    (good / "train" / "ft" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    out = tmp_path / "r.html"
    assert cli_main([str(good), "-o", str(out)]) == 0
    assert out.is_file() and capsys.readouterr().out.strip() == str(out.resolve())
