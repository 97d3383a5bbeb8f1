"""Issue 14: a report is published into ``<checkout>/reports`` in a checkout, and into the user's ``./reports`` when
kalm runs from a wheel (the workbench home is the installed ``kalm_lib/_home``): never into the installed package.

The wheel case is simulated without a wheel: ``config.INSTALLED_HOME`` / ``config.REPO_ROOT`` point at a fake
``site-packages/kalm_lib/_home`` (what :func:`kalm_lib.config._workbench_home` returns for an installed package;
tests/test_packaging.py builds the real wheel)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from kalm_lib import config
from kalm_lib.pipeline import cli as pipeline_cli
from kalm_lib.report.html import REPORTS_ENV, publish_report, reports_dir

ROOT = Path(__file__).resolve().parent.parent
PAGE = b"<html>a report</html>"


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """A fake installed package: REPO_ROOT is its _home (as for a wheel), the user stands in tmp_path/work."""
    home = tmp_path / "site-packages" / "kalm_lib" / "_home"
    (home / "configs").mkdir(parents=True)
    monkeypatch.setattr(config, "INSTALLED_HOME", home)
    monkeypatch.setattr(config, "REPO_ROOT", home)
    monkeypatch.delenv(REPORTS_ENV, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return SimpleNamespace(home=home, package=home.parent, work=work)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_checkout_publishes_into_its_reports_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(REPORTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)   # the checkout's folder, wherever the user stands
    assert config.REPO_ROOT == ROOT and reports_dir() == ROOT / "reports"


def test_wheel_publishes_into_the_current_directory_not_the_package(installed, tmp_path):
    report = tmp_path / "run" / "report" / "report.html"
    report.parent.mkdir(parents=True)
    report.write_bytes(PAGE)
    before = _files(installed.package)
    published = publish_report(report, "run-1")
    assert published == installed.work / "reports" / "run-1.html"
    assert published.read_bytes() == PAGE
    assert _files(installed.package) == before   # nothing written into the installed package


def test_wheel_kernel_inside_the_package_publishes_nothing(installed, monkeypatch, tmp_path):
    # papermill runs notebook 06 with cwd = REPO_ROOT, i.e. inside the installed package
    monkeypatch.chdir(installed.home)
    report = tmp_path / "report.html"
    report.write_bytes(PAGE)
    assert reports_dir() is None and publish_report(report, "run-1") is None
    assert _files(installed.package) == []


def test_env_names_the_folder(installed, monkeypatch, tmp_path):
    monkeypatch.setenv(REPORTS_ENV, str(tmp_path / "mine"))
    assert reports_dir() == (tmp_path / "mine").resolve()


def test_pipeline_passes_the_users_folder_to_its_kernels_and_restores_the_env(installed, monkeypatch):
    assert REPORTS_ENV not in os.environ
    with pipeline_cli._reports_env() as folder:
        assert folder == installed.work / "reports" and os.environ[REPORTS_ENV] == str(folder)
        monkeypatch.chdir(installed.home)                          # what the kernel sees: cwd in the package ...
        assert reports_dir() == installed.work / "reports"        # ... and still the user's folder
    assert REPORTS_ENV not in os.environ


def _publish_cell() -> str:
    nb = json.loads((ROOT / "notebooks" / "06_report.ipynb").read_text(encoding="utf-8"))
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    setup = next(c for c in cells if "import" in c and "publish_report" in c)
    return "\n".join(line for line in setup.splitlines() if "publish_report" in line), cells[-1]


def test_notebook_06_publish_cell_writes_outside_the_installed_package(installed, tmp_path, capsys):
    """Runs notebook 06's own last cell (its import line and its write cell) under the fake wheel."""
    run_dir = tmp_path / "runs" / "run-7"

    def build_report(run_dirs, out, **kw):   # stands in for the real report: only where it goes matters here
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(PAGE)
        return out

    ns = {"report": SimpleNamespace(build_report=build_report), "run_dir": run_dir, "run_dirs": [run_dir],
          "out": None, "baseline": None, "title": "t", "publish": True}
    import_line, cell = _publish_cell()
    exec(import_line, ns)
    exec("from pathlib import Path\n" + cell, ns)
    assert (installed.work / "reports" / "run-7.html").read_bytes() == PAGE
    assert f"published: {installed.work / 'reports' / 'run-7.html'}" in capsys.readouterr().out
    assert _files(installed.package) == [] and (run_dir / "report" / "report.html").is_file()
