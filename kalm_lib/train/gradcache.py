"""Embedding a training batch: length-grouped chunks, and GradCache (cached embeddings, chunked re-forward).

A contrastive step needs the embeddings of every text of the (global) batch before the loss exists, so
the activation memory of a plain step grows with the batch. GradCache (Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup") splits the step in three:

1. embed every chunk of texts **without** a graph (``torch.no_grad``), remembering the RNG state
   before each chunk;
2. compute the loss on those cached embeddings (leaf tensors) and back-propagate to them only, which
   gives ``g = dL/d(embedding)`` for every text;
3. re-embed each chunk **with** a graph, under the RNG state it saw in pass 1 (so dropout draws the same
   masks), and back-propagate ``g`` of that chunk: ``sum_chunks J_chunk^T g_chunk`` is exactly the full
   gradient, with the activation memory of one chunk.

The same chunking serves the plain step too: texts are sorted by token length and cut into chunks by a
row count and/or a token budget, so little compute goes into padding (sentence-transformers pads each
column of a batch to its longest text). Under FSDP2 and ZeRO-3 every forward and backward communicates, so
all processes must run the same number of chunks: the trainer agrees on the largest count and fills up with
:func:`padding_chunk` (one pad token whose embedding the loss never sees).

Where the memory of a GradCache step goes (all-MiniLM-L6-v2, batch 512 pairs = 1,024 texts, chunks of 32, max
length 128, fp32 CPU; RSS read between the phases, benchmarks/bench_train.py (b)): tokenising all texts +22 MB,
pass 1 (no graph) +58 MB, the cached embeddings and the loss +4 MB, and the re-forward of one 32 x 128 chunk with
its autograd graph about +1,100 MB, freed by that chunk's backward. The peak is therefore one chunk's activations
on top of the weights, gradients and AdamW state, the floor of any GradCache at that mini-batch; it measured
1,932 MB against 2,079 MB for sentence-transformers' CachedMultipleNegativesRankingLoss (mini-batch 32) at the
same batch. Smaller chunks (``train.chunk_size``/``chunk_tokens``) or gradient checkpointing lower it further.

Written by hand rather than taken from the ``grad-cache`` package because it must run the forward through
accelerate's prepared model (DDP no_sync on all but the last chunk, autocast, DeepSpeed/FSDP wrappers) and
restore the RNG per chunk; the package is not maintained for those.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


@dataclass
class Chunk:
    """One forward's worth of texts: padded features and the positions of its rows in the batch
    (no rows: a :func:`padding_chunk`)."""

    rows: list[int]
    features: dict[str, torch.Tensor]

    @property
    def is_padding(self) -> bool:
        return not self.rows

    @property
    def num_tokens(self) -> int:
        return 0 if self.is_padding else int(self.features["attention_mask"].sum())

    @property
    def padded_tokens(self) -> int:
        return 0 if self.is_padding else int(self.features["attention_mask"].numel())


def padding_chunk(pad_token_id: int) -> Chunk:
    """A chunk of one pad token that belongs to no row: run only so that every process makes the same number
    of forwards and backwards in a step; its embedding gets zero weight (plain) or a zero gradient (GradCache)."""
    one = torch.ones((1, 1), dtype=torch.long)
    return Chunk(rows=[], features={"input_ids": one * pad_token_id, "attention_mask": one, "pool_mask": one})


def tokenize_unpadded(model: Any, texts: Sequence[str], prompts: Sequence[str | None]) -> list[tuple[list[int], list[int]]]:
    """Token ids and pool mask of each ``prompt + text`` without padding (one tokenizer call per prompt)."""
    by_prompt: dict[str | None, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(prompt, []).append(i)
    out: list[tuple[list[int], list[int]] | None] = [None] * len(texts)
    for prompt, idx in by_prompt.items():
        feats = model.tokenize([texts[i] for i in idx], prompt)
        for row, i in enumerate(idx):
            keep = feats["attention_mask"][row].bool()
            out[i] = (feats["input_ids"][row][keep].tolist(), feats["pool_mask"][row][keep].tolist())
    return out  # type: ignore[return-value]


def make_chunks(tokens: Sequence[tuple[list[int], list[int]]], *, pad_token_id: int, padding_side: str = "right",
                max_rows: int | None = None, max_tokens: int | None = None, sort_by_length: bool = True) -> list[Chunk]:
    """Cut texts into padded chunks: longest first, at most ``max_rows`` rows and ``max_rows*len`` <= ``max_tokens``.

    With neither limit all texts form one chunk. Sorting by length means each chunk pads only to its own
    longest text; the order of the rows in the batch is kept through ``Chunk.rows``.
    """
    order = sorted(range(len(tokens)), key=lambda i: -len(tokens[i][0])) if sort_by_length else list(range(len(tokens)))
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = len(tokens[current[0]][0]) if current else len(tokens[i][0])
        longest = max(longest, len(tokens[i][0]))
        too_many = max_rows is not None and len(current) + 1 > max_rows
        too_big = max_tokens is not None and current and longest * (len(current) + 1) > max_tokens
        if current and (too_many or too_big):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    chunks = []
    for rows in groups:
        width = max(len(tokens[i][0]) for i in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        pool_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            t_ids, t_pool = tokens[i]
            span = slice(width - len(t_ids), width) if padding_side == "left" else slice(0, len(t_ids))
            ids[r, span] = torch.tensor(t_ids, dtype=torch.long)
            attention[r, span] = 1
            pool_mask[r, span] = torch.tensor(t_pool, dtype=torch.long)
        chunks.append(Chunk(rows=list(rows), features={"input_ids": ids, "attention_mask": attention,
                                                       "pool_mask": pool_mask}))
    return chunks


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _assemble(parts: list[torch.Tensor], chunks: list[Chunk], total: int) -> torch.Tensor:
    """Embeddings of all (non-padding) chunks back in batch order [total, d]."""
    order = torch.tensor([r for c in chunks for r in c.rows], device=parts[0].device)
    stacked = torch.cat([p for p, c in zip(parts, chunks) if not c.is_padding], dim=0)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(total, device=order.device)
    return stacked[inverse]


def embed_with_graph(model: Callable, chunks: list[Chunk], device: torch.device) -> torch.Tensor:
    """Plain path: forward every chunk with autograd, embeddings [n_texts, d] in batch order.

    Padding chunks stay in the graph with weight zero, so their backward runs (and communicates) too."""
    total = sum(len(c.rows) for c in chunks)
    parts = [model({k: v.to(device) for k, v in c.features.items()}) for c in chunks]
    out = _assemble(parts, chunks, total)
    padding = [p for p, c in zip(parts, chunks) if c.is_padding]
    return out + 0.0 * torch.stack([p.sum() for p in padding]).sum() if padding else out


def grad_cache_step(model: Callable, chunks: list[Chunk], device: torch.device,
                    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, Any]],
                    backward: Callable[[torch.Tensor], None],
                    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None) -> tuple[torch.Tensor, Any]:
    """One GradCache step: parameter gradients of ``loss_fn(embeddings)`` accumulated in ``.grad``.

    Args:
        model: the (prepared) embedding model, ``model(features) -> [b, d]``.
        chunks: from :func:`make_chunks`.
        device: where the features go.
        loss_fn: maps the cached embeddings [n_texts, d] (batch order, requires grad) to
            ``(loss, details)``; it may gather across ranks.
        backward: how to back-propagate a scalar through the model (``accelerator.backward``).
        no_sync: context manager entered for every chunk but the last (the accumulation boundary), e.g.
            DDP's ``accelerator.no_sync(model)`` so the all-reduce happens once
            (:func:`kalm_lib.train.engines.chunk_context`).

    Returns:
        ``(loss, details)`` from ``loss_fn`` (the loss is detached).
    """
    total = sum(len(c.rows) for c in chunks)
    states = []
    parts = []
    with torch.no_grad():
        for c in chunks:
            states.append(_rng_state(device))
            parts.append(model({k: v.to(device) for k, v in c.features.items()}))
    after_first_pass = _rng_state(device)
    reps = _assemble(parts, chunks, total).detach().float().requires_grad_(True)
    loss, details = loss_fn(reps)
    if torch.isfinite(loss):
        # d loss / d embeddings only; the model's parameters are not in this graph.
        (reps_grad,) = torch.autograd.grad(loss, reps)
        for n, (c, state) in enumerate(zip(chunks, states)):
            last = n == len(chunks) - 1
            ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with ctx:
                _set_rng_state(state, device)
                emb = model({k: v.to(device) for k, v in c.features.items()})
                if c.is_padding:
                    grad = torch.zeros_like(emb)
                else:
                    grad = reps_grad[torch.tensor(c.rows, device=reps_grad.device)].to(emb.dtype)
                # the surrogate <emb, g> has d/d(theta) = J^T g: the cached gradient pushed through the chunk
                backward((emb * grad).sum())
        _set_rng_state(after_first_pass, device)
    return loss.detach(), details
