"""Run a preset's notebooks in order, headlessly with papermill, into one run directory.

Every stage gets ``run_dir`` (absolute) on top of its parameters and runs with the repository root as its
working directory (so repo-relative config paths in presets work); stages talk to each other only through
files in the run directory (docs/CONTRACTS.md "Run directory"). Each executed notebook and its HTML export
land in ``<run_dir>/notebooks/``; ``<run_dir>/manifest.json`` (:mod:`kalm_lib.pipeline.manifest`) records
what ran. What runs again is :mod:`kalm_lib.pipeline.rerun`: a stage whose key (notebook, parameters, input
files, library code) is unchanged since its last successful run is skipped, a failed or interrupted one resumes
in place, so re-running the same command on the same run directory resumes after a failure; a stage whose key
changed (or a ``force``d one) re-runs from scratch with its previous outputs moved to ``<run_dir>/superseded/``.

Everything that can be checked without running anything (preset, notebooks, parameter names, inputs) is
checked before the first notebook starts (:func:`plan_pipeline`).

Every kernel runs headless (``KALM_HEADLESS=1``) and with this invocation's hub decision in its environment
(:func:`kernel_environment`: ``KALM_ONLINE`` and the Hugging Face offline flags, as
:func:`kalm_lib.runtime.configure_hub` decided for ``kalm [--online] pipeline``), so a notebook that calls
``configure_hub()`` itself comes to the same decision; the manifest records it per invocation.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shlex
import sys
import time
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import nbformat
import papermill
from nbconvert import HTMLExporter

from kalm_lib import atomic, provenance
from kalm_lib.config import REPO_ROOT
from kalm_lib.pipeline.code import stage_code
from kalm_lib.pipeline.manifest import (MANIFEST, check_inputs, expand, hash_paths, read_manifest, run_lock,
                                        stage_key, utc_now, write_manifest)
from kalm_lib.pipeline.presets import (PipelineError, Stage, load_preset, resolve_stages, select_stages,
                                       selected_names)
from kalm_lib.pipeline.rerun import Decision, decide, explain, move_aside
from kalm_lib import runtime


class StageFailed(PipelineError):
    """A notebook raised: names the stage, notebook, failing cell and the executed copy."""

    def __init__(self, message: str, *, stage: str, notebook: Path, executed: Path,
                 cell_index: int | None = None, cell_source: str = "", ename: str = "", evalue: str = ""):
        super().__init__(message)
        self.stage, self.notebook, self.executed = stage, notebook, executed
        self.cell_index, self.cell_source, self.ename, self.evalue = cell_index, cell_source, ename, evalue


@dataclass
class PipelineResult:
    """What a pipeline run did."""

    run_dir: Path
    ran: list[str]
    skipped: list[str]
    manifest: dict[str, Any]
    superseded: dict[str, Path] = field(default_factory=dict)  # stage -> where its previous outputs went


@dataclass
class _Execution:
    """How this invocation executes its stages, and the command that resumes it."""

    run_dir: Path
    stages: list[Stage]           # every stage of the preset (names the executed copies)
    kernel_name: str | None
    progress: bool
    html: bool
    start_timeout: int
    resume_command: str
    log: Callable[[str], Any]
    log_output: bool = False      # stream each cell's output to stderr
    online: bool = False          # hub access in the kernels (kernel_environment)


# ---------------------------------------------------------------------------------------------- run dirs
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


def _checked_run_dir(run_dir: Path | str) -> Path:
    """The run directory as an absolute path; an existing path that is not a directory is an error."""
    path = Path(run_dir).resolve()
    if path.exists() and not path.is_dir():
        raise PipelineError(f"run directory {path} exists and is not a directory")
    return path


def executed_name(stage: Stage, stages: list[Stage]) -> str:
    """File name of a stage's executed notebook: the notebook's own name, or ``<stem>.<stage>.ipynb`` when
    several stages of the preset run the same notebook (e.g. two ablation grids through 05_ablations)."""
    if sum(st.notebook.name == stage.notebook.name for st in stages) > 1:
        return f"{stage.notebook.stem}.{stage.name}{stage.notebook.suffix}"
    return stage.notebook.name


# ---------------------------------------------------------------------------------------------- planning
def _plan(preset: str | Path, overrides: list[str], from_stage: str | None, only: list[str] | None,
          presets_dir: Path | None, notebooks_dir: Path | None):
    name, spec, path = load_preset(preset, presets_dir)
    # with a selection, only the selected stages need their notebooks to exist
    required = set(selected_names(list(spec.stages), from_stage=from_stage, only=only)) \
        if from_stage or only else None
    stages = resolve_stages(spec, overrides, notebooks_dir=notebooks_dir, preset_path=path, required=required)
    return name, spec, path, stages, select_stages(stages, from_stage=from_stage, only=only)


def plan_pipeline(preset: str | Path, *, overrides: list[str] = (), from_stage: str | None = None,
                  only: list[str] | None = None, presets_dir: Path | None = None,
                  notebooks_dir: Path | None = None) -> tuple[str, Path, list[Stage], list[Stage]]:
    """Validate a preset + overrides + selection without running anything -> ``(name, path, stages, plan)``."""
    name, _, path, stages, plan = _plan(preset, list(overrides), from_stage, only, presets_dir, notebooks_dir)
    return name, path, stages, plan


# ---------------------------------------------------------------------------------------------- running
def kernel_environment(online: bool) -> dict[str, str]:
    """What every stage's kernel gets in its environment: headless, and the hub decision spelled out in full
    (``KALM_ONLINE`` too, so a user's ``KALM_ONLINE=0`` cannot turn a ``--online`` run offline inside a kernel
    that calls :func:`kalm_lib.runtime.configure_hub` again)."""
    flag = "0" if online else "1"
    return {runtime.HEADLESS_ENV: "1", runtime.ONLINE_ENV: "1" if online else "0",
            **{name: flag for name in runtime.OFFLINE_ENVS}}


def pipeline_command(preset: str | Path, run_dir: Path | str, overrides: list[str] = (), *extra: str) -> str:
    """The shell command (quoted) that runs ``preset`` on ``run_dir`` with these overrides and extra arguments."""
    parts = ["kalm", "pipeline", "--preset", str(preset), "--run-dir", str(run_dir)]
    for o in overrides:
        parts += ["-p", o]
    return shlex.join(parts + list(extra))


def run_pipeline(preset: str | Path, *, overrides: list[str] = (), run_dir: Path | str | None = None,
                 from_stage: str | None = None, only: list[str] | None = None, force: bool = False,
                 runs_dir: Path | str = "runs", presets_dir: Path | None = None,
                 notebooks_dir: Path | None = None, progress: bool = True, html: bool = True,
                 kernel_name: str | None = None, start_timeout: int = 120, log_output: bool = False,
                 online: bool | None = None, log: Callable[[str], Any] = print) -> PipelineResult:
    """Run a preset's notebooks in order into one run directory; see the module docstring.

    What runs is :func:`kalm_lib.pipeline.rerun.decide`: unchanged stages are skipped, a stage whose key changed
    (or every selected stage, with ``force``) re-runs from scratch with its previous outputs moved to
    ``<run_dir>/superseded/``. ``log_output`` streams each running cell's output to stderr (papermill's
    ``log_output``). ``online``: hub access in the notebooks' kernels; None = this process's own
    (:func:`kalm_lib.runtime.hub_online`, which ``kalm`` set by :func:`kalm_lib.runtime.configure_hub`). Raises :class:`PipelineError` for bad input (before any notebook runs) and
    :class:`StageFailed` when a notebook raises (the manifest then marks that stage ``failed``; later stages do
    not run).
    """
    overrides = list(overrides)
    name, spec, preset_path, stages, plan = _plan(preset, overrides, from_stage, only, presets_dir, notebooks_dir)
    run_dir = _checked_run_dir(run_dir if run_dir is not None else new_run_dir(name, runs_dir))
    check_inputs(plan, run_dir)
    online = runtime.hub_online() if online is None else bool(online)
    ex = _Execution(run_dir, stages, kernel_name or spec.kernel, progress and not log_output, html, start_timeout,
                    pipeline_command(preset, run_dir, overrides, *(["--online"] if online else [])), log,
                    log_output, online)

    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):  # one pipeline per run dir at a time
        manifest = _open_manifest(run_dir, name, preset_path, stages, overrides, online)
        invocation = {"started": utc_now(), "argv": sys.argv[:], "overrides": overrides,
                      "plan": [st.name for st in plan], "ran": [], "skipped": [], "superseded": {},
                      "hub_online": online, "status": "running"}
        manifest["history"].append(invocation)
        write_manifest(run_dir, manifest)
        for st in plan:
            try:
                _stage_turn(st, manifest, invocation, ex, force)
            except StageFailed:
                invocation.update(status="failed", finished=utc_now())
                manifest["status"] = "failed"
                write_manifest(run_dir, manifest)
                raise
        invocation.update(status="ok", finished=utc_now())
        all_ok = all(manifest["stages"].get(st.name, {}).get("status") == "ok" for st in stages)
        manifest["status"] = "ok" if all_ok else "partial"
        write_manifest(run_dir, manifest)
        return PipelineResult(run_dir, list(invocation["ran"]), list(invocation["skipped"]), manifest,
                              {k: Path(v) for k, v in invocation["superseded"].items()})


def _stage_turn(st: Stage, manifest: dict[str, Any], invocation: dict[str, Any], ex: _Execution,
                force: bool) -> None:
    """Skip, resume or re-run one planned stage (:func:`kalm_lib.pipeline.rerun.decide`), recording it."""
    inputs = hash_paths(ex.run_dir, st.needs, manifest.setdefault("file_hashes", {}))
    code = stage_code(st.notebook, st.parameters)
    key = stage_key(st, inputs, code)
    decision = decide(st, manifest["stages"].get(st.name, {}), key, code, inputs, ex.run_dir, force=force)
    why = "; ".join(decision.reasons)
    if decision.action == "skip":
        ex.log(f"[pipeline] {st.name}: {why} -> skipped")
        invocation["skipped"].append(st.name)
        write_manifest(ex.run_dir, manifest)
        return
    if decision.fresh:
        folder = move_aside(ex.run_dir, st, manifest, decision.reasons, ex.stages)
        where = f"its previous outputs moved to {folder}" if folder else "no previous outputs to move aside"
        ex.log(f"[pipeline] {st.name}: {why} -> re-runs from scratch; {where}")
        if folder:
            invocation["superseded"][st.name] = str(folder)
        write_manifest(ex.run_dir, manifest)
    else:
        ex.log(f"[pipeline] {st.name}: {why}")
    _run_stage(st, inputs, key, code, manifest, ex)
    invocation["ran"].append(st.name)
    write_manifest(ex.run_dir, manifest)


def explain_pipeline(preset: str | Path, run_dir: Path | str, *, overrides: list[str] = (),
                     from_stage: str | None = None, only: list[str] | None = None, force: bool = False,
                     presets_dir: Path | None = None, notebooks_dir: Path | None = None
                     ) -> tuple[str, Path, list[Stage], list[Decision]]:
    """What :func:`run_pipeline` would do on ``run_dir`` now (``--dry-run``), touching nothing.

    Returns ``(preset name, preset path, planned stages, one Decision per planned stage)``; see
    :func:`kalm_lib.pipeline.rerun.explain`. Bad input raises :class:`PipelineError` as the run would."""
    name, _, path, stages, plan = _plan(preset, list(overrides), from_stage, only, presets_dir, notebooks_dir)
    run_dir = _checked_run_dir(run_dir)
    check_inputs(plan, run_dir)
    manifest = read_manifest(run_dir)
    if manifest.get("preset") not in (None, name):
        raise PipelineError(f"{run_dir} holds a run of preset {manifest['preset']!r}, not {name!r}")
    return name, path, plan, explain(plan, stages, run_dir, manifest, force=force)


def _open_manifest(run_dir: Path, name: str, preset_path: Path, stages: list[Stage],
                   overrides: list[str], online: bool) -> dict[str, Any]:
    """The run dir's manifest, claimed for this invocation (the caller holds the run lock)."""
    manifest = read_manifest(run_dir)
    if manifest.get("preset") not in (None, name):
        raise PipelineError(f"{run_dir} holds a run of preset {manifest['preset']!r}, not {name!r}")
    manifest.update({
        "preset": name, "preset_file": str(preset_path), "run_dir": str(run_dir),
        "created": manifest.get("created") or utc_now(), "status": "running",
        "stage_order": [st.name for st in stages],
        "provenance": provenance.collect(
            config={"preset": name, "stages": {st.name: st.parameters for st in stages},
                    "overrides": list(overrides)},
            kernel_environment=kernel_environment(online)),
    })
    # we hold the lock, so anything still marked running was killed mid-way
    for rec in [*manifest["history"], *manifest["stages"].values()]:
        if rec.get("status") == "running":
            rec["status"] = "interrupted"
    for st in stages:  # stages outside this run's plan keep their record
        manifest["stages"].setdefault(st.name, {"status": "pending", "notebook": str(st.notebook)})
    return manifest


def _run_stage(st: Stage, inputs: dict[str, str], key: dict[str, str], code: dict[str, str],
               manifest: dict[str, Any], ex: _Execution) -> None:
    """Execute one stage's notebook and record it in ``manifest``; raises :class:`StageFailed`."""
    executed = ex.run_dir / "notebooks" / executed_name(st, ex.stages)
    record = {"status": "running", "notebook": str(st.notebook), "executed": str(executed),
              "html": None, "parameters": st.parameters, "needs": st.needs, "produces": st.produces,
              "input_hashes": inputs, **key, "code_files": code, "started": utc_now(), "finished": None,
              "seconds": None, "outputs": {}, "error": None}
    manifest["stages"][st.name] = record
    write_manifest(ex.run_dir, manifest)
    ex.log(f"[pipeline] {st.name}: running {st.notebook.name} -> {executed}")

    t0 = time.perf_counter()
    error = _execute_notebook(st, executed, ex)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    record["finished"] = utc_now()
    if ex.html and executed.is_file():
        try:
            record["html"] = str(export_html(executed))
        except Exception as e:  # an export problem must not hide the stage's own result
            ex.log(f"[pipeline] {st.name}: HTML export failed: {e}")
    if error is None:
        missing = [p for p in st.produces if not expand(ex.run_dir, p)]
        if missing:
            error = PipelineError(f"stage {st.name} finished but did not write its declared output(s) "
                                  f"{missing} in {ex.run_dir}")
    if error is not None:
        failure = _stage_failure(st, executed, error, record["html"], ex.resume_command)
        record.update(status="failed", error={"cell_index": failure.cell_index, "cell_source": failure.cell_source,
                                              "ename": failure.ename, "evalue": failure.evalue,
                                              "message": str(failure)})
        raise failure
    record["status"] = "ok"
    record["outputs"] = hash_paths(ex.run_dir, st.produces, manifest.setdefault("file_hashes", {}))
    ex.log(f"[pipeline] {st.name}: ok in {record['seconds']:.1f} s")


def _execute_notebook(st: Stage, executed: Path, ex: _Execution) -> Exception | None:
    """papermill the stage's notebook into ``executed``; the exception it raised, if any."""
    bare_kernel, bare_language = _bare_notebook_kernel(st.notebook)
    try:
        with _env(**kernel_environment(ex.online)), _papermill_logging(ex.log_output):
            papermill.execute_notebook(
                str(st.notebook), str(executed), parameters={"run_dir": str(ex.run_dir), **st.parameters},
                kernel_name=ex.kernel_name or bare_kernel, language=bare_language,
                progress_bar=ex.progress, log_output=ex.log_output, cwd=str(REPO_ROOT),
                start_timeout=ex.start_timeout)
    except Exception as e:  # papermill raises PapermillExecutionError, or kernel/IO errors
        return e
    return None


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the kernel papermill starts, and restore them afterwards."""
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
def _papermill_logging(stream: bool) -> Iterator[None]:
    """papermill's loggers while a notebook runs: its "Unable to parse line" warnings about parameter cells are
    silenced (presets.notebook_parameters reads those cells with ast); with ``stream`` its log records (the cells'
    output) go to stderr as they come, as ``papermill --log-output`` shows them. Restored afterwards."""
    logger, translators = logging.getLogger("papermill"), logging.getLogger("papermill.translators")
    saved = logger.level, logger.propagate, translators.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    translators.setLevel(logging.ERROR)
    if stream:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # once, not again through a root handler
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])  # setLevel, not .level: it also clears logging's isEnabledFor cache
        logger.propagate = saved[1]
        translators.setLevel(saved[2])


def _bare_notebook_kernel(path: Path) -> tuple[str | None, str | None]:
    """(None, None): papermill uses the notebook's kernelspec; for a notebook without one (written by a
    script, say), ("python3", "python") instead of papermill's 'No kernel name found' error."""
    meta = nbformat.read(str(path), as_version=4).metadata
    return (None if meta.get("kernelspec") else "python3",
            None if meta.get("kernelspec") or meta.get("language_info") else "python")


# ---------------------------------------------------------------------------------------------- outputs
def export_html(executed: Path) -> Path:
    """Export an executed notebook to HTML next to it, atomically (plotly figures survive if the notebook
    set ``plotly.io.renderers.default = "notebook+plotly_mimetype"``)."""
    body, _ = HTMLExporter().from_filename(str(executed))
    return atomic.write_text(executed.with_suffix(".html"), body)


def _stage_failure(st: Stage, executed: Path, error: Exception, html: str | None,
                   resume_command: str) -> StageFailed:
    """The error a failed stage raises: notebook, cell (as numbered in the source notebook), executed copy,
    HTML export and the command that resumes the run."""
    index, source, ename, evalue = _failure_details(executed, error)
    if isinstance(error, PipelineError) and index is None:  # our own check after the notebook ran
        message = f"{error}\n  executed copy: {executed}"
    else:
        first_line = next((ln for ln in source.splitlines() if ln.strip()), "").strip()
        cell = f"cell {index} (`{first_line}`)" if index is not None else "outside a cell"
        message = (f"stage {st.name!r} failed in notebook {st.notebook}, {cell}: {ename}: {evalue}"
                   f"\n  executed copy: {executed}" + (f"\n  HTML: {html}" if html else "")
                   + f"\n  fix it and re-run to resume from this stage: {resume_command}")
    return StageFailed(message, stage=st.name, notebook=st.notebook, executed=executed,
                       cell_index=index, cell_source=source, ename=ename, evalue=evalue)


def _failure_details(executed: Path, err: Exception) -> tuple[int | None, str, str, str]:
    """(cell index in the SOURCE notebook, cell source, ename, evalue) of a papermill failure.

    papermill counts cells of the executed copy, which has an injected-parameters cell (and, on error, a
    banner cell at the top); map back to the index the user sees in the source notebook."""
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
