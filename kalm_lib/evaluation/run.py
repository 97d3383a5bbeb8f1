"""Evaluation through the real ``mteb`` library: an encoder adapter, offline and online runs, tidy results.

- :class:`MtebEncoder` adapts an :class:`~kalm_lib.model.EmbeddingModel` to mteb's ``EncoderProtocol`` with
  task-aware KaLM instructions (query vs document side, symmetric tasks on both sides or none, per task type
  and per task) and a Matryoshka dim; model name, checkpoint revision, config hash and every prompt go into
  mteb's ``ModelMeta`` and a ``kalm_eval.json`` beside the results.
- :func:`run_eval` runs offline tasks (:mod:`kalm_lib.eval_tasks`, built from the data cards) or mteb's own
  tasks / benchmarks by name (online GPU boxes with hub access), writing mteb's JSON layout
  ``<out>/<model>/<revision>/<Task>.json``. A task that fails is recorded in ``errors.json`` and the others go on.
- :func:`load_results` reads any number of such folders into one tidy pandas frame; :func:`aggregate` gives
  MTK (mean over tasks) and MTY (mean over task-type means) per language, as in the paper.
- :func:`load_reference_scores` reads published leaderboard scores (``data/reference-scores``, CC0) and
  :func:`reference_for` places them beside our tasks where the task is exactly the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kalm_lib import provenance
from kalm_lib.config import ConfigError, apply_overrides, from_dict, load_config_data, to_dict
from kalm_lib.evaluation.tasks import (MTEB_TYPE_TO_OURS, SYMMETRIC_TYPES, TASKS_BY_NAME, build_tasks,
                                 offline_task_names)

logger = logging.getLogger(__name__)
REPO_ROOT = provenance.REPO_ROOT
REFERENCE_DIR = REPO_ROOT / "data" / "reference-scores" / "results"
LANG_OF_ISO = {"eng": "en", "cmn": "zh", "zho": "zh"}  # mteb ISO 639-3 codes -> our language tags

# Default instruction per task type, used for tasks that bring none (KaLM / mteb style wording).
DEFAULT_TYPE_INSTRUCTIONS = {
    "sts": "Retrieve semantically similar text.",
    "pair_classification": "Retrieve text that are semantically similar to the given text",
    "classification": "Classify the given text into its category",
    "clustering": "Identify the topic or theme of the given texts",
    "retrieval": "Given a query, retrieve relevant documents that answer the query",
    "reranking": "Given a query, retrieve relevant documents that answer the query",
}


# ---------------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class InstructionConfig:
    """How task instructions become prompts (DESIGN.md §1.1).

    ``enabled``: "auto" turns instructions on for models trained by this workbench (a ``kalm_config.json``
    in the folder) and off for plain models such as all-MiniLM-L6-v2, whose public scores used none.
    ``symmetric``: for STS / pair classification put the instruction on "both" sides (V2 paper) or "none"
    (V1 evaluation); ``symmetric_per_task`` overrides it per task name.
    ``per_type`` / ``per_task`` override the instruction text by task type or task name.
    Asymmetric tasks (retrieval, reranking) never instruct the document side.
    """

    enabled: Literal["auto", "on", "off"] = "auto"
    symmetric: Literal["both", "none"] = "both"
    symmetric_per_task: dict[str, Literal["both", "none"]] = dataclasses.field(default_factory=dict)
    per_type: dict[str, str] = dataclasses.field(default_factory=dict)
    per_task: dict[str, str] = dataclasses.field(default_factory=dict)


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
    data, where = load_config_data(spec, "eval", overrides) if spec else (apply_overrides({}, overrides or []),
                                                                           "eval config")
    return from_dict(EvalConfig, data, where=where)


# ---------------------------------------------------------------------------------------------- adapter
def _task_type(task_metadata) -> str:
    return MTEB_TYPE_TO_OURS.get(task_metadata.type, str(task_metadata.type).lower())


class MtebEncoder:
    """mteb ``EncoderProtocol`` adapter for :class:`~kalm_lib.model.EmbeddingModel`.

    Prompt choice for a call (task, side): no instruction when instructions are disabled; the document side
    of retrieval/reranking never gets one; symmetric tasks get one on both sides or none (config); everything
    else (queries, classification, clustering texts) gets ``instruction_prompt(instruction)`` where the
    instruction comes from ``per_task`` > the task's own (``TaskMetadata.prompt``) > ``per_type`` > defaults.
    Every prompt used is recorded in :attr:`prompts_used` for provenance.
    """

    def __init__(self, model, *, name: str, revision: str, instructions: InstructionConfig | None = None,
                 use_instructions: bool = True, dim: int | None = None, batch_size: int = 32,
                 config_hash: str | None = None):
        self.model = model
        self.name = name
        self.revision = revision
        self.instructions = instructions or InstructionConfig()
        self.use_instructions = use_instructions
        self.dim = dim
        self.batch_size = batch_size
        self.config_hash = config_hash
        self.prompts_used: dict[str, dict[str, str]] = {}
        self._meta = None

    # -- prompts ---------------------------------------------------------------------------------------
    def instruction_for(self, task_name: str, task_type: str, task_prompt: Any = None) -> str:
        """The instruction text for a task (before the KaLM query template is applied)."""
        ins = self.instructions
        if task_name in ins.per_task:
            return ins.per_task[task_name]
        if isinstance(task_prompt, str) and task_prompt:
            return task_prompt
        if isinstance(task_prompt, dict) and task_prompt.get("query"):
            return task_prompt["query"]
        return ins.per_type.get(task_type, DEFAULT_TYPE_INSTRUCTIONS.get(task_type, ""))

    def prompt_for(self, task_name: str, task_type: str, side: str | None, task_prompt: Any = None) -> str:
        """Raw prefix for texts of ``task_name`` on ``side`` ("query", "document" or None)."""
        from kalm_lib.model import instruction_prompt

        if not self.use_instructions:
            return ""
        if task_type in ("retrieval", "reranking") and side == "document":
            return ""
        if task_type in SYMMETRIC_TYPES:
            mode = self.instructions.symmetric_per_task.get(task_name, self.instructions.symmetric)
            if mode == "none":
                return ""
        instruction = self.instruction_for(task_name, task_type, task_prompt)
        return instruction_prompt(instruction) if instruction else ""

    # -- EncoderProtocol -------------------------------------------------------------------------------
    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs):
        """Encode an mteb DataLoader of text batches with the task-aware prompt; float32 [n, d]."""
        texts = [text for batch in inputs for text in batch["text"]]
        side = getattr(prompt_type, "value", prompt_type)
        task_type = _task_type(task_metadata)
        prompt = self.prompt_for(task_metadata.name, task_type, side, getattr(task_metadata, "prompt", None))
        self.prompts_used.setdefault(task_metadata.name, {})[str(side or "symmetric")] = prompt
        if not texts:
            return np.zeros((0, self.dim or self.model.embedding_dim), dtype=np.float32)
        return self.model.encode(texts, prompt=prompt or None, batch_size=kwargs.get("batch_size", self.batch_size),
                                 dim=self.dim, show_progress=False, normalize=True)

    def similarity(self, embeddings1, embeddings2):
        """Cosine similarity matrix (embeddings are L2-normalised, so a dot product)."""
        import torch

        a = torch.as_tensor(np.asarray(embeddings1, dtype=np.float32))
        b = torch.as_tensor(np.asarray(embeddings2, dtype=np.float32))
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T

    def similarity_pairwise(self, embeddings1, embeddings2):
        """Row-wise cosine similarity."""
        import torch

        a = torch.as_tensor(np.asarray(embeddings1, dtype=np.float32))
        b = torch.as_tensor(np.asarray(embeddings2, dtype=np.float32))
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)

    @property
    def mteb_model_meta(self):
        """mteb ModelMeta: name, revision, dims; ``experiment_kwargs`` = hash of everything that changes the
        embeddings (model settings, instruction config) and the Matryoshka dim. The prompts themselves, per
        task and side, are in ``kalm_eval.json`` beside the results."""
        if self._meta is None:
            from mteb.models.model_meta import ModelMeta, ScoringFunction

            n_params = sum(p.numel() for p in self.model.parameters())
            self._meta = ModelMeta.create_empty({
                "name": self.name, "revision": self.revision, "n_parameters": n_params,
                "embed_dim": self.dim or self.model.embedding_dim, "max_tokens": self.model.max_length,
                "similarity_fn_name": ScoringFunction.COSINE, "use_instructions": self.use_instructions,
                "framework": ["PyTorch", "Sentence Transformers"], "open_weights": True,
                "experiment_kwargs": {"config_hash": self.config_hash, "dim": self.dim},
            })
        return self._meta


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


# ---------------------------------------------------------------------------------------------- running
def resolve_tasks(config: EvalConfig) -> list:
    """mteb task objects: a benchmark by name, named tasks (ours offline, else mteb's), or the offline suite."""
    if config.benchmark:
        import mteb

        return list(mteb.get_benchmark(config.benchmark).tasks)
    names = config.tasks or offline_task_names(quick=config.quick)
    ours = [n for n in names if n in TASKS_BY_NAME]
    public = [n for n in names if n not in TASKS_BY_NAME]
    tasks = build_tasks(ours, quick=config.quick, seed=config.seed) if ours else []
    if public:
        import mteb

        tasks += list(mteb.get_tasks(tasks=public))
    return tasks


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def evaluate_encoder(encoder: MtebEncoder, tasks: list, out_dir: str | Path, *, batch_size: int = 32,
                     extra_provenance: dict | None = None, mteb_cache: str | Path | None = None) -> dict[str, Any]:
    """Run ``tasks`` with mteb's evaluators and write ``<out>/<model>/<revision>/<Task>.json``.

    Each task runs on its own so a failure is recorded (``errors.json``) and the rest go on. With
    ``mteb_cache`` (online runs) mteb's own ``ResultCache`` is used too: results already there for this
    model name/revision are reused ("only-missing") instead of recomputed. Returns
    ``{"results_dir", "tasks_ok", "errors", "seconds"}``.
    """
    import mteb

    cache = mteb.ResultCache(cache_path=str(mteb_cache)) if mteb_cache else None
    strategy = "only-missing" if cache else "always"  # no cache: never serve stale results silently

    meta = encoder.mteb_model_meta
    folder = Path(out_dir) / meta.model_name_as_path() / meta.revision
    folder.mkdir(parents=True, exist_ok=True)
    ok, errors, timings = [], {}, {}
    this_run = {t.metadata.name for t in tasks}
    for task in tasks:
        name = task.metadata.name
        t0 = time.perf_counter()
        try:
            res = mteb.evaluate(encoder, task, cache=cache, overwrite_strategy=strategy, raise_error=True,
                                encode_kwargs={"batch_size": batch_size}, show_progress_bar=False)
            task_result = res.task_results[0]
            tmp = folder / f"{name}.json.tmp"
            task_result.to_disk(tmp)
            os.replace(tmp, folder / f"{name}.json")
            ok.append(name)
        except Exception as e:  # one failing task must not stop the others; the failure is recorded
            logger.exception("task %s failed", name)
            errors[name] = f"{type(e).__name__}: {e}"
        timings[name] = round(time.perf_counter() - t0, 3)
    _write_json(folder / "model_meta.json", meta.to_dict())
    # several runs into one folder (e.g. different task sets): keep the earlier tasks' records
    previous = {}
    if (folder / "kalm_eval.json").is_file():
        try:
            previous = json.loads((folder / "kalm_eval.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            previous = {}
    prompts = {**previous.get("prompts", {}), **encoder.prompts_used}
    timings = {**previous.get("task_seconds", {}), **timings}
    errors = {**{k: v for k, v in previous.get("errors", {}).items() if k not in ok}, **errors}
    record = provenance.collect(
        extra_provenance.get("config") if extra_provenance else None,
        seed=(extra_provenance or {}).get("seed"),
        data_hashes=(extra_provenance or {}).get("data_hashes"),
        model={"name": meta.name, "revision": meta.revision, "dim": encoder.dim,
               "settings": getattr(encoder.model, "settings", lambda: {})()},
        prompts=prompts, use_instructions=encoder.use_instructions,
        instructions=to_dict(encoder.instructions), embedding_config_hash=encoder.config_hash,
        task_seconds=timings, errors=errors,
    )
    _write_json(folder / "kalm_eval.json", record)
    if errors:
        _write_json(folder / "errors.json", errors)
    elif (folder / "errors.json").exists():
        (folder / "errors.json").unlink()
    return {"results_dir": folder, "model": meta.name, "revision": meta.revision, "tasks_ok": ok, "errors": {k: v for k, v in errors.items() if k in this_run},
            "seconds": {k: v for k, v in timings.items() if k in this_run}}


def _data_hashes(tasks: list) -> dict[str, str]:
    """sha256 (from the data cards) of every split our offline tasks read; mteb dataset revisions otherwise."""
    from kalm_lib.evaluation.tasks import split_sha256

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


def run_eval(model_spec: str, config: EvalConfig, out_dir: str | Path, *, model=None, name: str | None = None,
             revision: str | None = None, mteb_cache: str | Path | None = None) -> list[dict[str, Any]]:
    """Evaluate one model (``"minilm"``, a folder, or an already-built ``model``) on the configured tasks,
    once per Matryoshka dim. Returns one summary dict per dim."""
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
    data_hashes = _data_hashes(tasks)
    summaries = []
    for dim in (config.dims or [None]):
        encoder = MtebEncoder(model, name=name if dim is None else f"{name}-dim{dim}", revision=revision,
                              instructions=config.instructions, use_instructions=use_instructions, dim=dim,
                              batch_size=config.batch_size, config_hash=chash)
        summaries.append(evaluate_encoder(encoder, tasks, out_dir, batch_size=config.batch_size,
                                          extra_provenance={"config": cfg, "seed": config.seed,
                                                            "data_hashes": data_hashes},
                                          mteb_cache=mteb_cache))
    return summaries


def evaluate_model(model, eval_config="quick", out_dir="runs/latest/eval", *, overrides: list[str] | None = None,
                   name: str | None = None, mteb_cache: str | Path | None = None):
    """Evaluate one model on one eval config and return its per-task scores: the notebooks' one call.

    ``model``: "minilm", a saved model folder, or an :class:`~kalm_lib.model.EmbeddingModel`. ``eval_config``:
    a name in ``configs/eval/``, a YAML path (repo-relative works from any folder), an :class:`EvalConfig`,
    or ``None`` (defaults); ``overrides`` are ``key=value`` strings on top. Results are written under
    ``out_dir`` in mteb's layout. Returns :func:`task_scores` of this model's results (columns run, model,
    revision, task, task_type, lang, main_score; ``run`` = ``name`` or the model name; one row per task
    and Matryoshka dim); ``attrs["results_dirs"]`` lists the folders written, ``attrs["errors"]`` the
    failed tasks ({task: error}; the others still ran).
    """
    import pandas as pd

    config = eval_config if isinstance(eval_config, EvalConfig) else load_eval_config(eval_config, overrides)
    if isinstance(eval_config, EvalConfig) and overrides:
        config = from_dict(EvalConfig, apply_overrides(to_dict(eval_config), overrides), where="eval config")
    if isinstance(model, (str, Path)):
        summaries = run_eval(str(model), config, out_dir, name=name, mteb_cache=mteb_cache)
    else:
        summaries = run_eval(name or "model", config, out_dir, model=model, name=name, mteb_cache=mteb_cache)
    frames = []
    for s in summaries:
        df = load_results([s["results_dir"]])
        frames.append(task_scores(df.assign(run=name or s["model"], model=s["model"], revision=s["revision"])))
    out = pd.concat(frames, ignore_index=True)
    out.attrs["results_dirs"] = [s["results_dir"] for s in summaries]
    out.attrs["errors"] = {k: v for s in summaries for k, v in s["errors"].items()}
    return out


# ---------------------------------------------------------------------------------------------- results
def _main_score_old(task_type: str, split_scores: dict) -> float | None:
    """Main score of an mteb 1.0-layout split entry (no "main_score" key)."""
    if "main_score" in split_scores:
        return split_scores["main_score"]
    if task_type == "sts":
        return split_scores.get("cos_sim", {}).get("spearman")
    if task_type == "classification":
        return split_scores.get("accuracy")
    if task_type == "pair_classification":
        return split_scores.get("cos_sim", {}).get("ap")
    if task_type == "clustering":
        return split_scores.get("v_measure")
    return split_scores.get("ndcg_at_10") or split_scores.get("map")


def task_info(task_name: str) -> dict[str, Any]:
    """type, lang, mteb_equivalent of a task name (ours, or mteb's registry; "unknown" if neither)."""
    if task_name in TASKS_BY_NAME:
        s = TASKS_BY_NAME[task_name]
        return {"type": s.type, "lang": s.lang, "mteb_equivalent": s.mteb_equivalent, "known": True}
    try:
        import mteb

        md = mteb.get_task(task_name).metadata
        langs = sorted({LANG_OF_ISO.get(l.split("-")[0], l.split("-")[0]) for l in md.languages})
        return {"type": MTEB_TYPE_TO_OURS.get(md.type, md.type.lower()),
                "lang": langs[0] if len(langs) == 1 else "multi", "mteb_equivalent": task_name, "known": True}
    except Exception:
        return {"type": "unknown", "lang": "unknown", "mteb_equivalent": None, "known": False}


def read_result_file(path: str | Path) -> list[dict[str, Any]]:
    """Rows (one per split x subset) of one mteb result JSON, new (2.x/1.12) or old (1.0) layout."""
    path = Path(path)
    d = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(d, dict) or not (d.get("task_name") or d.get("mteb_dataset_name")):
        return []  # not an mteb result file (configs, provenance, model_meta, ...)
    task = d.get("task_name") or d.get("mteb_dataset_name")
    info = task_info(task)
    rows = []
    if "scores" in d:
        for split, entries in d["scores"].items():
            for e in entries:
                scores = {k: v for k, v in e.items() if k not in ("hf_subset", "languages")}
                rows.append({"task": task, "split": split, "subset": e.get("hf_subset", "default"),
                             "main_score": e.get("main_score"), "scores": scores, **info})
    else:
        for split, e in d.items():
            if isinstance(e, dict) and split not in ("dataset_revision",):
                rows.append({"task": task, "split": split, "subset": "default",
                             "main_score": _main_score_old(info["type"], e), "scores": e, **info})
    for r in rows:
        r.update(source=str(path), mteb_version=d.get("mteb_version"), dataset_revision=d.get("dataset_revision"))
    return rows


COLUMNS = ["run", "model", "revision", "task", "type", "lang", "split", "subset", "main_score",
           "mteb_equivalent", "known", "scores", "source", "mteb_version", "dataset_revision"]


def load_results(paths: list[str | Path] | str | Path, run_names: list[str] | None = None):
    """One tidy frame from result folders: a run dir (uses ``<dir>/eval``), an eval dir, or a model folder.

    Columns: run, model, revision, task, type, lang, split, subset, main_score (0-100 as on the leaderboard),
    mteb_equivalent, known, scores (all metrics), source (file), mteb_version, dataset_revision.
    """
    import pandas as pd

    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows = []
    for i, p in enumerate(paths):
        p = Path(p)
        run = run_names[i] if run_names else p.name
        root = p / "eval" if (p / "eval").is_dir() else p
        if root == p and (p / "provenance.json").is_file():
            continue  # a run directory without eval/: no results (not its configs and checkpoints)
        for f in sorted(root.rglob("*.json")):
            if f.name in ("model_meta.json", "kalm_eval.json", "errors.json") or f.name.endswith(".tmp"):
                continue
            try:
                file_rows = read_result_file(f)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as e:
                logger.warning("skipping unreadable result file %s: %s", f, e)
                continue
            rel = f.relative_to(root).parts
            model, revision = (rel[0].replace("__", "/", 1), rel[1]) if len(rel) >= 3 else (root.name, "unknown")
            for r in file_rows:
                r.update(run=run, model=model, revision=revision)
            rows.extend(file_rows)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["main_score"] = pd.to_numeric(df["main_score"], errors="coerce") * 100.0
    return df


def task_scores(df):
    """One score per (run, model, revision, task): the mean over its eval splits and subsets (as mteb)."""
    keys = ["run", "model", "revision", "task", "type", "lang"]
    return df.dropna(subset=["main_score"]).groupby(keys, as_index=False, dropna=False)["main_score"].mean()


def aggregate(df, by: tuple[str, ...] = ("run", "model", "revision", "lang")):
    """MTK (mean over tasks) and MTY (mean over task-type means) per ``by`` group, plus task counts."""
    import pandas as pd

    per_task = task_scores(df)
    per_task = per_task[per_task["type"] != "unknown"]
    by = list(by)
    if per_task.empty:
        return pd.DataFrame(columns=[*by, "MTK", "MTY", "n_tasks", "n_types"])
    mtk = per_task.groupby(by, dropna=False)["main_score"].agg(["mean", "size"])
    type_means = per_task.groupby([*by, "type"], dropna=False)["main_score"].mean().reset_index()
    mty = type_means.groupby(by, dropna=False)["main_score"].agg(["mean", "size"])
    out = pd.DataFrame({"MTK": mtk["mean"], "MTY": mty["mean"], "n_tasks": mtk["size"], "n_types": mty["size"]})
    return out.reset_index()


# ---------------------------------------------------------------------------------------------- reference
def load_reference_scores(root: str | Path = REFERENCE_DIR):
    """Published scores (mteb results repo subset) as a frame like :func:`load_results` (run = "reference")."""
    root = Path(root)
    if not root.is_dir():
        import pandas as pd

        return pd.DataFrame(columns=COLUMNS)
    return load_results([root], run_names=["reference"])


def reference_for(tasks: list[str], reference=None):
    """Reference rows re-labelled with our task names, only where our task is the same public task and
    split. One row per (model, our task, split); where a model has several revisions the newest file wins."""
    import pandas as pd

    ref = load_reference_scores() if reference is None else reference
    parts = []
    for t in tasks:
        spec = TASKS_BY_NAME.get(t)
        if spec is None:  # a public mteb task name: the same task by definition, every split
            sub = ref[ref["task"] == t].copy()
            sub["public_task"] = t
        elif spec.mteb_equivalent:
            sub = ref[(ref["task"] == spec.mteb_equivalent) & (ref["split"].isin(list(spec.splits)))]
            sub = sub[sub["subset"].isin(["default", spec.lang])].copy()
            sub["public_task"], sub["task"], sub["type"], sub["lang"] = sub["task"], t, spec.type, spec.lang
        else:
            continue
        if sub.empty:
            continue
        parts.append(sub.drop_duplicates(["model", "task", "split"], keep="last"))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*COLUMNS, "public_task"])


# ---------------------------------------------------------------------------------------------- CLI
def summary_table(df) -> str:
    """Plain-text per-task table and MTK/MTY per language."""
    lines = []
    for _, r in task_scores(df).sort_values(["model", "lang", "type", "task"]).iterrows():
        lines.append(f"{r['model'][:40]:<40} {r['task']:<28} {r['type']:<20} {r['lang']:<4} {r['main_score']:7.2f}")
    for _, r in aggregate(df).iterrows():
        lines.append(f"{r['model'][:40]:<40} {'MTK/MTY ' + str(r['lang']):<28} {int(r['n_tasks'])} tasks "
                     f"{int(r['n_types'])} types {r['MTK']:7.2f} / {r['MTY']:6.2f}")
    return "\n".join(lines)


def cli_main(argv: list[str]) -> int:
    """``kalm eval MODEL... [--quick] [--tasks T...] [--benchmark NAME] [--out DIR] [--config YAML]``."""
    p = argparse.ArgumentParser(prog="kalm eval", description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="*", help="'minilm' or saved EmbeddingModel folders")
    p.add_argument("--quick", action="store_true", help="offline quick subset (subsampled, minutes on CPU)")
    p.add_argument("--tasks", nargs="+", default=None, help="offline KalmDev-* or public mteb task names")
    p.add_argument("--benchmark", default=None, help='mteb benchmark, e.g. "MTEB(eng, v2)" (needs hub access)')
    p.add_argument("--out", default="runs/latest/eval", help="results folder (a run dir's eval/)")
    p.add_argument("--mteb-cache", default=None, help="also use mteb's ResultCache here (reuse finished tasks)")
    p.add_argument("--config", default=None, help="YAML preset (configs/eval/*.yaml)")
    p.add_argument("--dims", nargs="+", type=int, default=None, help="Matryoshka dims to evaluate")
    p.add_argument("--instructions", choices=["auto", "on", "off"], default=None)
    p.add_argument("--symmetric", choices=["both", "none"], default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--list-tasks", action="store_true", help="print the offline tasks and exit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set instructions.symmetric=none (repeatable)")
    args = p.parse_args(argv)
    if args.list_tasks:
        for t in TASKS_BY_NAME.values():
            print(f"{t.name:<28} {t.type:<20} {t.lang} quick={t.quick} public={t.mteb_equivalent or '-'}")
        return 0
    if not args.models:
        p.error("give at least one model ('minilm' or a model folder)")
    try:
        config = load_eval_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"kalm eval: {e}", file=sys.stderr)
        return 2
    if args.quick:
        config.quick = True
    if args.tasks:
        unknown = [t for t in args.tasks if t not in TASKS_BY_NAME and task_info(t)["type"] == "unknown"]
        if unknown:
            print(f"kalm eval: unknown task(s) {unknown}; offline tasks: {sorted(TASKS_BY_NAME)}", file=sys.stderr)
            return 2
        config.tasks = args.tasks
    if args.benchmark:
        config.benchmark = args.benchmark
    if args.dims:
        config.dims = args.dims
    if args.instructions:
        config.instructions.enabled = args.instructions
    if args.symmetric:
        config.instructions.symmetric = args.symmetric
    if args.batch_size:
        config.batch_size = args.batch_size
    status = 0
    for m in args.models:
        t0 = time.perf_counter()
        for s in run_eval(m, config, args.out, mteb_cache=args.mteb_cache):
            print(f"{m}: {len(s['tasks_ok'])} tasks -> {s['results_dir']} ({time.perf_counter() - t0:.0f} s)")
            for task, err in s["errors"].items():
                print(f"  FAILED {task}: {err}", file=sys.stderr)
                status = 1
    df = load_results([args.out])
    if not df.empty:
        print(summary_table(df))
    run_dir = Path(args.out).parent if Path(args.out).name == "eval" else Path(args.out)
    print(f"report: kalm report {run_dir} -o reports/{run_dir.name}.html")
    return status
