"""Typed configs from YAML: unknown keys and wrong types are errors that name the key and the file.

Each stage declares its knobs as a dataclass next to the code that uses them; this module only turns
YAML/dicts into those dataclasses, strictly. Presets live in ``configs/`` (one YAML per stage).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
HOME_ENV = "KALM_HOME"
# the folders of the workbench besides the library: a checkout has them at its root; a wheel carries a copy in
# kalm_lib/_home/ (setup.py puts it there)
HOME_DIRS = ("configs", "notebooks", "data", "data_cards")
INSTALLED_HOME = Path(__file__).resolve().parent / "_home"


def _workbench_home() -> Path:
    """Where configs/, notebooks/ and data/ are (``REPO_ROOT``), in this order: ``$KALM_HOME`` (a checkout the
    user points at); the checkout this kalm_lib is in (a source tree or an editable install: kalm_lib's parent
    holds pyproject.toml and configs/); else the copy installed with the package (``kalm_lib/_home/``)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser().resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir():
        return checkout
    return INSTALLED_HOME


REPO_ROOT = _workbench_home()   # the one definition of where the workbench's files are
CONFIG_DIR = REPO_ROOT / "configs"
# configs/<kind>/ folders; a bare name of one of these kinds resolves to configs/<kind>/<name>.yaml
CONFIG_KINDS = ("presets", "train", "curation", "eval", "soup", "ablations", "accelerate")
# YAML 1.1 (PyYAML) reads "5e-4" and "1e-5" as strings (it wants a dot); users mean numbers
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, missing required value."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping top level is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:  # includes !!python tags, which safe_load refuses
        hint = ("; configs are plain YAML (a !!python tag would run code, so it is refused)"
                if "python/" in str(e) else "")
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}{hint}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _check(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in args:
            try:
                return _check(value, arm, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if origin is typing.Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:
            value = "on" if value else "off"   # YAML 1.1 reads a bare on/off as a boolean
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        items = [_check(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        kt, vt = args if args else (Any, Any)
        return {_check(k, kt, f"{where} key"): _check(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _check(value, hints[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain dict (for YAML/JSON provenance)."""
    return dataclasses.asdict(obj)


def parse_value(text: Any) -> Any:
    """An override value as the user meant it: YAML (``true``, ``[64, 128]``, ``{a: 1}``), numbers as numbers.

    Unlike plain PyYAML, ``5e-4`` and ``1e-5`` are floats. A non-string is returned unchanged.
    """
    if not isinstance(text, str):
        return text
    if _FLOAT.match(text.strip()):
        number = float(text)
        return int(number) if re.fullmatch(r"[-+]?\d+", text.strip()) else number
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override value {text!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    return value


def split_override(override: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", parsed value)``; the one override syntax of every subcommand."""
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value (dotted keys for nested settings)")
    key, value = override.split("=", 1)
    key = key.strip()
    if not key or any(not part.strip() for part in key.split(".")):
        raise ConfigError(f"override {override!r}: empty key")
    return key, parse_value(value)


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed by :func:`parse_value`) to a nested dict, returning a copy."""
    out = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else (split_override(o) for o in overrides)
    for key, value in items:
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a mapping")
        node[parts[-1]] = parse_value(value)
    return out


def resolve_config(spec: str | os.PathLike, kind: str | None = None) -> Path:
    """The one rule for finding a config file, used by every loader and notebook.

    Tried in order: ``spec`` as given (absolute or relative to the working directory), relative to the
    repository root (notebooks run from ``notebooks/``), then, for a bare name, ``configs/<kind>/<spec>.yaml``.
    A miss is a :class:`FileNotFoundError` that lists what was tried and the known names of that kind.
    """
    if kind is not None and kind not in CONFIG_KINDS:
        raise ValueError(f"unknown config kind {kind!r}; known: {list(CONFIG_KINDS)}")
    path = Path(spec)
    tried = [path, REPO_ROOT / path]
    if kind is not None and path.suffix not in (".yaml", ".yml"):
        tried.append(CONFIG_DIR / kind / f"{spec}.yaml")
    for candidate in tried:
        if candidate.is_file():
            return candidate.resolve()
    known = sorted(p.relative_to(CONFIG_DIR / kind).with_suffix("").as_posix()
                   for p in (CONFIG_DIR / kind).rglob("*.yaml")) if kind else []
    hint = f"; known {kind} configs: {known}" if kind else ""
    raise FileNotFoundError(f"config not found: {spec} (tried {', '.join(str(t) for t in dict.fromkeys(tried))}){hint}")


def load_config_data(spec: str | os.PathLike | dict[str, Any], kind: str | None = None,
                     overrides: list[str] | dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Resolve (:func:`resolve_config`), read (:func:`load_yaml`) and override a config -> ``(data, where)``.

    ``spec`` may already be a mapping (``where`` is then ``"config"``).
    """
    if isinstance(spec, dict):
        data, where = copy.deepcopy(spec), "config"
    else:
        path = resolve_config(spec, kind)
        data, where = load_yaml(path), str(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return data, where
