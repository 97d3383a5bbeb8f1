"""Run the ordered notebooks headlessly with papermill: ``kalm pipeline --preset cpu-demo``.

A *preset* (``configs/presets/<name>.yaml``) lists the stages to run, in order, and for each stage the
notebook parameters and the run-directory files it needs and produces::

    description: CPU demo on the bundled data
    parameters: {seed: 0}              # given to every stage whose notebook declares the name
    stages:
      setup:    {parameters: {preset: cpu-demo}, produces: [provenance.json]}
      curate:   {parameters: {config: configs/curate/cpu-demo.yaml}, produces: [curated/finetune.jsonl]}
      finetune: {parameters: {...}, needs: [curated/finetune.jsonl], produces: [train/finetune]}

Every stage gets ``run_dir`` (absolute) on top of its parameters and runs with the repository root as its
working directory (so repo-relative config paths in presets work); stages talk to each other only through
files in the run directory (docs/CONTRACTS.md "Run directory"). Each executed notebook and its HTML export
land in ``<run_dir>/notebooks/``; ``<run_dir>/manifest.json`` records per-stage status, timings, outputs,
content hashes and provenance. A stage whose notebook source, parameters and input files are unchanged
since its last successful run is skipped, so re-running the same command on the same run directory
resumes after a failure.

Everything that can be checked without running anything (preset, notebooks, parameter names, inputs) is
checked before the first notebook starts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import glob
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from kalm_lib import provenance
from kalm_lib.config import ConfigError, from_dict, load_yaml

REPO_ROOT = provenance.REPO_ROOT
PRESETS_DIR = REPO_ROOT / "configs" / "presets"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
MANIFEST = "manifest.json"

# The canonical stages and their notebooks, in pipeline order. A preset may list a subset, or a stage
# with its own ``notebook`` (then any name is allowed).
STAGE_NOTEBOOKS: dict[str, str] = {
    "setup": "00_setup.ipynb",
    "curate": "01_data_curation.ipynb",
    "pretrain": "02_pretrain.ipynb",
    "finetune": "03_finetune.ipynb",
    "soup": "04_soup.ipynb",
    "ablate": "05_ablations.ipynb",
    "report": "06_report.ipynb",
}

# Set in the kernel's environment so notebooks (kalm_lib.widgets) know nobody is watching live.
HEADLESS_ENV = "KALM_HEADLESS"


class PipelineError(Exception):
    """Bad input found before any work: unknown preset/stage/parameter, missing notebook or input."""


class StageFailed(PipelineError):
    """A notebook raised: names the stage, notebook, failing cell and the executed copy."""

    def __init__(self, message: str, *, stage: str, notebook: Path, executed: Path,
                 cell_index: int | None = None, cell_source: str = "", ename: str = "", evalue: str = ""):
        super().__init__(message)
        self.stage, self.notebook, self.executed = stage, notebook, executed
        self.cell_index, self.cell_source, self.ename, self.evalue = cell_index, cell_source, ename, evalue


# ---------------------------------------------------------------------------------------------- presets
@dataclass
class StageSpec:
    """One stage of a preset: notebook (default from STAGE_NOTEBOOKS), parameters, run-dir inputs/outputs."""

    notebook: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)      # run-dir relative paths or globs
    produces: list[str] = field(default_factory=list)   # run-dir relative paths or globs
    description: str = ""


@dataclass
class Preset:
    """A pipeline preset (configs/presets/<name>.yaml)."""

    stages: dict[str, StageSpec]
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)  # for every stage that declares the name
    notebooks_dir: str | None = None   # relative to the repository root; default notebooks/
    kernel: str | None = None          # jupyter kernel name; default: the notebook's own kernelspec


@dataclass
class Stage:
    """A stage resolved against its notebook: final parameters (without run_dir) and declared names."""

    name: str
    notebook: Path
    parameters: dict[str, Any]
    needs: list[str]
    produces: list[str]
    declared: dict[str, Any]   # papermill.inspect_notebook(): name -> {inferred_type_name, default, help}


def known_presets(presets_dir: Path = PRESETS_DIR) -> list[str]:
    """Names of the presets in ``presets_dir`` (file stems)."""
    return sorted(p.stem for p in Path(presets_dir).glob("*.yaml"))


def load_preset(preset: str | Path, presets_dir: Path = PRESETS_DIR) -> tuple[str, Preset, Path]:
    """Load a preset by name (``configs/presets/<name>.yaml``) or by path -> (name, Preset, path)."""
    path = Path(preset)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = Path(presets_dir) / f"{preset}.yaml"
    if not path.is_file():
        raise PipelineError(f"unknown preset {str(preset)!r}; known presets: {known_presets(presets_dir)} "
                            f"(in {presets_dir}), or pass the path of a preset YAML file")
    try:
        spec = from_dict(Preset, load_yaml(path), where=str(path))
    except ConfigError as e:
        raise PipelineError(f"invalid preset: {e}") from None
    if not spec.stages:
        raise PipelineError(f"{path}: preset lists no stages")
    return path.stem, spec, path


def notebook_parameters(path: Path) -> dict[str, Any]:
    """Names defined in the notebook's ``parameters``-tagged cell.

    papermill's own inspection (types, defaults, help from comments), completed by Python's ``ast``:
    papermill's line parser skips some valid lines (e.g. ``x = []  # e.g. ["a=b"]``), and a parameter it
    missed would wrongly be reported unknown. Raises PipelineError if there is no ``parameters`` cell.
    """
    import ast
    import logging

    import nbformat
    import papermill

    nb = nbformat.read(str(path), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise PipelineError(f"notebook {path} has no cell tagged 'parameters' (papermill needs one to "
                            "inject run_dir and the preset's parameters; tag the first code cell)")
    logger = logging.getLogger("papermill")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its "Unable to parse line" warnings are covered by the ast pass
    try:
        params = papermill.inspect_notebook(str(path))
    except ValueError:  # no kernelspec in the metadata: papermill cannot pick a translator; ast below
        params = {}
    finally:
        logger.setLevel(level)
    source = "\n".join(ln for ln in cells[0].source.splitlines() if not ln.lstrip().startswith(("%", "!")))
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise PipelineError(f"notebook {path}: the parameters cell is not valid Python: {e}") from None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            for name in ([t] if isinstance(t, ast.Name) else getattr(t, "elts", [])):
                if isinstance(name, ast.Name) and name.id not in params:
                    default = ast.get_source_segment(source, node.value) if node.value is not None else None
                    params[name.id] = {"name": name.id, "inferred_type_name": "None", "default": default,
                                       "help": ""}
    return params


def parse_overrides(overrides: list[str]) -> list[tuple[str | None, str, Any]]:
    """``-p`` values -> (stage or None, name, value). ``name=v`` targets every stage declaring ``name``;
    ``stage.name=v`` one stage. Values are YAML (``-p lr=1e-5``, ``-p quick=true``, ``-p dims=[64,128]``)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise PipelineError(f"parameter override {item!r} must look like name=value or stage.name=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        stage, _, name = key.rpartition(".")
        if not name.isidentifier():
            raise PipelineError(f"parameter override {item!r}: {name!r} is not a parameter name")
        out.append((stage or None, name, yaml.safe_load(raw)))
    return out


def resolve_stages(preset: Preset, overrides: list[str] = (), *, notebooks_dir: Path | None = None,
                   preset_path: Path | None = None, required: set[str] | None = None) -> list[Stage]:
    """Resolve every stage of ``preset`` against its notebook; all bad input is reported together.

    Checks: known stage names, notebooks that exist, a ``parameters`` cell in each, that each notebook
    declares ``run_dir``, and that every preset parameter and ``-p`` override names a declared parameter.
    With ``required`` (the stages about to run), a missing notebook of any other stage is not an error:
    that stage is left out of the result (and ``stage.name=value`` overrides aimed at it are ignored).
    """
    where = preset_path or "preset"
    nb_dir = Path(notebooks_dir or (REPO_ROOT / preset.notebooks_dir if preset.notebooks_dir else NOTEBOOKS_DIR))
    problems: list[str] = []
    unknown = [s for s, spec in preset.stages.items() if spec.notebook is None and s not in STAGE_NOTEBOOKS]
    if unknown:
        problems.append(f"{where}: unknown stage(s) {unknown}; known stages: {list(STAGE_NOTEBOOKS)} "
                        "(or give the stage a 'notebook')")
    canonical = [s for s in preset.stages if s in STAGE_NOTEBOOKS]
    if canonical != sorted(canonical, key=list(STAGE_NOTEBOOKS).index):
        problems.append(f"{where}: stages {canonical} are out of pipeline order {list(STAGE_NOTEBOOKS)} "
                        "(a preset runs its stages in the order it lists them)")
    paths = {s: nb_dir / (spec.notebook or STAGE_NOTEBOOKS[s]) for s, spec in preset.stages.items()
             if s not in unknown}
    if required is not None:  # stages that will not run may still lack their notebook
        dropped = {s for s, p in paths.items() if s not in required and not p.is_file()}
        preset = Preset(**{**preset.__dict__, "stages": {s: v for s, v in preset.stages.items()
                                                        if s not in dropped}})
        paths = {s: p for s, p in paths.items() if s not in dropped}
    else:
        dropped = set()
    missing = [f"{s}: {p}" for s, p in paths.items() if not p.is_file()]
    if missing:
        problems.append("notebook(s) not found (not written yet?): " + "; ".join(missing))
    declared: dict[str, dict[str, Any]] = {}
    for s, p in paths.items():
        if p.is_file():
            try:
                declared[s] = notebook_parameters(p)
            except PipelineError as e:
                problems.append(str(e))
    if problems:
        raise PipelineError("\n".join(problems))

    stages: list[Stage] = []
    for s, spec in preset.stages.items():
        names = declared[s]
        if "run_dir" not in names:
            problems.append(f"notebook {paths[s]} (stage {s}): parameters cell does not define run_dir")
        bad = sorted(set(spec.parameters) - set(names))
        if bad:
            problems.append(f"{where}: stage {s}: unknown parameter(s) {bad} for notebook {paths[s].name}; "
                            f"its parameters cell defines {sorted(names)}")
        params = {k: v for k, v in preset.parameters.items() if k in names}
        params.update(spec.parameters)
        stages.append(Stage(s, paths[s], params, list(spec.needs), list(spec.produces), names))
    common_unused = [] if dropped else sorted(k for k in preset.parameters
                                              if not any(k in st.declared for st in stages))
    if common_unused:
        problems.append(f"{where}: common parameter(s) {common_unused} are defined by no stage's notebook")

    by_name = {st.name: st for st in stages}
    for stage_name, name, value in parse_overrides(list(overrides)):
        if name == "run_dir":
            problems.append("run_dir is set by the pipeline (use --run-dir)")
            continue
        if stage_name is not None:
            if stage_name in dropped:
                continue
            if stage_name not in by_name:
                problems.append(f"-p {stage_name}.{name}: unknown stage {stage_name!r}; stages: {list(by_name)}")
            elif name not in by_name[stage_name].declared:
                problems.append(f"-p {stage_name}.{name}: notebook {by_name[stage_name].notebook.name} "
                                f"defines no parameter {name!r}; it defines {sorted(by_name[stage_name].declared)}")
            else:
                by_name[stage_name].parameters[name] = value
            continue
        targets = [st for st in stages if name in st.declared]
        if not targets:
            problems.append(f"-p {name}: unknown parameter; no stage's notebook defines {name!r} "
                            f"(stages: {', '.join(f'{st.name}: {sorted(st.declared)}' for st in stages)})")
        for st in targets:
            st.parameters[name] = value
    if problems:
        raise PipelineError("\n".join(problems))
    return stages


def select_stages(stages: list[Stage], *, from_stage: str | None = None,
                  only: list[str] | None = None) -> list[Stage]:
    """The stages to run: all, those from ``from_stage`` on, or ``only`` the named ones (in order)."""
    names = [s.name for s in stages]
    for n in ([from_stage] if from_stage else []) + list(only or []):
        if n not in names:
            raise PipelineError(f"unknown stage {n!r}; this preset's stages: {names}")
    if from_stage and only:
        raise PipelineError("use either --from or --only, not both")
    if from_stage:
        return stages[names.index(from_stage):]
    if only:
        return [s for s in stages if s.name in set(only)]
    return list(stages)


# ---------------------------------------------------------------------------------------------- hashing
def notebook_hash(path: Path) -> str:
    """Hash of a notebook's cell types, sources and tags (not outputs/ids/metadata noise), so running
    ``nbstripout`` or opening it in JupyterLab does not count as a change."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cells = [[c.cell_type, c.source, sorted(c.get("metadata", {}).get("tags", []))] for c in nb.cells]
    return hashlib.sha256(json.dumps(cells, ensure_ascii=False).encode()).hexdigest()


def _expand(run_dir: Path, pattern: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(run_dir / pattern), recursive=True))


def _files_under(path: Path) -> Iterator[Path]:
    if path.is_file():
        yield path
    elif path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for f in sorted(files):
                yield Path(root) / f


def hash_paths(run_dir: Path, patterns: list[str],
               cache: dict[str, list] | None = None) -> dict[str, str]:
    """Content hash per run-dir pattern: sha256 over (relative path, file sha256) of every matched file
    (directories recursively). A pattern that matches nothing hashes to ``"missing"``.

    ``cache`` (relative path -> [size, mtime_ns, sha256], kept in the manifest) skips re-reading files
    whose size and mtime are unchanged: checkpoints of a GPU run are GBs, hashed once instead of on
    every resume."""
    out = {}
    for pattern in patterns:
        h = hashlib.sha256()
        matched = _expand(run_dir, pattern)
        for p in matched:
            for f in _files_under(p):
                rel = f.relative_to(run_dir).as_posix()
                st = f.stat()
                hit = cache.get(rel) if cache is not None else None
                if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                    digest = hit[2]
                else:
                    digest = provenance.sha256_file(f)
                    # a file modified in the last 2 s could change again within the filesystem's mtime
                    # granularity without changing size: don't trust a cache entry for it (as git does)
                    if cache is not None and time.time_ns() - st.st_mtime_ns > 2_000_000_000:
                        cache[rel] = [st.st_size, st.st_mtime_ns, digest]
                h.update(f"{rel}\0{digest}\n".encode())
        out[pattern] = h.hexdigest() if matched else "missing"
    return out


def stage_key(stage: Stage, input_hashes: dict[str, str]) -> dict[str, str]:
    """What decides whether a stage must re-run: notebook source, parameters, input files."""
    params_hash = provenance.config_hash(stage.parameters)
    nb_hash = notebook_hash(stage.notebook)
    inputs_hash = provenance.config_hash(input_hashes)
    combined = provenance.config_hash([nb_hash, params_hash, inputs_hash])
    return {"key": combined, "notebook_hash": nb_hash, "parameters_hash": params_hash,
            "inputs_hash": inputs_hash}


def check_inputs(plan: list[Stage], run_dir: Path) -> None:
    """Every ``needs`` of a planned stage must exist in ``run_dir`` or be produced by an earlier planned stage."""
    problems = []
    produced: list[str] = []
    for st in plan:
        for need in st.needs:
            if not _expand(run_dir, need) and need not in produced:
                problems.append(f"stage {st.name} needs {need!r} in {run_dir}, which is missing and no earlier "
                                f"stage of this run produces it")
        produced += st.produces
    if problems:
        raise PipelineError("missing stage input(s):\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------- manifest
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The run directory's manifest (an empty skeleton if there is none yet)."""
    path = Path(run_dir) / MANIFEST
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"stages": {}, "history": []}


def _write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    manifest["updated"] = _now()
    provenance.write(Path(run_dir) / MANIFEST, manifest)  # temp file + rename


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """``<run_dir>/.pipeline.lock`` holding our pid; a second pipeline on the same run dir is refused
    while the holder is alive (a stale lock from a killed run is taken over)."""
    lock = Path(run_dir) / ".pipeline.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)  # signal 0: only checks that the process exists
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale
                continue
            except PermissionError:
                pass
            raise PipelineError(f"{run_dir} is in use by another pipeline (pid {pid}, lock {lock})") from None
    else:
        raise PipelineError(f"cannot take the lock {lock}")
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _bare_notebook_kernel(path: Path) -> tuple[str | None, str | None]:
    """(None, None): papermill uses the notebook's kernelspec; for a notebook without one (written by a
    script, say), ("python3", "python") instead of papermill's 'No kernel name found' error."""
    import nbformat

    meta = nbformat.read(str(path), as_version=4).metadata
    return (None if meta.get("kernelspec") else "python3",
            None if meta.get("kernelspec") or meta.get("language_info") else "python")


def executed_name(stage: Stage, stages: list[Stage]) -> str:
    """File name of a stage's executed notebook: the notebook's own name, or ``<stem>.<stage>.ipynb`` when
    several stages of the preset run the same notebook (e.g. two ablation grids through 05_ablations)."""
    if sum(st.notebook.name == stage.notebook.name for st in stages) > 1:
        return f"{stage.notebook.stem}.{stage.name}{stage.notebook.suffix}"
    return stage.notebook.name


def export_html(executed: Path) -> Path:
    """Export an executed notebook to HTML next to it (plotly figures survive if the notebook set
    ``plotly.io.renderers.default = "notebook+plotly_mimetype"``)."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(executed))
    out = executed.with_suffix(".html")
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, out)
    return out


def _failure_details(executed: Path, err: Exception) -> tuple[int | None, str, str, str]:
    """(cell index in the SOURCE notebook, cell source, ename, evalue) of a papermill failure.

    papermill counts cells of the executed copy, which has an injected-parameters cell (and, on error, a
    banner cell at the top); map back to the index the user sees in the source notebook."""
    import nbformat

    index = getattr(err, "cell_index", None)
    source = getattr(err, "source", "") or ""
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    if index is not None and executed.is_file():
        try:
            nb = nbformat.read(str(executed), as_version=4)
            tags = [set(c.get("metadata", {}).get("tags", [])) for c in nb.cells]
            # papermill's index counts the cells after injection but before it added its error markers
            kept = [t for t in tags if "papermill-error-cell-tag" not in t]
            index -= sum(1 for t in kept[:index] if "injected-parameters" in t)
        except Exception:  # best effort: the raw index is still useful
            pass
    return index, source, ename, evalue


# ---------------------------------------------------------------------------------------------- running
@dataclass
class PipelineResult:
    """What a pipeline run did."""

    run_dir: Path
    ran: list[str]
    skipped: list[str]
    manifest: dict[str, Any]


def new_run_dir(preset_name: str, runs_dir: Path | str = "runs", suffix: str = "") -> Path:
    """``runs/<UTC timestamp>-<preset>[-suffix]`` (not created)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{preset_name}" + (f"-{suffix}" if suffix else "")
    path = Path(runs_dir) / name
    n = 1
    while path.exists():
        n += 1
        path = Path(runs_dir) / f"{name}.{n}"
    return path


def latest_run_dir(preset_name: str, runs_dir: Path | str = "runs") -> Path | None:
    """The most recent ``runs/*-<preset>`` directory that has a manifest, or None."""
    found = [p.parent for p in Path(runs_dir).glob(f"*-{preset_name}*/{MANIFEST}")
             if read_manifest(p.parent).get("preset") == preset_name]
    return max(found, key=lambda p: p.name) if found else None


def plan_pipeline(preset: str | Path, *, overrides: list[str] = (), from_stage: str | None = None,
                  only: list[str] | None = None, presets_dir: Path = PRESETS_DIR,
                  notebooks_dir: Path | None = None) -> tuple[str, Path, list[Stage], list[Stage]]:
    """Validate a preset + overrides + selection without running anything -> (name, path, stages, plan)."""
    name, spec, path = load_preset(preset, presets_dir)
    required = None
    if from_stage or only:  # only the selected stages need their notebooks to exist
        from types import SimpleNamespace

        required = {s.name for s in select_stages([SimpleNamespace(name=n) for n in spec.stages],
                                                  from_stage=from_stage, only=only)}
    stages = resolve_stages(spec, overrides, notebooks_dir=notebooks_dir, preset_path=path, required=required)
    plan = select_stages(stages, from_stage=from_stage, only=only)
    return name, path, stages, plan


def run_pipeline(preset: str | Path, *, overrides: list[str] = (), run_dir: Path | str | None = None,
                 from_stage: str | None = None, only: list[str] | None = None, force: bool = False,
                 runs_dir: Path | str = "runs", presets_dir: Path = PRESETS_DIR,
                 notebooks_dir: Path | None = None, progress: bool = True, html: bool = True,
                 kernel_name: str | None = None, start_timeout: int = 120,
                 log=print) -> PipelineResult:
    """Run a preset's notebooks in order into one run directory; see the module docstring.

    Raises :class:`PipelineError` for bad input (before any notebook runs) and :class:`StageFailed` when
    a notebook raises (the manifest then marks that stage ``failed``; later stages do not run).
    """
    import papermill

    name, preset_path, stages, plan = plan_pipeline(preset, overrides=overrides, from_stage=from_stage,
                                                    only=only, presets_dir=presets_dir,
                                                    notebooks_dir=notebooks_dir)
    spec = load_preset(preset_path, presets_dir)[1]
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(name, runs_dir)
    run_dir = run_dir.resolve()
    check_inputs(plan, run_dir)

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "notebooks").mkdir(exist_ok=True)
    with _run_lock(run_dir):  # one pipeline per run dir at a time
        manifest = read_manifest(run_dir)
        if manifest.get("preset") not in (None, name):
            raise PipelineError(f"{run_dir} holds a run of preset {manifest['preset']!r}, not {name!r}")
        manifest.update({
            "preset": name, "preset_file": str(preset_path), "run_dir": str(run_dir),
            "created": manifest.get("created") or _now(), "status": "running",
            "stage_order": [st.name for st in stages],
            "provenance": provenance.collect(
                config={"preset": name, "stages": {st.name: st.parameters for st in stages},
                        "overrides": list(overrides)}),
        })
        # we hold the lock, so anything still marked running was killed mid-way
        for rec in [*manifest["history"], *manifest["stages"].values()]:
            if rec.get("status") == "running":
                rec["status"] = "interrupted"
        for st in stages:  # stages outside this run's plan keep their record
            manifest["stages"].setdefault(st.name, {"status": "pending", "notebook": str(st.notebook)})
        invocation = {"started": _now(), "argv": sys.argv[:], "overrides": list(overrides),
                      "plan": [st.name for st in plan], "ran": [], "skipped": [], "status": "running"}
        manifest["history"].append(invocation)
        _write_manifest(run_dir, manifest)

        ran, skipped = [], []
        for st in plan:
            inputs = hash_paths(run_dir, st.needs, manifest.setdefault("file_hashes", {}))
            key = stage_key(st, inputs)
            prev = manifest["stages"].get(st.name, {})
            outputs_present = all(_expand(run_dir, p) for p in st.produces)
            if not force and prev.get("status") == "ok" and prev.get("key") == key["key"] and outputs_present:
                log(f"[pipeline] {st.name}: unchanged (notebook, parameters, inputs) -> skipped")
                skipped.append(st.name)
                invocation["skipped"].append(st.name)
                _write_manifest(run_dir, manifest)
                continue

            executed = run_dir / "notebooks" / executed_name(st, stages)
            params = {"run_dir": str(run_dir), **st.parameters}
            record = {"status": "running", "notebook": str(st.notebook), "executed": str(executed),
                      "html": None, "parameters": st.parameters, "needs": st.needs, "produces": st.produces,
                      "input_hashes": inputs, **key, "started": _now(), "finished": None, "seconds": None,
                      "outputs": {}, "error": None}
            manifest["stages"][st.name] = record
            _write_manifest(run_dir, manifest)
            log(f"[pipeline] {st.name}: running {st.notebook.name} -> {executed}")
            t0 = time.perf_counter()
            error: Exception | None = None
            bare_kernel, bare_language = _bare_notebook_kernel(st.notebook)
            try:
                with _env(**{HEADLESS_ENV: "1"}):
                    papermill.execute_notebook(
                        str(st.notebook), str(executed), parameters=params,
                        kernel_name=kernel_name or spec.kernel or bare_kernel, language=bare_language,
                        progress_bar=progress,
                        cwd=str(REPO_ROOT), start_timeout=start_timeout)
            except Exception as e:  # papermill raises PapermillExecutionError, or kernel/IO errors
                error = e
            record["seconds"] = round(time.perf_counter() - t0, 3)
            record["finished"] = _now()
            if html and executed.is_file():
                try:
                    record["html"] = str(export_html(executed))
                except Exception as e:  # an export problem must not hide the stage's own result
                    log(f"[pipeline] {st.name}: HTML export failed: {e}")

            if error is None:
                missing = [p for p in st.produces if not _expand(run_dir, p)]
                if missing:
                    error = PipelineError(f"stage {st.name} finished but did not write its declared output(s) "
                                          f"{missing} in {run_dir}")
            if error is not None:
                index, source, ename, evalue = _failure_details(executed, error)
                first_line = next((ln for ln in source.splitlines() if ln.strip()), "").strip()
                cell = f"cell {index} (`{first_line}`)" if index is not None else "outside a cell"
                message = (f"stage {st.name!r} failed in notebook {st.notebook}, {cell}: "
                           f"{ename}: {evalue}\n  executed copy: {executed}"
                           + (f"\n  HTML: {record['html']}" if record["html"] else "")
                           + f"\n  fix it and re-run to resume from this stage: "
                             f"kalm pipeline --preset {shlex.quote(str(preset))} --run-dir {shlex.quote(str(run_dir))}"
                             + "".join(f" -p {shlex.quote(o)}" for o in overrides))
                if isinstance(error, PipelineError) and index is None:
                    message = f"{error}\n  executed copy: {executed}"
                record.update(status="failed", error={"cell_index": index, "cell_source": source,
                                                      "ename": ename, "evalue": evalue, "message": message})
                invocation.update(status="failed", finished=_now())
                manifest["status"] = "failed"
                _write_manifest(run_dir, manifest)
                raise StageFailed(message, stage=st.name, notebook=st.notebook, executed=executed,
                                  cell_index=index, cell_source=source, ename=ename, evalue=evalue) from None

            record["status"] = "ok"
            record["outputs"] = hash_paths(run_dir, st.produces, manifest.setdefault("file_hashes", {}))
            ran.append(st.name)
            invocation["ran"].append(st.name)
            _write_manifest(run_dir, manifest)
            log(f"[pipeline] {st.name}: ok in {record['seconds']:.1f} s")

        invocation.update(status="ok", finished=_now())
        all_ok = all(manifest["stages"].get(st.name, {}).get("status") == "ok" for st in stages)
        manifest["status"] = "ok" if all_ok else "partial"
        _write_manifest(run_dir, manifest)
        return PipelineResult(run_dir, ran, skipped, manifest)


# ---------------------------------------------------------------------------------------------- batch
@dataclass
class BatchEntry:
    """One run of a batch file: a preset, its overrides, and optionally a run dir / name suffix."""

    preset: str
    overrides: list[str] = field(default_factory=list)
    name: str = ""
    run_dir: str | None = None
    from_stage: str | None = None
    only: list[str] | None = None


def load_batch(path: str | Path) -> list[BatchEntry]:
    """A batch YAML: a list of ``{preset, overrides: [k=v, ...], name, run_dir, from_stage, only}``
    (a mapping ``overrides: {k: v}`` is accepted too)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"batch file not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, list) or not data:
        raise PipelineError(f"{path}: a batch file is a non-empty YAML list of runs")
    entries = []
    for i, item in enumerate(data):
        if isinstance(item, dict) and isinstance(item.get("overrides"), dict):
            item = {**item, "overrides": [f"{k}={json.dumps(v)}" for k, v in item["overrides"].items()]}
        try:
            entries.append(from_dict(BatchEntry, item, where=f"{path}[{i}]"))
        except ConfigError as e:
            raise PipelineError(str(e)) from None
    return entries


def batch_commands(entries: list[BatchEntry], runs_dir: Path | str = "runs") -> list[str]:
    """One ``kalm pipeline`` command per batch entry, each with its own run dir (for a scheduler)."""
    cmds = []
    for e in entries:
        run_dir = e.run_dir or new_run_dir(Path(e.preset).stem, runs_dir, e.name)
        parts = ["kalm", "pipeline", "--preset", e.preset, "--run-dir", str(run_dir)]
        for o in e.overrides:
            parts += ["-p", o]
        if e.from_stage:
            parts += ["--from", e.from_stage]
        for s in e.only or []:
            parts += ["--only", s]
        cmds.append(shlex.join(parts))
    return cmds


def run_batch(entries: list[BatchEntry], *, runs_dir: Path | str = "runs", log=print,
              **kwargs: Any) -> list[dict[str, Any]]:
    """Validate every entry first, then run them one after another; a failed run does not stop the
    others. Returns one ``{preset, name, run_dir, status, error}`` per entry."""
    presets_dir = kwargs.get("presets_dir", PRESETS_DIR)
    for e in entries:  # all bad input before any work
        plan_pipeline(e.preset, overrides=e.overrides, from_stage=e.from_stage, only=e.only,
                      presets_dir=presets_dir, notebooks_dir=kwargs.get("notebooks_dir"))
    results = []
    for i, e in enumerate(entries):
        run_dir = Path(e.run_dir) if e.run_dir else new_run_dir(Path(e.preset).stem, runs_dir, e.name or str(i))
        log(f"[batch] {i + 1}/{len(entries)}: {e.preset} {e.overrides} -> {run_dir}")
        try:
            run_pipeline(e.preset, overrides=e.overrides, run_dir=run_dir, from_stage=e.from_stage,
                         only=e.only, runs_dir=runs_dir, log=log, **kwargs)
            results.append({"preset": e.preset, "name": e.name, "run_dir": str(run_dir), "status": "ok",
                            "error": None})
        except PipelineError as err:
            log(f"[batch] run {i + 1} failed: {err}")
            results.append({"preset": e.preset, "name": e.name, "run_dir": str(run_dir), "status": "failed",
                            "error": str(err)})
    return results


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kalm pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", help="preset name in configs/presets/ or a preset YAML path")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="run this stage and the ones after it")
    p.add_argument("--only", action="append", metavar="STAGE", help="run only this stage (repeatable)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="notebook parameter override: name=value (every stage defining it) or stage.name=value")
    p.add_argument("--run-dir", help="run directory (default: a new runs/<timestamp>-<preset>/); "
                                     "re-using one resumes it")
    p.add_argument("--resume", action="store_true", help="re-use the latest runs/*-<preset> directory")
    p.add_argument("--runs-dir", default="runs", help="parent of new run directories (default: runs)")
    p.add_argument("--force", action="store_true", help="re-run selected stages even if unchanged")
    p.add_argument("--batch", metavar="FILE", help="YAML list of {preset, overrides, name, run_dir} runs")
    p.add_argument("--emit-commands", action="store_true",
                   help="with --batch: print one kalm pipeline command per run instead of running")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan, run nothing")
    p.add_argument("--no-html", action="store_true", help="skip the HTML export of executed notebooks")
    p.add_argument("--list-presets", action="store_true", help="list the known presets")
    return p


def cli_main(argv: list[str]) -> int:
    """``kalm pipeline ...`` entry point (see ``kalm pipeline --help``)."""
    args = _parser().parse_args(argv)
    try:
        if args.list_presets:
            for n in known_presets():
                print(f"{n:<18} {load_preset(n)[1].description}")
            return 0
        if args.batch:
            entries = load_batch(args.batch)
            if args.emit_commands:
                for e in entries:  # validate before printing anything a scheduler would run
                    plan_pipeline(e.preset, overrides=e.overrides, from_stage=e.from_stage, only=e.only)
                print("\n".join(batch_commands(entries, args.runs_dir)))
                return 0
            results = run_batch(entries, runs_dir=args.runs_dir, force=args.force, html=not args.no_html)
            for r in results:
                print(f"{r['status']:<7} {r['preset']:<16} {r['run_dir']}")
            return 0 if all(r["status"] == "ok" for r in results) else 1
        if not args.preset:
            print("kalm pipeline: --preset (or --batch) is required; known presets: "
                  f"{known_presets()}", file=sys.stderr)
            return 2
        if args.dry_run:
            name, path, stages, plan = plan_pipeline(args.preset, overrides=args.param,
                                                     from_stage=args.from_stage, only=args.only)
            print(f"preset {name} ({path}): {len(plan)} of {len(stages)} stage(s) would run")
            width = max((len(st.name) for st in plan), default=0)
            for st in plan:
                print(f"  {st.name:<{width}} {st.notebook.name:<24} {json.dumps(st.parameters, default=str)}")
            return 0
        run_dir = args.run_dir
        if args.resume and not run_dir:
            run_dir = latest_run_dir(load_preset(args.preset)[0], args.runs_dir)
            if run_dir is None:
                print(f"kalm pipeline: --resume: no earlier run of {args.preset} in {args.runs_dir}/",
                      file=sys.stderr)
                return 2
        result = run_pipeline(args.preset, overrides=args.param, run_dir=run_dir, from_stage=args.from_stage,
                              only=args.only, force=args.force, runs_dir=args.runs_dir,
                              html=not args.no_html)
    except StageFailed as e:
        print(f"kalm pipeline: {e}", file=sys.stderr)
        return 1
    except PipelineError as e:
        print(f"kalm pipeline: error: {e}", file=sys.stderr)
        return 2
    print(f"run directory: {result.run_dir}")
    print(f"ran: {result.ran or '-'}; skipped (unchanged): {result.skipped or '-'}")
    width = max(map(len, result.manifest["stage_order"]), default=0)
    for st_name in result.manifest["stage_order"]:
        html_path = result.manifest["stages"].get(st_name, {}).get("html")
        if html_path:
            print(f"  {st_name:<{width}} {html_path}")
    # the HTML report(s): declared outputs ending in .html, and notebook 06's default reports/<run name>.html
    reports = [p for st_name in result.manifest["stage_order"]
               for pattern in result.manifest["stages"].get(st_name, {}).get("produces", [])
               if pattern.endswith(".html") for p in _expand(result.run_dir, pattern)]
    default_report = REPO_ROOT / "reports" / f"{result.run_dir.name}.html"
    for path in reports + ([default_report] if default_report.is_file() else []):
        print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
