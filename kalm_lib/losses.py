"""Contrastive losses of the KaLM-Embedding-V2 recipe, as plain functions of embedding tensors.

Every function here takes embeddings (the pooled, *un-normalised* output of the model) and
returns a scalar loss (or per-query values), so the losses compose: ``matryoshka`` wraps any
loss with the ``info_nce`` signature, ``mix_hard_negatives`` feeds ``info_nce(mixed_neg=...)``,
``gather_with_grad`` turns any of them into a cross-device loss. The layout of each docstring
follows sentence-transformers' ``losses/``: what it computes, formula, args, shapes, returns,
references and the choices that are not public in the paper (exposed as options).

Notation (DESIGN.md §1.2): a batch of N queries ``q_i``, their positives ``p_i`` and M hard
negatives ``n_{i,m}`` per query; ``s`` is the cosine similarity; ``tau`` the temperature.

Gradient convention across devices (see :func:`gather_with_grad`): every rank gathers all
embedding tensors and computes the loss over the *global* batch, so every rank holds the same
loss value; the gradients that reach a rank's local embeddings are ``world_size`` times the
single-process gradients, and DDP's gradient averaging (a division by ``world_size``) undoes it.

References:
    - KaLM-Embedding-V2, arXiv 2506.20923 (InfoNCE with in-batch + hard negatives, focal-style
      reweighting, online hard-negative mixing, Matryoshka weights), and its V2.5 successor
      (contrastive distillation with KL over candidates, temperature 0.05).
    - Matryoshka Representation Learning, arXiv 2205.13147; sentence-transformers ``MatryoshkaLoss``.
    - Focal loss, arXiv 1708.02002 (the ``(1 - p)^gamma`` modulating factor).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "info_nce",
    "focal_weights",
    "mix_hard_negatives",
    "matryoshka",
    "distill_kl",
    "candidate_scores",
    "gather_with_grad",
]

_REDUCTIONS = ("mean", "sum", "none")
_MIX_MODES = ("pairwise", "listwise")
# Argument names of the info_nce signature that carry embeddings (truncated by `matryoshka`).
_EMBEDDING_ARGS = ("q", "pos", "neg", "mixed_neg")


# --------------------------------------------------------------------------------------------
# input checks (cheap: shapes, and one isfinite reduction per tensor)
# --------------------------------------------------------------------------------------------
def _check_tensor(name: str, t: Any, ndim: int, where: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{where}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{where}: `{name}` must have {ndim} dims, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{where}: `{name}` must be a floating-point tensor, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where}: `{name}` contains NaN or Inf values")
    return t


def _check_batch(q: Any, pos: Any, neg: Any, mixed_neg: Any, where: str) -> tuple[int, int]:
    """Shapes and finiteness of a contrastive batch (``info_nce``'s embedding arguments); returns (N, d)."""
    _check_tensor("q", q, 2, where)
    _check_tensor("pos", pos, 2, where)
    n, d = q.shape
    if n == 0:
        raise ValueError(f"{where}: empty batch (`q` has 0 rows)")
    if pos.shape != q.shape:
        raise ValueError(f"{where}: `pos` shape {tuple(pos.shape)} does not match `q` shape {tuple(q.shape)}")
    for name, t, k in (("neg", neg, "M"), ("mixed_neg", mixed_neg, "K")):
        if t is not None:
            _check_tensor(name, t, 3, where)
            if t.shape[0] != n or t.shape[2] != d:
                raise ValueError(f"{where}: `{name}` must be [N={n}, {k}, d={d}], got shape {tuple(t.shape)}")
    return n, d


def _check_reduction(reduction: str, where: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{where}: unknown `reduction`={reduction!r}; expected one of {_REDUCTIONS}")


def _check_positive(name: str, value: float, where: str) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and value == value and value != float("inf")):
        raise ValueError(f"{where}: `{name}` must be a finite number > 0, got {value!r}")


def _check_gamma(name: str, value: Any, where: str) -> None:
    # the one argument check of a focal exponent (info_nce and focal_weights)
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and value >= 0):
        raise ValueError(f"{where}: `{name}` must be a number >= 0, got {value!r}")


def _in_batch_mask(in_batch: Any, n: int, where: str) -> Tensor | None:
    """``in_batch`` as a per-row bool mask [N], or None for a plain bool (same for every row)."""
    if isinstance(in_batch, bool):
        return None
    if not isinstance(in_batch, Tensor) or in_batch.dtype != torch.bool or tuple(in_batch.shape) != (n,):
        shape = tuple(in_batch.shape) if isinstance(in_batch, Tensor) else type(in_batch).__name__
        raise ValueError(f"{where}: `in_batch` must be a bool or a bool tensor of shape [N={n}], got {shape}")
    return in_batch


def _own_or_shared(row_mask: Tensor, m: int, width: int) -> Tensor:
    """[N, width] bool: True where row i may see the column (its own candidates, or all when ``row_mask[i]``).

    Columns follow the in-batch layout ``[positives (N) | hard negatives (N*M, query-major) | own mixes]``.
    """
    n = row_mask.shape[0]
    rows = torch.arange(n, device=row_mask.device)
    owner = torch.cat([rows, rows.repeat_interleave(m)])  # the query each positive / hard negative belongs to
    allowed = (owner[None, :] == rows[:, None]) | row_mask[:, None]
    mixes = torch.ones(n, width - owner.shape[0], dtype=torch.bool, device=row_mask.device)
    return torch.cat([allowed, mixes], dim=1)


def _upcast(t: Tensor) -> Tensor:
    # Half-precision scores are too coarse at tau = 0.01 (bf16 steps are 0.5 near s/tau = 100):
    # compute similarities, softmax and mixes in float32; gradients flow back in the input dtype.
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


# --------------------------------------------------------------------------------------------
# focal weights
# --------------------------------------------------------------------------------------------
def _focal_from_log_p(log_p: Tensor, gamma: float) -> Tensor:
    # 1 - p computed as -expm1(log p): exact near p = 1, where 1 - exp(log p) cancels.
    one_minus_p = -torch.expm1(log_p)
    # At p == 1 (common with tau = 0.01 once the model separates well) d/dp (1-p)^gamma is
    # infinite for gamma < 1 and the chain rule gives 0 * inf = NaN. Clamping at the smallest
    # normal number keeps the value (tiny^gamma ~ 0) and zeroes the gradient there instead.
    one_minus_p = one_minus_p.clamp_min(torch.finfo(log_p.dtype).tiny)
    return one_minus_p.pow(gamma)


def focal_weights(p: Tensor, gamma: float, *, detach: bool = False) -> Tensor:
    """Focal modulating weights ``w = (1 - p)^gamma`` for the probability of the positive.

    Formula:
        ``w_i = (1 - p_i)^gamma`` (Lin et al., focal loss); ``gamma = 0`` gives ``w_i = 1``
        exactly. ``1 - p`` is clamped below at the dtype's smallest normal number so that the
        gradient stays finite at ``p == 1``.

    Args:
        p: probabilities of the positive, values in [0, 1].
        gamma: focusing parameter, >= 0 (KaLM-V2 uses 0.5).
        detach: return the weights without gradient (treat them as constants).

    Shapes:
        ``p``: any shape, e.g. [N]; the result has the same shape and dtype.

    Returns:
        The weights ``w`` (a new tensor).

    Not public in the paper:
        whether ``w`` is detached; the default (``detach=False``) keeps the formula as written.
    """
    where = "focal_weights"
    if not isinstance(p, Tensor) or not p.is_floating_point():
        raise ValueError(f"{where}: `p` must be a floating-point torch.Tensor")
    _check_gamma("gamma", gamma, where)
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError(f"{where}: `p` must hold probabilities in [0, 1] (found values outside, or NaN)")
    if gamma == 0:
        w = torch.ones_like(p)
    else:
        w = (1 - p).clamp_min(torch.finfo(p.dtype).tiny).pow(gamma)
    return w.detach() if detach else w


# --------------------------------------------------------------------------------------------
# InfoNCE (+ focal reweighting, + mixed negatives)
# --------------------------------------------------------------------------------------------
def info_nce(
    q: Tensor,
    pos: Tensor,
    neg: Tensor | None = None,
    *,
    temperature: float = 0.01,
    in_batch: bool | Tensor = True,
    focal_gamma: float = 0.0,
    focal_detach: bool = False,
    focal_normalize: bool = False,
    mixed_neg: Tensor | None = None,
    reduction: str = "mean",
    return_details: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """InfoNCE with in-batch and hard negatives, optional focal reweighting and mixed negatives.

    Each query is scored (cosine / temperature) against a candidate list holding its own positive;
    the loss is the cross-entropy of picking the positive, ``-log p_i``, optionally focal-weighted.
    For negatives from all devices, pass tensors gathered with :func:`gather_with_grad` (every
    rank then computes this loss over the global batch).

    Formula:
        ``p_i = e^{s(q_i,p_i)/tau} / Z_i``,
        ``Z_i = e^{s(q_i,p_i)/tau}``
        ``+ sum_{j != i} e^{s(q_i,p_j)/tau}``                      (other positives; if ``in_batch``)
        ``+ sum_j sum_m e^{s(q_i,n_{j,m})/tau}``                    (all hard negatives of the batch
        if ``in_batch`` (for query i), else only ``j = i``)
        ``+ sum_k e^{s(q_i,h_{i,k})/tau}``                          (the query's own mixed negatives)

        Focal: ``w_i = (1 - p_i)^gamma`` and ``L = mean_i(-w_i log p_i)``; with ``gamma = 0`` no
        weighting is applied at all, so the result is exactly plain InfoNCE.
        With ``focal_normalize`` the mean divides by ``sum_i w_i`` instead of N.
        Computed with ``logsumexp`` (``F.cross_entropy``), stable for tau = 0.01.

    Args:
        q: query embeddings (normalised inside).
        pos: one positive per query (normalised inside).
        neg: hard negatives per query, or None; M = 0 is allowed.
        temperature: tau > 0 (KaLM-V2: 0.01).
        in_batch: add the other queries' positives and hard negatives to each denominator. Turn
            off for classification/clustering-as-pairs, where they are false negatives; the
            pre-training stage uses ``in_batch=True`` and ``neg=None``. A bool tensor of shape [N]
            decides it per query (a batch mixing task types): row i's denominator holds the other
            queries' candidates only where ``in_batch[i]``. The result equals the rows of the two
            bool calls (``torch.where(in_batch, loss(True), loss(False))``) up to float rounding
            (the summation order inside ``logsumexp`` differs), in one call and one reduction.
        focal_gamma: focal exponent gamma >= 0 (KaLM-V2 fine-tuning: 0.5; 0 disables).
        focal_detach: treat the focal weights as constants (no gradient through ``w_i``).
        focal_normalize: with ``reduction="mean"``, divide by ``sum_i w_i`` instead of N
            (``"sum"`` and ``"none"`` are unaffected).
        mixed_neg: synthetic negatives from :func:`mix_hard_negatives`, or None; each query's mixes
            go only into its own denominator.
        reduction: ``"mean"`` (scalar), ``"sum"`` (scalar) or ``"none"`` (per-query ``w_i * -log p_i``).
        return_details: also return a dict for logging (all detached): ``p`` [N] probability of the
            positive, ``weights`` [N] focal weights, ``accuracy`` scalar (fraction of queries whose
            top-scoring candidate is the positive; ties count for the first candidate),
            ``logits`` [N, C] (scores / tau over the candidates) and ``labels`` [N] (column of the
            positive in ``logits``).

    Shapes:
        ``q`` [N, d], ``pos`` [N, d], ``neg`` [N, M, d], ``mixed_neg`` [N, K, d].
        ``in_batch``: a bool, or a bool tensor [N].
        Candidate columns of ``logits``: with ``in_batch`` ``[positives (N) | all hard negatives
        (N*M, query-major) | own mixes (K)]`` and ``labels = arange(N)``; without it
        ``[own positive | own hard negatives (M) | own mixes (K)]`` and ``labels = 0``. With a
        mask mixing True and False, the in-batch layout, where row i's other queries' columns are
        ``-inf`` when ``in_batch[i]`` is False (an all-True or all-False mask is the bool layout).

    Returns:
        The loss (a scalar, or [N] with ``reduction="none"``), or ``(loss, details)`` when
        ``return_details`` is set.

    Not public in the paper (options here):
        whether focal weights are detached (``focal_detach``) and whether the mean is renormalised
        by ``sum(w)`` (``focal_normalize``); defaults follow the formula as written.
    """
    where = "info_nce"
    n, d = _check_batch(q, pos, neg, mixed_neg, where)
    _check_positive("temperature", temperature, where)
    _check_gamma("focal_gamma", focal_gamma, where)
    _check_reduction(reduction, where)
    row_mask = _in_batch_mask(in_batch, n, where)  # None: the same for every row (bool `in_batch`)
    if row_mask is not None and bool(row_mask.all()) == bool(row_mask.any()):
        in_batch, row_mask = bool(row_mask[0]), None  # all on or all off: the cheaper bool layout, same numbers

    q = F.normalize(_upcast(q), dim=-1)
    pos = F.normalize(_upcast(pos), dim=-1)
    neg = F.normalize(_upcast(neg), dim=-1) if neg is not None and neg.shape[1] > 0 else None
    every_row = row_mask is not None or in_batch  # the [N, N + N*M] layout (masked per row, or for all rows)
    blocks: list[Tensor] = []
    if every_row:
        blocks.append(q @ pos.T)  # [N, N]; the diagonal holds the own positives
        labels = torch.arange(n, device=q.device)
    else:
        blocks.append((q * pos).sum(-1, keepdim=True))  # [N, 1]
        labels = torch.zeros(n, dtype=torch.long, device=q.device)
    if neg is not None:
        if every_row:
            blocks.append(q @ neg.reshape(-1, d).T)  # [N, N*M]: every hard negative of the batch
        else:
            blocks.append(torch.einsum("nd,nmd->nm", q, neg))  # [N, M]: own hard negatives only
    if mixed_neg is not None and mixed_neg.shape[1] > 0:
        mixed_neg = F.normalize(_upcast(mixed_neg), dim=-1)
        blocks.append(torch.einsum("nd,nkd->nk", q, mixed_neg))  # [N, K]: own mixes only
    logits = torch.cat(blocks, dim=1) / temperature
    if row_mask is not None:  # rows without in-batch negatives keep only their own candidates
        m = neg.shape[1] if neg is not None else 0
        logits = logits.masked_fill(~_own_or_shared(row_mask, m, logits.shape[1]), float("-inf"))

    nll = F.cross_entropy(logits, labels, reduction="none")  # -log p_i, via logsumexp
    if focal_gamma == 0:
        # No multiplication at all, so gamma = 0 is bit-for-bit plain InfoNCE.
        weights = torch.ones_like(nll)
        per_query = nll
    else:
        weights = _focal_from_log_p(-nll, focal_gamma)
        if focal_detach:
            weights = weights.detach()
        per_query = weights * nll

    if reduction == "mean" and focal_normalize and focal_gamma != 0:
        loss = per_query.sum() / weights.sum()
    else:
        loss = _reduce(per_query, reduction)

    if not return_details:
        return loss
    with torch.no_grad():
        details = {
            "p": torch.exp(-nll.detach()),
            "weights": weights.detach(),
            "accuracy": (logits.detach().argmax(dim=1) == labels).to(logits.dtype).mean(),
            "logits": logits.detach(),
            "labels": labels,
        }
    return loss, details


# --------------------------------------------------------------------------------------------
# online hard-negative mixing
# --------------------------------------------------------------------------------------------
def _sample_beta(shape: tuple[int, ...], alpha: float, beta: float, generator: torch.Generator | None,
                 dtype: torch.dtype, device: torch.device) -> Tensor:
    # torch.distributions.Beta takes no generator; Beta(a, b) = Ga / (Ga + Gb) with Ga ~ Gamma(a),
    # Gb ~ Gamma(b), and torch._standard_gamma does accept one (it is what Beta uses inside).
    gen_device = generator.device if generator is not None else device
    ga = torch._standard_gamma(torch.full(shape, float(alpha), dtype=torch.float64, device=gen_device),
                               generator=generator)
    gb = torch._standard_gamma(torch.full(shape, float(beta), dtype=torch.float64, device=gen_device),
                               generator=generator)
    return (ga / (ga + gb)).to(device=device, dtype=dtype)


def mix_hard_negatives(
    q: Tensor,
    neg: Tensor,
    *,
    num_mix: int,
    mode: str = "pairwise",
    alpha: float = 2.0,
    beta: float = 2.0,
    detach: bool = True,
    generator: torch.Generator | None = None,
    listwise_temperature: float = 1.0,
    listwise_subset_size: int | None = None,
) -> Tensor:
    """Online hard-negative mixing: synthesise extra negatives per query from its own hard negatives.

    Negatives are L2-normalised first, mixed, and the mixes L2-normalised again; each mix of
    query i is a convex combination of query i's negatives only (never another query's).

    Formula:
        pairwise: ``h_{i,k} = lam * n_{i,a} + (1 - lam) * n_{i,b}``, ``lam ~ Beta(alpha, beta)``,
        ``(a, b)`` a uniformly random ordered pair with ``a != b``, drawn independently per mix.
        listwise: ``h_{i,k} = sum_{m in S_k} lam_m n_{i,m}``,
        ``lam = softmax_{m in S_k}(s(q_i, n_{i,m}) / listwise_temperature)``, where ``S_k`` is the
        subset of negatives used by mix k: all M negatives when ``num_mix == 1`` and no
        ``listwise_subset_size`` is given; otherwise a uniformly random subset of
        ``listwise_subset_size`` negatives per mix (default ``max(2, ceil(M / 2))``), so that the K
        listwise mixes of one query differ (with one fixed subset they would all be identical).
        Then ``h <- h / ||h||`` and ``e^{s(q_i, h)/tau}`` enters ``Z_i`` (pass the result to
        ``info_nce(mixed_neg=...)``).

    Args:
        q: query embeddings (used by listwise weights; normalised inside).
        neg: hard negatives per query (normalised inside). Pairwise needs M >= 2, listwise M >= 1.
        num_mix: K, the number of mixes per query (>= 0; 0 returns an empty [N, 0, d] tensor).
        mode: ``"pairwise"`` or ``"listwise"``.
        alpha, beta: Beta distribution parameters of the pairwise lambda (KaLM-V2: 2, 2).
        detach: build the mixes from detached ``q`` and ``neg`` (no gradient flows through them).
        generator: a ``torch.Generator`` for reproducible pairs, lambdas and subsets; None uses
            the global RNG.
        listwise_temperature: softmax temperature of the listwise weights (> 0); the paper's
            "softmax of similarity" is taken literally as temperature 1.
        listwise_subset_size: size of the random subset per listwise mix (1 <= size <= M).

    Shapes:
        ``q`` [N, d], ``neg`` [N, M, d] -> [N, K, d].

    Returns:
        The mixed negatives, unit norm, same dtype and device as ``neg``.

    Not public in the paper (options here):
        how many mixes per query (``num_mix``; suggested M), how pairs are chosen (uniformly random
        distinct pairs here), whether gradient flows through the mixes (``detach``, default yes),
        the listwise temperature and how several listwise mixes per query differ (random subsets).
    """
    where = "mix_hard_negatives"
    _check_tensor("q", q, 2, where)
    _check_tensor("neg", neg, 3, where)
    n, d = q.shape
    if neg.shape[0] != n or neg.shape[2] != d:
        raise ValueError(f"{where}: `neg` must be [N={n}, M, d={d}], got shape {tuple(neg.shape)}")
    m = neg.shape[1]
    if not isinstance(num_mix, int) or isinstance(num_mix, bool) or num_mix < 0:
        raise ValueError(f"{where}: `num_mix` must be an int >= 0, got {num_mix!r}")
    if mode not in _MIX_MODES:
        raise ValueError(f"{where}: unknown `mode`={mode!r}; expected one of {_MIX_MODES}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"{where}: `generator` must be a torch.Generator or None")
    if num_mix == 0:
        return neg.new_zeros(n, 0, d)

    if detach:
        q, neg = q.detach(), neg.detach()
    out_dtype = neg.dtype
    neg = F.normalize(_upcast(neg), dim=-1)
    gen_device = generator.device if generator is not None else neg.device

    if mode == "pairwise":
        _check_positive("alpha", alpha, where)
        _check_positive("beta", beta, where)
        if m < 2:
            raise ValueError(f"{where}: pairwise mixing needs at least 2 hard negatives per query, got M={m}")
        a = torch.randint(0, m, (n, num_mix), generator=generator, device=gen_device)
        # b = a + offset (mod M) with offset in [1, M-1]: uniform over the M-1 indices != a.
        b = (a + torch.randint(1, m, (n, num_mix), generator=generator, device=gen_device)) % m
        a, b = a.to(neg.device), b.to(neg.device)
        lam = _sample_beta((n, num_mix), alpha, beta, generator, neg.dtype, neg.device).unsqueeze(-1)
        rows = torch.arange(n, device=neg.device).unsqueeze(1)
        mixes = lam * neg[rows, a] + (1 - lam) * neg[rows, b]  # [N, K, d]
    else:
        _check_positive("listwise_temperature", listwise_temperature, where)
        if m < 1:
            raise ValueError(f"{where}: listwise mixing needs at least 1 hard negative per query, got M=0")
        if listwise_subset_size is None:
            size = m if num_mix == 1 else max(2, -(-m // 2))
            size = min(size, m)
        else:
            size = listwise_subset_size
            if not isinstance(size, int) or not 1 <= size <= m:
                raise ValueError(f"{where}: `listwise_subset_size` must be an int in [1, M={m}], got {size!r}")
        sims = torch.einsum("nd,nmd->nm", F.normalize(_upcast(q), dim=-1), neg) / listwise_temperature  # [N, M]
        sims = sims.unsqueeze(1).expand(n, num_mix, m)
        if size < m:
            # A random subset per (query, mix): the `size` smallest of i.i.d. uniform keys.
            keys = torch.rand((n, num_mix, m), generator=generator, device=gen_device).to(neg.device)
            chosen = torch.zeros(n, num_mix, m, dtype=torch.bool, device=neg.device)
            chosen.scatter_(2, keys.topk(size, dim=2, largest=False).indices, True)
            sims = sims.masked_fill(~chosen, float("-inf"))
        lam = torch.softmax(sims, dim=-1)  # [N, K, M], zero outside the subset
        mixes = torch.einsum("nkm,nmd->nkd", lam, neg)
    return F.normalize(mixes, dim=-1).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Matryoshka wrapper
# --------------------------------------------------------------------------------------------
def matryoshka(loss_fn: Callable[..., Any], dims: Sequence[int], weights: Sequence[float]) -> Callable[..., Any]:
    """Matryoshka (MRL) wrapper: the weighted sum of ``loss_fn`` at several truncated dimensions.

    Formula:
        ``L_MRL = sum_t weights[t] * loss_fn(x_1[..., :dims[t]], x_2[..., :dims[t]], ...)``,
        where every embedding argument (``q``, ``pos``, ``neg``, ``mixed_neg``; positional or by
        keyword) is truncated *before* the normalisation inside ``loss_fn`` (truncate the raw
        pooled vector, then normalise). Other arguments are passed through unchanged.
        KaLM-V2: dims 896/512/256/128/64, weights 1/0.3/0.2/0.1/0.1.

    Args:
        loss_fn: any loss with ``info_nce``'s embedding-argument names (``q``, ``pos``, ``neg``,
            ``mixed_neg``), e.g. ``info_nce`` or a ``functools.partial`` of it.
        dims: truncation dimensions (distinct positive ints); each must be <= the embedding dim
            (checked at call time).
        weights: one weight > 0 per dim.

    Shapes:
        as ``loss_fn``; each embedding argument is sliced on its last dim.

    Returns:
        A callable with ``loss_fn``'s signature returning the weighted sum. If ``loss_fn``
        returns ``(loss, details)`` (``return_details=True``), the wrapper returns
        ``(weighted_loss, {dim: details})``.

    References:
        Kusupati et al., Matryoshka Representation Learning (arXiv 2205.13147);
        sentence-transformers ``MatryoshkaLoss``.
    """
    where = "matryoshka"
    if not callable(loss_fn):
        raise ValueError(f"{where}: `loss_fn` must be callable")
    dims, weights = list(dims), list(weights)
    if len(dims) == 0:
        raise ValueError(f"{where}: `dims` is empty")
    if len(dims) != len(weights):
        raise ValueError(f"{where}: `dims` has {len(dims)} entries but `weights` has {len(weights)}")
    for dim in dims:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f"{where}: every entry of `dims` must be a positive int, got {dim!r}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"{where}: `dims` has duplicates: {dims}")
    for w in weights:
        _check_positive(f"weights (entry {w!r})", w, where)
    signature = inspect.signature(loss_fn)
    names = [a for a in _EMBEDDING_ARGS if a in signature.parameters]
    if not names:
        raise ValueError(f"{where}: `loss_fn` has none of the embedding arguments {_EMBEDDING_ARGS}")

    @functools.wraps(loss_fn)
    def mrl_loss(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        full_dim = None
        for name in names:
            t = bound.arguments.get(name)
            if isinstance(t, Tensor):
                full_dim = t.shape[-1] if full_dim is None else full_dim
                if t.shape[-1] != full_dim:
                    raise ValueError(f"{where}: `{name}` has embedding dim {t.shape[-1]}, others have {full_dim}")
        for dim in dims:
            if full_dim is not None and dim > full_dim:
                raise ValueError(f"{where}: dim {dim} in `dims` is larger than the embedding dim {full_dim}")
        total, all_details = None, {}
        for dim, weight in zip(dims, weights):
            truncated = signature.bind(*args, **kwargs)
            for name in names:
                if isinstance(truncated.arguments.get(name), Tensor):
                    truncated.arguments[name] = truncated.arguments[name][..., :dim]
            out = loss_fn(*truncated.args, **truncated.kwargs)
            if isinstance(out, tuple):
                out, all_details[dim] = out
            total = weight * out if total is None else total + weight * out
        return (total, all_details) if all_details else total

    return mrl_loss


# --------------------------------------------------------------------------------------------
# contrastive distillation
# --------------------------------------------------------------------------------------------
def candidate_scores(q: Tensor, pos: Tensor, neg: Tensor | None = None) -> Tensor:
    """Cosine scores of each query against its own candidates: the positive, then its hard negatives.

    Args:
        q: query embeddings; pos: one positive per query; neg: hard negatives per query or None
            (all normalised inside).

    Shapes:
        ``q`` [N, d], ``pos`` [N, d], ``neg`` [N, M, d] -> [N, 1 + M] (column 0 is the positive).

    Returns:
        The score matrix, differentiable, for :func:`distill_kl` (student side, or a teacher's
        scores to cache).
    """
    where = "candidate_scores"
    _check_tensor("q", q, 2, where)
    _check_tensor("pos", pos, 2, where)
    if pos.shape != q.shape:
        raise ValueError(f"{where}: `pos` shape {tuple(pos.shape)} does not match `q` shape {tuple(q.shape)}")
    q, pos = F.normalize(_upcast(q), dim=-1), F.normalize(_upcast(pos), dim=-1)
    scores = [(q * pos).sum(-1, keepdim=True)]
    if neg is not None:
        _check_tensor("neg", neg, 3, where)
        if neg.shape[0] != q.shape[0] or neg.shape[2] != q.shape[1]:
            raise ValueError(f"{where}: `neg` must be [N={q.shape[0]}, M, d={q.shape[1]}], got {tuple(neg.shape)}")
        scores.append(torch.einsum("nd,nmd->nm", q, F.normalize(_upcast(neg), dim=-1)))
    return torch.cat(scores, dim=1)


def distill_kl(student_scores: Tensor, teacher_scores: Tensor, temperature: float = 0.05, *,
               reduction: str = "mean") -> Tensor:
    """Contrastive distillation: KL(P_teacher || P_student) over each query's candidates.

    Formula:
        ``P_t = softmax(teacher_scores / T)``, ``P_s = softmax(student_scores / T)`` per row;
        ``L_i = sum_c P_t[i,c] * (log P_t[i,c] - log P_s[i,c])``; ``L = mean_i L_i``.
        The V2.5 recipe uses T = 0.05 and a total ``0.3 * L_CL + 0.7 * L_KL`` (compose it with
        :func:`info_nce` in the trainer). Computed with ``log_softmax`` on both sides.

    Args:
        student_scores: the student's similarity scores over each query's candidates (positive +
            hard negatives), e.g. from :func:`candidate_scores`.
        teacher_scores: the teacher's scores over the same candidates in the same order; treated
            as constants (detached), so they can be precomputed and cached.
        temperature: T > 0, applied to both sides.
        reduction: ``"mean"`` over queries (default), ``"sum"``, or ``"none"`` ([N] per-query KL,
            e.g. to apply focal weights per query).

    Shapes:
        ``student_scores`` [N, C], ``teacher_scores`` [N, C] -> scalar (or [N]).

    Returns:
        The KL divergence (>= 0, zero when both score rows are equal).

    References:
        KaLM-Embedding V2.5 (stage-3 distillation); sentence-transformers ``DistillKLDivLoss``.
    """
    where = "distill_kl"
    _check_tensor("student_scores", student_scores, 2, where)
    _check_tensor("teacher_scores", teacher_scores, 2, where)
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(f"{where}: `student_scores` shape {tuple(student_scores.shape)} does not match "
                         f"`teacher_scores` shape {tuple(teacher_scores.shape)}")
    if student_scores.shape[0] == 0 or student_scores.shape[1] == 0:
        raise ValueError(f"{where}: empty score matrix of shape {tuple(student_scores.shape)}")
    _check_positive("temperature", temperature, where)
    _check_reduction(reduction, where)
    student_scores = _upcast(student_scores)
    log_ps = F.log_softmax(student_scores / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_scores.detach().to(student_scores.dtype) / temperature, dim=-1)
    per_query = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return _reduce(per_query, reduction)


# --------------------------------------------------------------------------------------------
# cross-device negatives
# --------------------------------------------------------------------------------------------
def gather_with_grad(t: Tensor) -> Tensor:
    """All ranks' ``t`` concatenated on dim 0, with gradients flowing back to every rank.

    Uses ``torch.distributed.nn.functional.all_gather``: its backward sums (reduce-scatter) the
    gradients that every rank computed for each gathered slice and hands each rank the slice of
    its own rows. It was the only gather that reproduced single-process gradients exactly on the
    development machines (DESIGN.md §3); ``torch.distributed.all_gather`` into a list has no
    gradient at all.

    Gradient convention (tested in tests/test_distributed.py): every rank gathers all embedding
    tensors (``q``, ``pos``, ``neg``, ``mixed_neg``) and computes the loss over the *global*
    batch, so all ranks hold the same loss value, equal to the one-process loss on the full
    batch. The gradient reaching a rank's local embeddings is then ``world_size`` times the
    one-process gradient (every rank's identical loss contributes once to the sum); DDP's
    gradient averaging divides by ``world_size`` and restores the one-process gradient. Without
    DDP (manual all-reduce of parameter grads), divide by ``world_size`` yourself.

    Args:
        t: a local tensor; every rank must pass the same shape (``all_gather`` needs equal sizes,
            so pad or drop the last uneven batch).

    Shapes:
        ``t`` [n_local, ...] -> [world_size * n_local, ...] in rank order.

    Returns:
        The gathered tensor; ``t`` itself when torch.distributed is unavailable, not
        initialised, or the world size is 1.
    """
    if not isinstance(t, Tensor):
        raise ValueError(f"gather_with_grad: `t` must be a torch.Tensor, got {type(t).__name__}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    if torch.distributed.get_world_size() == 1:
        return t
    import torch.distributed.nn.functional as dist_fn  # imported lazily: needs a distributed build

    with warnings.catch_warnings():
        # torch 2.13 marks it deprecated in favour of _functional_collectives.all_gather_single (a
        # private module); it is still the one whose gradients matched one process (DESIGN.md §3).
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        parts = dist_fn.all_gather(t)
    return _ContiguousGrad.apply(torch.cat(parts, dim=0))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    Why: on gloo, the backward of ``torch.distributed.nn.functional.all_gather`` (torch 2.13)
    emulates reduce-scatter with ``dist.scatter`` into ``torch.empty_like(grad)`` buffers, and gloo's
    scatter writes non-contiguous outputs in the wrong layout (pytorch issues #24836, #192920).
    The gradient of an ``einsum`` over [N, K, d] mixed negatives has strides (K*d, 1, K), so the
    cross-device gradients of ``mixed_neg`` came out silently wrong. A contiguous gradient into
    ``torch.cat``'s backward gives contiguous dim-0 slices, which are handled right
    (tests/test_distributed.py, configs with mixed negatives, fail without this).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return grad.contiguous()
