"""Declarative ablation grids: ``configs/ablations/<name>.yaml`` -> cells (one config each) x seeds.

A grid file names switches from :data:`~kalm_lib.ablations.switches.SWITCHES` and the values to try::

    description: focal and mixing on MiniLM
    design: one_at_a_time        # each switch varied alone against the full recipe; or: factorial
    seeds: [0, 1, 2]
    base_overrides: {model.name: minilm, train.max_steps: 40}   # every cell, including the full recipe
    switches:
      focal: [false]
      hard_negative_mixing: [off, listwise]
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import pandas as pd

from kalm_lib.ablations.switches import SWITCHES, GridError, value_label
from kalm_lib.config import from_dict, load_config_data

BASELINE = "full"  # the name of the full-recipe cell, the baseline of every delta


@dataclass
class GridSpec:
    """A grid file (configs/ablations/<name>.yaml)."""

    switches: dict[str, list[Any]]
    description: str = ""
    design: Literal["one_at_a_time", "factorial"] = "one_at_a_time"
    seeds: list[int] = field(default_factory=lambda: [0])
    baseline: dict[str, Any] = field(default_factory=dict)        # full-recipe values (else registry defaults)
    base_overrides: dict[str, Any] = field(default_factory=dict)  # dotted overrides for every cell
    name: str = ""

    @property
    def mentioned(self) -> list[str]:
        """Every switch the grid names (varied or fixed in ``baseline``), in file order."""
        return list(dict.fromkeys([*self.switches, *self.baseline]))


@dataclass
class Cell:
    """One configuration of the grid: the switch assignment and the dotted overrides it implies."""

    name: str
    switches: dict[str, Any]      # every switch the grid mentions -> value in this cell
    changed: dict[str, Any]       # those that differ from the full recipe
    overrides: dict[str, Any]     # base_overrides + switch overrides (dotted keys)

    @property
    def is_baseline(self) -> bool:
        return not self.changed

    def as_config(self) -> dict[str, Any]:
        """The ``cell_config`` handed to ``run_fn``: plain JSON-able dict."""
        return {"cell": self.name, "switches": jsonable(self.switches), "changed": jsonable(self.changed),
                "overrides": jsonable(self.overrides)}


def jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    """Switch values as JSON/YAML can hold them (dims tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_grid(grid: str | os.PathLike | Mapping[str, Any], where: str | None = None) -> GridSpec:
    """Load and check a grid: a name in ``configs/ablations/``, a YAML path (found by
    :func:`kalm_lib.config.resolve_config`) or a dict. Errors name the file and the switch."""
    if isinstance(grid, Mapping):  # a copy: checking normalises the values in place
        data, _ = load_config_data(dict(grid))
        where, name = where or "grid", data.get("name", "grid")
    else:
        data, where = load_config_data(grid, "ablations")
        name = Path(where).stem
    spec = from_dict(GridSpec, data, where=where)
    spec.name = spec.name or name
    unknown = sorted((set(spec.switches) | set(spec.baseline)) - set(SWITCHES))
    if unknown:
        raise GridError(f"{where}: unknown switch(es) {unknown}; known switches: {sorted(SWITCHES)}")
    if not spec.switches:
        raise GridError(f"{where}: the grid varies no switch")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise GridError(f"{where}: seeds must be a non-empty list without repeats, got {spec.seeds}")
    for sw, values in spec.switches.items():
        if not values:
            raise GridError(f"{where}: switch {sw} lists no values")
        checked = [SWITCHES[sw].check(v, f"{where}: switches.{sw}") for v in values]
        if len(set(map(value_label, checked))) != len(checked):
            raise GridError(f"{where}: switch {sw} lists a value twice: {values}")
        spec.switches[sw] = checked
    for sw, v in spec.baseline.items():
        spec.baseline[sw] = SWITCHES[sw].check(v, f"{where}: baseline.{sw}")
    _check_conflicts(spec, where)
    return spec


def _check_conflicts(spec: GridSpec, where: str) -> None:
    """Two switches of one grid may not write the same config key (focal reads focal_gamma by design)."""
    writers: dict[str, str] = {}
    for sw in spec.mentioned:
        for key in SWITCHES[sw].keys:
            other = writers.setdefault(key, sw)
            if other != sw and {other, sw} != {"focal", "focal_gamma"}:
                raise GridError(f"{where}: switches {other} and {sw} both set {key}; use one of them")


def _cell(spec: GridSpec, assignment: dict[str, Any], full: dict[str, Any]) -> Cell:
    changed = {k: v for k, v in assignment.items() if value_label(v) != value_label(full[k])}
    name = BASELINE if not changed else ",".join(f"{k}={value_label(v)}" for k, v in changed.items())
    overrides = dict(spec.base_overrides)
    for sw, v in assignment.items():
        overrides.update(SWITCHES[sw].overrides(v, assignment))
    return Cell(name, dict(assignment), changed, overrides)


def expand(spec: GridSpec) -> list[Cell]:
    """The grid's cells, full recipe first.

    one_at_a_time: the full recipe + one cell per (switch, value != full-recipe value).
    factorial: the cartesian product of the listed values (+ the full recipe if it is not in it).
    """
    full = {sw: spec.baseline.get(sw, SWITCHES[sw].default) for sw in spec.mentioned}
    cells = [_cell(spec, dict(full), full)]
    if spec.design == "one_at_a_time":
        for sw, values in spec.switches.items():
            for v in values:
                if value_label(v) != value_label(full[sw]):
                    cells.append(_cell(spec, {**full, sw: v}, full))
    else:
        names = list(spec.switches)
        for combo in itertools.product(*(spec.switches[n] for n in names)):
            cell = _cell(spec, {**full, **dict(zip(names, combo))}, full)
            if not cell.is_baseline:
                cells.append(cell)
    return cells


def expand_runs(spec: GridSpec, seeds: list[int] | None = None) -> list[tuple[Cell, int]]:
    """Every (cell, seed) run of the grid, cells in order, seeds inner."""
    return [(c, s) for c in expand(spec) for s in (seeds if seeds is not None else spec.seeds)]


def cells_table(cells: list[Cell]) -> pd.DataFrame:
    """One row per cell: its name, the switches it changes and the overrides it writes."""
    return pd.DataFrame([{"cell": c.name, "changed": jsonable(c.changed), "overrides": jsonable(c.overrides)}
                         for c in cells])
