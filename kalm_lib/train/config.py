"""The stage configuration: one strictly typed :class:`StageConfig` per YAML recipe, and the one validation
of every training knob.

Every knob is checked here, once, before any work: types and unknown keys by :func:`kalm_lib.config.from_dict`,
ranges and combinations by :func:`validate_config`. The rest of the package (objective, data, setup, loop)
trusts a validated config and does not check again. Files are found by the one config resolver
(:func:`kalm_lib.config.resolve_config`: a path, a repo-relative path, or ``<preset>/<stage>`` under
``configs/train/``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from kalm_lib.config import ConfigError, from_dict, load_config_data, to_dict
from kalm_lib.data.records import SYMMETRIC_TASK_TYPES, TASK_TYPES

# In-batch negatives are false negatives when the "positive" is just another example of the same class.
DEFAULT_IN_BATCH_BY_TASK = {"classification": False, "clustering": False}
# Keys that do not change what is trained: a resumed run may differ in them.
RESUME_FREE_KEYS = ("output_dir", "checkpoint", "log")


@dataclass
class LoraConfig:
    """Optional LoRA adapters through peft (merged into the weights of every saved checkpoint)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: peft's default for the architecture


@dataclass
class ModelConfig:
    """The model trained. ``name_or_path``: ``minilm`` (bundled, offline), a folder, a hub id, or
    ``tiny:<arch>`` (a random-init tiny decoder, arch qwen2|qwen3|llama|mistral)."""

    name_or_path: str = "minilm"
    bidirectional: bool | None = None      # None: the saved setting (decoders default to bidirectional)
    pooling: Literal["mean", "last", "cls"] | None = None
    max_length: int = 128
    include_prompt: bool | None = None      # False: instruction tokens excluded from mean pooling
    attn_implementation: str | None = None
    dtype: str | None = None                # weight dtype when loading; mixed precision is train.mixed_precision
    padding_free: bool = False              # decoders on CUDA with flash_attn: packed texts, FlashAttention-2 varlen
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class LossConfig:
    """The contrastive objective (names match kalm_lib.losses and the ablation switches)."""

    temperature: float = 0.01
    in_batch: bool = True                   # default for task types not in in_batch_by_task
    in_batch_by_task: dict[str, bool] = field(default_factory=lambda: dict(DEFAULT_IN_BATCH_BY_TASK))
    num_hard_negatives: int = 0             # M per query; 0 = pre-training (in-batch only)
    focal_gamma: float = 0.0
    focal_detach: bool = False
    focal_normalize: bool = False
    mix_mode: Literal["none", "pairwise", "listwise"] | None = "none"   # None == "none"
    num_mix: int = 0                        # mixed negatives per query
    mix_detach: bool = True
    matryoshka_dims: list[int] | None = None
    matryoshka_weights: list[float] | None = None
    distill_weight_cl: float = 1.0          # a in a*L_CL + b*L_KL
    distill_weight_kl: float = 0.0          # b; > 0 needs distill.teacher
    distill_temperature: float = 0.05
    gather_across_devices: bool = True      # cross-device negatives

    def in_batch_for(self, task_type: str) -> bool:
        """Whether queries of ``task_type`` see the other queries' positives and negatives (the one rule)."""
        return {**DEFAULT_IN_BATCH_BY_TASK, **self.in_batch_by_task}.get(task_type, self.in_batch)


@dataclass
class StreamSourceConfig:
    """One streamed training source (``data.sources``): record files, or a hub dataset (named here or by a data
    card's ``hub:`` block). Every global batch comes from one source (task-homogeneous batches)."""

    name: str = ""
    files: list[str] = field(default_factory=list)   # globs of *.jsonl / *.jsonl.gz / *.parquet, or folders of them
    card: str | None = None                 # a data card whose hub: block says where and how (data_cards/<card>.md)
    hub: str | None = None                  # a hub dataset id (or a datasets builder: json, parquet + data_files)
    hub_config: str | None = None
    split: str = "train"
    revision: str | None = None             # a commit sha pins the hub data
    data_files: list[str] | None = None     # for hub: json / parquet (local files through datasets streaming)
    columns: dict[str, str] = field(default_factory=dict)   # record field -> dataset column (hub rows)
    task_type: str | None = None            # hub rows without these fields take them (default: the card's/pretrain)
    lang: str | None = None
    instruction: str | None = None
    weight: float = 1.0                     # multiplies the size-based draw weight
    rows: int | None = None                 # the source's rows, for the draw weights (default: counted/estimated)


@dataclass
class DataConfig:
    """Training data: a unified-record JSONL (docs/CONTRACTS.md), batched per task; or, with ``streaming``,
    record shards / hub datasets streamed per process (kalm_lib/train/stream.py)."""

    train_file: str = ""
    homogeneous_ratio: float = 1.0          # 1 = every batch from one task; V1: semi-homogeneous (in memory only)
    # The instruction policy, the same in training and evaluation (the saved folder's prompt table says which):
    # "both" = the record's instruction on both sides of symmetric tasks (sts, pair_classification) as KaLM V2
    # evaluates them, "none" = no instruction on either side of a symmetric task, "off" = no instructions at all.
    # Asymmetric tasks always put it on the query side only (documents never get one).
    instruction_policy: Literal["both", "none", "off"] = "both"
    passage_instruction_tasks: list[str] = field(default_factory=list)  # further tasks with instructions on both sides
    max_records: int | None = None
    # The per-source mixture (in memory): each record is drawn weight times (2.5 = twice, plus once more with
    # probability 0.5; 0 drops it; seeded). Keys: a source name, "lang:<code>" or "task:<type>"; a record's
    # weight is the product of the keys it matches (default 1). Streamed sources have their own `weight`.
    source_weights: dict[str, float] = field(default_factory=dict)
    positives: Literal["example", "label_text"] = "example"   # label_text: classification/clustering records
    # with a `label` train on it (pos = its class text, neg = other classes' texts); KaLM V2's ablation switch
    streaming: bool = False                 # read per process from a saved position, never the whole data
    train_files: list[str] = field(default_factory=list)   # streaming: globs; a source per file name (shard no. dropped)
    sources: list[StreamSourceConfig] = field(default_factory=list)   # streaming: explicit sources
    temperature: float = 1.0                # streaming: source draw weight = weight * rows ** (1 / temperature)
    read_batch_rows: int = 1024             # streaming: parquet rows read at a time per source

    def passage_prompt_tasks(self) -> list[str]:
        """Task types whose passages get the query's instruction: the symmetric ones under policy "both",
        plus ``passage_instruction_tasks``."""
        extra = SYMMETRIC_TASK_TYPES if self.instruction_policy == "both" else ()
        return sorted(set(self.passage_instruction_tasks) | set(extra))


@dataclass
class TrainConfig:
    """Optimisation."""

    seed: int = 0
    max_steps: int | None = None            # None: `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int = 32                    # the global batch: queries per step over all processes
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = 1.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"   # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    grad_cache: bool = False                # cached embeddings + chunked re-forward
    chunk_size: int | None = 64             # texts per forward (length-sorted chunks); None: one forward
    chunk_tokens: int | None = None         # token budget per forward (rows * longest), with or instead of chunk_size


@dataclass
class CheckpointConfig:
    every_steps: int = 0                    # 0: only at the end
    keep_last: int = 2
    resume: bool = True                     # continue from the last complete checkpoint in output_dir


@dataclass
class LogConfig:
    every_steps: int = 1
    trackers: list[str] = field(default_factory=list)   # accelerate trackers: tensorboard, wandb, ...
    progress_bar: bool = True


@dataclass
class DistillConfig:
    teacher: str | None = None              # any EmbeddingModel name_or_path
    teacher_batch_size: int = 64
    cache_dir: str | None = None            # default: <output_dir>/teacher_cache
    teacher_query_template: str | None = None   # e.g. "Instruct: {instruction}\nQuery: "; None: the teacher's own
    #                                           (train/data.py teacher_query_format)


@dataclass
class StageConfig:
    """A training stage (one YAML file under configs/train/<preset>/)."""

    stage: Literal["pretrain", "finetune", "distill"] = "finetune"
    output_dir: str = "runs/train"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def load_config(source: str | os.PathLike | dict[str, Any],
                overrides: list[str] | dict[str, Any] | None = None) -> StageConfig:
    """A validated :class:`StageConfig` from a YAML file, a ``<preset>/<stage>`` name or a dict, plus overrides.

    ``source`` is found by :func:`kalm_lib.config.resolve_config` (kind ``train``): as given, repo-relative,
    or ``configs/train/<source>.yaml``. ``overrides`` are dotted ``key=value`` strings (or a mapping).
    Raises :class:`~kalm_lib.config.ConfigError` naming the key (and file) of the first problem.
    """
    data, where = load_config_data(source, "train", overrides)
    config = from_dict(StageConfig, data, where)
    validate_config(config, where)
    return config


def validate_config(c: StageConfig, where: str = "config") -> None:
    """The checks across fields that types alone cannot express; raises ConfigError naming the key."""
    for check in (_check_loss, _check_distill, _check_data, _check_train, _check_bookkeeping):
        problem = check(c)
        if problem:
            key, msg = problem
            raise ConfigError(f"{where}: {key}: {msg}")


# Each check returns (key, message) for the first problem of its section, or None.
def _check_loss(c: StageConfig) -> tuple[str, str] | None:
    L = c.loss
    if L.temperature <= 0:
        return "loss.temperature", f"must be > 0, got {L.temperature}"
    if L.focal_gamma < 0:
        return "loss.focal_gamma", f"must be >= 0, got {L.focal_gamma}"
    if L.num_hard_negatives < 0:
        return "loss.num_hard_negatives", f"must be >= 0, got {L.num_hard_negatives}"
    for task in L.in_batch_by_task:
        if task not in TASK_TYPES:
            return f"loss.in_batch_by_task.{task}", f"unknown task type; known: {list(TASK_TYPES)}"
    mode = L.mix_mode or "none"
    if mode != "none":
        if L.num_mix < 1:
            return "loss.num_mix", f"must be >= 1 when loss.mix_mode is {mode!r}"
        need = 2 if mode == "pairwise" else 1
        if L.num_hard_negatives < need:
            return "loss.mix_mode", f"{mode} mixing needs loss.num_hard_negatives >= {need}, got {L.num_hard_negatives}"
    if L.matryoshka_dims is not None:
        dims, weights = L.matryoshka_dims, L.matryoshka_weights
        if not dims or any(d < 1 for d in dims) or len(set(dims)) != len(dims):
            return "loss.matryoshka_dims", f"must be a non-empty list of distinct positive dims, got {dims}"
        if weights is not None and len(weights) != len(dims):
            return "loss.matryoshka_weights", f"has {len(weights)} entries for {len(dims)} dims"
        if weights is not None and any(w <= 0 for w in weights):
            return "loss.matryoshka_weights", f"must all be > 0, got {weights}"
    return None


def _check_distill(c: StageConfig) -> tuple[str, str] | None:
    L = c.loss
    if L.distill_weight_cl < 0 or L.distill_weight_kl < 0 or L.distill_weight_cl + L.distill_weight_kl == 0:
        return "loss.distill_weight_cl/kl", "must be >= 0 and not both 0"
    if L.distill_temperature <= 0:
        return "loss.distill_temperature", f"must be > 0, got {L.distill_temperature}"
    if L.distill_weight_kl > 0:
        if not c.distill.teacher:
            return "distill.teacher", "a teacher model is needed when loss.distill_weight_kl > 0"
        if L.num_hard_negatives < 1:
            return "loss.num_hard_negatives", "distillation needs candidates: set it >= 1"
    if c.stage == "distill" and L.distill_weight_kl <= 0:
        return "loss.distill_weight_kl", "stage 'distill' needs a KL weight > 0"
    if c.distill.teacher_batch_size < 1:
        return "distill.teacher_batch_size", f"must be >= 1, got {c.distill.teacher_batch_size}"
    template = c.distill.teacher_query_template
    if template is not None and "{instruction}" not in template:
        return "distill.teacher_query_template", f"needs an {{instruction}} placeholder, got {template!r}"
    return None


def _check_data(c: StageConfig) -> tuple[str, str] | None:
    D = c.data
    if c.model.max_length < 1:
        return "model.max_length", f"must be >= 1, got {c.model.max_length}"
    if not 0 <= D.homogeneous_ratio <= 1:
        return "data.homogeneous_ratio", f"must be in [0, 1], got {D.homogeneous_ratio}"
    for task in D.passage_instruction_tasks:
        if task not in TASK_TYPES:
            return "data.passage_instruction_tasks", f"unknown task type {task!r}"
    for key, w in D.source_weights.items():
        if not (math.isfinite(w) and w >= 0):
            return f"data.source_weights.{key}", f"must be a finite number >= 0, got {w}"
    if D.streaming:
        if D.source_weights:
            return "data.source_weights", "is for in-memory data; streamed sources carry their own weight"
        return _check_streaming(c)
    if D.sources or D.train_files:
        return "data.streaming", "data.sources / data.train_files are streamed: set data.streaming: true"
    if not D.train_file:
        return "data.train_file", "is required (a unified-record JSONL, e.g. <curated>/finetune.jsonl)"
    if D.max_records is not None and D.max_records < 1:
        return "data.max_records", f"must be >= 1 or null, got {D.max_records}"
    return None


def _check_streaming(c: StageConfig) -> tuple[str, str] | None:
    D = c.data
    if not (D.sources or D.train_files or D.train_file):
        return "data.sources", "streaming needs data.sources, data.train_files or data.train_file"
    if c.train.max_steps is None:
        return "train.max_steps", "is required with data.streaming (the schedule is set before the data is read)"
    if D.max_records is not None:
        return "data.max_records", "is for in-memory data; a streamed run's length is train.max_steps"
    if c.loss.distill_weight_kl > 0:
        return "data.streaming", "distillation reads its teacher-score cache over in-memory records"
    if D.homogeneous_ratio != 1:
        return "data.homogeneous_ratio", "streamed batches are task-homogeneous (1.0); mixing is in memory only"
    if D.positives != "example":
        return "data.positives", "label_text positives need every class of a source at once: in memory only"
    if D.temperature <= 0 or D.read_batch_rows < 1:
        return "data.temperature", "data.temperature must be > 0 and data.read_batch_rows >= 1"
    names = [s.name for s in D.sources]
    if len(set(names)) != len(names):
        return "data.sources", f"source names must be unique, got {names}"
    for i, s in enumerate(D.sources):
        key = f"data.sources[{i}]"
        if not s.name:
            return f"{key}.name", "is required"
        if sum([bool(s.files), bool(s.card), bool(s.hub)]) != 1:
            return key, f"source {s.name!r} needs exactly one of files, card, hub"
        if s.weight <= 0 or (s.rows is not None and s.rows < 1):
            return key, f"source {s.name!r}: weight must be > 0 and rows >= 1 or null"
        if s.task_type is not None and s.task_type not in TASK_TYPES:
            return f"{key}.task_type", f"unknown task type {s.task_type!r}; known: {list(TASK_TYPES)}"
    return None


def _check_train(c: StageConfig) -> tuple[str, str] | None:
    T = c.train
    if T.batch_size < 1:
        return "train.batch_size", f"must be >= 1, got {T.batch_size}"
    if T.max_steps is not None and T.max_steps < 1:
        return "train.max_steps", f"must be >= 1 (or null for epochs), got {T.max_steps}"
    if T.epochs <= 0:
        return "train.epochs", f"must be > 0, got {T.epochs}"
    if T.lr <= 0:
        return "train.lr", f"must be > 0, got {T.lr}"
    if not 0 <= T.warmup_ratio <= 1:
        return "train.warmup_ratio", f"must be in [0, 1], got {T.warmup_ratio}"
    if len(T.adam_betas) != 2:
        return "train.adam_betas", f"needs two values, got {T.adam_betas}"
    if T.chunk_size is not None and T.chunk_size < 1:
        return "train.chunk_size", f"must be >= 1 or null, got {T.chunk_size}"
    if T.chunk_tokens is not None and T.chunk_tokens < 1:
        return "train.chunk_tokens", f"must be >= 1 or null, got {T.chunk_tokens}"
    return None


def _check_bookkeeping(c: StageConfig) -> tuple[str, str] | None:
    if c.checkpoint.every_steps < 0 or c.checkpoint.keep_last < 1:
        return "checkpoint", "every_steps must be >= 0 and keep_last >= 1"
    if c.log.every_steps < 1:
        return "log.every_steps", f"must be >= 1, got {c.log.every_steps}"
    return None


def check_trackers(trackers: list[str]) -> None:
    """Trackers must be importable here (checked when a run starts: a GPU preset validates on a CPU box too)."""
    for tracker in trackers:
        modules = {"tensorboard": ("tensorboard", "tensorboardX")}.get(tracker, (tracker,))
        if not any(importlib.util.find_spec(m) for m in modules):
            raise ConfigError(f"log.trackers: {tracker!r} is not installed here (pip install {modules[0]})")


# ============================================================================================ resume
def resume_view(config: StageConfig | dict[str, Any]) -> dict[str, Any]:
    """The part of a config that decides what is trained (a resume must match it exactly)."""
    data = to_dict(config) if isinstance(config, StageConfig) else config
    return {k: v for k, v in data.items() if k not in RESUME_FREE_KEYS}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts (sorted)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and other values as JSON text (tracker-friendly scalars)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return out
