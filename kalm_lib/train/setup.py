"""Everything a run needs before its first step: data, accelerator, model, teacher, optimizer, scheduler, resume.

:func:`setup` runs the checks that must fail before any work (trackers, data, batch size over the processes,
the output folder's lock, resume compatibility, Matryoshka dims), then builds the run. The one
``accelerator.prepare`` is :func:`kalm_lib.train.engines.prepare`, called here; every save is in
:mod:`kalm_lib.train.checkpoint`; what differs between engines is in :mod:`kalm_lib.train.engines`.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from peft import LoraConfig as PeftLoraConfig, get_peft_model
from transformers import get_scheduler

from kalm_lib import locking, provenance
from kalm_lib.config import ConfigError, to_dict
from kalm_lib.model import EmbeddingModel
from kalm_lib.prompts import policy_prompt_table
from kalm_lib.train import checkpoint as ckpt, engines
from kalm_lib.train.config import (LoraConfig, ModelConfig, StageConfig, check_trackers, config_differences, flatten,
                                   resume_view)
from kalm_lib.train.data import (TeacherCache, data_hashes, load_training_data, model_identity, plan_steps,
                                 split_global_batch, teacher_query_format, teacher_scores)
from kalm_lib.train.stream import STATE_KEY, check_sources, stream_identity


LOCK_FILE = ".kalm-train.lock"


@dataclass
class Position:
    """Where a run stands: optimizer steps done, and the next batch (epoch, index in that epoch)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass
class Run:
    """A stage ready to train: what :func:`setup` built, read by the loop."""

    config: StageConfig
    accelerator: Accelerator
    model: Any                      # the prepared model (DDP/FSDP2/DeepSpeed engine): forward and backward
    unwrapped: EmbeddingModel       # the same model before prepare: tokenizer and settings (not its weights)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    records: list[dict[str, Any]]
    row_counts: dict[str, int]
    teacher: TeacherCache | None
    global_batch: int               # queries per optimizer step, over all processes (train.batch_size)
    per_device_batch: int           # this process's slice of it
    max_steps: int
    start: Position
    resumed_from: Path | None
    resume_state: dict[str, Any] | None     # the trainer_state.json resumed from (the streamed data position)
    state_base: dict[str, Any]      # what every checkpoint's trainer_state.json records besides the position
    save_model: Callable[[Any, dict], Any]  # (folder, full state dict): the model folder (LoRA: merged weights)
    engine: str = engines.SINGLE
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the output lock
    superseded: Path | None = None  # where a previous run in output_dir was moved aside (a fresh run)

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


def setup(config: StageConfig) -> Run:
    """Check, then build everything for ``config`` (validated); resumes from the last complete checkpoint.

    The returned run holds the output folder's lock in ``run.resources`` (close it when the run ends).
    """
    C, T = config, config.train
    check_trackers(C.log.trackers)
    if C.data.streaming:  # read per process by the loop's feed (stream.py); the sources are checked here
        check_sources(C)
        records, row_counts = [], {}
        accelerator = make_accelerator(C)
        world = accelerator.num_processes
        global_batch, per_device, max_steps = T.batch_size, split_global_batch(T.batch_size, world), T.max_steps
    else:
        records, row_counts = load_training_data(C)
        accelerator = make_accelerator(C)
        global_batch, per_device, max_steps = plan_steps(records, C, accelerator.num_processes)
    resources = contextlib.ExitStack()
    try:
        resources.enter_context(_output_lock(accelerator, Path(C.output_dir)))
        return _build(C, accelerator, records, row_counts, (global_batch, per_device, max_steps), resources)
    except BaseException:
        resources.close()
        raise


def _build(C: StageConfig, accelerator: Accelerator, records, row_counts, plan: tuple[int, int, int],
           resources: contextlib.ExitStack) -> Run:
    """The run, once its output folder is ours: resume check, model, optimizer, prepare, resume."""
    T, out, engine = C.train, Path(C.output_dir), engines.engine_name(accelerator)
    global_batch, per_device, max_steps = plan
    resume_from = resumable_checkpoint(C, engine=engine, world=accelerator.num_processes)
    if accelerator.is_main_process:
        ckpt.remove_stale_temp(out)
        out.mkdir(parents=True, exist_ok=True)
    superseded = _move_previous_run(C, accelerator) if resume_from is None else None

    set_seed(T.seed)
    model = load_model(C.model, T.seed)
    # the saved folder carries the prompts of the policy it was trained under: evaluation asks it the same way
    model.prompts = {**model.prompts, **policy_prompt_table(C.data.instruction_policy)}
    _check_model_fits(C, model, resume_from)
    teacher = _teacher_cache(C, records, accelerator) if C.loss.distill_weight_kl > 0 else None
    if C.model.lora.enabled:
        apply_lora(model, C.model.lora)
    if T.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    # the main process writes model folders from gathered weights into a copy without storage (see model_saver)
    save_model = ckpt.model_saver(model, lora=C.model.lora.enabled) if accelerator.is_main_process else None
    optimizer = make_optimizer(model, C)
    scheduler = make_scheduler(optimizer, C, max_steps)
    unwrapped = model
    model, optimizer, scheduler = engines.prepare(accelerator, model, optimizer, scheduler,
                                                  per_device_batch=per_device, max_grad_norm=T.max_grad_norm)
    start, state = Position(), None
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from)
        start = Position(state["step"], state["epoch"], state["batch_in_epoch"])
    cfg = to_dict(C)
    run = Run(config=C, accelerator=accelerator, model=model, unwrapped=unwrapped, optimizer=optimizer,
              scheduler=scheduler, records=records, row_counts=row_counts, teacher=teacher,
              global_batch=global_batch, per_device_batch=per_device, max_steps=max_steps, start=start,
              resumed_from=resume_from, resume_state=state,
              state_base={"config": cfg, "config_hash": provenance.config_hash(resume_view(cfg)),
                          "model_settings": unwrapped.settings(), "max_steps": max_steps,
                          "world_size": accelerator.num_processes, "engine": engine, "global_batch": global_batch},
              save_model=save_model, engine=engine, resources=resources, superseded=superseded)
    _record_start(run)
    return run


@contextlib.contextmanager
def _output_lock(accelerator: Accelerator, out: Path):
    """Only one run writes into an output folder (issue 15): the main process holds ``<out>/.kalm-train.lock``
    for the whole run; a second run is refused on every process with the holder's pid, host and start time."""
    refusal = [None]
    with contextlib.ExitStack() as stack:
        if accelerator.is_main_process:
            try:
                stack.enter_context(locking.hold(out / LOCK_FILE, what=f"training output {out}"))
            except locking.LockHeld as e:
                refusal = [str(e)]
        if accelerator.num_processes > 1:
            broadcast_object_list(refusal, from_process=0)
        if refusal[0] is not None:
            raise locking.LockHeld(refusal[0])
        yield


def _move_previous_run(config: StageConfig, accelerator: Accelerator) -> Path | None:
    """A fresh run never mixes with another run's outputs (issue 15): what a previous run left in the output folder
    (checkpoints, ``final``, metrics, provenance) moves to ``<output_dir>/superseded/<UTC time>/``, said on stderr
    and in ``provenance.json``; if it cannot move, every process stops with a one-line ConfigError. A run killed
    before its first checkpoint (only metrics/provenance, ``checkpoint.resume`` on) restarts in place."""
    out, outcome = Path(config.output_dir), [None, None]
    if accelerator.is_main_process:
        left = ckpt.previous_run(out)
        restart = config.checkpoint.resume and all(p.name in ("metrics.jsonl", "provenance.json") for p in left)
        if left and not restart:
            try:
                outcome[0] = str(ckpt.move_previous_run(out))
                print(f"kalm train: a fresh run in {out}: the previous run there ({', '.join(p.name for p in left)}) "
                      f"was moved to {outcome[0]}/", file=sys.stderr)
            except OSError as e:
                outcome[1] = (f"output_dir {out} holds a previous run that cannot be moved aside ({e}); use another "
                              f"output_dir")
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    if outcome[1] is not None:
        raise ConfigError(outcome[1])
    return Path(outcome[0]) if outcome[0] else None


# ============================================================================================ accelerator
def make_accelerator(config: StageConfig) -> Accelerator:
    """The accelerator of a stage, on the engine the launcher asked for (:func:`engines.build_accelerator`):
    mixed precision ``auto`` is bf16 on GPU and fp32 on CPU."""
    mixed_precision = config.train.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    return engines.build_accelerator(mixed_precision, trackers=config.log.trackers,
                                     project_dir=str(config.output_dir))


# ============================================================================================ model
def load_model(mc: ModelConfig, seed: int) -> EmbeddingModel:
    """The model trained: ``tiny:<arch>`` (random init, seeded), or anything ``EmbeddingModel.from_pretrained`` loads."""
    if mc.name_or_path.startswith("tiny:"):
        arch = mc.name_or_path.split(":", 1)[1] or "qwen2"
        return EmbeddingModel.tiny_decoder(arch, seed=seed, max_length=mc.max_length,
                                           bidirectional=True if mc.bidirectional is None else mc.bidirectional,
                                           pooling=mc.pooling or "mean",
                                           include_prompt=True if mc.include_prompt is None else mc.include_prompt,
                                           padding_free=mc.padding_free)
    return EmbeddingModel.from_pretrained(mc.name_or_path, bidirectional=mc.bidirectional, pooling=mc.pooling,
                                          max_length=mc.max_length, include_prompt=mc.include_prompt,
                                          dtype=mc.dtype, attn_implementation=mc.attn_implementation,
                                          padding_free=mc.padding_free)


def apply_lora(model: EmbeddingModel, lc: LoraConfig) -> EmbeddingModel:
    """LoRA adapters on the backbone through peft (only they train; checkpoints save merged weights)."""
    peft_config = PeftLoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                 target_modules=lc.target_modules, bias="none")
    model.backbone = get_peft_model(model.backbone, peft_config)
    return model


def enable_gradient_checkpointing(model: EmbeddingModel) -> None:
    """Activation checkpointing on the backbone, non-reentrant (it replays the RNG itself, and works with DDP
    and with GradCache's second forward). transformers >= 5.2x renamed the method; older 5.x has the old name."""
    kwargs = {"use_reentrant": False}
    if getattr(model.backbone.config, "use_cache", None):  # an encoder keeps no KV cache; avoids transformers' warning
        model.backbone.config.use_cache = False
    enable = getattr(model.backbone, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _check_model_fits(config: StageConfig, model: EmbeddingModel, resume_from: Path | None) -> None:
    """Matryoshka dims within the embedding, and a resumed checkpoint of the same width."""
    dims = config.loss.matryoshka_dims
    if dims and max(dims) > model.embedding_dim:
        raise ConfigError(f"loss.matryoshka_dims: {max(dims)} exceeds the embedding dim "
                          f"{model.embedding_dim} of {config.model.name_or_path}")
    if resume_from is not None:
        saved = ckpt.read_state(resume_from).get("model_settings", {})
        if saved and saved.get("embedding_dim") != model.embedding_dim:
            raise ConfigError(f"{resume_from} was trained on a model with embedding dim "
                              f"{saved.get('embedding_dim')}, not {model.embedding_dim}")


def _teacher_cache(config: StageConfig, records: list[dict[str, Any]], accelerator: Accelerator) -> TeacherCache:
    """The teacher's candidate scores, computed once by the main process (the others wait, then read the cache)."""
    C = config
    key_parts = {"teacher": model_identity(C.distill.teacher),
                 "data_sha256": provenance.sha256_file(C.data.train_file) if Path(C.data.train_file).is_file()
                 else data_hashes(C.data.train_file)["train_files_sha256"], "max_records": C.data.max_records,
                 "max_length": C.model.max_length}
    with accelerator.main_process_first():
        return teacher_scores(
            lambda: EmbeddingModel.from_pretrained(C.distill.teacher, max_length=C.model.max_length,
                                                   device=accelerator.device),
            records, cache_dir=C.distill.cache_dir or Path(C.output_dir) / "teacher_cache", key_parts=key_parts,
            passage_instruction_tasks=C.data.passage_prompt_tasks(),
            batch_size=C.distill.teacher_batch_size, show_progress=accelerator.is_main_process,
            query_format=teacher_query_format(C.distill.teacher, C.distill.teacher_query_template))


# ============================================================================================ optimisation
def make_optimizer(model: EmbeddingModel, config: StageConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-d tensors)."""
    T = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": T.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=T.lr, betas=tuple(T.adam_betas), eps=T.adam_eps)


def make_scheduler(optimizer: torch.optim.Optimizer, config: StageConfig, max_steps: int):
    """transformers' schedule named by ``train.scheduler`` (``constant`` keeps the warmup), warmup included."""
    T = config.train
    return get_scheduler({"constant": "constant_with_warmup"}.get(T.scheduler, T.scheduler), optimizer,
                         num_warmup_steps=int(math.ceil(T.warmup_ratio * max_steps)), num_training_steps=max_steps)


# ============================================================================================ resume
def resumable_checkpoint(config: StageConfig, *, engine: str = engines.SINGLE, world: int = 1) -> Path | None:
    """The checkpoint to resume from (``checkpoint.resume``), refusing one trained with a different config, or
    one whose state this engine and process count cannot continue exactly (:func:`engines.resume_problem`)."""
    if not config.checkpoint.resume:
        return None
    found = ckpt.latest_checkpoint(config.output_dir)
    if found is None:
        return None
    saved = ckpt.read_state(found)
    old, new = resume_view(saved.get("config", {})), resume_view(config)
    if old != new:
        raise ConfigError(f"output_dir {config.output_dir} holds {found.name} from a different config "
                          f"(differs in {config_differences(old, new)[:8]}); use another output_dir, or "
                          f"checkpoint.resume=false (--no-resume) to start afresh there (the old run moves to "
                          f"{Path(config.output_dir) / ckpt.SUPERSEDED_DIR}/<UTC time>/)")
    problem = engines.resume_problem(saved, engine, world, gathered=config.loss.gather_across_devices)
    if STATE_KEY in saved and saved.get("world_size", 1) != world:
        problem = (f"written by {saved.get('world_size', 1)} process(es) from streamed data, whose reading positions "
                   f"are per process: resume with --num_processes {saved.get('world_size', 1)}, or start a new "
                   f"output_dir from its weights (model.name_or_path=<that checkpoint>)")
    if problem:
        raise ConfigError(f"cannot resume {found} on {world} process(es) under {engine}: it was {problem}")
    return found


def _record_start(run: Run) -> None:
    """``provenance.json`` of the run (config, data hashes, rows, world size, resume) and the trackers' start."""
    C, accelerator = run.config, run.accelerator
    cfg = run.state_base["config"]
    if accelerator.is_main_process:
        provenance.write(run.output_dir / "provenance.json", provenance.collect(
            cfg, seed=C.train.seed, stage=C.stage,
            data_hashes=stream_identity(C) if C.data.streaming else data_hashes(C.data.train_file),
            world_size=accelerator.num_processes, engine=run.engine, global_batch=run.global_batch,
            rows=run.row_counts, model=model_identity(C.model.name_or_path),
            max_steps=run.max_steps, resumed_from=str(run.resumed_from) if run.resumed_from else None,
            teacher_cache=str(run.teacher.path) if run.teacher else None,
            superseded=str(run.superseded) if run.superseded else None))
    if C.log.trackers:
        accelerator.init_trackers("kalm", config=flatten(cfg))
