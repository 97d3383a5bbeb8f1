"""The distributed engines a stage trains under: one process, DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3.

The engine is chosen the accelerate way, outside the recipe: ``accelerate launch --config_file
configs/accelerate/<engine>.yaml`` sets ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED`` and the
``FSDP_*`` / ``ACCELERATE_DEEPSPEED_*`` variables, and :func:`build_accelerator` builds accelerate's plugins
from them (as ``Accelerator()`` itself does). Everything that differs between engines lives here:

- the accelerator (DDP without buffer broadcasts, the DeepSpeed batch and clipping values of the recipe);
- one step's gradient plumbing: how a chunk back-propagates (:func:`backward`), which chunks skip the
  gradient synchronisation (:func:`chunk_context`), the optimizer step with its non-finite guard and
  clipping (:func:`optimizer_step`), the agreement on a chunk count (:func:`agree_on_max`);
- the full (gathered) weights for a model folder (:func:`full_state_dict`, a collective);
- which checkpoints a run may resume from with another process count (:func:`resume_problem`).

CPU rehearsal: accelerate turns FSDP and DeepSpeed on only for GPU-like process groups (accelerate 1.15,
``AcceleratorState.__init__``: the FSDP branch is reached for MULTI_GPU-like types only and the DeepSpeed
branch needs ``cpu=False``), so on a machine without GPUs the same ``accelerate launch`` command would
silently train with DDP over gloo. :func:`_engage_on_cpu` sets the state accelerate sets on GPUs, on CPU only,
so the tests run the code path a GPU run takes (FSDP2 ``fully_shard`` and DeepSpeed ZeRO over gloo).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import (DeepSpeedPlugin, DistributedDataParallelKwargs, DistributedType,
                              FullyShardedDataParallelPlugin)
from transformers.integrations import unset_hf_deepspeed_config

from kalm_lib.config import ConfigError

SINGLE, DDP, FSDP2 = "single", "ddp", "fsdp2"
ZERO2, ZERO3 = "deepspeed-zero2", "deepspeed-zero3"
ENGINES = (SINGLE, DDP, FSDP2, ZERO2, ZERO3)
# engines whose checkpoint holds the whole optimizer state in one file (any process count can load it)
UNSHARDED = (SINGLE, DDP)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


# ============================================================================================ accelerator
def build_accelerator(mixed_precision: str, *, trackers: list[str] | None = None,
                      project_dir: str | None = None) -> Accelerator:
    """The accelerator of the engine the environment asks for (``accelerate launch --config_file ...``).

    ``mixed_precision``: ``no``/``bf16``/``fp16`` (the stage config's, resolved). DDP never re-broadcasts
    buffers: the rotary ``inv_freq`` buffers are identical on every rank, and a broadcast in every forward
    deadlocks when ranks run different numbers of forwards (chunks) per step.
    """
    fsdp = FullyShardedDataParallelPlugin() if _env_flag("ACCELERATE_USE_FSDP") else None
    deepspeed = DeepSpeedPlugin() if _env_flag("ACCELERATE_USE_DEEPSPEED") else None
    if fsdp is not None and fsdp.fsdp_version != 2:
        raise ConfigError("FSDP: only fsdp_version 2 is supported (configs/accelerate/fsdp.yaml); FSDP1's "
                          "checkpoint gather is not wired up")
    _allow_new_precision(mixed_precision)
    # cpu=True is what makes accelerate treat torchrun's processes as a gloo group on a machine without GPUs
    cpu = not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, step_scheduler_with_optimizer=False,
                              log_with=trackers or None, project_dir=project_dir, fsdp_plugin=fsdp,
                              deepspeed_plugin=deepspeed,
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    if cpu:
        _engage_on_cpu(accelerator, fsdp, deepspeed, mixed_precision)
    if deepspeed is not None:
        _load_models_whole(deepspeed)
    return accelerator


def _load_models_whole(deepspeed: DeepSpeedPlugin) -> None:
    """Models (the trained one, a teacher) are loaded whole on every process and sharded by ``prepare``.

    accelerate registers its DeepSpeed config with transformers whatever ``zero3_init_flag`` says, and under
    ZeRO-3 transformers then builds every model inside ``deepspeed.zero.Init``: parameters partitioned at
    construction, i.e. empty stubs for the teacher, the checkpoint shell and LoRA. The registration is
    dropped (it is only read while models are built and saved); ``zero3_init_flag: true`` is refused.
    """
    if deepspeed.zero_stage != 3:
        return
    if deepspeed.zero3_init_flag:
        raise ConfigError("DeepSpeed zero3_init_flag: true is not supported: models are loaded whole and sharded "
                          "by accelerator.prepare (set zero3_init_flag: false, as in deepspeed_zero3.yaml)")
    unset_hf_deepspeed_config()


def _allow_new_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with another
    mixed precision; in one notebook or process, stages may differ (fp32 pre-training, then a bf16 stage), so
    the precision part is dropped (the process group, PartialState, stays). accelerate has no public API for
    this, hence its documented-internal ``_reset_state``."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state(reset_partial_state=False)


def _engage_on_cpu(accelerator: Accelerator, fsdp: FullyShardedDataParallelPlugin | None,
                   deepspeed: DeepSpeedPlugin | None, mixed_precision: str) -> None:
    """CPU only: give FSDP2 / DeepSpeed the state accelerate gives them on GPUs (see the module docstring).

    Without this the documented configs silently train with DDP on CPU. The values mirror accelerate's own
    GPU branch (state.py); the type is also set on PartialState because every ``AcceleratorState()``
    re-reads it from there (otherwise the first save_state would see MULTI_CPU again).
    """
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or (fsdp is None and deepspeed is None):
        return
    if deepspeed is not None:
        deepspeed.set_mixed_precision(mixed_precision)
        deepspeed.select(_from_accelerator_state=True)
        state.deepspeed_plugins = deepspeed
        state._mixed_precision = "no"  # DeepSpeed runs its precision from its own config
        kind = DistributedType.DEEPSPEED
    else:
        if mixed_precision != "no":
            fsdp.set_mixed_precision(mixed_precision)
        state.fsdp_plugin = fsdp
        kind = DistributedType.FSDP
    state.distributed_type = kind
    PartialState._shared_state["distributed_type"] = kind


def engine_name(accelerator: Accelerator) -> str:
    """``single``, ``ddp``, ``fsdp2``, ``deepspeed-zero2`` or ``deepspeed-zero3``."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        return FSDP2
    return SINGLE if kind == DistributedType.NO else DDP


def prepare(accelerator: Accelerator, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, *,
            per_device_batch: int, max_grad_norm: float | None) -> tuple[Any, Any, Any]:
    """THE ``accelerator.prepare`` of a run (model, optimizer, scheduler; no DataLoader).

    DeepSpeed sizes its batch from a prepared DataLoader, and there is none here (the trainer builds global
    batches itself), so the recipe's numbers go into its config: the per-device batch, one accumulation step
    per optimizer step (GradCache chunks are micro-steps whose boundary the trainer sets), and the recipe's
    clipping (``train.max_grad_norm``; DeepSpeed clips inside its step).
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
            raise ConfigError(f"DeepSpeed config: gradient_accumulation_steps must be 1 (got "
                              f"{ds['gradient_accumulation_steps']}): train.batch_size is the global batch, and "
                              f"GradCache (train.grad_cache) is how a large batch fits in memory")
        ds["train_micro_batch_size_per_gpu"] = per_device_batch
        ds["gradient_accumulation_steps"] = 1
        ds["train_batch_size"] = per_device_batch * accelerator.num_processes
        ds["gradient_clipping"] = float(max_grad_norm or 0.0)
        if ds.get("zero_optimization", {}).get("stage") == 3:
            # the model folder of every checkpoint is gathered from the shards (accelerator.get_state_dict)
            ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return accelerator.prepare(model, optimizer, scheduler)


# ============================================================================================ one step
def agree_on_max(accelerator: Accelerator, n: int) -> int:
    """The largest ``n`` over all processes (each process passes its own)."""
    if accelerator.num_processes == 1:
        return n
    t = torch.tensor([n], device=accelerator.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def backward(accelerator: Accelerator, model: Any, loss: torch.Tensor) -> None:
    """Back-propagate one (chunk's) loss. DeepSpeed: through its engine, which never steps here (the
    optimizer step is :func:`optimizer_step`, after the non-finite check); others: ``accelerator.backward``."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.backward(loss)
    else:
        accelerator.backward(loss)


@contextlib.contextmanager
def chunk_context(accelerator: Accelerator, model: Any):
    """Entered for every GradCache chunk but the last of a step (the gradient-accumulation boundary).

    - DDP: ``no_sync`` (gradients accumulate locally; the last chunk's backward all-reduces them once).
    - DeepSpeed: the engine is told it is not at an accumulation boundary (ZeRO reduces partitions as it
      goes; the boundary is restored for the last chunk).
    - FSDP2: nothing. Skipping the reduce-scatter would keep unsharded gradients on every rank, the memory
      FSDP is chosen to save; each chunk's gradients are reduce-scattered into the sharded ``.grad``.
    """
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        model.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            model.set_gradient_accumulation_boundary(True)
    elif kind in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        with accelerator.no_sync(model):
            yield
    else:
        yield


def optimizer_step(accelerator: Accelerator, model: Any, optimizer: Any, scheduler: Any,
                   max_grad_norm: float | None) -> torch.Tensor | float | None:
    """Clip, then step optimizer and scheduler unless the gradient norm is NaN/Inf; returns the norm.

    A non-finite norm leaves the weights as they were (the caller stops the run). DeepSpeed does the same
    inside ``engine.step()``: it computes the global norm over its shards, skips the update when the norm
    is not finite (reported as inf) and clips to ``gradient_clipping`` (set from ``train.max_grad_norm``).
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.step()
        norm = model.get_global_grad_norm()
        if norm is not None and torch.isfinite(torch.as_tensor(norm)):
            scheduler.step()
        return norm
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm) if max_grad_norm else None
    if norm is not None and not torch.isfinite(torch.as_tensor(norm)):
        return norm
    optimizer.step()
    scheduler.step()
    return norm


# ============================================================================================ checkpoints
def full_state_dict(accelerator: Accelerator, model: Any) -> dict[str, torch.Tensor] | None:
    """The model's full weights, gathered from every shard: call on EVERY process (a collective under
    FSDP2 and ZeRO-3). The main process gets the dict; the others may get an empty dict or None."""
    return accelerator.get_state_dict(model)


def resume_problem(saved: dict[str, Any], engine: str, world: int, *, gathered: bool) -> str | None:
    """Why a checkpoint's trainer state cannot be resumed by ``engine`` on ``world`` processes, or None.

    The global batch and the data order do not depend on the process count (every process takes its slice
    of the same global batches), so a run may change its process count when its checkpoint holds the whole
    optimizer state (one process, DDP) and the loss does not depend on it (``loss.gather_across_devices``).
    Sharded states (FSDP2, ZeRO) load only into the engine and process count that wrote them.
    """
    was_world = saved.get("world_size", 1)
    was_engine = saved.get("engine", SINGLE if was_world == 1 else DDP)  # checkpoints from before engines: DDP
    if was_engine == engine and was_world == world:
        return None
    written = f"written by {was_world} process(es) under {was_engine}"
    if was_engine not in UNSHARDED or engine not in UNSHARDED:
        return (f"{written}; its sharded state loads only there: resume with --num_processes {was_world} and the "
                f"{was_engine} accelerate config, or start a new output_dir from its weights "
                f"(model.name_or_path=<that checkpoint>)")
    if was_world != world and not gathered:
        return (f"{written}, with loss.gather_across_devices=false (the negatives of a query depend on the "
                f"process count): resume with {was_world} process(es), or start a new output_dir")
    return None
