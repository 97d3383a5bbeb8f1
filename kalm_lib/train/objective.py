"""The training objective of every stage, in one place: ``loss(q, pos, neg, in_batch, teacher)``.

A stage's loss follows from its :class:`~kalm_lib.train.config.LossConfig` (DESIGN.md §1.2-1.3):

- pre-training: InfoNCE with in-batch negatives (``loss.num_hard_negatives: 0``);
- fine-tuning: + M hard negatives per query, focal reweighting, online hard-negative mixing, Matryoshka,
  in-batch negatives switched per task type (off for classification/clustering: false negatives);
- distillation: ``a * L_CL + b * L_KL``, KL to a teacher's cached scores over each query's candidates.

The formulas live in :mod:`kalm_lib.losses`; this module only composes them. The per-task in-batch switch is
one :func:`~kalm_lib.losses.info_nce` call with a per-row mask, reduced once inside it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch

from kalm_lib.losses import candidate_scores, distill_kl, info_nce, matryoshka, mix_hard_negatives
from kalm_lib.train.config import LossConfig, StageConfig

Objective = Callable[..., tuple[torch.Tensor, dict[str, Any]]]


def make_objective(config: StageConfig, *, step_seed: int) -> Objective:
    """``objective(q, pos, neg, in_batch, teacher) -> (loss, details)`` over the global batch.

    ``q`` [N, d], ``pos`` [N, d], ``neg`` [N, M, d] or None, ``in_batch`` [N] bool (per query: are the other
    queries' candidates negatives?), ``teacher`` [N, 1+M] or None. ``details`` (detached, for logging):
    ``loss_cl``, ``focal_weight_mean``, ``accuracy``, ``p_pos`` and, when distilling, ``loss_kl``; under
    Matryoshka those of the largest dim. Mixed negatives are drawn inside (from the truncated embeddings
    under Matryoshka) with a generator seeded by ``step_seed``, so every process and a resumed run draw the
    same ones.
    """
    L = config.loss

    def objective(q, pos, neg=None, *, in_batch, teacher):
        return _stage_loss(L, step_seed, q, pos, neg, in_batch=in_batch, teacher=teacher)

    if not L.matryoshka_dims:
        return objective
    mrl = matryoshka(objective, L.matryoshka_dims, L.matryoshka_weights or [1.0] * len(L.matryoshka_dims))

    def matryoshka_objective(q, pos, neg=None, *, in_batch, teacher):
        loss, per_dim = mrl(q, pos, neg, in_batch=in_batch, teacher=teacher)
        return loss, per_dim[max(per_dim)]  # log the details of the largest dim

    return matryoshka_objective


def _stage_loss(L: LossConfig, step_seed: int, q, pos, neg, *, in_batch, teacher) -> tuple[torch.Tensor, dict]:
    """``L_CL`` (InfoNCE: in-batch per row, hard and mixed negatives, focal), plus ``b * L_KL`` when distilling."""
    mixed = None
    if (L.mix_mode or "none") != "none":
        generator = torch.Generator(device="cpu").manual_seed(step_seed)
        mixed = mix_hard_negatives(q, neg, num_mix=L.num_mix, mode=L.mix_mode, detach=L.mix_detach,
                                   generator=generator)
    cl, det = info_nce(q, pos, neg, in_batch=in_batch, temperature=L.temperature, focal_gamma=L.focal_gamma,
                       focal_detach=L.focal_detach, focal_normalize=L.focal_normalize, mixed_neg=mixed,
                       return_details=True)
    details = {"loss_cl": cl.detach(), "focal_weight_mean": det["weights"].mean(), "accuracy": det["accuracy"],
               "p_pos": det["p"].mean()}
    if L.distill_weight_kl <= 0:
        return cl, details
    kl = distill_kl(candidate_scores(q, pos, neg), teacher.to(q.device), L.distill_temperature)
    details["loss_kl"] = kl.detach()
    return L.distill_weight_cl * cl + L.distill_weight_kl * kl, details


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s random draws (mixed negatives): the same on every process and on resume."""
    return int.from_bytes(hashlib.sha256(f"kalm-step-{seed}-{step}".encode()).digest()[:8], "little") >> 1
