"""Runners: the function that turns one (cell, seed) into scores, ``run_fn(cell_config, seed) -> {task: score}``.

:class:`TrainerRunFn` trains with :mod:`kalm_lib.train` and scores with :mod:`kalm_lib.evaluation` (the soup
switch through :mod:`kalm_lib.soup`); :func:`load_run_fn` loads any other function (``module:function`` or
``file.py:function``, e.g. the toy runner of the tests); :func:`make_run_fn` picks one from a name, as
``kalm ablate --runner`` and notebook 05 do. Runners given by name pickle, so worker processes can load them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from kalm_lib import evaluation, soup
from kalm_lib import train as trainer
from kalm_lib.ablations.grid import GridSpec, expand
from kalm_lib.ablations.store import safe_name
from kalm_lib.ablations.switches import OVERRIDE_KEYS, GridError, split_overrides
from kalm_lib.config import ConfigError, load_config_data, resolve_config

RunFn = Callable[[dict[str, Any], int], Mapping[str, Any]]


def _load_file_function(path: str, name: str) -> Callable:
    if not Path(path).is_file():
        raise ImportError(f"no file {path}")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


class _FileRunner:
    """A run_fn defined in a file (``file.py:function``). It pickles as its path and name, so a worker process
    loads the file again; its ``__module__``/``__qualname__`` are the function's (the runner hash of results.csv)."""

    def __init__(self, path: str, name: str):
        self.path, self.name = path, name
        functools.update_wrapper(self, _load_file_function(path, name))

    def __call__(self, cell_config: dict[str, Any], seed: int) -> Mapping[str, Any]:
        return self.__wrapped__(cell_config, seed)

    def __reduce__(self):
        return _FileRunner, (self.path, self.name)


def load_run_fn(spec: str) -> RunFn:
    """``"module:function"`` or ``"path/to/file.py:function"`` -> the function (e.g. a test runner)."""
    if ":" not in spec:
        raise GridError(f"runner {spec!r} must look like module:function or file.py:function")
    mod, fn = spec.rsplit(":", 1)
    try:
        if mod.endswith(".py"):
            return _FileRunner(str(Path(mod).resolve()), fn)
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise GridError(f"runner {spec!r} cannot be loaded ({e}); a runner is a function "
                        "run_fn(cell_config: dict, seed: int) -> {task: score}") from None


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
        if "stage1" in spec.mentioned and self.pretrain_config is None and \
                self.finetune_overrides.get("model.name_or_path", self.config_start()) == self.config_start():
            raise GridError(f"grid {spec.name}: switch stage1 needs a pretrain_config for the runner, or cells "
                            f"that start from the run's stage-1 model (run_dir_paths: {{finetune: "
                            f"{{model.name_or_path: train/pretrain/final}}}})")
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
        return (base / safe_name(grid) if grid else base) / safe_name(cell) / f"seed{seed}"

    def config_start(self) -> str:
        """The model the fine-tuning config itself starts from (before the runner's overrides)."""
        data, _ = load_config_data(self.finetune_config, "train")
        return str((data.get("model") or {}).get("name_or_path", ""))

    def train_cell(self, cell_config: dict[str, Any], seed: int, out: Path) -> Path:
        """Pre-train (unless off or not configured) and fine-tune one cell; the fine-tuned model folder.

        Without a ``pretrain_config``, cells start from the run's stage-1 model (``finetune_overrides``), and
        ``stage1`` off starts from the fine-tuning config's own model instead (the base model): the same
        comparison without pre-training once per cell."""
        ft_ov, pre_ov = self.stage_configs(cell_config["overrides"])
        _, adapter_ov = split_overrides(cell_config["overrides"])
        ft_ov = {**ft_ov, "train.seed": seed, "output_dir": str(out / "finetune")}
        if pre_ov is None and not adapter_ov.get(OVERRIDE_KEYS["pretrain_enabled"], True):
            ft_ov["model.name_or_path"] = self.config_start()
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
                eval_overrides: list[str] | None = None, keep_models: bool = False,
                run_dir_paths: Mapping[str, Mapping[str, str]] | None = None) -> RunFn:
    """``"trainer"`` -> :class:`TrainerRunFn` on the run dir's curated data
    (``<run_dir>/curated/{finetune,pretrain}.jsonl`` when present); anything else -> :func:`load_run_fn`.
    ``run_dir_paths`` (``{"finetune"|"pretrain": {config key: path inside run_dir}}``, e.g. the run's stage-1
    model and re-mined records) are set on the cells' stage configs, after the curated defaults.

    Config files are found by :func:`kalm_lib.config.resolve_config` (a path, repo-relative, or a name in
    ``configs/train/`` / ``configs/eval/``), so a missing one is an error here, before any work.
    """
    if runner != "trainer":
        return load_run_fn(runner)
    if not finetune_config:
        raise GridError("runner 'trainer' needs a finetune_config (a kalm_lib.train stage YAML)")
    run_dir = Path(run_dir).resolve()   # the runner hash must not depend on how the path was spelled
    curated = run_dir / "curated"
    ft_ov, pre_ov = dict(train_overrides or {}), dict(train_overrides or {})
    if (curated / "finetune.jsonl").is_file():
        ft_ov.setdefault("data.train_file", str(curated / "finetune.jsonl"))
    if (curated / "pretrain.jsonl").is_file():
        pre_ov.setdefault("data.train_file", str(curated / "pretrain.jsonl"))
    paths = dict(run_dir_paths or {})
    if not set(paths) <= {"finetune", "pretrain"}:
        raise GridError(f"run_dir_paths: stages must be finetune / pretrain, got {sorted(paths)}")
    ft_ov.update({k: str(run_dir / v) for k, v in (paths.get("finetune") or {}).items()})
    pre_ov.update({k: str(run_dir / v) for k, v in (paths.get("pretrain") or {}).items()})
    return TrainerRunFn(_config_path(finetune_config, "train"), run_dir,
                        pretrain_config=_config_path(pretrain_config, "train"),
                        eval_config=_config_path(eval_config, "eval"), finetune_overrides=ft_ov,
                        pretrain_overrides=pre_ov, eval_overrides=list(eval_overrides or []),
                        keep_models=keep_models)
