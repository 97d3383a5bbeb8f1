"""The run directory's memory: ``manifest.json``, the stage keys that decide what re-runs, and the run lock.

``<run_dir>/manifest.json`` records per-stage status, timings, outputs, content hashes and provenance, and
one ``history`` entry per invocation. It is rewritten through :mod:`kalm_lib.atomic` after every change,
so a killed pipeline leaves the last complete version. A stage's key (:func:`stage_key`: notebook source,
parameters, content of its ``needs``, the library code it runs) is compared with the key of its last run to
decide what re-runs (:mod:`kalm_lib.pipeline.rerun`). ``<run_dir>/.pipeline.lock`` keeps two pipelines off one
run directory.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import nbformat

from kalm_lib import atomic, locking, provenance
from kalm_lib.pipeline.code import stage_code
from kalm_lib.pipeline.presets import PipelineError, Stage

MANIFEST = "manifest.json"
LOCK = ".pipeline.lock"
# a file modified this recently could change again within the filesystem's mtime granularity without
# changing size: its hash is not cached (as git does)
_CACHE_MIN_AGE_NS = 2_000_000_000


def utc_now() -> str:
    """The manifest's timestamp format: ISO 8601, UTC, milliseconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The run directory's manifest (an empty skeleton if there is none yet)."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return {"stages": {}, "history": []}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path} is not a readable manifest ({e}); move it aside to start the run "
                            "directory's record over") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
        raise PipelineError(f"{path} is not a pipeline manifest (no 'stages' mapping)")
    manifest.setdefault("history", [])
    return manifest


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> Path:
    """Stamp ``updated`` and write the manifest atomically."""
    manifest["updated"] = utc_now()
    return atomic.write_json(Path(run_dir) / MANIFEST, manifest, sort_keys=True)


# ---------------------------------------------------------------------------------------------- hashing
def notebook_hash(path: Path) -> str:
    """Hash of a notebook's cell types, sources and tags (not outputs/ids/metadata noise), so running
    ``nbstripout`` or opening it in JupyterLab does not count as a change."""
    nb = nbformat.read(str(path), as_version=4)
    cells = [[c.cell_type, c.source, sorted(c.get("metadata", {}).get("tags", []))] for c in nb.cells]
    return hashlib.sha256(json.dumps(cells, ensure_ascii=False).encode()).hexdigest()


def expand(run_dir: Path, pattern: str) -> list[Path]:
    """The paths a run-dir relative pattern (glob, ``**`` allowed) matches, sorted."""
    return sorted(Path(p) for p in glob.glob(str(Path(run_dir) / pattern), recursive=True))


def _files_under(path: Path) -> Iterator[Path]:
    if path.is_file():
        yield path
    elif path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for f in sorted(files):
                yield Path(root) / f


def _file_digest(path: Path, rel: str, cache: dict[str, list] | None) -> str:
    """sha256 of a file, from ``cache`` when its size and mtime are those cached."""
    st = path.stat()
    hit = cache.get(rel) if cache is not None else None
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return hit[2]
    digest = provenance.sha256_file(path)
    if cache is not None and time.time_ns() - st.st_mtime_ns > _CACHE_MIN_AGE_NS:
        cache[rel] = [st.st_size, st.st_mtime_ns, digest]
    return digest


def hash_paths(run_dir: Path, patterns: list[str], cache: dict[str, list] | None = None) -> dict[str, str]:
    """Content hash per run-dir pattern: sha256 over (relative path, file sha256) of every matched file
    (directories recursively). A pattern that matches nothing hashes to ``"missing"``.

    ``cache`` (relative path -> [size, mtime_ns, sha256], kept in the manifest) skips re-reading files
    whose size and mtime are unchanged: checkpoints of a GPU run are GBs, hashed once instead of on
    every resume."""
    out = {}
    for pattern in patterns:
        h = hashlib.sha256()
        matched = expand(run_dir, pattern)
        for p in matched:
            for f in _files_under(p):
                rel = f.relative_to(run_dir).as_posix()
                h.update(f"{rel}\0{_file_digest(f, rel, cache)}\n".encode())
        out[pattern] = h.hexdigest() if matched else "missing"
    return out


def stage_key(stage: Stage, input_hashes: dict[str, str], code: dict[str, str] | None = None) -> dict[str, str]:
    """What decides whether a stage must re-run: notebook source, parameters, input files and the code it runs.

    ``code``: :func:`kalm_lib.pipeline.code.stage_code` of the stage (computed when not given): the sha256 of
    every ``kalm_lib`` module the stage can import and of the config files it names."""
    code = stage_code(stage.notebook, stage.parameters) if code is None else code
    params_hash = provenance.config_hash(stage.parameters)
    nb_hash = notebook_hash(stage.notebook)
    inputs_hash = provenance.config_hash(input_hashes)
    code_hash = provenance.config_hash(code)
    combined = provenance.config_hash([nb_hash, params_hash, inputs_hash, code_hash])
    return {"key": combined, "notebook_hash": nb_hash, "parameters_hash": params_hash,
            "inputs_hash": inputs_hash, "code_hash": code_hash}


def check_inputs(plan: list[Stage], run_dir: Path) -> None:
    """Every ``needs`` of a planned stage must exist in ``run_dir`` or be produced by an earlier planned stage."""
    problems = []
    produced: list[str] = []
    for st in plan:
        for need in st.needs:
            if not expand(run_dir, need) and need not in produced:
                problems.append(f"stage {st.name} needs {need!r} in {run_dir}, which is missing and no earlier "
                                f"stage of this run produces it")
        produced += st.produces
    if problems:
        raise PipelineError("missing stage input: " + problems[0] if len(problems) == 1 else
                            "missing stage inputs:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------- lock
@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """``<run_dir>/.pipeline.lock`` (:func:`kalm_lib.locking.hold`: pid, host, since): a second pipeline on the
    same run dir is refused while the holder is alive; a stale lock from a killed run is taken over."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locking.hold(Path(run_dir) / LOCK, what=f"run directory {run_dir} (kalm pipeline)"))
        except locking.LockHeld as e:
            raise PipelineError(str(e)) from None
        yield
