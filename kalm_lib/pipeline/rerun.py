"""When a stage runs again, and how: skipped, resumed in place, or re-run from scratch with its old outputs kept.

One rule (:func:`decide`), used by the run and by ``--dry-run`` alike, so the plan printed is the plan run:

- **skip**: the stage's key (:func:`~kalm_lib.pipeline.manifest.stage_key`: notebook, parameters, inputs, code)
  equals the key of its last successful run, and its declared outputs exist;
- **run in place** (resume): same key, but the last run failed or was interrupted, or an output is missing; what
  it wrote stays, so a training stage resumes from its last checkpoint;
- **run from scratch**: the key changed, or ``--force``. The previous run's outputs (every path its ``produces``
  matches, with its executed notebook and HTML export) first move to ``<run_dir>/superseded/<stage>-<UTC time>/``
  in the same layout, beside a ``superseded.json`` that says why and holds the old record. Nothing is deleted,
  and old and new outputs never mix. A stage whose outputs were among the moved paths (two ablation grids that
  share ``ablations/results.csv``) is marked ``superseded``, and re-runs in place when next planned;
- never ran in this run directory: run (nothing moves; its outputs may be shared with an earlier stage).
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kalm_lib import atomic
from kalm_lib.pipeline.code import stage_code
from kalm_lib.pipeline.manifest import LOCK, MANIFEST, expand, hash_paths, stage_key, utc_now
from kalm_lib.pipeline.presets import PipelineError, Stage

SUPERSEDED = "superseded"
# run-directory entries that belong to the pipeline itself: never an output, never moved aside
RESERVED = frozenset({MANIFEST, LOCK, "notebooks", SUPERSEDED})


@dataclass
class Decision:
    """What happens to one stage, and why."""

    stage: str
    action: str                       # "skip" | "run" | "maybe" (dry run: decided once an earlier stage ran)
    reasons: list[str] = field(default_factory=list)
    fresh: bool = False               # from scratch: the previous outputs move aside first


def decide(stage: Stage, record: dict[str, Any], key: dict[str, str], code: dict[str, str],
           inputs: dict[str, str], run_dir: Path, *, force: bool = False) -> Decision:
    """The rule of the module docstring for one stage, given its manifest ``record`` and its key now."""
    name = stage.name
    if "key" not in record:
        return Decision(name, "run", ["new: it has not run in this run directory"])
    if force:
        return Decision(name, "run", ["forced (--force)"], fresh=True)
    changes = key_changes(stage, record, key, code, inputs)
    if changes:
        return Decision(name, "run", changes, fresh=True)
    status = record.get("status")
    if status == "ok":
        missing = [p for p in stage.produces if not expand(run_dir, p)]
        if missing:
            return Decision(name, "run", [f"unchanged, but declared output(s) {missing} are missing: runs again"])
        return Decision(name, "skip", ["unchanged (notebook, parameters, inputs, code)"])
    if status == "failed":
        error = record.get("error") or {}
        where = f"cell {error['cell_index']}, " if error.get("cell_index") is not None else ""
        what = f"{error.get('ename') or 'error'}: {_short(str(error.get('evalue') or ''), 80)}"
        return Decision(name, "run", [f"failed last time ({where}{what}): resumes with the same key"])
    if status == "superseded":
        return Decision(name, "run", [f"its outputs were moved aside with stage {record.get('superseded_by')!r}'s"])
    return Decision(name, "run", [f"last run {status or 'unfinished'}: resumes with the same key"])


def key_changes(stage: Stage, record: dict[str, Any], key: dict[str, str], code: dict[str, str],
                inputs: dict[str, str]) -> list[str]:
    """What differs between the recorded key and the key now, one readable item per part ([] if none)."""
    changes = []
    if record.get("notebook_hash") != key["notebook_hash"]:
        changes.append(f"notebook {stage.notebook.name} changed")
    if record.get("parameters_hash") != key["parameters_hash"]:
        old, new = record.get("parameters") or {}, stage.parameters
        names = sorted(n for n in {*old, *new} if n not in old or n not in new or _dump(old[n]) != _dump(new[n]))
        changes.append("parameters changed: " + "; ".join(
            f"{n} {_shown(old, n)} -> {_shown(new, n)}" for n in names))
    if record.get("inputs_hash") != key["inputs_hash"]:
        old = record.get("input_hashes") or {}
        changed = [p for p in sorted({*old, *inputs}) if old.get(p) != inputs.get(p)]
        changes.append("inputs changed: " + ", ".join(changed))
    if "code_hash" not in record:
        changes.append("no code version in its record (an older kalm pipeline ran it)")
    elif record["code_hash"] != key["code_hash"]:
        old = record.get("code_files") or {}
        files = [f for f in sorted({*old, *code}) if old.get(f) != code.get(f)]
        more = f" (+{len(files) - 5} more)" if len(files) > 5 else ""
        changes.append("code changed: " + ", ".join(files[:5]) + more)
    if not changes and record.get("key") != key["key"]:
        changes.append("stage key changed")
    return changes


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _shown(parameters: dict[str, Any], name: str) -> str:
    """A parameter's value as JSON (cut short), or ``(unset)``: the notebook's default applies."""
    return _short(_dump(parameters[name])) if name in parameters else "(unset)"


# ---------------------------------------------------------------------------------------------- moving aside
def outputs_of(run_dir: Path, patterns: list[str]) -> list[Path]:
    """The paths a stage's ``produces`` match now: outermost ones only, the pipeline's own entries left out."""
    found = sorted({p for pattern in patterns for p in expand(run_dir, pattern)
                    if p.relative_to(run_dir).parts[:1] and p.relative_to(run_dir).parts[0] not in RESERVED})
    return [p for p in found if not any(q in p.parents for q in found)]


def overlaps(a: Path, b: Path) -> bool:
    """True when one path is the other or lies inside it."""
    return a == b or a in b.parents or b in a.parents


def sharing_stages(stage: Stage, stages: list[Stage], run_dir: Path) -> list[str]:
    """The other stages whose current outputs overlap this stage's."""
    mine = outputs_of(run_dir, stage.produces)
    return [t.name for t in stages if t.name != stage.name
            and any(overlaps(p, q) for p in mine for q in outputs_of(run_dir, t.produces))]


def move_aside(run_dir: Path, stage: Stage, manifest: dict[str, Any], reasons: list[str],
               stages: list[Stage]) -> Path | None:
    """Move the stage's previous outputs and executed notebook to a new ``superseded/<stage>-<UTC time>/``.

    Renames within the run directory (nothing copied, nothing deleted). Stages sharing the moved outputs are
    marked ``superseded`` in ``manifest``. Returns the folder, or None when there was nothing to move."""
    record = manifest["stages"].get(stage.name, {})
    paths = outputs_of(run_dir, stage.produces)
    copies = [Path(p) for p in (record.get("executed"), record.get("html")) if p]
    paths += [p for p in copies if p.exists() and p.parent == run_dir / "notebooks"]
    if not paths:
        return None
    shared = sharing_stages(stage, stages, run_dir)
    folder = _new_folder(run_dir, stage.name)
    moved = [p.relative_to(run_dir).as_posix() for p in paths]
    atomic.write_json(folder / "superseded.json", {
        "stage": stage.name, "moved": moved, "when": utc_now(), "why": reasons, "shared_with": shared,
        "record": record}, indent=1, sort_keys=True)
    for path, rel in zip(paths, moved):
        dest = folder / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, dest)
        except OSError as e:
            raise PipelineError(f"cannot move {path} aside to {dest} ({e}); {folder}/superseded.json lists "
                                "what was to move") from None
    cache = manifest.get("file_hashes", {})
    for rel_file in [f for f in cache if any(f == m or f.startswith(m + "/") for m in moved)]:
        del cache[rel_file]
    for name in shared:
        if "key" in manifest["stages"].get(name, {}):
            manifest["stages"][name].update(status="superseded", superseded_by=stage.name)
    manifest.setdefault("superseded", []).append({"stage": stage.name, "folder": str(folder), "moved": moved,
                                                  "when": utc_now(), "why": reasons, "shared_with": shared})
    return folder


def _new_folder(run_dir: Path, stage: str) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = run_dir / SUPERSEDED / f"{stage}-{stamp}"
    folder, n = base, 1
    while True:
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            n += 1
            folder = base.with_name(f"{base.name}.{n}")


# ---------------------------------------------------------------------------------------------- dry run
def explain(plan: list[Stage], stages: list[Stage], run_dir: Path, manifest: dict[str, Any], *,
            force: bool = False) -> list[Decision]:
    """What running ``plan`` on ``run_dir`` would do, stage by stage, without touching anything.

    A stage that is unchanged now but reads what an earlier planned stage (re)writes is ``maybe``: its key is
    computed again once that stage ran (outputs hashed by content, so an identical result still skips it)."""
    cache = json.loads(json.dumps(manifest.get("file_hashes", {})))  # a copy: a dry run writes nothing
    decisions, running, moved = [], [], []
    for st in plan:
        inputs = hash_paths(run_dir, st.needs, cache)
        code = stage_code(st.notebook, st.parameters)
        d = decide(st, manifest["stages"].get(st.name, {}), stage_key(st, inputs, code), code, inputs, run_dir,
                   force=force)
        if d.action == "skip":
            movers = [s for s, paths in moved if any(overlaps(p, q) for p in paths
                                                     for q in outputs_of(run_dir, st.produces))]
            upstream = [u.name for u in running if _feeds(u, st, run_dir)]
            if movers:
                d = Decision(st.name, "run", [f"its outputs move aside with stage {movers[0]!r}'s: runs again"])
            elif upstream:
                d = Decision(st.name, "maybe", [f"unchanged so far; decided after {', '.join(upstream)} "
                                                "ran (it reads their outputs)"])
        if d.fresh:
            outputs = outputs_of(run_dir, st.produces)
            moved.append((st.name, outputs))
            if outputs:
                d.reasons.append(f"its previous outputs move to {run_dir / SUPERSEDED}/{st.name}-<UTC time>/")
            shared = sharing_stages(st, stages, run_dir)
            if shared:
                d.reasons.append(f"outputs shared with {shared}, which re-run(s) too")
        if d.action != "skip":
            running.append(st)
        decisions.append(d)
    return decisions


def _feeds(upstream: Stage, stage: Stage, run_dir: Path) -> bool:
    """True when ``stage`` needs something ``upstream`` produces (by pattern, or by the paths they match)."""
    for need in stage.needs:
        for out in upstream.produces:
            if need == out or fnmatch.fnmatch(need, out) or fnmatch.fnmatch(out, need) \
                    or need.startswith(out.rstrip("/") + "/") or out.startswith(need.rstrip("/") + "/"):
                return True
            if any(overlaps(p, q) for p in expand(run_dir, need) for q in expand(run_dir, out)):
                return True
    return False
