"""``pip install .`` (a wheel, not editable) works without a checkout: the CLI, the presets, the notebooks.

The wheel carries configs/, notebooks/, data/ and data_cards/ as ``kalm_lib/_home/`` (setup.py), and
``kalm_lib.config.REPO_ROOT`` finds them: ``$KALM_HOME``, else the checkout kalm_lib is in, else that copy."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from kalm_lib import config, pipeline

ROOT = Path(__file__).resolve().parent.parent


def test_workbench_home_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(config.HOME_ENV, raising=False)
    assert config._workbench_home() == ROOT == config.REPO_ROOT   # this checkout (editable install / source)
    monkeypatch.setenv(config.HOME_ENV, str(tmp_path / "other-checkout"))
    assert config._workbench_home() == tmp_path / "other-checkout"   # KALM_HOME: where the user points
    monkeypatch.delenv(config.HOME_ENV)
    installed = tmp_path / "site-packages" / "kalm_lib"
    installed.mkdir(parents=True)
    (tmp_path / "site-packages" / "configs").mkdir()   # a stray folder is not a checkout (no pyproject.toml)
    monkeypatch.setattr(config, "__file__", str(installed / "config.py"))
    assert config._workbench_home() == config.INSTALLED_HOME


def test_build_ships_every_workbench_folder():
    """setup.py copies kalm_lib.config.HOME_DIRS; MANIFEST.in puts the same folders in an sdist."""
    assigned = {t.id: node.value for node in ast.parse((ROOT / "setup.py").read_text()).body
                if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    assert ast.literal_eval(assigned["HOME_DIRS"]) == config.HOME_DIRS
    grafted = {line.split()[1] for line in (ROOT / "MANIFEST.in").read_text().splitlines()
               if line.startswith("graft ")}
    assert grafted == set(config.HOME_DIRS)


def _checkout_copy(dest: Path) -> Path:
    """The files a fresh clone of this working tree has (tracked + new, not ignored), copied to ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def test_wheel_installs_into_a_fresh_venv_and_runs_the_cli(tmp_path):
    """Offline: the wheel is built from a copy of the checkout without build isolation, installed with --no-deps
    --no-index into a new venv that sees .venv's packages (a .pth line) but not its editable kalm_lib."""
    src = _checkout_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("kalm_workbench-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in config.HOME_DIRS:
        assert any(n.startswith(f"kalm_lib/_home/{folder}/") for n in names), folder
    assert "kalm_lib/_home/configs/presets/smoke.yaml" in names and "kalm_lib/_home/notebooks/00_setup.ipynb" in names

    venv = tmp_path / "venv"
    # --system-site-packages gives the base interpreter's packages; .venv's (papermill, torch, ...) come through a
    # .pth line, which adds its folder but runs none of its .pth files: the editable kalm_lib stays out of sight
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    venv_python = venv / "bin" / "python"
    purelib = subprocess.run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "workbench-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv_python), "install", "--no-deps",
                    "--no-index", "-I", "-q", str(wheel)], check=True, capture_output=True)

    elsewhere = tmp_path / "elsewhere"   # not a checkout: nothing to find by the working directory
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(config.HOME_ENV, None)

    def kalm(*args: str, **extra_env: str) -> str:
        done = subprocess.run([str(venv / "bin" / "kalm"), *args], cwd=elsewhere, env={**env, **extra_env},
                              capture_output=True, text=True)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    import kalm_lib

    assert kalm("--version") == f"kalm {kalm_lib.__version__}\n"
    where = subprocess.run([str(venv_python), "-c", "import kalm_lib.config as c; print(c.__file__, c.REPO_ROOT)"],
                           cwd=elsewhere, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert where == [f"{purelib}/kalm_lib/config.py", f"{purelib}/kalm_lib/_home"]   # the installed copy

    out = kalm("pipeline", "--preset", "smoke", "--dry-run", "--runs-dir", str(tmp_path / "runs"))
    _, spec, _ = pipeline.load_preset("smoke")
    assert f"preset smoke ({purelib}/kalm_lib/_home/configs/presets/smoke.yaml)" in out
    assert f"{len(spec.stages)} of {len(spec.stages)} stage(s) would run" in out
    listed = [line.split()[0] for line in out.splitlines()[2:] if line.split()[0] != "parameters:"]
    assert listed == list(spec.stages)
    assert "gpu-rehearsal" in kalm("pipeline", "--list-presets")

    # KALM_HOME points the installed package at a checkout
    out = kalm("pipeline", "--preset", "smoke", "--dry-run", "--runs-dir", str(tmp_path / "runs"),
               **{config.HOME_ENV: str(ROOT)})
    assert f"preset smoke ({ROOT}/configs/presets/smoke.yaml)" in out
