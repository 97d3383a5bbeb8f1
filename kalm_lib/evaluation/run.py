"""Running evaluations through the real ``mteb`` library: config, models, tasks, and the runs themselves.

- :class:`EvalConfig` (YAML presets in ``configs/eval/``, :func:`load_eval_config`) says which tasks, which
  Matryoshka dims, which device and which instruction policy.
- :func:`resolve_model` loads ``"minilm"``, a model folder or a hub id (Hugging Face cache, or the hub when hub
  access is on) with the prompts its folder carries.
- :func:`run_eval` evaluates one model on offline tasks (:mod:`kalm_lib.evaluation.tasks`, built from the data
  cards) or mteb's own tasks / benchmarks by name (``mteb.get_benchmark``), once per dim;
  :func:`evaluate_encoder` is one such pass. A task that fails is recorded and the others go on.
- :func:`evaluate_model` is the notebooks' one call: evaluate a model on an eval config and get its
  per-task scores back.

**Results layout** (``<out>`` is an mteb result cache: ``mteb.ResultCache(<out>).load_results()`` reads it
with default arguments)::

    <out>/results/<model>/<revision>/<Task>.json       mteb's TaskResult files
    <out>/results/<model>/<revision>/model_meta.json   mteb's ModelMeta (no experiment_kwargs)
    <out>/results/<model>/<revision>/run_settings.jsonl  mteb's run settings: versions + our encode settings
    <out>/kalm/<model>/<revision>/kalm_eval.json       our provenance: config, prompts, data sha256s, timings
    <out>/kalm/<model>/<revision>/errors.json          failed tasks (only when one failed)

Our records live outside mteb's task-file glob (``results/*/*/*.json``). Offline quick subsets carry their own
dataset revision (``quick-<n>``; full splits ``full``), never the full split's.

Several evaluations may write into one ``<out>`` at once (``kalm eval`` of other task sets, notebooks, ablation
cells): every read-merge-write of a model's shared files (``run_settings.jsonl``, ``kalm_eval.json``) holds the
model folder's lock (``<out>/kalm/<model>/<revision>/.kalm-eval.lock``, :mod:`kalm_lib.locking`), and task files
are published atomically, so concurrent runs keep each other's results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from kalm_lib import atomic, locking, provenance, runtime
from kalm_lib.config import ConfigError, apply_overrides, from_dict, load_config_data, to_dict
from kalm_lib.evaluation.encoder import InstructionConfig, MtebEncoder
from kalm_lib.evaluation.results import RECORDS_DIR, RESULTS_DIR, load_results, task_scores
from kalm_lib.evaluation.tasks import TASKS_BY_NAME, build_tasks, offline_task_names, register_with_mteb, split_sha256

__all__ = ["EvalConfig", "LoadedModel", "load_eval_config", "resolve_model", "resolve_tasks", "evaluate_encoder",
           "run_eval", "evaluate_model", "run_eval_cache"]

logger = logging.getLogger(__name__)
RUN_SETTINGS = "run_settings.jsonl"
# One mteb ResultCache per run directory, shared by its notebooks: a model is evaluated once per task whatever
# stage asks (the pretrain stage's "after" is the finetune stage's "before" and one of the report's models). Keyed
# by mteb on model name, weights hash, the prompt/settings hash and the task's dataset revision (quick-<n> | full);
# a re-trained model has other weights, so it is never served another's scores. Delete it to re-evaluate.
RUN_EVAL_CACHE = ".eval-cache"
EVAL_LOCK = ".kalm-eval.lock"   # in <out>/kalm/<model>/<revision>/, outside mteb's task-file glob
LOCK_WAIT_S = 600.0             # the lock is held for one file merge (seconds); waiting long only meets a stale one


# ---------------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class EvalConfig:
    """Everything ``kalm eval`` needs besides the model (YAML presets in ``configs/eval/``)."""

    tasks: list[str] = dataclasses.field(default_factory=list)  # offline KalmDev-* or public mteb task names
    quick: bool = False              # offline quick subset (subsampled; minutes on CPU)
    quick_cap: int | None = None     # quick subsets of at most this many items per split (None: each task's own)
    benchmark: str | None = None     # mteb benchmark name, e.g. "MTEB(eng, v2)" (mteb.get_benchmark)
    device: str = "auto"             # "auto" (cuda when present, else cpu), "cpu", "cuda", "cuda:1", ...
    batch_size: int = 32             # encode batch size on the CPU
    gpu_batch_size: int = 128        # ... and on a GPU
    dtype: str = "auto"              # "auto": float32 on the CPU, bfloat16 on a GPU; or a torch dtype name
    dims: list[int] = dataclasses.field(default_factory=list)  # Matryoshka dims; [] = full dim only
    seed: int = 42
    mteb_cache: str | None = None    # reuse finished tasks from an mteb ResultCache here ("default": mteb's own)
    instructions: InstructionConfig = dataclasses.field(default_factory=InstructionConfig)


def load_eval_config(spec: str | Path | None = None, overrides: list[str] | None = None) -> EvalConfig:
    """EvalConfig from a preset (a name in ``configs/eval/`` or a YAML path, found by
    :func:`kalm_lib.config.resolve_config`; ``None`` = defaults) plus ``key=value`` overrides."""
    if spec is None:
        data, where = apply_overrides({}, overrides or []), "eval config"
    else:
        data, where = load_config_data(spec, "eval", overrides)
    config = from_dict(EvalConfig, data, where=where)
    check_quick_cap(config.quick_cap, where)
    return config


def check_quick_cap(quick_cap: int | None, where: str) -> None:
    """The one check of a ``quick_cap`` setting (eval and soup configs): None or >= 1, else a ConfigError."""
    if quick_cap is not None and quick_cap < 1:
        raise ConfigError(f"{where}: quick_cap: must be >= 1 or null, got {quick_cap}")


# ---------------------------------------------------------------------------------------------- models
class LoadedModel(NamedTuple):
    """A model to evaluate: the model, its name and revision in the results, whether this workbench saved it
    (a ``kalm_config.json``), and the prompt table its folder carries (None: no folder)."""

    model: Any
    name: str
    revision: str
    trained_here: bool
    prompts: dict[str, str] | None


def run_eval_cache(run_dir: str | Path) -> Path:
    """The run directory's shared evaluation cache (``<run_dir>/.eval-cache``, an mteb ResultCache): pass it as
    ``mteb_cache`` so that every notebook of a run evaluates each model once per task."""
    return Path(run_dir) / RUN_EVAL_CACHE


def _weights_hash(folder: Path) -> str:
    """Short sha256 of a model folder's weight files: the checkpoint revision of a local model."""
    h = hashlib.sha256()
    files = sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.bin")))
    for f in files:
        h.update(provenance.sha256_file(f).encode())
    return h.hexdigest()[:12] if files else "no_revision_available"


def resolve_model(spec: str, *, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load ``"minilm"``, a model folder, or a hub id (``org/name[@revision]``: the Hugging Face cache, or the
    hub when hub access is on) with its own saved settings and prompts. The revision of a hub model is its
    commit; of a local folder, the sha256 of its weights."""
    # kalm_lib.model imports torch: the results / report side of this package must not pay for it
    from kalm_lib.model import KALM_CONFIG, MINILM_ALIASES, EmbeddingModel, read_prompt_table, resolve_source

    local = spec in MINILM_ALIASES or Path(str(spec)).is_dir()
    name_or_id, _, hub_rev = (spec, "", "") if local else str(spec).partition("@")
    folder, commit = resolve_source(name_or_id, hub_rev or None)
    model = EmbeddingModel.from_pretrained(folder, device=device, dtype=dtype)
    if spec in MINILM_ALIASES:
        name, revision = "sentence-transformers/all-MiniLM-L6-v2", "gt-" + _weights_hash(folder)
    elif commit is not None:
        name, revision = name_or_id, commit
        model.card.setdefault("base_model", name_or_id)
    else:
        generic = folder.name.startswith("checkpoint") or folder.name in ("final", "model")
        name = "kalm/" + (folder.parent.name + "-" + folder.name if generic else folder.name)  # kalm/finetune-final
        revision = _weights_hash(folder)
    return LoadedModel(model, name, revision, (folder / KALM_CONFIG).is_file(), read_prompt_table(folder))


def _dtype(dtype: str, device: str) -> str | None:
    if dtype != "auto":
        return dtype
    return "float32" if device == "cpu" else "bfloat16"


# ---------------------------------------------------------------------------------------------- tasks
def resolve_tasks(config: EvalConfig) -> list:
    """mteb task objects: a benchmark by name, named tasks (ours offline, else mteb's), or the offline suite."""
    if config.benchmark:
        import mteb  # seconds to import: only where a run needs it

        return list(mteb.get_benchmark(config.benchmark).tasks)
    names = config.tasks or offline_task_names(quick=config.quick)
    ours = [n for n in names if n in TASKS_BY_NAME]
    public = [n for n in names if n not in TASKS_BY_NAME]
    tasks = build_tasks(ours, quick=config.quick, seed=config.seed, quick_cap=config.quick_cap) if ours else []
    if tasks:
        register_with_mteb()  # so stock mteb honours a saved folder's prompts for every offline task
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


# ---------------------------------------------------------------------------------------------- writing
def _records_lock(folder: Path):
    """The lock on one model's results (``folder`` = ``<out>/kalm/<model>/<revision>``), held for each
    read-merge-write of its shared files."""
    return locking.hold(folder / EVAL_LOCK, what=f"evaluation results in {folder}", wait_s=LOCK_WAIT_S)


def _write_eval_record(folder: Path, encoder: MtebEncoder, ok: list[str], errors: dict[str, str],
                       timings: dict[str, float], extra_provenance: dict | None) -> dict[str, str]:
    """Write ``kalm_eval.json`` (provenance, prompts, timings, errors) and ``errors.json``, merged with an
    earlier run into the same folder (e.g. another task set), under the folder's lock (a concurrent evaluation's
    record is merged, never overwritten); returns the merged errors."""
    with _records_lock(folder):
        return _merge_eval_record(folder, encoder, ok, errors, timings, extra_provenance)


def _merge_eval_record(folder: Path, encoder: MtebEncoder, ok: list[str], errors: dict[str, str],
                       timings: dict[str, float], extra_provenance: dict | None) -> dict[str, str]:
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
        prompt_source="model prompt table" if encoder.prompts is not None else
        "instruction policy" if encoder.use_instructions else "none",
        instructions=to_dict(encoder.instructions), embedding_config_hash=encoder.config_hash,
        task_seconds=timings, errors=errors,
    )
    atomic.write_json(folder / "kalm_eval.json", record)
    if errors:
        atomic.write_json(folder / "errors.json", errors)
    else:
        (folder / "errors.json").unlink(missing_ok=True)
    return errors


def _save_result(out: Path, task_result, meta, encode_settings: dict[str, Any]) -> Path:
    """Write one task's result with mteb's own writer (``ResultCache.save_to_cache``: ``<Task>.json``,
    ``model_meta.json``, ``run_settings.jsonl`` merged with the earlier ones), run in a temporary cache and
    published file by file atomically, so a crash never leaves a half-written file mteb would then read. The
    merge holds the model's lock: a concurrent evaluation's run settings are never lost."""
    import mteb  # seconds to import: only where a run needs it

    final = out / RESULTS_DIR / meta.model_name_as_path() / meta.revision
    tmp_root = atomic.temp_sibling(out / RESULTS_DIR)
    try:
        with _records_lock(out / RECORDS_DIR / meta.model_name_as_path() / meta.revision):
            tmp = tmp_root / RESULTS_DIR / meta.model_name_as_path() / meta.revision
            tmp.mkdir(parents=True)
            if (final / RUN_SETTINGS).is_file():
                shutil.copyfile(final / RUN_SETTINGS, tmp / RUN_SETTINGS)  # mteb merges the new settings into it
            mteb.ResultCache(tmp_root).save_to_cache(task_result, meta, encode_kwargs=encode_settings)
            for f in sorted(tmp.iterdir()):
                atomic.write_bytes(final / f.name, f.read_bytes())
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return final


def _encode_settings(encoder: MtebEncoder, task_name: str, batch_size: int) -> dict[str, Any]:
    """What shaped the embeddings of one task (mteb's run settings keep it beside the result)."""
    params = next(encoder.model.parameters(), None) if hasattr(encoder.model, "parameters") else None
    return {"batch_size": batch_size, "device": str(params.device) if params is not None else None,
            "dtype": str(params.dtype).replace("torch.", "") if params is not None else None,
            "dim": encoder.dim, "max_length": getattr(encoder.model, "max_length", None),
            "prompts": encoder.prompts_used.get(task_name, {}), "embedding_config_hash": encoder.config_hash}


# ---------------------------------------------------------------------------------------------- running
def evaluate_encoder(encoder: MtebEncoder, tasks: list, out_dir: str | Path, *, batch_size: int = 32,
                     extra_provenance: dict | None = None, mteb_cache: str | Path | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Run ``tasks`` with mteb's evaluators and write the results layout of the module docstring.

    Each task runs on its own so a failure is recorded (``errors.json``) and the rest go on. With
    ``mteb_cache`` (a path, or "default" for mteb's own) mteb's ``ResultCache`` is used too: results already
    there for this model name/revision/settings are reused ("only-missing") instead of recomputed.
    ``progress``: a per-task progress bar and one line per finished task on stderr. Returns ``{"results_dir",
    "record_dir", "model", "revision", "tasks_ok", "errors", "seconds"}``.
    """
    import mteb  # seconds to import: only where a run needs it

    cache = None if not mteb_cache else mteb.ResultCache(None if str(mteb_cache) == "default" else str(mteb_cache))
    strategy = "only-missing" if cache else "always"  # no cache: never serve stale results silently
    meta, out = encoder.results_meta, Path(out_dir)
    results_dir = out / RESULTS_DIR / meta.model_name_as_path() / meta.revision
    record_dir = out / RECORDS_DIR / meta.model_name_as_path() / meta.revision
    record_dir.mkdir(parents=True, exist_ok=True)
    encoder.show_progress = None if progress else False
    bar = runtime.progress_bar()(tasks, desc=meta.name, unit="task", disable=not progress, file=sys.stderr)
    ok, errors, timings = [], {}, {}
    for task in bar:
        name = task.metadata.name
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        try:
            res = mteb.evaluate(encoder, task, cache=cache, overwrite_strategy=strategy, raise_error=True,
                                encode_kwargs={"batch_size": batch_size}, show_progress_bar=False)
            task_result = res.task_results[0]
            _save_result(out, task_result, meta, _encode_settings(encoder, name, batch_size))
            ok.append(name)
            outcome = f"{100 * task_result.get_score():.2f}"
        except Exception as e:  # one failing task must not stop the others; the failure is recorded
            logger.exception("task %s failed", name)
            errors[name] = outcome = f"{type(e).__name__}: {e}"
        timings[name] = round(time.perf_counter() - t0, 3)
        if progress:
            bar.write(f"{meta.name} {name}: {outcome} ({timings[name]:.1f} s)", file=sys.stderr)
    all_errors = _write_eval_record(record_dir, encoder, ok, errors, timings, extra_provenance)
    this_run = {t.metadata.name for t in tasks}
    return {"results_dir": results_dir, "record_dir": record_dir, "model": meta.name, "revision": meta.revision,
            "tasks_ok": ok, "errors": {k: v for k, v in all_errors.items() if k in this_run}, "seconds": timings}


def _prompt_choice(loaded: LoadedModel, instructions: InstructionConfig) -> tuple[dict[str, str] | None, bool]:
    """(prompt table or None, instruction policy on) for a model under ``instructions.enabled``."""
    if instructions.enabled == "off":
        return None, False
    if instructions.enabled == "on":
        return None, True
    if loaded.prompts and (any(loaded.prompts.values()) or loaded.trained_here):
        # auto: the folder's own prompts, as stock mteb would use them (all empty: trained with instructions off)
        return loaded.prompts, True
    return None, loaded.trained_here    # auto: the policy for our models without a table, none otherwise


def run_eval(model_spec: str, config: EvalConfig, out_dir: str | Path, *, model=None, name: str | None = None,
             revision: str | None = None, mteb_cache: str | Path | None = None,
             progress: bool = False) -> list[dict[str, Any]]:
    """Evaluate one model (``"minilm"``, a folder, a hub id, or an already-built ``model``) on the configured
    tasks, once per Matryoshka dim, on ``config.device``. Returns one :func:`evaluate_encoder` summary per dim."""
    device = runtime.resolve_device(config.device)
    if model is None:
        loaded = resolve_model(model_spec, device=device, dtype=_dtype(config.dtype, device))
    else:
        if config.device != "auto":
            model.to(device)
        loaded = LoadedModel(model, "kalm/" + str(model_spec), "no_revision_available", True, None)
    model, name, revision = loaded.model, name or loaded.name, revision or loaded.revision
    prompts, use_instructions = _prompt_choice(loaded, config.instructions)
    batch_size = runtime.batch_size_for(next(model.parameters()).device.type, config.batch_size,
                                        config.gpu_batch_size)
    tasks = resolve_tasks(config)
    cfg = to_dict(config)
    # what changes the embeddings (not the task list): keys reuse in a shared mteb cache
    chash = provenance.config_hash({"instructions": cfg["instructions"], "use_instructions": use_instructions,
                                    "prompts": prompts, "model": getattr(model, "settings", lambda: {})()})
    extra = {"config": cfg, "seed": config.seed, "data_hashes": _data_hashes(tasks)}
    summaries = []
    for dim in (config.dims or [None]):
        encoder = MtebEncoder(model, name=name if dim is None else f"{name}-dim{dim}", revision=revision,
                              instructions=config.instructions, use_instructions=use_instructions, prompts=prompts,
                              dim=dim, batch_size=batch_size, config_hash=chash)
        summaries.append(evaluate_encoder(encoder, tasks, out_dir, batch_size=batch_size, extra_provenance=extra,
                                          mteb_cache=mteb_cache or config.mteb_cache, progress=progress))
    return summaries


def evaluate_model(model, eval_config: str | Path | EvalConfig | None = "quick",
                   out_dir: str | Path = "runs/latest/eval", *, overrides: list[str] | None = None,
                   name: str | None = None, mteb_cache: str | Path | None = None,
                   progress: bool = False) -> pd.DataFrame:
    """Evaluate one model on one eval config and return its per-task scores: the notebooks' one call.

    ``model``: "minilm", a saved model folder, a hub id, or an :class:`~kalm_lib.model.EmbeddingModel`.
    ``eval_config``: a name in ``configs/eval/``, a YAML path (repo-relative works from any folder), an
    :class:`EvalConfig`, or ``None`` (defaults); ``overrides`` are ``key=value`` strings on top. Results are
    written under ``out_dir`` in mteb's layout. Returns :func:`~kalm_lib.evaluation.task_scores` of this model's
    results (columns run, model, revision, task, task_type, lang, scope, main_score; ``run`` = ``name`` or the
    model name; one row per task and Matryoshka dim); ``attrs["results_dirs"]`` lists the folders written,
    ``attrs["errors"]`` the failed tasks ({task: error}; the others still ran).
    """
    if isinstance(eval_config, EvalConfig):
        config = from_dict(EvalConfig, apply_overrides(to_dict(eval_config), overrides or []), where="eval config")
    else:
        config = load_eval_config(eval_config, overrides)
    if isinstance(model, (str, Path)):
        summaries = run_eval(str(model), config, out_dir, name=name, mteb_cache=mteb_cache, progress=progress)
    else:
        summaries = run_eval(name or "model", config, out_dir, model=model, name=name, mteb_cache=mteb_cache,
                             progress=progress)
    frames = [task_scores(load_results([s["results_dir"]]).assign(run=name or s["model"], model=s["model"],
                                                                  revision=s["revision"]))
              for s in summaries]
    out = pd.concat(frames, ignore_index=True)
    out.attrs["results_dirs"] = [s["results_dir"] for s in summaries]
    out.attrs["errors"] = {task: err for s in summaries for task, err in s["errors"].items()}
    for task, err in out.attrs["errors"].items():
        logger.warning("evaluation of %s: task %s failed: %s", name or model, task, err)
    return out
