"""Declarative ablation grids over the recipe's switches: ``kalm ablate --grid configs/ablations/<name>.yaml``.

A grid file names switches from :data:`SWITCHES` and the values to try; it expands to cells (one config
each) x seeds. Each switch maps to dotted overrides of the trainer's stage config (one table,
:data:`OVERRIDE_KEYS`). A run is ``run_fn(cell_config, seed) -> {task: score}``; any function with that
signature plugs in (the trainer's adapter, or a test function). Results go to
``<run_dir>/ablations/results.csv`` (one row per cell, seed, task), and :func:`aggregate` turns them into
deltas against the full recipe with mean, std and n across seeds (paired by seed)::

    description: focal and mixing on MiniLM
    design: one_at_a_time        # each switch varied alone against the full recipe; or: factorial
    seeds: [0, 1, 2]
    base_overrides: {model.name: minilm, train.max_steps: 40}   # every cell, including the full recipe
    switches:
      focal: [false]
      hard_negative_mixing: [off, listwise]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from kalm_lib import provenance
from kalm_lib.config import ConfigError, from_dict, load_yaml

GRIDS_DIR = provenance.REPO_ROOT / "configs" / "ablations"
RESULTS = "ablations/results.csv"
BASELINE = "full"
TASK_TYPES = ("retrieval", "reranking", "sts", "pair_classification", "classification", "clustering",
              "nli", "pretrain")

# The one table of config keys the switches write, as dotted paths. ``model.*`` and ``loss.*`` are keys of
# kalm_lib.train's StageConfig (pass them as ``train(config, overrides)``); ``stages.*`` and ``soup.*`` are
# for the run_fn adapter itself (whether to pre-train first, whether to soup). Align names here, only here.
OVERRIDE_KEYS = {
    "focal_gamma": "loss.focal_gamma",
    "mix_mode": "loss.mix_mode",
    "in_batch_by_task": "loss.in_batch_by_task",      # + ".<task_type>"
    "matryoshka_dims": "loss.matryoshka_dims",
    "temperature": "loss.temperature",
    "pretrain_enabled": "stages.pretrain.enabled",
    "soup_mode": "soup.mode",
    "bidirectional": "model.bidirectional",
    "pooling": "model.pooling",
}


class GridError(ConfigError):
    """A grid that cannot run: unknown switch, bad value, conflicting switches, empty seeds."""


# ---------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Switch:
    """A recipe switch: allowed values, its value in the full recipe, and the overrides it writes.

    ``overrides(value, assignment)`` gets the switch's value and the whole cell's switch assignment
    (so ``focal`` can read ``focal_gamma``); ``keys`` lists the config keys it may write, for conflicts.
    """

    name: str
    help: str
    default: Any
    kind: Literal["bool", "choice", "float", "dims"]
    overrides: Callable[[Any, Mapping[str, Any]], dict[str, Any]]
    keys: tuple[str, ...] = ()
    choices: tuple[Any, ...] = ()

    def check(self, value: Any, where: str) -> Any:
        """Normalise and validate a value for this switch (YAML's on/off are booleans)."""
        if self.kind == "bool":
            if isinstance(value, str) and value.lower() in ("on", "off", "true", "false"):
                value = value.lower() in ("on", "true")
            if not isinstance(value, bool):
                raise GridError(f"{where}: switch {self.name} takes true/false (on/off), got {value!r}")
        elif self.kind == "choice":
            if value is False and "off" in self.choices:  # YAML reads a bare `off` as false
                value = "off"
            if value not in self.choices:
                raise GridError(f"{where}: switch {self.name} takes one of {list(self.choices)}, got {value!r}")
        elif self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise GridError(f"{where}: switch {self.name} takes a number, got {value!r}")
            value = float(value)
            if self.name == "temperature" and value <= 0:
                raise GridError(f"{where}: switch temperature must be > 0, got {value}")
            if self.name == "focal_gamma" and value < 0:
                raise GridError(f"{where}: switch focal_gamma must be >= 0, got {value}")
        elif self.kind == "dims":
            if isinstance(value, list):
                if not value or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value):
                    raise GridError(f"{where}: switch {self.name} takes true/false or a list of positive "
                                    f"dims, got {value!r}")
                value = tuple(value)
            elif not isinstance(value, bool):
                raise GridError(f"{where}: switch {self.name} takes true/false or a list of dims, got {value!r}")
        return value


def _const(key: str, mapping: Mapping[Any, Any] | None = None):
    return lambda v, _a: {key: mapping[v] if mapping is not None else v}


def _focal(on: bool, assignment: Mapping[str, Any]) -> dict[str, Any]:
    gamma = assignment.get("focal_gamma", SWITCHES["focal_gamma"].default)
    return {OVERRIDE_KEYS["focal_gamma"]: gamma if on else 0.0}


def _matryoshka(value: Any, _a: Mapping[str, Any]) -> dict[str, Any]:
    # on: keep the stage config's dims (they depend on the model's width); off: no truncated losses
    if value is True:
        return {}
    return {OVERRIDE_KEYS["matryoshka_dims"]: None if value is False else list(value)}


def _registry() -> dict[str, Switch]:
    k = OVERRIDE_KEYS
    switches = [
        Switch("focal", "focal-style reweighting of the InfoNCE terms (w = (1-p)^gamma); off = gamma 0",
               True, "bool", _focal, (k["focal_gamma"],)),
        Switch("focal_gamma", "gamma of the focal weights when focal is on (paper: 0.5)",
               0.5, "float", lambda v, a: {} if "focal" in a else {k["focal_gamma"]: v}, (k["focal_gamma"],)),
        Switch("hard_negative_mixing", "online hard-negative mixing in embedding space",
               "pairwise", "choice", _const(k["mix_mode"], {"off": "none", "pairwise": "pairwise",
                                                             "listwise": "listwise"}),
               (k["mix_mode"],), ("off", "pairwise", "listwise")),
        Switch("stage1", "weakly-supervised pre-training stage before fine-tuning",
               True, "bool", _const(k["pretrain_enabled"]), (k["pretrain_enabled"],)),
        Switch("matryoshka", "Matryoshka losses at truncated dims (true: the config's dims; or a list)",
               True, "dims", _matryoshka, (k["matryoshka_dims"],)),
        Switch("soup", "final model: parameter-averaged soup or the best single checkpoint",
               "soup", "choice", _const(k["soup_mode"]), (k["soup_mode"],), ("soup", "best_single")),
        Switch("temperature", "InfoNCE temperature tau (paper: 0.01)",
               0.01, "float", _const(k["temperature"]), (k["temperature"],)),
        Switch("architecture", "decoder attention + pooling: the paper's bidirectional+mean vs causal+last-token",
               "bidirectional_mean", "choice",
               lambda v, _a: {k["bidirectional"]: v == "bidirectional_mean",
                              k["pooling"]: "mean" if v == "bidirectional_mean" else "last"},
               (k["bidirectional"], k["pooling"]), ("bidirectional_mean", "causal_last")),
        Switch("bidirectional", "remove the causal mask (for factorial attention x pooling grids)",
               True, "bool", _const(k["bidirectional"]), (k["bidirectional"],)),
        Switch("pooling", "pooling over tokens (for factorial attention x pooling grids)",
               "mean", "choice", _const(k["pooling"]), (k["pooling"],), ("mean", "last", "cls")),
    ]
    # in-batch negatives per task type: false negatives for classification/clustering, so off there (paper)
    for tt in TASK_TYPES:
        key = f"{k['in_batch_by_task']}.{tt}"
        switches.append(Switch(f"in_batch.{tt}", f"in-batch negatives for {tt} batches",
                               tt not in ("classification", "clustering"), "bool", _const(key), (key,)))
    return {s.name: s for s in switches}


SWITCHES: dict[str, Switch] = _registry()


# ---------------------------------------------------------------------------------------------- grids
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
        return {"cell": self.name, "switches": _jsonable(self.switches), "changed": _jsonable(self.changed),
                "overrides": _jsonable(self.overrides)}


def split_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer StageConfig overrides, adapter overrides): ``stages.*`` / ``soup.*`` keys are not
    StageConfig keys; a run_fn adapter acts on them (skip pre-training, soup vs best checkpoint)."""
    adapter = {k: v for k, v in overrides.items() if k.split(".", 1)[0] in ("stages", "soup")}
    return {k: v for k, v in overrides.items() if k not in adapter}, adapter


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, tuple):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def load_grid(grid: str | Path | Mapping[str, Any], where: str | None = None) -> GridSpec:
    """Load and validate a grid (name in configs/ablations/, a path, or a dict); errors name the switch."""
    if isinstance(grid, Mapping):
        data, where, name = dict(grid), where or "grid", dict(grid).get("name", "grid")
    else:
        path = Path(grid)
        if not path.is_file() and (GRIDS_DIR / f"{grid}.yaml").is_file():
            path = GRIDS_DIR / f"{grid}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))
            raise GridError(f"grid file not found: {grid} (grids in {GRIDS_DIR}: {known})")
        data, where, name = load_yaml(path), str(path), path.stem
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
        if len(set(map(_fmt, checked))) != len(checked):
            raise GridError(f"{where}: switch {sw} lists a value twice: {values}")
        spec.switches[sw] = checked
    for sw, v in spec.baseline.items():
        spec.baseline[sw] = SWITCHES[sw].check(v, f"{where}: baseline.{sw}")
    mentioned = list(dict.fromkeys([*spec.switches, *spec.baseline]))
    writers: dict[str, str] = {}
    for sw in mentioned:
        for key in SWITCHES[sw].keys:
            other = writers.setdefault(key, sw)
            if other != sw and {other, sw} != {"focal", "focal_gamma"}:  # focal reads focal_gamma by design
                raise GridError(f"{where}: switches {other} and {sw} both set {key}; use one of them")
    return spec


def _cell(spec: GridSpec, assignment: dict[str, Any], full: dict[str, Any]) -> Cell:
    changed = {k: v for k, v in assignment.items() if _fmt(v) != _fmt(full[k])}
    name = BASELINE if not changed else ",".join(f"{k}={_fmt(v)}" for k, v in changed.items())
    overrides = dict(spec.base_overrides)
    for sw, v in assignment.items():
        overrides.update(SWITCHES[sw].overrides(v, assignment))
    return Cell(name, dict(assignment), changed, overrides)


def expand(spec: GridSpec) -> list[Cell]:
    """The grid's cells, full recipe first.

    one_at_a_time: the full recipe + one cell per (switch, value != full-recipe value).
    factorial: the cartesian product of the listed values (+ the full recipe if it is not in it).
    """
    mentioned = list(dict.fromkeys([*spec.switches, *spec.baseline]))
    full = {sw: spec.baseline.get(sw, SWITCHES[sw].default) for sw in mentioned}
    cells = [_cell(spec, dict(full), full)]
    if spec.design == "one_at_a_time":
        for sw, values in spec.switches.items():
            for v in values:
                if _fmt(v) != _fmt(full[sw]):
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


# ---------------------------------------------------------------------------------------------- running
RunFn = Callable[[dict[str, Any], int], Mapping[str, Any]]


def load_run_fn(spec: str) -> RunFn:
    """``"module:function"`` or ``"path/to/file.py:function"`` -> the function (e.g. the trainer's adapter)."""
    if ":" not in spec:
        raise GridError(f"runner {spec!r} must look like module:function or file.py:function")
    mod, fn = spec.rsplit(":", 1)
    try:
        if mod.endswith(".py"):
            if not Path(mod).is_file():
                raise ImportError(f"no file {mod}")
            module_spec = importlib.util.spec_from_file_location(Path(mod).stem, mod)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod)
        return getattr(module, fn)
    except (ImportError, AttributeError) as e:
        raise GridError(f"runner {spec!r} cannot be loaded ({e}); a runner is a function "
                        "run_fn(cell_config: dict, seed: int) -> {task: score}") from None


def _score_rows(cell: Cell, seed: int, scores: Mapping[str, Any], task_types: Mapping[str, str]):
    if not scores:
        raise GridError(f"run_fn returned no scores for cell {cell.name}, seed {seed}")
    for task, value in scores.items():
        if isinstance(value, Mapping):  # {"score": x, "task_type": t}
            score, ttype = value.get("score", value.get("main_score")), value.get("task_type")
        else:
            score, ttype = value, None
        ttype = ttype or task_types.get(task, "unknown")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise GridError(f"cell {cell.name}, seed {seed}, task {task}: score {score!r} is not a finite number")
        yield task, ttype, float(score)


def _write_csv(df, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def run_grid(spec: GridSpec, run_fn: RunFn, run_dir: str | Path, *, seeds: list[int] | None = None,
             task_types: Mapping[str, str] | None = None, resume: bool = True, progress: bool = True):
    """Run every (cell, seed) through ``run_fn`` and write ``<run_dir>/ablations/results.csv``.

    The CSV is rewritten (temp + rename) after every run, so an interrupted grid resumes: runs whose
    (cell, seed, overrides hash, runner hash) are already in the file are not run again; the runner hash is
    ``run_fn.signature()`` hashed when the runner has one (configs, evaluation), else its name. Rows of
    this grid's runs no longer wanted are dropped. Several grids share the file (its ``grid`` column): the
    rows of other grids are kept as they are. ``run_fn`` gets the cell config with the grid's name added
    (``cell_config["grid"]``). Returns this grid's rows.
    """
    import pandas as pd

    # text progress bar in headless runs (a notebook widget bar does not survive the HTML export)
    if os.environ.get("KALM_HEADLESS") == "1":
        from tqdm import tqdm
    else:
        from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    out = run_dir / RESULTS
    runs = expand_runs(spec, seeds)
    task_types = dict(task_types or {})
    switch_cols = [f"sw.{s}" for s in runs[0][0].switches]
    # what else decides a score: the runner's own settings (configs, evaluation), when it states them
    rhash = provenance.config_hash(run_fn.signature()) if hasattr(run_fn, "signature") else \
        f"{getattr(run_fn, '__module__', '')}.{getattr(run_fn, '__qualname__', type(run_fn).__name__)}"
    keys = {(c.name, s, provenance.config_hash(c.as_config()["overrides"]), rhash): (c, s) for c, s in runs}
    # resume: keep the rows of runs that are still wanted with the same overrides and runner; the file
    # is rewritten from these, so stale rows (changed grid, seeds or runner) do not linger in it
    rows, others = [], []
    if out.is_file():
        existing = pd.read_csv(out)
        if "runner_hash" not in existing:
            existing["runner_hash"] = None
        mine = existing["grid"].astype(str) == spec.name
        others = existing[~mine].to_dict("records")
        if resume:
            rows = [r for r in existing[mine].to_dict("records")
                    if (r["cell"], int(r["seed"]), r["overrides_hash"], r["runner_hash"]) in keys]
    done = {(r["cell"], int(r["seed"]), r["overrides_hash"], r["runner_hash"]) for r in rows}
    if hasattr(run_fn, "check"):  # a runner may refuse switches it cannot act on, before any work
        run_fn.check(spec)
    provenance.write(provenance_path(run_dir, spec.name), provenance.collect(
        config={"grid": spec.name, "design": spec.design, "switches": _jsonable(spec.switches),
                "baseline": _jsonable(spec.baseline), "base_overrides": spec.base_overrides},
        seed=None, seeds=list(seeds if seeds is not None else spec.seeds),
        cells=[c.as_config() for c in expand(spec)]))
    for key, (cell, seed) in tqdm(list(keys.items()), desc=f"ablation grid {spec.name}", disable=not progress):
        if key in done:
            continue
        ohash = key[2]
        scores = run_fn({**cell.as_config(), "grid": spec.name}, seed)
        for task, ttype, score in _score_rows(cell, seed, scores, task_types):
            rows.append({"grid": spec.name, "cell": cell.name, "is_baseline": cell.is_baseline, "seed": seed,
                         "task": task, "task_type": ttype, "score": score, "overrides_hash": ohash,
                         "runner_hash": rhash, **{f"sw.{k}": _fmt(v) for k, v in cell.switches.items()}})
        _write_csv(pd.DataFrame(others + rows), out)
    _write_csv(pd.DataFrame(others + rows), out)  # also when nothing ran: stale rows were dropped
    df = pd.DataFrame(rows)
    keep = [c for c in ["grid", "cell", "is_baseline", "seed", "task", "task_type", "score", "overrides_hash",
                        "runner_hash",
                        *switch_cols] if c in df.columns]
    return df[keep + [c for c in df.columns if c not in keep]]


def provenance_path(run_dir: str | Path, grid: str) -> Path:
    """Where :func:`run_grid` records a grid's provenance: ``<run_dir>/ablations/provenance/<grid>.json``."""
    return Path(run_dir) / "ablations" / "provenance" / f"{_safe_name(grid)}.json"


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "=.-_" else "_" for ch in str(name))


def read_results(run_dir: str | Path, grid: str | None = None):
    """``<run_dir>/ablations/results.csv`` as a DataFrame (FileNotFoundError naming the path); with
    ``grid``, only that grid's rows (ValueError listing the grids present when it has none)."""
    import pandas as pd

    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"no ablation results at {path}")
    df = pd.read_csv(path)
    if grid is None:
        return df
    part = df[df["grid"].astype(str) == grid].reset_index(drop=True)
    if part.empty:
        raise ValueError(f"{path} has no rows of grid {grid!r} (grids: {sorted(set(df['grid'].astype(str)))})")
    return part


# ---------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainerRunFn:
    """A ``run_fn`` that trains with :func:`kalm_lib.train.train` and scores the result.

    Per (cell, seed), under ``<run_dir>/ablations/cells/<grid>/<cell>/seed<seed>/``: optionally pre-train
    (``pretrain_config``; skipped when the cell sets ``stages.pretrain.enabled: false``), fine-tune
    (``finetune_config``, starting from the pre-trained model), then ``evaluate_fn(model_dir, out_dir)``
    -> ``{task: {"score", "task_type"}}`` (default: :mod:`kalm_lib.evaluate` with ``eval_config``).
    The cell's ``model.*``/``loss.*``/... overrides go to the trainer's StageConfig (``model.*`` to both
    stages); ``train.seed`` is the run's seed. Configs are YAML paths or dicts.

    When the grid mentions the ``soup`` switch, every cell is scored on its fine-tuning checkpoints instead
    of the final model: ``soup`` = the uniform soup of the checkpoints kept (written to ``<cell>/soup``),
    ``best_single`` = the checkpoint with the best mean score. The best single checkpoint is picked on the
    same dev tasks it is scored on, an optimistic single-model baseline, so a soup gain is conservative.
    """

    finetune_config: str | dict[str, Any]
    run_dir: str | Path
    pretrain_config: str | dict[str, Any] | None = None
    eval_config: str | None = None
    finetune_overrides: dict[str, Any] = field(default_factory=dict)   # e.g. {"data.train_file": ...}
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)
    eval_overrides: list[str] = field(default_factory=list)
    evaluate_fn: Callable[[Path, Path], Mapping[str, Any]] | None = None
    keep_models: bool = False   # False: delete a cell's checkpoints once it is scored (GBs per grid)

    def check(self, spec: GridSpec) -> None:
        """Refuse, before any training, switches this runner cannot act on."""
        mentioned = set(spec.switches) | set(spec.baseline)
        if "soup" in mentioned:  # soup ingredients: the fine-tuning checkpoints each cell keeps
            from kalm_lib import train as trainer

            base_trainer_ov = split_overrides(spec.base_overrides)[0]
            cfg = trainer.load_config(self.finetune_config, {**self.finetune_overrides, **base_trainer_ov})
            ck, steps = cfg.checkpoint, cfg.train.max_steps
            kept = 0 if ck.every_steps <= 0 else min(ck.keep_last, steps // ck.every_steps if steps else 2)
            if kept < 2:
                raise GridError(f"grid {spec.name}: the soup switch needs >= 2 fine-tuning checkpoints per cell; "
                                f"the finetune config keeps {kept} (checkpoint.every_steps={ck.every_steps}, "
                                f"keep_last={ck.keep_last}, train.max_steps={steps})")
        if "stage1" in mentioned and self.pretrain_config is None:
            raise GridError(f"grid {spec.name}: switch stage1 needs a pretrain_config for the runner")

    def signature(self) -> dict[str, Any]:
        """What besides the cell and seed decides its scores (part of run_grid's resume key)."""
        return {"finetune": self.finetune_config, "pretrain": self.pretrain_config, "eval": self.eval_config,
                "finetune_overrides": self.finetune_overrides, "pretrain_overrides": self.pretrain_overrides,
                "eval_overrides": self.eval_overrides, "evaluate_fn": repr(self.evaluate_fn)}

    def cell_dir(self, cell: str, seed: int, grid: str | None = None) -> Path:
        """``<run_dir>/ablations/cells[/<grid>]/<cell>/seed<seed>`` (grids share cell names such as full)."""
        base = Path(self.run_dir) / "ablations" / "cells"
        return (base / _safe_name(grid) if grid else base) / _safe_name(cell) / f"seed{seed}"

    def __call__(self, cell_config: dict[str, Any], seed: int) -> Mapping[str, Any]:
        from kalm_lib import train as trainer

        trainer_ov, adapter_ov = split_overrides(cell_config["overrides"])
        out = self.cell_dir(cell_config["cell"], seed, cell_config.get("grid"))
        start_from = None
        if self.pretrain_config is not None and adapter_ov.get(OVERRIDE_KEYS["pretrain_enabled"], True):
            model_ov = {k: v for k, v in trainer_ov.items() if k.startswith("model.")}
            pre = trainer.train(trainer.load_config(self.pretrain_config, {
                **self.pretrain_overrides, **model_ov, "train.seed": seed, "output_dir": str(out / "pretrain")}))
            start_from = pre.final_model
        ft_ov = {**self.finetune_overrides, **trainer_ov, "train.seed": seed, "output_dir": str(out / "finetune")}
        if start_from is not None:
            ft_ov["model.name_or_path"] = str(start_from)
        result = trainer.train(trainer.load_config(self.finetune_config, ft_ov))
        if result.final_model is None:
            raise GridError(f"cell {cell_config['cell']}, seed {seed}: training wrote no final model in {out}")
        evaluate_fn = self.evaluate_fn or self._evaluate
        import shutil

        shutil.rmtree(out / "eval", ignore_errors=True)  # results of an earlier attempt must not be read back
        soup_mode = adapter_ov.get(OVERRIDE_KEYS["soup_mode"])
        if soup_mode is None:
            scores = evaluate_fn(Path(result.final_model), out / "eval")
        else:
            scores = self._score_checkpoints(out, soup_mode, evaluate_fn, f"cell {cell_config['cell']}, seed {seed}")
        if not self.keep_models:  # metrics.jsonl, provenance and eval results stay
            for stage_dir in (out / "pretrain", out / "finetune"):
                for model_dir in [*stage_dir.glob("checkpoint-*"), stage_dir / "final"]:
                    shutil.rmtree(model_dir, ignore_errors=True)
            shutil.rmtree(out / "soup", ignore_errors=True)
        return scores

    @staticmethod
    def _score_checkpoints(out: Path, soup_mode: str, evaluate_fn, where: str) -> Mapping[str, Any]:
        """Soup switch: the uniform soup of the cell's checkpoints, or its best single checkpoint."""
        from kalm_lib import soup as souping

        try:
            ckpts = souping.find_ingredients([str(out / "finetune" / "checkpoint-*")])
        except FileNotFoundError:
            ckpts = []
        if len(ckpts) < 2:
            raise GridError(f"{where}: the soup switch needs >= 2 checkpoints in {out / 'finetune'}, found "
                            f"{len(ckpts)}")
        if soup_mode == "soup":
            ings = souping.load_ingredients(ckpts)
            model = souping.write_soup(ings, souping.uniform_weights(len(ings)), out / "soup",
                                       extra={"recipe": "uniform"})
            return evaluate_fn(model, out / "eval")
        per_ckpt = {Path(c).name: evaluate_fn(Path(c), out / "eval" / Path(c).name) for c in ckpts}

        def mean_score(scores: Mapping[str, Any]) -> float:
            vals = [v["score"] if isinstance(v, Mapping) else v for v in scores.values()]
            return sum(vals) / len(vals)

        best = max(per_ckpt, key=lambda name: mean_score(per_ckpt[name]))
        return per_ckpt[best]

    def _evaluate(self, model_dir: Path, out_dir: Path) -> dict[str, Any]:
        from kalm_lib import evaluation as evaluate

        config = evaluate.load_eval_config(self.eval_config, [*self.eval_overrides, "dims=[]"])
        evaluate.run_eval(str(model_dir), config, out_dir)
        per_task = evaluate.task_scores(evaluate.load_results(out_dir))
        return {r.task: {"score": float(r.main_score), "task_type": r.type} for r in per_task.itertuples()}


def _repo_path(path: str | None) -> str | None:
    """A config path as given if it exists (or is absolute), else relative to the repository root
    (notebooks run with their own folder as the working directory)."""
    if path is None or Path(path).is_absolute() or Path(path).exists():
        return path
    return str(provenance.REPO_ROOT / path)


def make_run_fn(runner: str, run_dir: str | Path, *, finetune_config: str | None = None,
                pretrain_config: str | None = None, eval_config: str | None = None,
                train_overrides: Mapping[str, Any] | None = None,
                eval_overrides: list[str] | None = None, keep_models: bool = False) -> RunFn:
    """``"trainer"`` -> :class:`TrainerRunFn` on the run dir's curated data
    (``<run_dir>/curated/{finetune,pretrain}.jsonl`` when present); anything else -> :func:`load_run_fn`."""
    if runner != "trainer":
        return load_run_fn(runner)
    if not finetune_config:
        raise GridError("runner 'trainer' needs a finetune_config (a kalm_lib.train stage YAML)")
    curated = Path(run_dir) / "curated"
    ft_ov, pre_ov = dict(train_overrides or {}), dict(train_overrides or {})
    if (curated / "finetune.jsonl").is_file():
        ft_ov.setdefault("data.train_file", str(curated / "finetune.jsonl"))
    if (curated / "pretrain.jsonl").is_file():
        pre_ov.setdefault("data.train_file", str(curated / "pretrain.jsonl"))
    return TrainerRunFn(_repo_path(finetune_config), run_dir, pretrain_config=_repo_path(pretrain_config),
                        eval_config=_repo_path(eval_config), finetune_overrides=ft_ov, pretrain_overrides=pre_ov,
                        eval_overrides=list(eval_overrides or []), keep_models=keep_models)


# ---------------------------------------------------------------------------------------------- analysis
LEVELS = ("task", "task_type", "mtk", "mty")


def per_seed_scores(results, level: str = "task"):
    """Score per (cell, seed, group): a task's score; the mean over a task type's tasks; ``mtk`` = mean
    over tasks; ``mty`` = mean over task-type means (the paper's MTK/MTY)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    df = results[["cell", "seed", "task", "task_type", "score"]]
    if level == "task":
        out = df.rename(columns={"task": "group"})[["cell", "seed", "group", "score"]]
    elif level == "task_type":
        out = df.groupby(["cell", "seed", "task_type"], as_index=False)["score"].mean()
        out = out.rename(columns={"task_type": "group"})
    elif level == "mtk":
        out = df.groupby(["cell", "seed"], as_index=False)["score"].mean().assign(group="MTK")
    else:
        by_type = df.groupby(["cell", "seed", "task_type"], as_index=False)["score"].mean()
        out = by_type.groupby(["cell", "seed"], as_index=False)["score"].mean().assign(group="MTY")
    return out[["cell", "seed", "group", "score"]]


def aggregate(results, *, level: str = "mtk", baseline: str = BASELINE):
    """Deltas against ``baseline`` (default: the full recipe), paired by seed, per (cell, group).

    Columns: cell, group, score_mean (cell's mean score), baseline_mean, delta_mean, delta_std (sample std,
    ddof=1; NaN for one seed), n (seeds present in both). Baseline rows are included (delta 0). Results of
    several grids (a ``grid`` column with more than one value) are aggregated per grid, each against its
    own baseline cell, with a ``grid`` column added.
    """
    import pandas as pd

    if "grid" in results.columns and results["grid"].nunique() > 1:
        parts = [aggregate(part, level=level, baseline=baseline).assign(grid=str(g))
                 for g, part in results.groupby("grid", sort=False)]
        out = pd.concat(parts, ignore_index=True)
        out.attrs["baseline"] = baseline
        return out
    scores = per_seed_scores(results, level)
    if baseline not in set(scores["cell"]):
        raise ValueError(f"baseline cell {baseline!r} is not in the results (cells: {sorted(set(scores['cell']))})")
    base = scores[scores["cell"] == baseline][["seed", "group", "score"]].rename(columns={"score": "base"})
    paired = scores.merge(base, on=["seed", "group"], how="inner")
    paired["delta"] = paired["score"] - paired["base"]
    agg = paired.groupby(["cell", "group"], sort=False).agg(
        score_mean=("score", "mean"), baseline_mean=("base", "mean"), delta_mean=("delta", "mean"),
        delta_std=("delta", "std"), n=("delta", "size")).reset_index()
    order = {c: i for i, c in enumerate(dict.fromkeys(results["cell"]))}
    agg = agg.sort_values(["cell", "group"], key=lambda s: s.map(order) if s.name == "cell" else s)
    agg = pd.DataFrame(agg).reset_index(drop=True)
    agg.attrs["baseline"] = baseline
    return agg


def delta_figure(agg, title: str = "Ablation deltas vs the full recipe", include_baseline: bool = False):
    """Plotly bar chart: mean delta per cell, one colour per group, error bars = std across seeds."""
    import plotly.graph_objects as go

    fig = go.Figure()
    data = agg if include_baseline else agg[agg["cell"] != agg.attrs.get("baseline", BASELINE)]
    if "grid" in data.columns:  # several grids: their cells side by side, named by grid
        data = data.assign(cell=data["grid"].astype(str) + " · " + data["cell"].astype(str))
    for group, part in data.groupby("group", sort=False):
        fig.add_bar(x=list(part["cell"]), y=list(part["delta_mean"]), name=str(group),
                    error_y=dict(type="data", array=list(part["delta_std"].fillna(0.0)), visible=True),
                    customdata=list(part["n"]),
                    hovertemplate="%{x}<br>delta %{y:.4f} ± %{error_y.array:.4f} (n=%{customdata})")
    fig.update_layout(title=title, barmode="group", yaxis_title="score delta vs full recipe",
                      xaxis_title="cell", legend_title="group")
    fig.add_hline(y=0, line_width=1, line_color="gray")
    return fig


# ---------------------------------------------------------------------------------------------- CLI
DEFAULT_RUNNER = "trainer"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kalm ablate", description="Run a declarative ablation grid.")
    p.add_argument("--grid", help="grid name in configs/ablations/ or a YAML path")
    p.add_argument("--run-dir", default=None, help="run directory (results in <run-dir>/ablations/)")
    p.add_argument("--seeds", type=int, nargs="+", help="override the grid's seeds")
    p.add_argument("--runner", default=DEFAULT_RUNNER,
                   help="'trainer' (kalm_lib.train + kalm_lib.evaluate, see --finetune-config), or "
                        "module:function / file.py:function run_fn(cell_config, seed) -> {task: score}")
    p.add_argument("--finetune-config", help="trainer runner: fine-tune stage YAML (configs/train/...)")
    p.add_argument("--pretrain-config", help="trainer runner: pre-train stage YAML (stage 1 per cell)")
    p.add_argument("--eval-config", help="trainer runner: evaluation YAML (kalm_lib.evaluate)")
    p.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer runner: evaluation override, e.g. 'tasks=[KalmDev-STSB-en]'")
    p.add_argument("--keep-models", action="store_true",
                   help="trainer runner: keep every cell's checkpoints (default: delete once scored)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer runner: extra StageConfig override for every cell, e.g. train.max_steps=30")
    p.add_argument("--level", default="mtk", choices=LEVELS, help="aggregation level of the printed table")
    p.add_argument("--dry-run", action="store_true", help="print the expanded cells and overrides, run nothing")
    p.add_argument("--list-switches", action="store_true", help="list the known switches")
    return p


def cli_main(argv: list[str]) -> int:
    """``kalm ablate ...`` entry point."""
    args = _parser().parse_args(argv)
    if args.list_switches:
        for s in SWITCHES.values():
            vals = list(s.choices) if s.choices else s.kind
            print(f"{s.name:<30} default {_fmt(s.default):<20} {vals}  {s.help}")
        return 0
    if not args.grid:
        print("kalm ablate: --grid is required", file=sys.stderr)
        return 2
    try:
        spec = load_grid(args.grid)
        runs = expand_runs(spec, args.seeds)
        if args.dry_run:
            cells = expand(spec)
            print(f"grid {spec.name}: {len(cells)} cells x {len(runs) // len(cells)} seeds = {len(runs)} runs")
            for c in cells:
                print(f"  {c.name:<40} {json.dumps(c.as_config()['overrides'])}")
            return 0
        if not args.run_dir:
            print("kalm ablate: --run-dir is required to run the grid", file=sys.stderr)
            return 2
        import yaml

        extra = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.override if "=" in o)}
        if len(extra) != len(args.override):
            raise GridError(f"--override values must look like key=value: {args.override}")
        run_fn = make_run_fn(args.runner, args.run_dir, finetune_config=args.finetune_config,
                             pretrain_config=args.pretrain_config, eval_config=args.eval_config,
                             train_overrides=extra, eval_overrides=args.eval_override,
                             keep_models=args.keep_models)
        results = run_grid(spec, run_fn, args.run_dir, seeds=args.seeds)
    except (ConfigError, FileNotFoundError) as e:
        print(f"kalm ablate: error: {e}", file=sys.stderr)
        return 2
    print(aggregate(results, level=args.level).to_string(index=False))
    print(f"results: {Path(args.run_dir) / RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
