"""One trainer for the three KaLM stages: pre-training, fine-tuning and distillation (DESIGN.md §1.2-1.3).

    kalm train --config configs/train/smoke/finetune.yaml train.max_steps=20 output_dir=runs/x/train/finetune
    python -m kalm_lib.train --config ...                       # the same
    accelerate launch --config_file configs/accelerate/ddp.yaml -m kalm_lib.train --config ...
    result = train(load_config("configs/train/cpu-demo/pretrain.yaml", ["train.max_steps=50"]))  # notebook

A stage is a :class:`StageConfig` (YAML, strictly typed). The objective follows from it:

- pre-training: InfoNCE with in-batch negatives (``loss.num_hard_negatives: 0``);
- fine-tuning: + M hard negatives per query, focal reweighting, online hard-negative mixing, Matryoshka,
  in-batch negatives switched per task type (off for classification/clustering: false negatives);
- distillation: ``a * L_CL + b * L_KL`` with KL to a teacher's scores over each query's candidates, the
  teacher's scores computed once with any EmbeddingModel and cached on disk (:func:`teacher_scores`).

Embeddings are gathered across processes with :func:`kalm_lib.losses.gather_with_grad`, so every rank
computes the loss of the global batch (DDP's gradient averaging then gives the one-process gradient).
GradCache (:mod:`kalm_lib.gradcache`) decouples the contrastive batch from memory. Checkpoints
(:mod:`kalm_lib.checkpoint`) are atomic and resumable bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from kalm_lib.train import checkpoint as ckpt
from kalm_lib import provenance
from kalm_lib.config import ConfigError, to_dict
from kalm_lib.train.gradcache import embed_with_graph, grad_cache_step, make_chunks, tokenize_unpadded
from kalm_lib.losses import candidate_scores, distill_kl, gather_with_grad, info_nce, matryoshka, mix_hard_negatives
# the stage config and the data side live in their own modules; re-exported here so ``kalm_lib.train`` stays the
# one import of the trainer (``from kalm_lib.train import load_config, train``)
from kalm_lib.train.config import (DEFAULT_IN_BATCH_BY_TASK, TASK_TYPES, CheckpointConfig, DataConfig,  # noqa: F401
                                   DistillConfig, LogConfig, LoraConfig, LossConfig, ModelConfig, StageConfig,
                                   TrainConfig, _check_trackers, _resume_view, load_config, validate_config)
from kalm_lib.train.data import (Batch, DataError, TeacherCache, build_batch, epoch_batches,  # noqa: F401
                                 load_records, model_identity, teacher_scores)

# ============================================================================================ objective
def make_objective(config: StageConfig, *, step_seed: int) -> Callable[..., tuple[torch.Tensor, dict[str, Any]]]:
    """``objective(q, pos, neg, in_batch, teacher) -> (loss, details)`` over the global batch.

    ``q`` [N, d], ``pos`` [N, d], ``neg`` [N, M, d] or None, ``in_batch`` [N] bool, ``teacher`` [N, 1+M] or
    None. Mixed negatives are drawn inside (from the truncated embeddings under Matryoshka) with a
    generator seeded per step, so every process and a resumed run draw the same ones.
    """
    L = config.loss
    mode = L.mix_mode or "none"

    def single(q, pos, neg=None, *, in_batch, teacher):
        mixed = None
        if mode != "none":
            gen = torch.Generator(device="cpu").manual_seed(step_seed)
            mixed = mix_hard_negatives(q, neg, num_mix=L.num_mix, mode=mode, detach=L.mix_detach, generator=gen)
        kw = dict(temperature=L.temperature, focal_gamma=L.focal_gamma, focal_detach=L.focal_detach,
                  mixed_neg=mixed, return_details=True)
        flags = in_batch
        if bool(flags.all()) or not bool(flags.any()):
            per_query, det = info_nce(q, pos, neg, in_batch=bool(flags[0]), reduction="none", **kw)
            p, w, acc = det["p"], det["weights"], det["accuracy"]
        else:  # a semi-homogeneous batch mixing tasks with and without in-batch negatives
            on, d_on = info_nce(q, pos, neg, in_batch=True, reduction="none", **kw)
            off, d_off = info_nce(q, pos, neg, in_batch=False, reduction="none", **kw)
            per_query = torch.where(flags, on, off)
            p = torch.where(flags, d_on["p"], d_off["p"])
            w = torch.where(flags, d_on["weights"], d_off["weights"])
            hit_on = d_on["logits"].argmax(1) == d_on["labels"]
            hit_off = d_off["logits"].argmax(1) == d_off["labels"]
            acc = torch.where(flags, hit_on, hit_off).float().mean()
        if L.focal_normalize and L.focal_gamma != 0:
            cl = per_query.sum() / w.sum()
        else:
            cl = per_query.mean()
        details = {"loss_cl": cl.detach(), "focal_weight_mean": w.mean(), "accuracy": acc, "p_pos": p.mean()}
        loss = L.distill_weight_cl * cl if L.distill_weight_kl > 0 else cl
        if L.distill_weight_kl > 0:
            kl = distill_kl(candidate_scores(q, pos, neg), teacher.to(q.device), L.distill_temperature)
            loss = loss + L.distill_weight_kl * kl
            details["loss_kl"] = kl.detach()
        return loss, details

    if not L.matryoshka_dims:
        return single
    weights = L.matryoshka_weights or [1.0] * len(L.matryoshka_dims)
    mrl = matryoshka(single, L.matryoshka_dims, weights)

    def objective(q, pos, neg=None, *, in_batch, teacher):
        loss, per_dim = mrl(q, pos, neg, in_batch=in_batch, teacher=teacher)
        return loss, per_dim[max(per_dim)]  # log the details of the largest dim

    return objective


# ============================================================================================ trainer
@dataclass
class TrainResult:
    """What :func:`train` returns: where things are and the last logged metrics."""

    output_dir: Path
    final_model: Path | None
    last_checkpoint: Path | None
    steps: int
    metrics: dict[str, Any]
    resumed_from: Path | None = None


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient) became NaN/Inf; the message names the step and the batch's record ids."""


def _load_model(mc: ModelConfig, seed: int):
    from kalm_lib.model import EmbeddingModel

    if mc.name_or_path.startswith("tiny:"):
        arch = mc.name_or_path.split(":", 1)[1] or "qwen2"
        return EmbeddingModel.tiny_decoder(arch, seed=seed, max_length=mc.max_length,
                                           bidirectional=True if mc.bidirectional is None else mc.bidirectional,
                                           pooling=mc.pooling or "mean",
                                           include_prompt=True if mc.include_prompt is None else mc.include_prompt)
    return EmbeddingModel.from_pretrained(mc.name_or_path, bidirectional=mc.bidirectional, pooling=mc.pooling,
                                          max_length=mc.max_length, include_prompt=mc.include_prompt,
                                          dtype=mc.dtype, attn_implementation=mc.attn_implementation)


def _allow_new_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with another
    mixed precision; in one notebook or process, stages may differ (fp32 pre-training, then a bf16 stage), so
    the precision part is dropped (the process group, PartialState, stays). accelerate has no public API for
    this, hence its documented-internal ``_reset_state``."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state(reset_partial_state=False)


def enable_gradient_checkpointing(model) -> None:
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


def _apply_lora(model, lc: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_config = PeftLoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                 target_modules=lc.target_modules, bias="none")
    model.backbone = get_peft_model(model.backbone, peft_config)
    return model


def _save_model_fn(model, lora: bool):
    """How a checkpoint's EmbeddingModel folder is written (LoRA: merged weights on a copy)."""
    if not lora:
        return model.save

    def save(path):
        import copy

        merged = copy.deepcopy(model)
        merged.backbone = merged.backbone.merge_and_unload()
        return merged.save(path)

    return save


def _tqdm():
    """tqdm.auto in JupyterLab; plain text bars when headless (papermill exports cannot show widget bars)."""
    if os.environ.get("KALM_HEADLESS", "").lower() in ("1", "true", "yes"):
        from tqdm import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _data_hashes(train_file: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"train_file": str(train_file), "train_file_sha256": provenance.sha256_file(train_file)}
    curated = train_file.parent / "provenance.json"
    if curated.is_file():  # card hashes recorded by `kalm curate`
        try:
            out["curation"] = json.loads(curated.read_text()).get("data", {})
        except json.JSONDecodeError:
            pass
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after ``step`` (a resumed run logs those steps again)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def train(config: StageConfig | str | os.PathLike | dict[str, Any], overrides: list[str] | None = None, *,
          callbacks: list[Callable[[dict[str, Any]], None]] | None = None) -> TrainResult:
    """Run one stage; returns the output dir, the final model folder and the last metrics.

    Re-running the same config on the same ``output_dir`` resumes from its last complete checkpoint
    (``checkpoint.resume``). ``callbacks`` get every logged metrics dict on the main process (live plots).
    """
    if not isinstance(config, StageConfig):
        config = load_config(config, overrides)
    elif overrides:
        config = load_config(to_dict(config), overrides)
    else:
        validate_config(config)
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    C, T, L = config, config.train, config.loss
    cfg_dict = to_dict(C)
    out = Path(C.output_dir)

    # ---------------------------------------------------------------- checks before any work
    _check_trackers(C.log.trackers)
    train_file = Path(C.data.train_file)
    records, row_counts = load_records(train_file, max_records=C.data.max_records)
    if C.stage == "distill" or L.distill_weight_kl > 0:
        no_negs = sum(1 for r in records if not r["neg"])
        if no_negs:
            raise DataError(f"data.train_file: {no_negs} record(s) in {train_file} have no hard negatives; "
                            f"distillation needs the teacher's scores over mined candidates")
    mixed_precision = T.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    _allow_new_precision(mixed_precision)
    # cpu=True is what makes accelerate treat torchrun's processes as a gloo group on a machine without GPUs
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision,
                              step_scheduler_with_optimizer=False,
                              log_with=C.log.trackers or None, project_dir=str(out))
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = T.batch_size * world
    if global_batch > len(records):
        raise DataError(f"train.batch_size: a global batch of {global_batch} ({T.batch_size} x {world} processes) "
                        f"is larger than the {len(records)} usable records in {train_file}")
    batches0 = epoch_batches(records, global_batch, seed=T.seed, epoch=0, homogeneous_ratio=C.data.homogeneous_ratio)
    if not batches0:
        raise DataError(f"data.train_file: no full batch of {global_batch} can be formed from {train_file}")
    max_steps = T.max_steps or max(1, int(math.ceil(T.epochs * len(batches0))))

    resume_from = ckpt.latest_checkpoint(out) if C.checkpoint.resume else None
    if resume_from is not None:
        saved = ckpt.read_state(resume_from)
        old, new = _resume_view(saved.get("config", {})), _resume_view(cfg_dict)
        if old != new:
            diff = sorted(k for k in set(_flatten(old)) | set(_flatten(new)) if _flatten(old).get(k) != _flatten(new).get(k))
            raise ConfigError(f"output_dir {out} holds {resume_from.name} from a different config "
                              f"(differs in {diff[:8]}); use another output_dir or checkpoint.resume=false")
    if accelerator.is_main_process:
        ckpt.remove_stale_temp(out)
        out.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- model, teacher, optimiser
    set_seed(T.seed)
    model = _load_model(C.model, T.seed)
    if L.matryoshka_dims and max(L.matryoshka_dims) > model.embedding_dim:
        raise ConfigError(f"loss.matryoshka_dims: {max(L.matryoshka_dims)} exceeds the embedding dim "
                          f"{model.embedding_dim} of {C.model.name_or_path}")
    if resume_from is not None:
        saved_model = ckpt.read_state(resume_from).get("model_settings", {})
        if saved_model and saved_model.get("embedding_dim") != model.embedding_dim:
            raise ConfigError(f"{resume_from} was trained on a model with embedding dim "
                              f"{saved_model.get('embedding_dim')}, not {model.embedding_dim}")
    teacher_cache = None
    if L.distill_weight_kl > 0:
        from kalm_lib.model import EmbeddingModel

        key_parts = {"teacher": model_identity(C.distill.teacher),
                     "data_sha256": provenance.sha256_file(train_file), "max_records": C.data.max_records,
                     "max_length": C.model.max_length}
        with accelerator.main_process_first():
            teacher_cache = teacher_scores(
                lambda: EmbeddingModel.from_pretrained(C.distill.teacher, max_length=C.model.max_length,
                                                       device=accelerator.device),
                records, cache_dir=C.distill.cache_dir or out / "teacher_cache", key_parts=key_parts,
                passage_instruction_tasks=C.data.passage_instruction_tasks,
                batch_size=C.distill.teacher_batch_size, show_progress=accelerator.is_main_process)
    if C.model.lora.enabled:
        model = _apply_lora(model, C.model.lora)
    if T.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": T.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=T.lr, betas=tuple(T.adam_betas), eps=T.adam_eps)
    from transformers import get_scheduler

    scheduler = get_scheduler({"constant": "constant_with_warmup"}.get(T.scheduler, T.scheduler), optimizer,
                              num_warmup_steps=int(math.ceil(T.warmup_ratio * max_steps)),
                              num_training_steps=max_steps)
    tokenizer = model.tokenizer
    unwrapped = model
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    device = accelerator.device

    step, epoch, batch_in_epoch = 0, 0, 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    metrics_path = out / "metrics.jsonl"
    if accelerator.is_main_process:
        _truncate_metrics(metrics_path, step) if resume_from is not None else metrics_path.unlink(missing_ok=True)
        provenance.write(out / "provenance.json", provenance.collect(
            cfg_dict, seed=T.seed, data_hashes=_data_hashes(train_file), stage=C.stage, world_size=world,
            rows=row_counts, model=model_identity(C.model.name_or_path), max_steps=max_steps,
            resumed_from=str(resume_from) if resume_from else None,
            teacher_cache=str(teacher_cache.path) if teacher_cache else None))
    if C.log.trackers:
        accelerator.init_trackers("kalm", config=_flatten(cfg_dict))

    state_base = {"config": cfg_dict, "config_hash": provenance.config_hash(_resume_view(cfg_dict)),
                  "model_settings": unwrapped.settings(), "max_steps": max_steps, "world_size": world}
    save_model = _save_model_fn(unwrapped, C.model.lora.enabled)

    def save(at_step: int, at_epoch: int, at_batch: int, last_metrics: dict[str, Any]) -> Path:
        return ckpt.save_checkpoint(accelerator, unwrapped, out, at_step,
                                    {**state_base, "step": at_step, "epoch": at_epoch, "batch_in_epoch": at_batch,
                                     "metrics": last_metrics},
                                    keep_last=C.checkpoint.keep_last, save_model=save_model)

    progress = None
    if C.log.progress_bar and accelerator.is_main_process:
        progress = _tqdm()(total=max_steps, initial=step, desc=f"train {C.stage}", unit="step", dynamic_ncols=True)
    batches = epoch_batches(records, global_batch, seed=T.seed, epoch=epoch, homogeneous_ratio=C.data.homogeneous_ratio)
    last: dict[str, Any] = {}
    last_ckpt = ckpt.latest_checkpoint(out)
    m = L.num_hard_negatives
    pad_id = tokenizer.pad_token_id
    while step < max_steps:
        if batch_in_epoch >= len(batches):
            epoch, batch_in_epoch = epoch + 1, 0
            batches = epoch_batches(records, global_batch, seed=T.seed, epoch=epoch,
                                    homogeneous_ratio=C.data.homogeneous_ratio)
        t0 = time.perf_counter()
        batch = build_batch(records, batches[batch_in_epoch], C, epoch=epoch, rank=rank, world=world,
                            teacher_cache=teacher_cache)
        tokens = tokenize_unpadded(unwrapped, batch.texts, batch.prompts)
        chunks = make_chunks(tokens, pad_token_id=pad_id, padding_side=tokenizer.padding_side,
                             max_rows=T.chunk_size, max_tokens=T.chunk_tokens)
        n_local = batch.local_queries
        flags = torch.tensor(batch.in_batch, device=device)
        objective = make_objective(C, step_seed=_step_seed(T.seed, step))

        def loss_fn(emb: torch.Tensor):
            q, pos = emb[:n_local], emb[n_local:2 * n_local]
            neg = emb[2 * n_local:].reshape(n_local, m, -1) if m else None
            in_batch, teacher = flags, batch.teacher
            if L.gather_across_devices:
                q, pos = gather_with_grad(q), gather_with_grad(pos)
                neg = gather_with_grad(neg) if neg is not None else None
            elif world > 1:  # local negatives only: this rank's rows of the global-batch metadata
                in_batch = flags[rank * n_local:(rank + 1) * n_local]
                teacher = teacher[rank * n_local:(rank + 1) * n_local] if teacher is not None else None
            try:
                return objective(q, pos, neg, in_batch=in_batch, teacher=teacher)
            except ValueError as e:
                if "NaN or Inf" in str(e):  # the embeddings themselves are no longer finite
                    return torch.tensor(float("nan")), {}
                raise

        optimizer.zero_grad(set_to_none=True)
        if T.grad_cache:
            loss, details = grad_cache_step(model, chunks, device, loss_fn, accelerator.backward,
                                            no_sync=lambda: _no_sync(accelerator, model))
        else:
            emb = embed_with_graph(model, chunks, device)
            loss, details = loss_fn(emb)
            if torch.isfinite(loss):
                accelerator.backward(loss)
            loss = loss.detach()
        grad_norm = None
        if torch.isfinite(loss) and T.max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), T.max_grad_norm)
        if not torch.isfinite(loss) or (grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm))):
            if progress is not None:
                progress.close()
            what = "loss" if not torch.isfinite(loss) else "gradient norm"
            raise NonFiniteLossError(
                f"non-finite {what} at step {step + 1} (epoch {epoch}, batch {batch_in_epoch}); record ids: "
                f"{batch.ids}. Last good checkpoint: {last_ckpt or 'none'} (kept; nothing was saved after it)")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        step += 1
        batch_in_epoch += 1
        elapsed = time.perf_counter() - t0
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{float(loss):.4f}")
        if step % C.log.every_steps == 0 or step == max_steps:
            n_tok = sum(c.num_tokens for c in chunks)
            last = {"step": step, "epoch": epoch, "loss": float(loss), "lr": lr,
                    "loss_cl": float(details.get("loss_cl", loss)),
                    "focal_weight_mean": float(details.get("focal_weight_mean", float("nan"))),
                    "accuracy": float(details.get("accuracy", float("nan"))),
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "pairs_per_s": len(batch.ids) / elapsed, "tokens_per_s": n_tok * world / elapsed,
                    "padding_fraction": 1 - n_tok / max(1, sum(c.padded_tokens for c in chunks)),
                    "step_time_s": elapsed, "memory_mb": _memory_mb(device)}
            if "loss_kl" in details:
                last["loss_kl"] = float(details["loss_kl"])
            if accelerator.is_main_process:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(last) + "\n")
                for cb in callbacks or []:
                    cb(dict(last))
            if C.log.trackers:
                accelerator.log({k: v for k, v in last.items() if v is not None}, step=step)
        if (C.checkpoint.every_steps and step % C.checkpoint.every_steps == 0) or step == max_steps:
            last_ckpt = save(step, epoch, batch_in_epoch, last)
    if progress is not None:
        progress.close()
    final = out / "final"
    if accelerator.is_main_process and last_ckpt is not None:
        _publish_final(last_ckpt, final)
    accelerator.wait_for_everyone()
    if C.log.trackers:
        accelerator.end_training()
    if not last and last_ckpt is not None:
        last = ckpt.read_state(last_ckpt).get("metrics", {})
    return TrainResult(output_dir=out, final_model=final if final.exists() else None, last_checkpoint=last_ckpt,
                       steps=step, metrics=last, resumed_from=resume_from)


@contextlib.contextmanager
def _no_sync(accelerator, model):
    """Accumulate a GradCache chunk's gradients without synchronising (all but the last chunk).

    DDP/FSDP: ``accelerator.no_sync``. DeepSpeed: ``accelerator.backward`` steps the engine whenever
    ``sync_gradients`` is set, so it is cleared for the chunk (the engine's gradient-accumulation boundary).
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.gradient_state._set_sync_gradients(False)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
    else:
        with accelerator.no_sync(model):
            yield


def _publish_final(checkpoint: Path, final: Path) -> None:
    """``<output_dir>/final``: the last checkpoint's model folder (without trainer state), swapped in atomically."""
    import shutil

    tmp = final.with_name(".tmp-final")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns(ckpt.STATE_DIR))
    old = final.with_name(".old-final")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"kalm-step-{seed}-{step}".encode()).digest()[:8], "little") >> 1


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return out


# ============================================================================================ notebooks
def run_dir_overrides(run_dir: str | os.PathLike, stage: str, *, start_from: str | None = "auto") -> dict[str, str]:
    """The overrides that place a stage in a run directory (docs/CONTRACTS.md "Run directory").

    ``output_dir`` -> ``<run_dir>/train/<stage>``; ``data.train_file`` -> ``<run_dir>/curated/<pretrain|finetune>.jsonl``
    when it exists; ``model.name_or_path`` -> the previous stage's ``final`` model when it exists (fine-tune
    starts from pre-training, distillation from fine-tuning) unless ``start_from`` names a model or is None.
    """
    run_dir = Path(run_dir)
    out = {"output_dir": str(run_dir / "train" / stage)}
    data = run_dir / "curated" / ("pretrain.jsonl" if stage == "pretrain" else "finetune.jsonl")
    if data.is_file():
        out["data.train_file"] = str(data)
    previous = {"finetune": "pretrain", "distill": "finetune"}.get(stage)
    if start_from == "auto":
        if previous and (run_dir / "train" / previous / "final").is_dir():
            out["model.name_or_path"] = str(run_dir / "train" / previous / "final")
    elif start_from:
        out["model.name_or_path"] = str(start_from)
    return out


def launch(config: str | os.PathLike, overrides: list[str] | dict[str, Any] | None = None, *,
           num_processes: int | None = None, accelerate_config: str | None = None,
           callbacks: list[Callable[[dict[str, Any]], None]] | None = None) -> TrainResult:
    """Run a stage in this process, or with ``accelerate launch`` when several GPUs are used.

    ``num_processes`` None: the number of visible GPUs (1 on CPU). In-process runs call ``callbacks`` live;
    a launched run is followed through its ``metrics.jsonl`` (callbacks get each new row as it appears).
    """
    if isinstance(overrides, dict):
        overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    overrides = list(overrides or [])
    if num_processes is None:
        num_processes = max(1, torch.cuda.device_count())
    resolved = load_config(config, overrides)  # bad config: fail here, before any launch
    if num_processes <= 1:
        return train(resolved, callbacks=callbacks)
    import subprocess

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    cmd += ["--config_file", accelerate_config] if accelerate_config else ["--multi_gpu"]
    cmd += ["-m", "kalm_lib.train.loop", "--config", str(config), *overrides]
    metrics = Path(resolved.output_dir) / "metrics.jsonl"
    seen = 0
    proc = subprocess.Popen(cmd)
    while True:
        done = proc.poll() is not None
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            for line in lines[seen:]:
                if line.strip():
                    for cb in callbacks or []:
                        cb(json.loads(line))
            seen = len(lines)
        if done:
            break
        time.sleep(2)
    if proc.returncode != 0:
        raise RuntimeError(f"accelerate launch exited with {proc.returncode}: {' '.join(cmd)}")
    out = Path(resolved.output_dir)
    last = ckpt.latest_checkpoint(out)
    return TrainResult(output_dir=out, final_model=out / "final" if (out / "final").exists() else None,
                       last_checkpoint=last, steps=ckpt.read_state(last)["step"] if last else 0,
                       metrics=ckpt.read_state(last).get("metrics", {}) if last else {})


def read_metrics(output_dir: str | os.PathLike):
    """``<output_dir>/metrics.jsonl`` as a pandas frame (one row per logged step)."""
    import pandas as pd

    path = Path(output_dir) / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return pd.DataFrame(rows)


def loss_figure(metrics, title: str = "training"):
    """A plotly figure of loss (and positive accuracy, right axis) against step, from :func:`read_metrics`."""
    import plotly.graph_objects as go

    fig = go.Figure()
    if len(metrics):
        fig.add_scatter(x=metrics["step"], y=metrics["loss"], name="loss", mode="lines")
        if "accuracy" in metrics:
            fig.add_scatter(x=metrics["step"], y=metrics["accuracy"], name="positive accuracy", mode="lines",
                            yaxis="y2", line={"dash": "dot"})
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss", template="plotly_white", height=380,
                      yaxis2={"title": "accuracy", "overlaying": "y", "side": "right", "range": [0, 1]})
    return fig


def live_loss_plot(title: str = "training (live)"):
    """``(widget, callback)``: a plotly FigureWidget that ``callback(metrics_row)`` extends step by step.

    Pass ``callback`` to :func:`train`/:func:`launch`; display ``widget`` first. In a headless run (papermill)
    widgets do not render, so show :func:`loss_figure` after training as well.
    """
    import plotly.graph_objects as go

    widget = go.FigureWidget(loss_figure([], title))
    widget.add_scatter(x=[], y=[], name="loss", mode="lines")
    widget.add_scatter(x=[], y=[], name="positive accuracy", mode="lines", yaxis="y2", line={"dash": "dot"})

    def callback(row: dict[str, Any]) -> None:
        with widget.batch_update():
            widget.data[0].x = (*widget.data[0].x, row["step"])
            widget.data[0].y = (*widget.data[0].y, row["loss"])
            widget.data[1].x = (*widget.data[1].x, row["step"])
            widget.data[1].y = (*widget.data[1].y, row.get("accuracy"))

    return widget, callback


# ============================================================================================ CLI
def cli_main(argv: list[str] | None = None) -> int:
    """``kalm train --config X.yaml [key=value ...]``: run a stage (resumes when output_dir has checkpoints)."""
    parser = argparse.ArgumentParser(prog="kalm train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="stage YAML, e.g. configs/train/smoke/finetune.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 loss.focal_gamma=0")
    parser.add_argument("--output-dir", help="same as output_dir=...")
    parser.add_argument("--no-resume", action="store_true", help="same as checkpoint.resume=false")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.no_resume:
        overrides.append("checkpoint.resume=false")
    try:
        config = load_config(args.config, overrides)
        if args.print_config:
            print(json.dumps(to_dict(config), indent=2))
            return 0
        result = train(config)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"kalm train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"kalm train: {e}", file=sys.stderr)
        return 3
    print(json.dumps({"output_dir": str(result.output_dir), "final_model": str(result.final_model),
                      "steps": result.steps, "metrics": result.metrics}, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.exit(cli_main())
