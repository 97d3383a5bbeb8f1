"""The trainer's stage configuration: one strictly typed :class:`StageConfig` per YAML recipe, its loading with
dotted overrides, and the checks that run before any work (unknown keys, wrong types, bad combinations)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from kalm_lib.config import ConfigError, apply_overrides, from_dict, load_yaml

TASK_TYPES = ("retrieval", "reranking", "sts", "pair_classification", "classification", "clustering", "nli",
              "pretrain")
# In-batch negatives are false negatives when the "positive" is just another example of the same class.
DEFAULT_IN_BATCH_BY_TASK = {"classification": False, "clustering": False}


# ============================================================================================ config
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


@dataclass
class DataConfig:
    """Training data: a unified-record JSONL (docs/CONTRACTS.md), batched per task."""

    train_file: str = ""
    homogeneous_ratio: float = 1.0          # 1 = every batch from one task; V1: semi-homogeneous
    passage_instruction_tasks: list[str] = field(default_factory=list)  # symmetric tasks: instruction on both sides
    max_records: int | None = None


@dataclass
class TrainConfig:
    """Optimisation."""

    seed: int = 0
    max_steps: int | None = None            # None: `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int = 32                    # queries per process per step (global = batch_size * processes)
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


# Keys that do not change what is trained: a resume may differ in them.
_RESUME_FREE_KEYS = ("output_dir", "checkpoint", "log")


def load_config(source: str | os.PathLike | dict[str, Any], overrides: list[str] | dict[str, Any] | None = None) -> StageConfig:
    """A :class:`StageConfig` from a YAML file (or dict) + dotted ``key=value`` overrides, fully validated."""
    where = str(source) if not isinstance(source, dict) else "config"
    data = load_yaml(source) if not isinstance(source, dict) else dict(source)
    if overrides:
        data = apply_overrides(data, overrides)
    config = from_dict(StageConfig, data, where)
    validate_config(config, where)
    return config


def validate_config(c: StageConfig, where: str = "config") -> None:
    """Checks across fields that types alone cannot express; raises ConfigError naming the key."""
    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{where}: {key}: {msg}")

    L, T = c.loss, c.train
    if L.temperature <= 0:
        bad("loss.temperature", f"must be > 0, got {L.temperature}")
    if L.focal_gamma < 0:
        bad("loss.focal_gamma", f"must be >= 0, got {L.focal_gamma}")
    if L.num_hard_negatives < 0:
        bad("loss.num_hard_negatives", f"must be >= 0, got {L.num_hard_negatives}")
    for task in L.in_batch_by_task:
        if task not in TASK_TYPES:
            bad(f"loss.in_batch_by_task.{task}", f"unknown task type; known: {list(TASK_TYPES)}")
    mode = L.mix_mode or "none"
    if mode != "none":
        if L.num_mix < 1:
            bad("loss.num_mix", f"must be >= 1 when loss.mix_mode is {mode!r}")
        need = 2 if mode == "pairwise" else 1
        if L.num_hard_negatives < need:
            bad("loss.mix_mode", f"{mode} mixing needs loss.num_hard_negatives >= {need}, got {L.num_hard_negatives}")
    if L.matryoshka_dims is not None:
        if not L.matryoshka_dims or any(d < 1 for d in L.matryoshka_dims):
            bad("loss.matryoshka_dims", f"must be a non-empty list of positive dims, got {L.matryoshka_dims}")
        weights = L.matryoshka_weights
        if weights is not None and len(weights) != len(L.matryoshka_dims):
            bad("loss.matryoshka_weights", f"has {len(weights)} entries for {len(L.matryoshka_dims)} dims")
        if weights is not None and any(w <= 0 for w in weights):
            bad("loss.matryoshka_weights", f"must all be > 0, got {weights}")
    if L.distill_weight_cl < 0 or L.distill_weight_kl < 0 or L.distill_weight_cl + L.distill_weight_kl == 0:
        bad("loss.distill_weight_cl/kl", "must be >= 0 and not both 0")
    if L.distill_temperature <= 0:
        bad("loss.distill_temperature", f"must be > 0, got {L.distill_temperature}")
    if L.distill_weight_kl > 0:
        if not c.distill.teacher:
            bad("distill.teacher", "a teacher model is needed when loss.distill_weight_kl > 0")
        if L.num_hard_negatives < 1:
            bad("loss.num_hard_negatives", "distillation needs candidates: set it >= 1")
    if c.stage == "distill" and L.distill_weight_kl <= 0:
        bad("loss.distill_weight_kl", "stage 'distill' needs a KL weight > 0")
    if not 0 <= c.data.homogeneous_ratio <= 1:
        bad("data.homogeneous_ratio", f"must be in [0, 1], got {c.data.homogeneous_ratio}")
    for task in c.data.passage_instruction_tasks:
        if task not in TASK_TYPES:
            bad("data.passage_instruction_tasks", f"unknown task type {task!r}")
    if not c.data.train_file:
        bad("data.train_file", "is required (a unified-record JSONL, e.g. <curated>/finetune.jsonl)")
    if c.model.max_length < 1:
        bad("model.max_length", f"must be >= 1, got {c.model.max_length}")
    if T.batch_size < 1:
        bad("train.batch_size", f"must be >= 1, got {T.batch_size}")
    if T.max_steps is not None and T.max_steps < 1:
        bad("train.max_steps", f"must be >= 1 (or null for epochs), got {T.max_steps}")
    if T.epochs <= 0:
        bad("train.epochs", f"must be > 0, got {T.epochs}")
    if T.lr <= 0:
        bad("train.lr", f"must be > 0, got {T.lr}")
    if not 0 <= T.warmup_ratio <= 1:
        bad("train.warmup_ratio", f"must be in [0, 1], got {T.warmup_ratio}")
    if len(T.adam_betas) != 2:
        bad("train.adam_betas", f"needs two values, got {T.adam_betas}")
    if T.chunk_size is not None and T.chunk_size < 1:
        bad("train.chunk_size", f"must be >= 1 or null, got {T.chunk_size}")
    if T.chunk_tokens is not None and T.chunk_tokens < 1:
        bad("train.chunk_tokens", f"must be >= 1 or null, got {T.chunk_tokens}")
    if c.checkpoint.every_steps < 0 or c.checkpoint.keep_last < 1:
        bad("checkpoint", "every_steps must be >= 0 and keep_last >= 1")
    if c.log.every_steps < 1:
        bad("log.every_steps", f"must be >= 1, got {c.log.every_steps}")


def _check_trackers(trackers: list[str]) -> None:
    """Trackers must be importable here (checked at run time: a GPU preset validates on a CPU box too)."""
    import importlib.util

    for tracker in trackers:
        modules = {"tensorboard": ("tensorboard", "tensorboardX")}.get(tracker, (tracker,))
        if not any(importlib.util.find_spec(m) for m in modules):
            raise ConfigError(f"log.trackers: {tracker!r} is not installed here (pip install {modules[0]})")


def _resume_view(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _RESUME_FREE_KEYS}
