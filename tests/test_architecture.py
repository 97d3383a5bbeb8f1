"""The shape docs/ARCHITECTURE.md promises, checked on the source: layering, public APIs, function length.

These read the code with ``ast`` (nothing is imported), so a new import across layers, a re-export shim or a
200-line function fails here with the file and line named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "kalm_lib"
CORE = {"config", "provenance", "atomic", "locking", "runtime", "prompts", "model_card", "model", "losses"}
# package -> the packages (besides core) it may import; mirrors docs/ARCHITECTURE.md
ALLOWED = {
    "data": set(),
    "train": {"data"},
    "evaluation": {"data"},
    "soup": {"evaluation", "data"},
    "ablations": {"data", "train", "evaluation", "soup"},
    "report": {"evaluation", "ablations", "data"},
    "pipeline": set(),
}
# core modules may import each other only in this order (lower never imports higher)
CORE_ORDER = ["atomic", "locking", "runtime", "config", "provenance", "losses", "prompts", "model_card", "model"]
MAX_FUNCTION_LINES = 80


def modules():
    return sorted(p for p in LIB.rglob("*.py") if "__pycache__" not in p.parts)


def unit_of(path: Path) -> str:
    rel = path.relative_to(LIB).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def our_imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kalm_lib"):
            parts = node.module.split(".")
            if len(parts) == 1:  # from kalm_lib import x, y
                for alias in node.names:
                    yield alias.name, node.lineno
            else:
                yield parts[1], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kalm_lib."):
                    yield alias.name.split(".")[1], node.lineno


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(LIB)))
def test_layering(path):
    unit = unit_of(path)
    if unit == "cli" or path.name == "cli.py":
        return  # entry points may dispatch to anything
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = []
    for target, line in our_imports(tree):
        if target == unit or target == "__version__":
            continue
        if unit in CORE:
            ok = target in CORE and CORE_ORDER.index(target) < CORE_ORDER.index(unit)
        else:
            ok = target in CORE or target in ALLOWED[unit]
        if not ok:
            bad.append(f"line {line}: {unit} imports {target}")
    assert not bad, f"{path.relative_to(LIB)} breaks the layering of docs/ARCHITECTURE.md: {bad}"


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        if len(body) == 1:
            return 0
        first = body[1]
    return fn.end_lineno - first.lineno + 1


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(LIB)))
def test_no_function_over_80_lines(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [f"{n.name} (line {n.lineno}): {_body_lines(n)} lines" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(n) > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(LIB)}: functions over {MAX_FUNCTION_LINES} lines (docstrings aside): {long}"


PACKAGES = sorted(p.parent for p in LIB.glob("*/__init__.py"))


@pytest.mark.parametrize("init", [p / "__init__.py" for p in PACKAGES], ids=lambda p: p.parent.name)
def test_package_api_is_curated(init):
    text = init.read_text(encoding="utf-8")
    assert "noqa" not in text, f"{init}: no noqa re-export shims"
    tree = ast.parse(text)
    exported = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            exported = ast.literal_eval(node.value)
    assert exported is not None, f"{init}: the public API is declared with __all__"
    private = [name for name in exported if name.startswith("_")]
    assert not private, f"{init}: private names re-exported: {private}"
    defined = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            defined |= {a.asname or a.name for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    missing = sorted(set(exported) - defined)
    assert not missing, f"{init}: __all__ names nothing defines or imports: {missing}"


def test_library_has_no_argparse_outside_entry_points():
    offenders = [str(p.relative_to(LIB)) for p in modules()
                 if p.name != "cli.py" and "argparse" in p.read_text(encoding="utf-8")
                 and "import argparse" in p.read_text(encoding="utf-8")]
    assert not offenders, f"argparse belongs in the packages' cli.py entry points: {offenders}"
