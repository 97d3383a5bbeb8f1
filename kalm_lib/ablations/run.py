"""Running a grid: every (cell, seed) through a ``run_fn``, rows into ``<run_dir>/ablations/results.csv``.

A run is ``run_fn(cell_config, seed) -> {task: score | {"score", "task_type"}}``; any function with that
signature plugs in: :class:`TrainerRunFn` (train with :mod:`kalm_lib.train`, score with
:mod:`kalm_lib.evaluation`), or a test function (``module:function`` / ``file.py:function``).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from kalm_lib import atomic, evaluation, provenance, soup
from kalm_lib import train as trainer
from kalm_lib.ablations.grid import Cell, GridSpec, expand, expand_runs, jsonable
from kalm_lib.ablations.switches import OVERRIDE_KEYS, GridError, split_overrides, value_label
from kalm_lib.config import ConfigError, resolve_config
from kalm_lib.runtime import progress_bar

RESULTS = "ablations/results.csv"
RESULT_COLUMNS = ["grid", "cell", "is_baseline", "seed", "task", "task_type", "score", "overrides_hash",
                  "runner_hash"]  # then one sw.<switch> column per switch the grid mentions

RunFn = Callable[[dict[str, Any], int], Mapping[str, Any]]


def load_run_fn(spec: str) -> RunFn:
    """``"module:function"`` or ``"path/to/file.py:function"`` -> the function (e.g. a test runner)."""
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


# ---------------------------------------------------------------------------------------------- results.csv
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


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with atomic.open_atomic(path) as f:
        pd.DataFrame(rows).to_csv(f, index=False)


def _runner_hash(run_fn: RunFn) -> str:
    """What else decides a score: the runner's own settings (configs, evaluation) when it states them
    (``run_fn.signature()``), else its name."""
    if hasattr(run_fn, "signature"):
        return provenance.config_hash(run_fn.signature())
    return f"{getattr(run_fn, '__module__', '')}.{getattr(run_fn, '__qualname__', type(run_fn).__name__)}"


def _previous_rows(path: Path, grid: str, wanted: set, resume: bool) -> tuple[list[dict], list[dict]]:
    """(this grid's rows still wanted, other grids' rows) of an existing results.csv.

    A row is still wanted when its (cell, seed, overrides hash, runner hash) is one of this grid's runs;
    the file is rewritten from these, so stale rows (changed grid, seeds or runner) do not linger in it.
    """
    if not path.is_file():
        return [], []
    existing = pd.read_csv(path)
    if "runner_hash" not in existing:
        existing["runner_hash"] = None
    mine = existing["grid"].astype(str) == grid
    others = existing[~mine].to_dict("records")
    if not resume:
        return [], others
    kept = [r for r in existing[mine].to_dict("records")
            if (r["cell"], int(r["seed"]), r["overrides_hash"], r["runner_hash"]) in wanted]
    return kept, others


def _write_provenance(run_dir: Path, spec: GridSpec, seeds: list[int] | None) -> None:
    provenance.write(provenance_path(run_dir, spec.name), provenance.collect(
        config={"grid": spec.name, "design": spec.design, "switches": jsonable(spec.switches),
                "baseline": jsonable(spec.baseline), "base_overrides": spec.base_overrides},
        seed=None, seeds=list(seeds if seeds is not None else spec.seeds),
        cells=[c.as_config() for c in expand(spec)]))


def run_grid(spec: GridSpec, run_fn: RunFn, run_dir: str | Path, *, seeds: list[int] | None = None,
             task_types: Mapping[str, str] | None = None, resume: bool = True, progress: bool = True) -> pd.DataFrame:
    """Run every (cell, seed) through ``run_fn`` and write ``<run_dir>/ablations/results.csv``.

    The CSV is rewritten atomically after every run, so an interrupted grid resumes: runs whose (cell,
    seed, overrides hash, runner hash) are already in the file are not run again (see :func:`_runner_hash`).
    Rows of this grid's runs no longer wanted are dropped. Several grids share the file (its ``grid``
    column): the rows of other grids are kept as they are. A runner with a ``check(spec)`` method may refuse
    the grid before any work. ``run_fn`` gets the cell config with the grid's name added
    (``cell_config["grid"]``). Returns this grid's rows (columns :data:`RESULT_COLUMNS` + ``sw.*``).
    """
    run_dir = Path(run_dir)
    out = run_dir / RESULTS
    runs = expand_runs(spec, seeds)
    rhash = _runner_hash(run_fn)
    keys = {(c.name, s, provenance.config_hash(c.as_config()["overrides"]), rhash): (c, s) for c, s in runs}
    rows, others = _previous_rows(out, spec.name, set(keys), resume)
    done = {(r["cell"], int(r["seed"]), r["overrides_hash"], r["runner_hash"]) for r in rows}
    if hasattr(run_fn, "check"):
        run_fn.check(spec)
    _write_provenance(run_dir, spec, seeds)
    bar = progress_bar()  # text bars when headless: a widget bar does not survive the HTML export
    for key, (cell, seed) in bar(list(keys.items()), desc=f"ablation grid {spec.name}", disable=not progress):
        if key in done:
            continue
        scores = run_fn({**cell.as_config(), "grid": spec.name}, seed)
        for task, ttype, score in _score_rows(cell, seed, scores, dict(task_types or {})):
            rows.append({"grid": spec.name, "cell": cell.name, "is_baseline": cell.is_baseline, "seed": seed,
                         "task": task, "task_type": ttype, "score": score, "overrides_hash": key[2],
                         "runner_hash": rhash, **{f"sw.{k}": value_label(v) for k, v in cell.switches.items()}})
        _write_csv(others + rows, out)
    _write_csv(others + rows, out)  # also when nothing ran: stale rows were dropped
    df = pd.DataFrame(rows)
    keep = [c for c in [*RESULT_COLUMNS, *(f"sw.{s}" for s in runs[0][0].switches)] if c in df.columns]
    return df[keep + [c for c in df.columns if c not in keep]]


def provenance_path(run_dir: str | Path, grid: str) -> Path:
    """Where :func:`run_grid` records a grid's provenance: ``<run_dir>/ablations/provenance/<grid>.json``."""
    return Path(run_dir) / "ablations" / "provenance" / f"{_safe_name(grid)}.json"


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "=.-_" else "_" for ch in str(name))


def read_results(run_dir: str | Path, grid: str | None = None) -> pd.DataFrame:
    """``<run_dir>/ablations/results.csv`` as a DataFrame (FileNotFoundError naming the path); with
    ``grid``, only that grid's rows (ValueError listing the grids present when it has none)."""
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


# ---------------------------------------------------------------------------------------------- the trainer
def _checkpoints_kept(config: trainer.StageConfig) -> int:
    """How many fine-tuning checkpoints a stage config leaves behind (the soup switch's ingredients)."""
    ck, steps = config.checkpoint, config.train.max_steps
    return 0 if ck.every_steps <= 0 else min(ck.keep_last, steps // ck.every_steps if steps else 2)


@dataclass
class TrainerRunFn:
    """A ``run_fn`` that trains with :func:`kalm_lib.train.train` and scores the result.

    Per (cell, seed), under ``<run_dir>/ablations/cells/<grid>/<cell>/seed<seed>/``: optionally pre-train
    (``pretrain_config``; skipped when the cell sets ``stages.pretrain.enabled: false``), fine-tune
    (``finetune_config``, starting from the pre-trained model), then ``evaluate_fn(model_dir, out_dir)``
    -> ``{task: {"score", "task_type"}}`` (default: :mod:`kalm_lib.evaluation` with ``eval_config``).
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

    def stage_configs(self, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(fine-tune, pre-train or None) overrides of a cell: its trainer overrides, ``model.*`` to both."""
        trainer_ov, _ = split_overrides(overrides)
        model_ov = {k: v for k, v in trainer_ov.items() if k.startswith("model.")}
        pre = {**self.pretrain_overrides, **model_ov} if self.pretrain_config is not None else None
        return {**self.finetune_overrides, **trainer_ov}, pre

    def check(self, spec: GridSpec) -> None:
        """Refuse, before any training, a grid this runner cannot run: a switch it cannot act on, or a cell
        whose stage configs :func:`kalm_lib.train.load_config` rejects (the one place knobs are validated,
        e.g. ``loss.focal_gamma >= 0``, ``loss.temperature > 0``)."""
        if "stage1" in spec.mentioned and self.pretrain_config is None:
            raise GridError(f"grid {spec.name}: switch stage1 needs a pretrain_config for the runner")
        for cell in expand(spec):
            ft_ov, pre_ov = self.stage_configs(cell.overrides)
            try:
                config = trainer.load_config(self.finetune_config, ft_ov)
                if pre_ov is not None:
                    trainer.load_config(self.pretrain_config, pre_ov)
            except ConfigError as e:
                raise GridError(f"grid {spec.name}, cell {cell.name}: {e}") from None
            kept = _checkpoints_kept(config)
            if "soup" in spec.mentioned and kept < 2:  # soup ingredients: the fine-tuning checkpoints kept
                ck = config.checkpoint
                raise GridError(f"grid {spec.name}: the soup switch needs >= 2 fine-tuning checkpoints per cell; "
                                f"the finetune config keeps {kept} (checkpoint.every_steps={ck.every_steps}, "
                                f"keep_last={ck.keep_last}, train.max_steps={config.train.max_steps})")

    def signature(self) -> dict[str, Any]:
        """What besides the cell and seed decides its scores (part of run_grid's resume key)."""
        return {"finetune": self.finetune_config, "pretrain": self.pretrain_config, "eval": self.eval_config,
                "finetune_overrides": self.finetune_overrides, "pretrain_overrides": self.pretrain_overrides,
                "eval_overrides": self.eval_overrides, "evaluate_fn": repr(self.evaluate_fn)}

    def cell_dir(self, cell: str, seed: int, grid: str | None = None) -> Path:
        """``<run_dir>/ablations/cells[/<grid>]/<cell>/seed<seed>`` (grids share cell names such as full)."""
        base = Path(self.run_dir) / "ablations" / "cells"
        return (base / _safe_name(grid) if grid else base) / _safe_name(cell) / f"seed{seed}"

    def train_cell(self, cell_config: dict[str, Any], seed: int, out: Path) -> Path:
        """Pre-train (unless off or not configured) and fine-tune one cell; the fine-tuned model folder."""
        ft_ov, pre_ov = self.stage_configs(cell_config["overrides"])
        _, adapter_ov = split_overrides(cell_config["overrides"])
        ft_ov = {**ft_ov, "train.seed": seed, "output_dir": str(out / "finetune")}
        if pre_ov is not None and adapter_ov.get(OVERRIDE_KEYS["pretrain_enabled"], True):
            pre = trainer.train(trainer.load_config(self.pretrain_config, {
                **pre_ov, "train.seed": seed, "output_dir": str(out / "pretrain")}))
            ft_ov["model.name_or_path"] = str(pre.final_model)
        result = trainer.train(trainer.load_config(self.finetune_config, ft_ov))
        if result.final_model is None:
            raise GridError(f"cell {cell_config['cell']}, seed {seed}: training wrote no final model in {out}")
        return Path(result.final_model)

    def __call__(self, cell_config: dict[str, Any], seed: int) -> Mapping[str, Any]:
        out = self.cell_dir(cell_config["cell"], seed, cell_config.get("grid"))
        final_model = self.train_cell(cell_config, seed, out)
        evaluate_fn = self.evaluate_fn or self._evaluate
        shutil.rmtree(out / "eval", ignore_errors=True)  # results of an earlier attempt must not be read back
        soup_mode = split_overrides(cell_config["overrides"])[1].get(OVERRIDE_KEYS["soup_mode"])
        if soup_mode is None:
            scores = evaluate_fn(final_model, out / "eval")
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
        try:
            ckpts = soup.find_ingredients([str(out / "finetune" / "checkpoint-*")])
        except FileNotFoundError:
            ckpts = []
        if len(ckpts) < 2:
            raise GridError(f"{where}: the soup switch needs >= 2 checkpoints in {out / 'finetune'}, found "
                            f"{len(ckpts)}")
        if soup_mode == "soup":
            ings = soup.load_ingredients(ckpts)
            model = soup.write_soup(ings, soup.uniform_weights(len(ings)), out / "soup", extra={"recipe": "uniform"})
            return evaluate_fn(model, out / "eval")
        per_ckpt = {Path(c).name: evaluate_fn(Path(c), out / "eval" / Path(c).name) for c in ckpts}

        def mean_score(scores: Mapping[str, Any]) -> float:
            vals = [v["score"] if isinstance(v, Mapping) else v for v in scores.values()]
            return sum(vals) / len(vals)

        best = max(per_ckpt, key=lambda name: mean_score(per_ckpt[name]))
        return per_ckpt[best]

    def _evaluate(self, model_dir: Path, out_dir: Path) -> dict[str, Any]:
        """The default ``evaluate_fn``: ``eval_config`` (full dims only) through kalm_lib.evaluation."""
        per_task = evaluation.evaluate_model(str(model_dir), self.eval_config, out_dir,
                                             overrides=[*self.eval_overrides, "dims=[]"])
        return {r["task"]: {"score": float(r["main_score"]), "task_type": r["task_type"]}
                for r in per_task.to_dict("records")}


def _config_path(spec: str | None, kind: str) -> str | None:
    return None if spec is None else str(resolve_config(spec, kind))


def make_run_fn(runner: str, run_dir: str | Path, *, finetune_config: str | None = None,
                pretrain_config: str | None = None, eval_config: str | None = None,
                train_overrides: Mapping[str, Any] | None = None,
                eval_overrides: list[str] | None = None, keep_models: bool = False) -> RunFn:
    """``"trainer"`` -> :class:`TrainerRunFn` on the run dir's curated data
    (``<run_dir>/curated/{finetune,pretrain}.jsonl`` when present); anything else -> :func:`load_run_fn`.

    Config files are found by :func:`kalm_lib.config.resolve_config` (a path, repo-relative, or a name in
    ``configs/train/`` / ``configs/eval/``), so a missing one is an error here, before any work.
    """
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
    return TrainerRunFn(_config_path(finetune_config, "train"), run_dir,
                        pretrain_config=_config_path(pretrain_config, "train"),
                        eval_config=_config_path(eval_config, "eval"), finetune_overrides=ft_ov,
                        pretrain_overrides=pre_ov, eval_overrides=list(eval_overrides or []),
                        keep_models=keep_models)
