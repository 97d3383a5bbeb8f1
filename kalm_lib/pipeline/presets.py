"""Presets: which notebooks a pipeline runs, in which order, with which parameters.

A preset (``configs/presets/<name>.yaml``, found by :func:`kalm_lib.config.resolve_config`) lists the stages
in order, and for each stage the notebook parameters and the run-directory files it needs and produces::

    description: CPU demo on the bundled data
    parameters: {seed: 0}              # given to every stage whose notebook declares the name
    stages:
      setup:    {parameters: {preset: cpu-demo}, produces: [provenance.json]}
      curate:   {parameters: {preset: cpu-demo}, produces: [curated/finetune.jsonl]}
      finetune: {parameters: {...}, needs: [curated/finetune.jsonl], produces: [train/finetune]}

Resolving a preset checks it against the notebooks' ``parameters`` cells before anything runs: known stage
names in pipeline order, notebooks that exist, every parameter and ``-p`` override naming a declared one.

**Pipeline order is the notebooks' numbering** (:func:`notebook_rank`): ``00_setup`` < ``00b_standins`` <
``01_data_curation`` < ``02_pretrain`` < ``02b_remine`` < ``03_finetune`` < ``03b_distill`` < ``04_soup`` <
``04b_mteb`` < ``05_ablations`` < ``06_report``. A preset lists its stages in that order (several stages may run
one notebook, e.g. two ablation grids through 05); a notebook whose name carries no number (a user's own) may go
anywhere. :data:`STAGE_NOTEBOOKS` gives the canonical stage names their default notebook; any other stage names
its notebook (``notebook:``).
Overrides use the one override syntax of every subcommand (:func:`kalm_lib.config.split_override`):
``-p name=value`` sets ``name`` in every stage whose notebook declares it, ``-p stage.name=value`` in one.
"""

from __future__ import annotations

import ast
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import nbformat
import papermill

from kalm_lib.config import CONFIG_DIR, REPO_ROOT, ConfigError, from_dict, load_yaml, resolve_config, split_override

PRESETS_DIR = CONFIG_DIR / "presets"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"

# The canonical stages and their default notebooks. A preset may list a subset, or a stage with its own
# ``notebook`` (then any name is allowed: remine -> 02b_remine.ipynb, mteb_eng_v2 -> 04b_mteb.ipynb, ...).
STAGE_NOTEBOOKS: dict[str, str] = {
    "setup": "00_setup.ipynb",
    "curate": "01_data_curation.ipynb",
    "pretrain": "02_pretrain.ipynb",
    "finetune": "03_finetune.ipynb",
    "soup": "04_soup.ipynb",
    "ablate": "05_ablations.ipynb",
    "report": "06_report.ipynb",
}
# a notebook's place in the pipeline: its leading number and letter ("02b_remine.ipynb" -> (2, "b"))
_NUMBERED = re.compile(r"^(\d+)([a-z]?)_")


class PipelineError(Exception):
    """Bad input found before any work: unknown preset/stage/parameter, missing notebook or input."""


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


# ---------------------------------------------------------------------------------------------- loading
def known_presets(presets_dir: Path | None = None) -> list[str]:
    """Names of the presets in ``presets_dir`` (default ``configs/presets/``)."""
    return sorted(p.stem for p in Path(presets_dir or PRESETS_DIR).glob("*.yaml"))


def find_preset(preset: str | Path, presets_dir: Path | None = None) -> Path:
    """The YAML file of a preset given by name or path.

    The rule is :func:`kalm_lib.config.resolve_config` with ``kind="presets"`` (path as given, repo-relative,
    then ``configs/presets/<name>.yaml``); with ``presets_dir`` a bare name is looked up there instead
    (tests, a private collection of presets).
    """
    try:
        if presets_dir is not None and Path(preset).suffix not in (".yaml", ".yml"):
            return resolve_config(Path(presets_dir) / f"{preset}.yaml")
        return resolve_config(preset, "presets")
    except FileNotFoundError:
        where = presets_dir or PRESETS_DIR
        raise PipelineError(f"unknown preset {str(preset)!r}; known presets: {known_presets(where)} "
                            f"(in {where}), or pass the path of a preset YAML file") from None


def load_preset(preset: str | Path, presets_dir: Path | None = None) -> tuple[str, Preset, Path]:
    """Load a preset by name or path (see :func:`find_preset`) -> ``(name, Preset, path)``."""
    path = find_preset(preset, presets_dir)
    try:
        spec = from_dict(Preset, load_yaml(path), where=str(path))
    except ConfigError as e:
        raise PipelineError(f"invalid preset: {e}") from None
    if not spec.stages:
        raise PipelineError(f"{path}: preset lists no stages")
    return path.stem, spec, path


# ---------------------------------------------------------------------------------------------- notebooks
def notebook_parameters(path: Path) -> dict[str, Any]:
    """Names defined in the notebook's ``parameters``-tagged cell.

    papermill's own inspection (types, defaults, help from comments), completed by Python's ``ast``:
    papermill's line parser skips some valid lines (e.g. ``x = []  # e.g. ["a=b"]``), and a parameter it
    missed would wrongly be reported unknown. Raises PipelineError if there is no ``parameters`` cell.
    """
    nb = nbformat.read(str(path), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise PipelineError(f"notebook {path} has no cell tagged 'parameters' (papermill needs one to "
                            "inject run_dir and the preset's parameters; tag the first code cell)")
    params = _papermill_parameters(path)
    for name, default in _assigned_names(cells[0].source, path).items():
        params.setdefault(name, {"name": name, "inferred_type_name": "None", "default": default, "help": ""})
    return params


def _papermill_parameters(path: Path) -> dict[str, Any]:
    logger = logging.getLogger("papermill")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its "Unable to parse line" warnings are covered by the ast pass
    try:
        return papermill.inspect_notebook(str(path))
    except ValueError:  # no kernelspec in the metadata: papermill cannot pick a translator; ast instead
        return {}
    finally:
        logger.setLevel(level)


def _assigned_names(cell_source: str, path: Path) -> dict[str, str | None]:
    """Every name the cell assigns at top level -> the source text of its value (None if annotated only)."""
    source = "\n".join(ln for ln in cell_source.splitlines() if not ln.lstrip().startswith(("%", "!")))
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise PipelineError(f"notebook {path}: the parameters cell is not valid Python: {e}") from None
    names: dict[str, str | None] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        default = ast.get_source_segment(source, node.value) if targets and node.value is not None else None
        for t in targets:
            for name in ([t] if isinstance(t, ast.Name) else getattr(t, "elts", [])):
                if isinstance(name, ast.Name):
                    names.setdefault(name.id, default)
    return names


# ---------------------------------------------------------------------------------------------- overrides
def parse_overrides(overrides: list[str]) -> list[tuple[str | None, str, Any]]:
    """``-p`` values -> ``(stage or None, name, value)``.

    ``name=v`` targets every stage declaring ``name``, ``stage.name=v`` one stage. Values are parsed by
    :func:`kalm_lib.config.parse_value` (YAML, numbers as numbers): ``-p lr=1e-5`` is a float,
    ``-p quick=true`` a bool, ``-p dims=[64,128]`` a list.
    """
    out = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise PipelineError(f"parameter override {item!r} must look like name=value or stage.name=value")
        try:
            key, value = split_override(item)
        except ConfigError as e:
            raise PipelineError(f"bad parameter override (name=value or stage.name=value): {e}") from None
        stage, _, name = key.rpartition(".")
        if not name.isidentifier():
            raise PipelineError(f"parameter override {item!r}: {name!r} is not a parameter name "
                                "(use name=value or stage.name=value)")
        out.append((stage or None, name, value))
    return out


def _apply_overrides(stages: list[Stage], overrides: list[str], ignored_stages: set[str]) -> list[str]:
    """Set each ``-p`` override on the stages it targets; returns the problems found."""
    by_name = {st.name: st for st in stages}
    problems = []
    for stage_name, name, value in parse_overrides(list(overrides)):
        if name == "run_dir":
            problems.append("run_dir is set by the pipeline (use --run-dir)")
        elif stage_name in ignored_stages:
            continue
        elif stage_name is not None and stage_name not in by_name:
            problems.append(f"-p {stage_name}.{name}: unknown stage {stage_name!r}; stages: {list(by_name)}")
        elif stage_name is not None and name not in by_name[stage_name].declared:
            st = by_name[stage_name]
            problems.append(f"-p {stage_name}.{name}: notebook {st.notebook.name} defines no parameter {name!r}; "
                            f"it defines {sorted(st.declared)}")
        elif stage_name is not None:
            by_name[stage_name].parameters[name] = value
        else:
            targets = [st for st in stages if name in st.declared]
            if not targets:
                problems.append(f"-p {name}: unknown parameter; no stage's notebook defines {name!r} (stages: "
                                + ", ".join(f"{st.name}: {sorted(st.declared)}" for st in stages) + ")")
            for st in targets:
                st.parameters[name] = value
    return problems


# ---------------------------------------------------------------------------------------------- resolving
def resolve_stages(preset: Preset, overrides: list[str] = (), *, notebooks_dir: Path | None = None,
                   preset_path: Path | None = None, required: set[str] | None = None) -> list[Stage]:
    """Resolve every stage of ``preset`` against its notebook; all bad input is reported together.

    Checks: known stage names in pipeline order, notebooks that exist, a ``parameters`` cell in each, that
    each notebook declares ``run_dir``, and that every preset parameter and ``-p`` override names a declared
    parameter. With ``required`` (the stages about to run), a missing notebook of any other stage is not an
    error: that stage is left out of the result (and ``stage.name=value`` overrides aimed at it are ignored).
    """
    where = preset_path or "preset"
    nb_dir = Path(notebooks_dir or (REPO_ROOT / preset.notebooks_dir if preset.notebooks_dir else NOTEBOOKS_DIR))
    problems = _stage_name_problems(preset, where)
    paths = {s: nb_dir / (spec.notebook or STAGE_NOTEBOOKS[s]) for s, spec in preset.stages.items()
             if spec.notebook is not None or s in STAGE_NOTEBOOKS}
    # stages that will not run may still lack their notebook
    dropped = set() if required is None else {s for s, p in paths.items() if s not in required and not p.is_file()}
    paths = {s: p for s, p in paths.items() if s not in dropped}
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

    stages = [_stage(s, preset, paths[s], declared[s], where, problems) for s in paths]
    common_unused = [] if dropped else sorted(k for k in preset.parameters
                                              if not any(k in st.declared for st in stages))
    if common_unused:
        problems.append(f"{where}: common parameter(s) {common_unused} are defined by no stage's notebook")
    problems += _apply_overrides(stages, overrides, dropped)
    if problems:
        raise PipelineError("\n".join(problems))
    return stages


def notebook_rank(notebook: str | Path) -> tuple[int, str] | None:
    """A notebook's place in the pipeline, from its file name's number: ``"02b_remine.ipynb"`` -> ``(2, "b")``,
    ``"03_finetune.ipynb"`` -> ``(3, "")``; None for a name without a leading number (no fixed place)."""
    match = _NUMBERED.match(Path(notebook).name)
    return (int(match.group(1)), match.group(2)) if match else None


def _stage_name_problems(preset: Preset, where: Any) -> list[str]:
    """Unknown stage names, and numbered notebooks listed out of their numbers' order."""
    problems = []
    unknown = [s for s, spec in preset.stages.items() if spec.notebook is None and s not in STAGE_NOTEBOOKS]
    if unknown:
        problems.append(f"{where}: unknown stage(s) {unknown}; known stages: {list(STAGE_NOTEBOOKS)} "
                        "(or give the stage a 'notebook')")
    ranked = [(s, notebook_rank(spec.notebook or STAGE_NOTEBOOKS[s])) for s, spec in preset.stages.items()
              if s not in unknown]
    ranked = [(s, rank) for s, rank in ranked if rank is not None]
    if [r for _, r in ranked] != sorted(r for _, r in ranked):
        listed = ", ".join(f"{s} ({spec.notebook or STAGE_NOTEBOOKS[s]})" for s, spec in preset.stages.items()
                           if s not in unknown and notebook_rank(spec.notebook or STAGE_NOTEBOOKS[s]))
        problems.append(f"{where}: stages out of pipeline order: {listed}; a preset lists its stages in the order "
                        "of their notebooks' numbers (00 < 00b < 01 < ... < 06), the order they run in")
    return problems


def _stage(name: str, preset: Preset, notebook: Path, declared: dict[str, Any], where: Any,
           problems: list[str]) -> Stage:
    """One stage with the preset's common and own parameters; problems with them are appended."""
    spec = preset.stages[name]
    if "run_dir" not in declared:
        problems.append(f"notebook {notebook} (stage {name}): parameters cell does not define run_dir")
    bad = sorted(set(spec.parameters) - set(declared))
    if bad:
        problems.append(f"{where}: stage {name}: unknown parameter(s) {bad} for notebook {notebook.name}; "
                        f"its parameters cell defines {sorted(declared)}")
    for kind, patterns in (("needs", spec.needs), ("produces", spec.produces)):
        outside = [p for p in patterns if not p or PurePosixPath(p).is_absolute()
                   or ".." in PurePosixPath(p).parts or PurePosixPath(p).parts in ((), (".",))]
        if outside:
            problems.append(f"{where}: stage {name}: {kind} {outside} must be paths inside the run directory")
    params = {k: v for k, v in preset.parameters.items() if k in declared}
    params.update(spec.parameters)
    return Stage(name, notebook, params, list(spec.needs), list(spec.produces), declared)


def selected_names(names: list[str], *, from_stage: str | None = None, only: list[str] | None = None) -> list[str]:
    """The stage names to run, in preset order: all, those from ``from_stage`` on, or ``only`` the named ones."""
    for n in ([from_stage] if from_stage else []) + list(only or []):
        if n not in names:
            raise PipelineError(f"unknown stage {n!r}; this preset's stages: {names}")
    if from_stage and only:
        raise PipelineError("use either --from or --only, not both")
    if from_stage:
        return names[names.index(from_stage):]
    if only:
        return [n for n in names if n in set(only)]
    return list(names)


def select_stages(stages: list[Stage], *, from_stage: str | None = None,
                  only: list[str] | None = None) -> list[Stage]:
    """The stages to run (see :func:`selected_names`)."""
    chosen = set(selected_names([s.name for s in stages], from_stage=from_stage, only=only))
    return [s for s in stages if s.name in chosen]
