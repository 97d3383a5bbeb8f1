"""Running evaluations through the real ``mteb`` library: config, models, tasks, and the runs themselves.

- :class:`EvalConfig` (YAML presets in ``configs/eval/``, :func:`load_eval_config`) says which tasks, which
  Matryoshka dims and which instruction policy.
- :func:`run_eval` evaluates one model on offline tasks (:mod:`kalm_lib.evaluation.tasks`, built from the data
  cards) or mteb's own tasks / benchmarks by name (online GPU boxes with hub access), once per dim, writing
  mteb's JSON layout ``<out>/<model>/<revision>/<Task>.json``; :func:`evaluate_encoder` is one such pass. A task
  that fails is recorded in ``errors.json`` and the others go on.
- :func:`evaluate_model` is the notebooks' one call: evaluate a model on an eval config and get its
  per-task scores back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from kalm_lib import atomic, provenance
from kalm_lib.config import apply_overrides, from_dict, load_config_data, to_dict
from kalm_lib.evaluation.encoder import InstructionConfig, MtebEncoder
from kalm_lib.evaluation.results import load_results, task_scores
from kalm_lib.evaluation.tasks import TASKS_BY_NAME, build_tasks, offline_task_names, split_sha256

__all__ = ["EvalConfig", "load_eval_config", "resolve_model", "resolve_tasks", "evaluate_encoder", "run_eval",
           "evaluate_model"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class EvalConfig:
    """Everything ``kalm eval`` needs besides the model (YAML presets in ``configs/eval/``)."""

    tasks: list[str] = dataclasses.field(default_factory=list)  # offline KalmDev-* or public mteb task names
    quick: bool = False              # offline quick subset (subsampled; minutes on CPU)
    benchmark: str | None = None     # mteb benchmark name, e.g. "MTEB(eng, v2)" (online)
    batch_size: int = 32
    dims: list[int] = dataclasses.field(default_factory=list)  # Matryoshka dims; [] = full dim only
    seed: int = 42
    instructions: InstructionConfig = dataclasses.field(default_factory=InstructionConfig)


def load_eval_config(spec: str | Path | None = None, overrides: list[str] | None = None) -> EvalConfig:
    """EvalConfig from a preset (a name in ``configs/eval/`` or a YAML path, found by
    :func:`kalm_lib.config.resolve_config`; ``None`` = defaults) plus ``key=value`` overrides."""
    if spec is None:
        data, where = apply_overrides({}, overrides or []), "eval config"
    else:
        data, where = load_config_data(spec, "eval", overrides)
    return from_dict(EvalConfig, data, where=where)


# ---------------------------------------------------------------------------------------------- models
def _weights_hash(folder: Path) -> str:
    """Short sha256 of a model folder's weight files: the checkpoint revision of a local model."""
    h = hashlib.sha256()
    files = sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.bin")))
    for f in files:
        h.update(provenance.sha256_file(f).encode())
    return h.hexdigest()[:12] if files else "no_revision_available"


def resolve_model(spec: str):
    """(EmbeddingModel, name, revision, trained_here) for "minilm" or a model folder."""
    # kalm_lib.model imports torch: the results / report side of this package must not pay for it
    from kalm_lib.model import MINILM_ALIASES, EmbeddingModel, minilm_path

    if spec in MINILM_ALIASES:
        folder = Path(minilm_path())
        return (EmbeddingModel.from_pretrained(None), "sentence-transformers/all-MiniLM-L6-v2",
                "gt-" + _weights_hash(folder), False)
    folder = Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {spec} (use 'minilm' or a saved EmbeddingModel folder)")
    model = EmbeddingModel.from_pretrained(str(folder))
    generic = folder.name.startswith("checkpoint") or folder.name in ("final", "model")
    name = "kalm/" + (folder.parent.name + "-" + folder.name if generic else folder.name)  # e.g. kalm/finetune-final
    return model, name, _weights_hash(folder), (folder / "kalm_config.json").is_file()


# ---------------------------------------------------------------------------------------------- tasks
def resolve_tasks(config: EvalConfig) -> list:
    """mteb task objects: a benchmark by name, named tasks (ours offline, else mteb's), or the offline suite."""
    if config.benchmark:
        import mteb  # seconds to import: only where a run needs it

        return list(mteb.get_benchmark(config.benchmark).tasks)
    names = config.tasks or offline_task_names(quick=config.quick)
    ours = [n for n in names if n in TASKS_BY_NAME]
    public = [n for n in names if n not in TASKS_BY_NAME]
    tasks = build_tasks(ours, quick=config.quick, seed=config.seed) if ours else []
    if public:
        import mteb

        tasks += list(mteb.get_tasks(tasks=public))
    return tasks


def _data_hashes(tasks: list) -> dict[str, str]:
    """sha256 (from the data cards) of every split our offline tasks read; mteb dataset revisions otherwise."""
    out = {}
    for t in tasks:
        spec = getattr(t, "kalm_spec", None)
        if spec is None:
            out[t.metadata.name] = str(t.metadata.dataset.get("revision"))
            continue
        for split in [*spec.splits.values(), spec.train_split, spec.corpus_split]:
            if split:
                try:
                    out[f"{spec.card}/{split}"] = split_sha256(spec.card, split)
                except Exception as e:  # recorded here; the task itself reports the failure when it runs
                    out[f"{spec.card}/{split}"] = f"unavailable: {type(e).__name__}: {e}"
    return out


# ---------------------------------------------------------------------------------------------- running
def _write_eval_record(folder: Path, encoder: MtebEncoder, ok: list[str], errors: dict[str, str],
                       timings: dict[str, float], extra_provenance: dict | None) -> dict[str, str]:
    """Write ``kalm_eval.json`` (provenance, prompts, timings, errors) and ``errors.json``, merged with an
    earlier run into the same folder (e.g. another task set); returns the merged errors."""
    previous = {}
    if (folder / "kalm_eval.json").is_file():
        try:
            previous = json.loads((folder / "kalm_eval.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            previous = {}
    prompts = {**previous.get("prompts", {}), **encoder.prompts_used}
    timings = {**previous.get("task_seconds", {}), **timings}
    errors = {**{k: v for k, v in previous.get("errors", {}).items() if k not in ok}, **errors}
    extra = extra_provenance or {}
    meta = encoder.mteb_model_meta
    record = provenance.collect(
        extra.get("config"), seed=extra.get("seed"), data_hashes=extra.get("data_hashes"),
        model={"name": meta.name, "revision": meta.revision, "dim": encoder.dim,
               "settings": getattr(encoder.model, "settings", lambda: {})()},
        prompts=prompts, use_instructions=encoder.use_instructions,
        instructions=to_dict(encoder.instructions), embedding_config_hash=encoder.config_hash,
        task_seconds=timings, errors=errors,
    )
    atomic.write_json(folder / "kalm_eval.json", record)
    if errors:
        atomic.write_json(folder / "errors.json", errors)
    else:
        (folder / "errors.json").unlink(missing_ok=True)
    return errors


def _save_task_result(task_result, path: Path) -> None:
    """mteb's own file format (``TaskResult.to_disk``), published atomically under ``path``."""
    tmp = atomic.temp_sibling(path)
    try:
        task_result.to_disk(tmp)
        atomic.write_bytes(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)


def evaluate_encoder(encoder: MtebEncoder, tasks: list, out_dir: str | Path, *, batch_size: int = 32,
                     extra_provenance: dict | None = None, mteb_cache: str | Path | None = None) -> dict[str, Any]:
    """Run ``tasks`` with mteb's evaluators and write ``<out>/<model>/<revision>/<Task>.json``.

    Each task runs on its own so a failure is recorded (``errors.json``) and the rest go on. With
    ``mteb_cache`` (online runs) mteb's own ``ResultCache`` is used too: results already there for this
    model name/revision are reused ("only-missing") instead of recomputed. Returns
    ``{"results_dir", "model", "revision", "tasks_ok", "errors", "seconds"}``.
    """
    import mteb  # seconds to import: only where a run needs it

    cache = mteb.ResultCache(cache_path=str(mteb_cache)) if mteb_cache else None
    strategy = "only-missing" if cache else "always"  # no cache: never serve stale results silently
    meta = encoder.mteb_model_meta
    folder = Path(out_dir) / meta.model_name_as_path() / meta.revision
    folder.mkdir(parents=True, exist_ok=True)
    ok, errors, timings = [], {}, {}
    for task in tasks:
        name = task.metadata.name
        t0 = time.perf_counter()
        try:
            res = mteb.evaluate(encoder, task, cache=cache, overwrite_strategy=strategy, raise_error=True,
                                encode_kwargs={"batch_size": batch_size}, show_progress_bar=False)
            _save_task_result(res.task_results[0], folder / f"{name}.json")
            ok.append(name)
        except Exception as e:  # one failing task must not stop the others; the failure is recorded
            logger.exception("task %s failed", name)
            errors[name] = f"{type(e).__name__}: {e}"
        timings[name] = round(time.perf_counter() - t0, 3)
    atomic.write_json(folder / "model_meta.json", meta.to_dict())
    all_errors = _write_eval_record(folder, encoder, ok, errors, timings, extra_provenance)
    this_run = {t.metadata.name for t in tasks}
    return {"results_dir": folder, "model": meta.name, "revision": meta.revision, "tasks_ok": ok,
            "errors": {k: v for k, v in all_errors.items() if k in this_run}, "seconds": timings}


def run_eval(model_spec: str, config: EvalConfig, out_dir: str | Path, *, model=None, name: str | None = None,
             revision: str | None = None, mteb_cache: str | Path | None = None) -> list[dict[str, Any]]:
    """Evaluate one model (``"minilm"``, a folder, or an already-built ``model``) on the configured tasks,
    once per Matryoshka dim. Returns one :func:`evaluate_encoder` summary per dim."""
    if model is None:
        model, auto_name, auto_rev, trained_here = resolve_model(model_spec)
    else:
        auto_name, auto_rev, trained_here = "kalm/" + str(model_spec), "no_revision_available", True
    name, revision = name or auto_name, revision or auto_rev
    enabled = config.instructions.enabled
    use_instructions = trained_here if enabled == "auto" else enabled == "on"
    tasks = resolve_tasks(config)
    cfg = to_dict(config)
    # what changes the embeddings (not the task list): keys mteb's cache and the ModelMeta experiment
    chash = provenance.config_hash({"instructions": cfg["instructions"], "use_instructions": use_instructions,
                                    "model": getattr(model, "settings", lambda: {})()})
    extra = {"config": cfg, "seed": config.seed, "data_hashes": _data_hashes(tasks)}
    summaries = []
    for dim in (config.dims or [None]):
        encoder = MtebEncoder(model, name=name if dim is None else f"{name}-dim{dim}", revision=revision,
                              instructions=config.instructions, use_instructions=use_instructions, dim=dim,
                              batch_size=config.batch_size, config_hash=chash)
        summaries.append(evaluate_encoder(encoder, tasks, out_dir, batch_size=config.batch_size,
                                          extra_provenance=extra, mteb_cache=mteb_cache))
    return summaries


def evaluate_model(model, eval_config: str | Path | EvalConfig | None = "quick",
                   out_dir: str | Path = "runs/latest/eval", *, overrides: list[str] | None = None,
                   name: str | None = None, mteb_cache: str | Path | None = None) -> pd.DataFrame:
    """Evaluate one model on one eval config and return its per-task scores: the notebooks' one call.

    ``model``: "minilm", a saved model folder, or an :class:`~kalm_lib.model.EmbeddingModel`. ``eval_config``:
    a name in ``configs/eval/``, a YAML path (repo-relative works from any folder), an :class:`EvalConfig`,
    or ``None`` (defaults); ``overrides`` are ``key=value`` strings on top. Results are written under
    ``out_dir`` in mteb's layout. Returns :func:`~kalm_lib.evaluation.task_scores` of this model's results
    (columns run, model, revision, task, task_type, lang, main_score; ``run`` = ``name`` or the model name;
    one row per task and Matryoshka dim); ``attrs["results_dirs"]`` lists the folders written,
    ``attrs["errors"]`` the failed tasks ({task: error}; the others still ran).
    """
    if isinstance(eval_config, EvalConfig):
        config = from_dict(EvalConfig, apply_overrides(to_dict(eval_config), overrides or []), where="eval config")
    else:
        config = load_eval_config(eval_config, overrides)
    if isinstance(model, (str, Path)):
        summaries = run_eval(str(model), config, out_dir, name=name, mteb_cache=mteb_cache)
    else:
        summaries = run_eval(name or "model", config, out_dir, model=model, name=name, mteb_cache=mteb_cache)
    frames = [task_scores(load_results([s["results_dir"]]).assign(run=name or s["model"], model=s["model"],
                                                                  revision=s["revision"]))
              for s in summaries]
    out = pd.concat(frames, ignore_index=True)
    out.attrs["results_dirs"] = [s["results_dir"] for s in summaries]
    out.attrs["errors"] = {task: err for s in summaries for task, err in s["errors"].items()}
    for task, err in out.attrs["errors"].items():
        logger.warning("evaluation of %s: task %s failed: %s", name or model, task, err)
    return out
