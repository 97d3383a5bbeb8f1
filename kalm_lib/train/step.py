"""One step's gradients: a batch of texts -> embeddings -> the objective -> parameter gradients.

Texts are tokenised once and cut into length-sorted chunks (:mod:`kalm_lib.train.gradcache`); the plain path
embeds every chunk with a graph, GradCache embeds without one and re-forwards chunk by chunk. Embeddings are
gathered across processes with :func:`kalm_lib.losses.gather_with_grad`, so every rank computes the loss of
the global batch (DDP's gradient averaging then gives the one-process gradient).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DistributedType

from kalm_lib.losses import gather_with_grad
from kalm_lib.train.data import Batch
from kalm_lib.train.gradcache import Chunk, embed_with_graph, grad_cache_step, make_chunks, tokenize_unpadded
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
    """Zero the gradients, back-propagate ``objective`` over ``batch`` and clip; the optimizer is not stepped.

    A non-finite loss is not back-propagated (its gradients would poison the weights); the caller decides.
    """
    C, accelerator = run.config, run.accelerator
    tokens = tokenize_unpadded(run.unwrapped, batch.texts, batch.prompts)
    chunks = make_chunks(tokens, pad_token_id=run.unwrapped.tokenizer.pad_token_id,
                         padding_side=run.unwrapped.tokenizer.padding_side,
                         max_rows=C.train.chunk_size, max_tokens=C.train.chunk_tokens)
    loss_fn = _batch_loss(run, batch, objective)
    run.optimizer.zero_grad(set_to_none=True)
    if C.train.grad_cache:
        loss, details = grad_cache_step(run.model, chunks, accelerator.device, loss_fn, accelerator.backward,
                                        no_sync=lambda: _no_sync(accelerator, run.model))
    else:
        loss, details = loss_fn(embed_with_graph(run.model, chunks, accelerator.device))
        if torch.isfinite(loss):
            accelerator.backward(loss)
        loss = loss.detach()
    grad_norm = None
    if torch.isfinite(loss) and C.train.max_grad_norm:
        grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), C.train.max_grad_norm)
    return StepResult(loss=loss, details=details, grad_norm=grad_norm, chunks=chunks)


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
            return objective(q, pos, neg, in_batch=in_batch, teacher=teacher)
        except ValueError as e:
            if "NaN or Inf" in str(e):  # the embeddings themselves are no longer finite
                return torch.tensor(float("nan")), {}
            raise

    return loss_fn


@contextlib.contextmanager
def _no_sync(accelerator, model):
    """Accumulate a GradCache chunk's gradients without synchronising (all but the last chunk).

    DDP/FSDP: ``accelerator.no_sync``. DeepSpeed: ``accelerator.backward`` steps the engine whenever
    ``sync_gradients`` is set, so it is cleared for the chunk (the engine's gradient-accumulation boundary).
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.gradient_state._set_sync_gradients(False)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
    else:
        with accelerator.no_sync(model):
            yield
