"""One step's gradients: a batch of texts -> embeddings -> the objective -> parameter gradients.

Texts are tokenised once and cut into length-sorted chunks (:mod:`kalm_lib.train.gradcache`); the plain path
embeds every chunk with a graph, GradCache embeds without one and re-forwards chunk by chunk. Every process
runs the same number of chunks (the largest count, filled up with padding chunks), since FSDP2 and ZeRO-3
communicate in each forward and backward. Embeddings are gathered across processes with
:func:`kalm_lib.losses.gather_with_grad`, so every rank computes the loss of the global batch (the engines'
gradient averaging then gives the one-process gradient). :func:`apply_update` is the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kalm_lib.losses import gather_with_grad
from kalm_lib.train import engines
from kalm_lib.train.data import Batch
from kalm_lib.train.gradcache import (Chunk, embed_with_graph, grad_cache_step, make_chunks, padding_chunk,
                                      tokenize_unpadded)
from kalm_lib.train.objective import Objective
from kalm_lib.train.setup import Run


@dataclass
class StepResult:
    """What a step's forward/backward gives the loop: the loss (detached), its details, the gradient norm."""

    loss: torch.Tensor
    details: dict[str, Any]
    grad_norm: torch.Tensor | float | None
    chunks: list[Chunk]

    @property
    def failure(self) -> str | None:
        """``"loss"`` or ``"gradient norm"`` when that is NaN/Inf (nothing may be applied), else None."""
        if not torch.isfinite(self.loss):
            return "loss"
        if self.grad_norm is not None and not torch.isfinite(torch.as_tensor(self.grad_norm)):
            return "gradient norm"
        return None


def compute_gradients(run: Run, batch: Batch, objective: Objective) -> StepResult:
    """Zero the gradients and back-propagate ``objective`` over ``batch``; the optimizer is not stepped
    (:func:`apply_update`). A non-finite loss is not back-propagated (its gradients would poison the weights),
    on any process: the loss is the global batch's (gathered), or agreed on when each process has its own.
    """
    C, accelerator = run.config, run.accelerator
    tokens = tokenize_unpadded(run.unwrapped, batch.texts, batch.prompts)
    pad_id = run.unwrapped.tokenizer.pad_token_id
    chunks = make_chunks(tokens, pad_token_id=pad_id, padding_side=run.unwrapped.tokenizer.padding_side,
                         max_rows=C.train.chunk_size, max_tokens=C.train.chunk_tokens)
    chunks += [padding_chunk(pad_id) for _ in range(engines.agree_on_max(accelerator, len(chunks)) - len(chunks))]
    loss_fn = _batch_loss(run, batch, objective)
    run.optimizer.zero_grad(set_to_none=True)

    def backward(loss):
        engines.backward(accelerator, run.model, loss)

    if C.train.grad_cache:
        loss, details = grad_cache_step(run.model, chunks, accelerator.device, loss_fn, backward,
                                        no_sync=lambda: engines.chunk_context(accelerator, run.model))
    else:
        loss, details = loss_fn(embed_with_graph(run.model, chunks, accelerator.device))
        if torch.isfinite(loss):
            backward(loss)
        loss = loss.detach()
    return StepResult(loss=loss, details=details, grad_norm=None, chunks=chunks)


def apply_update(run: Run, result: StepResult) -> StepResult:
    """Clip and step (optimizer, scheduler) after :func:`compute_gradients`, unless the loss or the gradient
    norm is NaN/Inf (then the weights stay as they are); returns the result with its gradient norm."""
    if torch.isfinite(result.loss):
        result.grad_norm = engines.optimizer_step(run.accelerator, run.model, run.optimizer, run.scheduler,
                                                  run.config.train.max_grad_norm)
    return result


def _batch_loss(run: Run, batch: Batch, objective: Objective):
    """``loss_fn(embeddings) -> (loss, details)`` for this rank's rows (queries | positives | negatives)."""
    n, m = batch.local_queries, run.config.loss.num_hard_negatives
    world, rank = run.accelerator.num_processes, run.accelerator.process_index
    flags = torch.tensor(batch.in_batch, device=run.accelerator.device)

    def loss_fn(emb: torch.Tensor):
        q, pos = emb[:n], emb[n:2 * n]
        neg = emb[2 * n:].reshape(n, m, -1) if m else None
        in_batch, teacher = flags, batch.teacher
        if run.config.loss.gather_across_devices:
            q, pos = gather_with_grad(q), gather_with_grad(pos)
            neg = gather_with_grad(neg) if neg is not None else None
        elif world > 1:  # local negatives only: this rank's rows of the global-batch metadata
            in_batch = flags[rank * n:(rank + 1) * n]
            teacher = teacher[rank * n:(rank + 1) * n] if teacher is not None else None
        try:
            loss, details = objective(q, pos, neg, in_batch=in_batch, teacher=teacher)
        except ValueError as e:
            if "NaN or Inf" not in str(e):
                raise
            loss, details = torch.tensor(float("nan")), {}  # the embeddings themselves are no longer finite
        if world > 1 and not run.config.loss.gather_across_devices:  # local losses: all skip if one is NaN/Inf
            if engines.agree_on_max(run.accelerator, int(not torch.isfinite(loss))):
                loss = loss.detach() * float("nan")
        return loss, details

    return loss_fn
