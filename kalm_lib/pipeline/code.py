"""The code a stage runs, for its key: the ``kalm_lib`` modules its notebook can import and the files it names.

A stage's outputs depend on the library as much as on its notebook, so its key
(:func:`kalm_lib.pipeline.manifest.stage_key`) includes the sha256 of every ``kalm_lib`` module the stage can
import: the modules its notebook imports or names, then everything those import or name, transitively, with the
``__init__.py`` of each package on the way. A module counts as imported when an ``import`` statement names it
(function-local ones too) or when a string is its dotted name (``"kalm_lib.train"`` for ``python -m``, a
``"module:function"`` runner); an f-string that builds a name after ``kalm_lib.`` counts as the whole library.

Per stage rather than one hash of the whole tree, so that fixing the report code re-runs the report stage, not a
day of GPU training; within a stage it errs on the side of re-running (a package's ``__init__`` imports its
submodules, so importing a package takes all of it). Third-party packages are not part of the key.

The files a stage names are part of it too: every string in the notebook's code (the ``parameters`` cell's
defaults included) or in its parameters that is the path of an existing config or code file (``.py``, ``.yaml``,
``.yml``, ``.json``, ``.toml``; ``file.py:function`` runners included, and a named ``.py`` file's ``kalm_lib``
imports are followed). Configs found through a *name* (``preset: smoke`` read as
``configs/train/smoke/finetune.yaml`` by the notebook) are not: after editing one, re-run with ``--force``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import nbformat

from kalm_lib import provenance
from kalm_lib.config import INSTALLED_HOME, REPO_ROOT

LIBRARY = Path(__file__).resolve().parents[1]   # the kalm_lib package directory
_ROOT_NAME = LIBRARY.name                        # "kalm_lib"
_WHOLE_LIBRARY = f"{_ROOT_NAME}.*"
NAMED_FILE_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".toml")
_MODULE_NAME = re.compile(rf"({_ROOT_NAME}(?:\.[A-Za-z_]\w*)*)(?::[A-Za-z_]\w*)?")
_RUNNER_FILE = re.compile(r"(.+\.py):[A-Za-z_]\w*")
# (path, mtime_ns, size) -> (sha256, referenced module names): each file is read once per process
_SCANNED: dict[tuple[str, int, int], tuple[str, frozenset[str]]] = {}


def stage_code(notebook: Path, parameters: dict[str, Any]) -> dict[str, str]:
    """sha256 of every file the stage's code is made of (see the module docstring), sorted by label.

    Labels: ``kalm_lib/<module path>`` for library modules, the path as written for a file the notebook or its
    parameters name."""
    code = _notebook_code(notebook)
    modules, strings = _references(code, package=None)
    strings |= set(_strings_in(parameters))
    modules |= {m.group(1) for s in strings if (m := _MODULE_NAME.fullmatch(s.strip()))}
    out: dict[str, str] = {}
    for label, path in _named_files(strings):
        out[label] = provenance.sha256_file(path)
        if path.suffix == ".py":
            modules |= _references(path.read_text(encoding="utf-8", errors="replace"), package=None)[0]
    for path in library_closure(modules):
        out[path.relative_to(LIBRARY.parent).as_posix()] = _scan(path)[0]
    return dict(sorted(out.items()))


def library_closure(modules: Iterable[str]) -> list[Path]:
    """The ``kalm_lib`` files that importing ``modules`` can execute, transitively (sorted)."""
    todo = [f for name in modules for f in module_files(name)]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for name in _scan(path)[1] for f in module_files(name)]
    return sorted(seen)


def module_files(name: str) -> list[Path]:
    """The files importing the dotted ``name`` executes: each package's ``__init__.py`` down to the module.

    A name that goes past a module (``kalm_lib.train.plan_stage``, a function) stops at the module;
    ``kalm_lib.*`` is every file of the library."""
    if name == _WHOLE_LIBRARY:   # not the installed copy of configs/notebooks/data (kalm_lib/_home/)
        return sorted(p for p in LIBRARY.rglob("*.py") if not p.is_relative_to(INSTALLED_HOME))
    parts = name.split(".")
    if parts[0] != _ROOT_NAME:
        return []
    files, here = [LIBRARY / "__init__.py"], LIBRARY
    for part in parts[1:]:
        if (here / part / "__init__.py").is_file():
            here = here / part
            files.append(here / "__init__.py")
        else:
            if (here / f"{part}.py").is_file():
                files.append(here / f"{part}.py")
            break
    return [f for f in files if f.is_file()]


# ---------------------------------------------------------------------------------------------- scanning
def _scan(path: Path) -> tuple[str, frozenset[str]]:
    """(sha256, module names referenced) of a library file, cached by path, mtime and size."""
    st = path.stat()
    cache_key = (str(path), st.st_mtime_ns, st.st_size)
    if cache_key not in _SCANNED:
        package = ".".join(path.relative_to(LIBRARY.parent).parent.parts)  # an __init__'s is its own package
        modules, _ = _references(path.read_text(encoding="utf-8"), package=package)
        _SCANNED[cache_key] = (provenance.sha256_file(path), frozenset(modules))
    return _SCANNED[cache_key]


def _references(source: str, package: str | None) -> tuple[set[str], set[str]]:
    """(``kalm_lib`` module names the code imports or names, every other one-line string constant in it).

    ``package``: the dotted package of the code, for relative imports. Code that does not parse (a notebook
    cell with unusual magics) is searched for module names as text."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {m.group(1) for m in _MODULE_NAME.finditer(source)}, set()
    modules: set[str] = set()
    strings: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            modules |= {base} | {f"{base}.{a.name}" for a in node.names if a.name != "*"}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "\n" not in node.value:
            if m := _MODULE_NAME.fullmatch(node.value.strip()):
                modules.add(m.group(1))
            elif len(node.value) < 500:
                strings.add(node.value)
        elif isinstance(node, ast.JoinedStr) and any(
                isinstance(v, ast.Constant) and str(v.value).endswith(f"{_ROOT_NAME}.") for v in node.values):
            modules.add(_WHOLE_LIBRARY)  # a module name built at run time
    return {m for m in modules if m.split(".")[0] == _ROOT_NAME}, strings


def _absolute(node: ast.ImportFrom, package: str | None) -> str:
    """The absolute module name of a ``from ... import`` (relative imports resolved against ``package``)."""
    if not node.level:
        return node.module or ""
    parts = (package or "").split(".")
    base = parts[:len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _notebook_code(path: Path) -> str:
    """The notebook's code cells as one Python source (IPython magics and shell lines left out)."""
    nb = nbformat.read(str(path), as_version=4)
    lines = [ln for c in nb.cells if c.cell_type == "code" for ln in c.source.splitlines()
             if not ln.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


def _strings_in(value: Any) -> Iterator[str]:
    """Every string inside a parameter value (lists and mappings walked)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings_in(k)
            yield from _strings_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings_in(v)


def _named_files(strings: Iterable[str]) -> Iterator[tuple[str, Path]]:
    """(label, path) of each string that names an existing config or code file (repo-relative or absolute)."""
    for s in sorted(set(strings)):
        m = _RUNNER_FILE.fullmatch(s.strip())
        text = m.group(1) if m else s.strip()
        if not text or Path(text).suffix not in NAMED_FILE_SUFFIXES:
            continue
        path = Path(text) if Path(text).is_absolute() else REPO_ROOT / text
        if path.is_file():
            yield text, path
