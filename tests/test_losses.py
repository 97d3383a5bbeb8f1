"""Tests of kalm_lib.losses against independent references.

References used here never call the vectorised code they check: InfoNCE values and gradients come
from a naive Python loop over queries i, candidates j and hard negatives k (float64 torch scalars,
plain ``exp`` / ``log``, no logsumexp), distillation from scipy, mixing coefficients are recovered
by least squares from the produced mixes.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
import torch.nn.functional as F

from kalm_lib.losses import (
    candidate_scores,
    distill_kl,
    focal_weights,
    gather_with_grad,
    info_nce,
    matryoshka,
    mix_hard_negatives,
)


# ------------------------------------------------------------------------------------------
# naive references
# ------------------------------------------------------------------------------------------
def naive_cos(a, b):
    dot = sum(a[t] * b[t] for t in range(len(a)))
    na = sum(a[t] * a[t] for t in range(len(a))) ** 0.5
    nb = sum(b[t] * b[t] for t in range(len(b))) ** 0.5
    return dot / (na * nb)


def naive_info_nce(q, pos, neg=None, *, temperature=0.01, in_batch=True, focal_gamma=0.0,
                   focal_detach=False, focal_normalize=False, mixed_neg=None, reduction="mean"):
    """Direct transcription of DESIGN.md §1.2: loops over i (queries), j (other rows), k (negatives).

    ``in_batch`` may be a per-query sequence of bools (query i sees the other rows only if ``in_batch[i]``).
    """
    n = len(q)
    per_query, ps, ws = [], [], []
    for i in range(n):
        shared = bool(in_batch[i]) if isinstance(in_batch, (list, torch.Tensor)) else in_batch
        own = torch.exp(naive_cos(q[i], pos[i]) / temperature)
        z = own
        for j in range(n):
            if shared and j != i:
                z = z + torch.exp(naive_cos(q[i], pos[j]) / temperature)
            if neg is not None and (shared or j == i):
                for k in range(neg.shape[1]):
                    z = z + torch.exp(naive_cos(q[i], neg[j][k]) / temperature)
        if mixed_neg is not None:
            for k in range(mixed_neg.shape[1]):
                z = z + torch.exp(naive_cos(q[i], mixed_neg[i][k]) / temperature)
        p = own / z
        w = (1 - p) ** focal_gamma
        if focal_detach:
            w = w.detach()
        per_query.append(-w * torch.log(p))
        ps.append(p)
        ws.append(w)
    if reduction == "none":
        return torch.stack(per_query), ps, ws
    total = sum(per_query)
    if reduction == "sum":
        return total, ps, ws
    denom = sum(ws) if focal_normalize else n
    return total / denom, ps, ws


def make_batch(n=4, m=3, k=2, d=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=dtype)
    pos = q + 0.8 * torch.randn(n, d, generator=g, dtype=dtype)  # positives correlated with queries
    neg = torch.randn(n, m, d, generator=g, dtype=dtype) + 0.3 * q[:, None]
    mixed = torch.randn(n, k, d, generator=g, dtype=dtype)
    return q, pos, neg, mixed


CASES = {
    "in_batch_only": dict(use_neg=False, use_mixed=False, kw=dict(in_batch=True)),
    "no_in_batch_no_neg": dict(use_neg=False, use_mixed=False, kw=dict(in_batch=False)),
    "in_batch_hard_neg": dict(use_neg=True, use_mixed=False, kw=dict(in_batch=True)),
    "own_hard_neg_only": dict(use_neg=True, use_mixed=False, kw=dict(in_batch=False)),
    "mixed_in_batch": dict(use_neg=True, use_mixed=True, kw=dict(in_batch=True)),
    "mixed_no_in_batch": dict(use_neg=True, use_mixed=True, kw=dict(in_batch=False)),
    "focal": dict(use_neg=True, use_mixed=False, kw=dict(focal_gamma=0.5)),
    "focal_detach": dict(use_neg=True, use_mixed=True, kw=dict(focal_gamma=0.5, focal_detach=True)),
    "focal_normalize": dict(use_neg=True, use_mixed=False, kw=dict(focal_gamma=0.5, focal_normalize=True)),
    "focal_detach_normalize_own": dict(
        use_neg=True, use_mixed=True,
        kw=dict(focal_gamma=0.5, focal_detach=True, focal_normalize=True, in_batch=False)),
    "focal_gamma2_sum": dict(use_neg=True, use_mixed=False, kw=dict(focal_gamma=2.0, reduction="sum")),
    "focal_none": dict(use_neg=True, use_mixed=True, kw=dict(focal_gamma=0.5, reduction="none")),
}


def _leaves(case, temperature):
    q, pos, neg, mixed = make_batch()
    q.requires_grad_()
    pos.requires_grad_()
    neg = neg.requires_grad_() if case["use_neg"] else None
    mixed = mixed.requires_grad_() if case["use_mixed"] else None
    return q, pos, neg, mixed


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_info_nce_matches_naive_loop_values_and_gradients(name, temperature):
    case = CASES[name]
    kw = dict(case["kw"], temperature=temperature)
    q, pos, neg, mixed = _leaves(case, temperature)
    inputs = [t for t in (q, pos, neg, mixed) if t is not None]

    loss = info_nce(q, pos, neg, mixed_neg=mixed, **kw)
    ref, _, _ = naive_info_nce(q, pos, neg, mixed_neg=mixed, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)

    # Gradients: autograd through the vectorised code vs autograd through the naive loop.
    scalar, ref_scalar = (loss.sum(), ref.sum()) if loss.ndim else (loss, ref)
    if loss.ndim:  # reduction="none": weight queries differently so every row's gradient counts
        coef = torch.arange(1, loss.shape[0] + 1, dtype=loss.dtype)
        scalar, ref_scalar = (loss * coef).sum(), (ref * coef).sum()
    grads = torch.autograd.grad(scalar, inputs)
    ref_grads = torch.autograd.grad(ref_scalar, inputs)
    trivial = name == "no_in_batch_no_neg"  # a single candidate: p = 1, loss and gradients are 0
    for g, rg in zip(grads, ref_grads):
        assert (g.abs().max() == 0) if trivial else (g.abs().max() > 0)
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-11)


def test_info_nce_default_temperature_matches_naive_loop():
    # tau = 0.01 (the paper's value): exp(s/tau) up to e^100, still fine in float64 for the naive loop.
    q, pos, neg, mixed = make_batch(seed=3)
    loss = info_nce(q, pos, neg, mixed_neg=mixed, focal_gamma=0.5)
    ref, _, _ = naive_info_nce(q, pos, neg, mixed_neg=mixed, temperature=0.01, focal_gamma=0.5)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)


def test_info_nce_gradcheck_finite_differences():
    q, pos, neg, mixed = make_batch(n=3, m=2, k=1, d=4, seed=1)
    inputs = tuple(t.requires_grad_() for t in (q, pos, neg, mixed))
    fn = functools.partial(info_nce, temperature=0.2, focal_gamma=0.5)
    assert torch.autograd.gradcheck(lambda a, b, c, e: fn(a, b, c, mixed_neg=e), inputs)


def test_focal_gamma_zero_is_plain_info_nce_bit_for_bit():
    q, pos, neg, mixed = make_batch(dtype=torch.float32, seed=5)
    plain = info_nce(q, pos, neg, mixed_neg=mixed)
    for detach in (False, True):
        for normalize in (False, True):
            focal0 = info_nce(q, pos, neg, mixed_neg=mixed, focal_gamma=0.0,
                              focal_detach=detach, focal_normalize=normalize)
            assert torch.equal(focal0, plain)
    # ... and plain InfoNCE is cross-entropy over [positives | all hard negatives | mixes]:
    qn, pn, nn_, mn = (F.normalize(t, dim=-1) for t in (q, pos, neg, mixed))
    n, m, d = neg.shape
    rows = []
    for i in range(n):
        cand = torch.cat([pn, nn_.reshape(n * m, d), mn[i]])
        rows.append(torch.log_softmax(cand @ qn[i] / 0.01, dim=0)[i])
    torch.testing.assert_close(plain, -torch.stack(rows).mean(), rtol=1e-6, atol=1e-6)
    # focal with gamma > 0 must differ (the test can fail)
    assert not torch.allclose(info_nce(q, pos, neg, focal_gamma=0.5), info_nce(q, pos, neg))


def test_info_nce_details_match_naive():
    q, pos, neg, mixed = make_batch(seed=7)
    loss, det = info_nce(q, pos, neg, mixed_neg=mixed, temperature=0.1, focal_gamma=0.5, return_details=True)
    ref, ps, ws = naive_info_nce(q, pos, neg, mixed_neg=mixed, temperature=0.1, focal_gamma=0.5)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(det["p"], torch.stack(ps))
    torch.testing.assert_close(det["weights"], torch.stack(ws))
    n, m, _ = neg.shape
    assert det["logits"].shape == (n, n + n * m + mixed.shape[1])
    # accuracy: fraction of queries whose best candidate is the own positive, by a naive loop
    hits = 0
    for i in range(n):
        best = max([naive_cos(q[i], pos[j]) for j in range(n)]
                   + [naive_cos(q[i], neg[j][k]) for j in range(n) for k in range(m)]
                   + [naive_cos(q[i], mixed[i][k]) for k in range(mixed.shape[1])])
        hits += int(naive_cos(q[i], pos[i]) >= best)
    assert float(det["accuracy"]) == hits / n
    # a batch where queries equal their positives and negatives are far: accuracy 1, p close to 1
    easy_q = torch.eye(4, 8, dtype=torch.float64)
    _, det = info_nce(easy_q, easy_q, -easy_q[:, None].repeat(1, 2, 1), return_details=True)
    assert float(det["accuracy"]) == 1.0


# ------------------------------------------------------------------------------------------
# per-query in-batch mask (a batch mixing task types with and without in-batch negatives)
# ------------------------------------------------------------------------------------------
MASK = [True, False, False, True, False, True]


def two_call_combination(q, pos, neg, mask, **kw):
    """What the trainer computed before the mask existed: both bool layouts, rows picked per query, one
    reduction redone by hand (sum(w * nll) / sum(w) under focal_normalize, else the mean)."""
    normalize = kw.pop("focal_normalize", False)
    on, d_on = info_nce(q, pos, neg, in_batch=True, reduction="none", return_details=True, **kw)
    off, d_off = info_nce(q, pos, neg, in_batch=False, reduction="none", return_details=True, **kw)
    per_query = torch.where(mask, on, off)
    weights = torch.where(mask, d_on["weights"], d_off["weights"])
    hits = torch.where(mask, d_on["logits"].argmax(1) == d_on["labels"], d_off["logits"].argmax(1) == d_off["labels"])
    loss = per_query.sum() / weights.sum() if normalize and kw.get("focal_gamma", 0) else per_query.mean()
    return loss, per_query, hits.double().mean()


@pytest.mark.parametrize("kw", [dict(), dict(focal_gamma=0.5), dict(focal_gamma=0.5, focal_normalize=True),
                                dict(focal_gamma=2.0, focal_detach=True)], ids=["plain", "focal", "focal_norm", "detach"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_single_call_equals_the_two_call_combination(kw, dtype):
    """One call with a per-row mask == the old two calls + torch.where + reduction.

    Rows with in-batch negatives are the same numbers bit for bit (same matmul, same softmax row). Rows
    without differ only by float rounding: their own-negative scores come from ``q @ neg.T`` instead of an
    einsum (a cosine rounded differently by ~eps, then divided by tau), and ``logsumexp`` sums the same
    non-zero terms in another order among ``-inf`` columns (exp = 0). Hence the bound 8 * eps / tau:
    2e-5 in float32 at tau = 0.05, 4e-14 in float64.
    """
    q, pos, neg, _ = make_batch(n=6, m=3, dtype=dtype, seed=11)
    mask = torch.tensor(MASK)
    loss, det = info_nce(q, pos, neg, in_batch=mask, temperature=0.05, return_details=True, **kw)
    per_query = info_nce(q, pos, neg, in_batch=mask, temperature=0.05, reduction="none",
                         **{k: v for k, v in kw.items() if k != "focal_normalize"})
    ref_loss, ref_rows, ref_acc = two_call_combination(q, pos, neg, mask, temperature=0.05, **kw)
    tol = dict(rtol=0, atol=8 * torch.finfo(dtype).eps / 0.05)
    torch.testing.assert_close(loss, ref_loss, **tol)
    torch.testing.assert_close(per_query, ref_rows, **tol)
    assert torch.equal(per_query[mask], ref_rows[mask])   # in-batch rows: bit for bit
    assert float(det["accuracy"]) == float(ref_acc)
    # the mask matters: the loss is neither of the two bool layouts
    assert not torch.allclose(loss, info_nce(q, pos, neg, in_batch=True, temperature=0.05, **kw))
    assert not torch.allclose(loss, info_nce(q, pos, neg, in_batch=False, temperature=0.05, **kw))


@pytest.mark.parametrize("kw", [dict(), dict(focal_gamma=0.5, focal_normalize=True)], ids=["plain", "focal_norm"])
def test_masked_info_nce_matches_naive_loop_values_and_gradients(kw):
    q, pos, neg, mixed = make_batch(n=6, m=2, k=2, seed=4)
    inputs = [t.requires_grad_() for t in (q, pos, neg, mixed)]
    mask = torch.tensor(MASK)
    loss = info_nce(q, pos, neg, mixed_neg=mixed, in_batch=mask, temperature=0.1, **kw)
    ref, _, _ = naive_info_nce(q, pos, neg, mixed_neg=mixed, in_batch=MASK, temperature=0.1, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(ref, inputs)
    for g, rg in zip(grads, ref_grads):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-11)


def test_uniform_mask_is_the_bool_call_bit_for_bit():
    q, pos, neg, mixed = make_batch(dtype=torch.float32, seed=2)
    n = q.shape[0]
    for flag in (True, False):
        mask = torch.full((n,), flag)
        got, det = info_nce(q, pos, neg, mixed_neg=mixed, in_batch=mask, focal_gamma=0.5, return_details=True)
        want, want_det = info_nce(q, pos, neg, mixed_neg=mixed, in_batch=flag, focal_gamma=0.5, return_details=True)
        assert torch.equal(got, want) and det["logits"].shape == want_det["logits"].shape


def test_masked_logits_hide_other_queries_candidates_from_unmasked_rows():
    q, pos, neg, mixed = make_batch(n=4, m=2, k=1, seed=6)
    mask = torch.tensor([True, False, True, False])
    _, det = info_nce(q, pos, neg, mixed_neg=mixed, in_batch=mask, return_details=True)
    logits, n, m = det["logits"], 4, 2
    assert logits.shape == (n, n + n * m + 1) and torch.equal(det["labels"], torch.arange(n))
    for i in range(n):
        own = {i} | {n + i * m + k for k in range(m)} | {n + n * m}
        hidden = {c for c in range(logits.shape[1]) if torch.isinf(logits[i, c])}
        assert hidden == (set() if mask[i] else set(range(logits.shape[1])) - own), i


@pytest.mark.parametrize("bad, match", [(torch.tensor([True, False]), r"shape \[N=4\]"),
                                        (torch.ones(4), "bool tensor"), ([True] * 4, "bool tensor")])
def test_bad_in_batch_mask_names_the_argument(bad, match):
    q, pos, neg, _ = make_batch()
    with pytest.raises(ValueError, match=f"`in_batch`.*{match}"):
        info_nce(q, pos, neg, in_batch=bad)


def test_info_nce_empty_neg_equals_no_neg():
    q, pos, _, _ = make_batch()
    empty = torch.zeros(q.shape[0], 0, q.shape[1], dtype=q.dtype)
    for in_batch in (True, False):
        assert torch.equal(info_nce(q, pos, empty, in_batch=in_batch), info_nce(q, pos, None, in_batch=in_batch))


def test_focal_gradient_finite_when_positive_is_certain():
    # tau = 0.01 with a perfect positive and opposite negatives gives p == 1 in float32;
    # d/dp (1-p)^0.5 is infinite there, the loss must still give finite (zero) gradients.
    q = torch.eye(3, 5).requires_grad_()
    neg = -torch.eye(3, 5)[:, None].repeat(1, 2, 1)
    loss = info_nce(q, torch.eye(3, 5), neg, focal_gamma=0.5)
    (g,) = torch.autograd.grad(loss, [q])
    assert torch.isfinite(g).all()
    assert float(loss.detach()) == 0.0


def test_focal_weights_formula():
    p = torch.tensor([0.0, 0.25, 0.5, 0.999, 1.0], requires_grad=True)
    w = focal_weights(p, 0.5)
    expected = [math.sqrt(1 - x) for x in [0.0, 0.25, 0.5, 0.999, 1.0]]
    torch.testing.assert_close(w, torch.tensor(expected), atol=1e-6, rtol=1e-6)
    assert w.requires_grad and not focal_weights(p, 0.5, detach=True).requires_grad
    assert torch.equal(focal_weights(p, 0.0), torch.ones(5))
    (g,) = torch.autograd.grad(w.sum(), [p])
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g[1], torch.tensor(-0.5 / math.sqrt(0.75)))
    with pytest.raises(ValueError, match="gamma"):
        focal_weights(p, -1.0)
    with pytest.raises(ValueError, match="`p`"):
        focal_weights(torch.tensor([1.5]), 0.5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q, p, n: info_nce(q, p[:3], n), "`pos`"),
        (lambda q, p, n: info_nce(q, p, n[:, :, :4]), "`neg`"),
        (lambda q, p, n: info_nce(q, p, n[:2]), "`neg`"),
        (lambda q, p, n: info_nce(q, p, n, mixed_neg=n[:, :, :2]), "`mixed_neg`"),
        (lambda q, p, n: info_nce(q, p, n, reduction="avg"), "`reduction`"),
        (lambda q, p, n: info_nce(q, p, n, temperature=0.0), "`temperature`"),
        (lambda q, p, n: info_nce(q, p, n, focal_gamma=-0.5), "`focal_gamma`"),
        (lambda q, p, n: info_nce(q[0], p, n), "`q`"),
        (lambda q, p, n: info_nce(q.masked_fill(q > 1, float("nan")), p, n), "`q` contains NaN"),
        (lambda q, p, n: info_nce(q, p, n.masked_fill(n > 1, float("inf"))), "`neg` contains NaN or Inf"),
    ],
)
def test_info_nce_bad_input_names_the_argument(call, match):
    q, pos, neg, _ = make_batch()
    with pytest.raises(ValueError, match=match):
        call(q, pos, neg)


# ------------------------------------------------------------------------------------------
# hard-negative mixing
# ------------------------------------------------------------------------------------------
def block_negatives(n=3, m=4, extra=2, seed=0):
    """Query i's negatives live only in coordinate block i: a mix touching another block would
    use another query's negatives."""
    g = torch.Generator().manual_seed(seed)
    d = n * m + extra
    neg = torch.zeros(n, m, d, dtype=torch.float64)
    for i in range(n):
        neg[i, :, i * m:(i + 1) * m] = torch.randn(m, m, generator=g, dtype=torch.float64)
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    return q, neg


def recover_coefficients(mix, own_neg):
    """Least-squares coefficients c with mix = sum_m c_m * unit(own_neg_m); returns (c, residual)."""
    basis = F.normalize(own_neg, dim=-1).T.numpy()  # [d, M]
    c, *_ = np.linalg.lstsq(basis, mix.numpy(), rcond=None)
    return c, np.abs(basis @ c - mix.numpy()).max()


@pytest.mark.parametrize("mode", ["pairwise", "listwise"])
def test_mixes_are_unit_norm_convex_mixes_of_own_negatives(mode):
    q, neg = block_negatives()
    n, m, d = neg.shape
    mixes = mix_hard_negatives(q, neg, num_mix=5, mode=mode, generator=torch.Generator().manual_seed(1))
    assert mixes.shape == (n, 5, d) and mixes.dtype == neg.dtype
    torch.testing.assert_close(mixes.norm(dim=-1), torch.ones(n, 5, dtype=torch.float64))
    for i in range(n):
        outside = torch.ones(d, dtype=torch.bool)
        outside[i * m:(i + 1) * m] = False
        assert mixes[i][:, outside].abs().max() == 0, "a mix uses another query's negatives"
        for k in range(5):
            c, residual = recover_coefficients(mixes[i, k], neg[i])
            assert residual < 1e-10
            assert (c >= -1e-10).all(), c
            # mix = unit(sum lam_m n_m) with sum lam_m = 1  =>  lam = c / sum(c), and the
            # un-normalised convex mix has norm 1 / sum(c) <= 1 (triangle inequality on unit vectors)
            lam = c / c.sum()
            assert abs(lam.sum() - 1) < 1e-12 and c.sum() >= 1 - 1e-10
            if mode == "pairwise":
                assert (np.abs(c) > 1e-9).sum() == 2  # exactly two distinct negatives


def test_pairwise_lambda_follows_beta_distribution():
    # Recover lam from many mixes; the pair order is random, so compare max(lam, 1 - lam) with the
    # folded Beta(alpha, beta): P(max <= t) = F(t) - F(1 - t) for t >= 1/2 (Kolmogorov-Smirnov).
    alpha, beta = 2.0, 5.0
    g = torch.Generator().manual_seed(0)
    neg = torch.eye(3, dtype=torch.float64)[None].repeat(500, 1, 1)  # orthonormal: coefficients = mix coords
    q = torch.randn(500, 3, dtype=torch.float64, generator=g)
    mixes = mix_hard_negatives(q, neg, num_mix=4, alpha=alpha, beta=beta, generator=g)
    coef = mixes.reshape(-1, 3)
    lam = (coef / coef.sum(-1, keepdim=True)).max(-1).values.numpy()
    cdf = lambda t: scipy.stats.beta.cdf(t, alpha, beta) - scipy.stats.beta.cdf(1 - t, alpha, beta)
    assert scipy.stats.kstest(lam, cdf).pvalue > 1e-3
    assert scipy.stats.kstest(lam, lambda t: scipy.stats.beta.cdf(t, 2, 2) - scipy.stats.beta.cdf(1 - t, 2, 2)).pvalue < 1e-3
    # pairs are uniform over the 3 unordered pairs
    pairs = [tuple(np.flatnonzero(row > 1e-12)) for row in coef.numpy()]
    counts = [pairs.count(p) for p in [(0, 1), (0, 2), (1, 2)]]
    assert sum(counts) == len(pairs)
    assert scipy.stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_listwise_single_mix_weights_are_softmax_of_similarity(temperature):
    q, neg = block_negatives(seed=2)
    n, m, _ = neg.shape
    mixes = mix_hard_negatives(q, neg, num_mix=1, mode="listwise", listwise_temperature=temperature)
    for i in range(n):
        c, _ = recover_coefficients(mixes[i, 0], neg[i])
        sims = [float(naive_cos(q[i], neg[i][k])) / temperature for k in range(m)]
        expected = scipy.special.softmax(sims)
        np.testing.assert_allclose(c / c.sum(), expected, rtol=1e-8)


def test_listwise_several_mixes_use_random_subsets_with_softmax_weights():
    q, neg = block_negatives(m=6, seed=3)
    mixes = mix_hard_negatives(q, neg, num_mix=4, mode="listwise", listwise_subset_size=3,
                               generator=torch.Generator().manual_seed(0))
    supports = set()
    for i in range(neg.shape[0]):
        for k in range(4):
            c, _ = recover_coefficients(mixes[i, k], neg[i])
            support = np.flatnonzero(np.abs(c) > 1e-9)
            assert len(support) == 3
            supports.add(tuple(support))
            sims = [float(naive_cos(q[i], neg[i][j])) for j in support]
            np.testing.assert_allclose(c[support] / c.sum(), scipy.special.softmax(sims), rtol=1e-8)
    assert len(supports) > 1  # the mixes differ


def test_mixing_reproducible_with_generator_and_detach_option():
    q, neg = block_negatives()
    for mode in ("pairwise", "listwise"):
        a = mix_hard_negatives(q, neg, num_mix=3, mode=mode, generator=torch.Generator().manual_seed(4))
        b = mix_hard_negatives(q, neg, num_mix=3, mode=mode, generator=torch.Generator().manual_seed(4))
        c = mix_hard_negatives(q, neg, num_mix=3, mode=mode, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b) and not torch.equal(a, c)
    q.requires_grad_()
    neg.requires_grad_()
    assert not mix_hard_negatives(q, neg, num_mix=2).requires_grad
    live = mix_hard_negatives(q, neg, num_mix=2, mode="listwise", detach=False)
    gq, gn = torch.autograd.grad(live.sum(), [q, neg])
    assert gq.abs().max() > 0 and gn.abs().max() > 0
    assert mix_hard_negatives(q, neg, num_mix=0).shape == (3, 0, neg.shape[2])


def test_mixing_bad_input():
    q, neg = block_negatives()
    with pytest.raises(ValueError, match="`mode`"):
        mix_hard_negatives(q, neg, num_mix=2, mode="random")
    with pytest.raises(ValueError, match="M=1"):
        mix_hard_negatives(q, neg[:, :1], num_mix=2)
    with pytest.raises(ValueError, match="`neg`"):
        mix_hard_negatives(q, neg[:2], num_mix=2)
    with pytest.raises(ValueError, match="`num_mix`"):
        mix_hard_negatives(q, neg, num_mix=-1)
    with pytest.raises(ValueError, match="`alpha`"):
        mix_hard_negatives(q, neg, num_mix=1, alpha=0)
    with pytest.raises(ValueError, match="`listwise_subset_size`"):
        mix_hard_negatives(q, neg, num_mix=2, mode="listwise", listwise_subset_size=9)


def test_mixed_negatives_feed_info_nce():
    q, pos, neg, _ = make_batch()
    mixes = mix_hard_negatives(q, neg, num_mix=3, generator=torch.Generator().manual_seed(0))
    loss = info_nce(q, pos, neg, mixed_neg=mixes, temperature=0.1)
    ref, _, _ = naive_info_nce(q, pos, neg, mixed_neg=mixes, temperature=0.1)
    torch.testing.assert_close(loss, ref)
    assert loss > info_nce(q, pos, neg, temperature=0.1)  # extra negatives enlarge every Z_i


# ------------------------------------------------------------------------------------------
# Matryoshka
# ------------------------------------------------------------------------------------------
def test_matryoshka_equals_hand_weighted_sum_of_truncated_losses():
    q, pos, neg, mixed = make_batch(d=8)
    dims, weights = [8, 4, 2], [1.0, 0.3, 0.1]
    leaves = [t.requires_grad_() for t in (q, pos, neg, mixed)]
    loss_fn = matryoshka(info_nce, dims, weights)
    got = loss_fn(q, pos, neg, mixed_neg=mixed, temperature=0.1, focal_gamma=0.5)
    expected = sum(
        w * naive_info_nce(q[:, :k], pos[:, :k], neg[..., :k], mixed_neg=mixed[..., :k],
                           temperature=0.1, focal_gamma=0.5)[0]
        for k, w in zip(dims, weights))
    torch.testing.assert_close(got, expected)
    for g, rg in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(g, rg)
    # keyword call and a functools.partial both compose
    part = matryoshka(functools.partial(info_nce, temperature=0.1, focal_gamma=0.5), dims, weights)
    torch.testing.assert_close(part(q=q, pos=pos, neg=neg, mixed_neg=mixed), got)
    # return_details passes through, keyed by dim
    total, details = loss_fn(q, pos, neg, temperature=0.1, return_details=True)
    assert sorted(details) == [2, 4, 8] and details[4]["p"].shape == (4,)


def test_matryoshka_composes_with_any_loss_of_that_signature():
    def cosine_margin(q, pos, neg=None, *, margin=0.2):
        s_pos = F.cosine_similarity(q, pos)
        s_neg = F.cosine_similarity(q[:, None], neg, dim=-1).max(-1).values
        return (s_neg - s_pos + margin).clamp_min(0).mean()

    q, pos, neg, _ = make_batch(d=8)
    wrapped = matryoshka(cosine_margin, [6, 3], [0.5, 2.0])
    expected = 0.5 * cosine_margin(q[:, :6], pos[:, :6], neg[..., :6], margin=0.5) + \
        2.0 * cosine_margin(q[:, :3], pos[:, :3], neg[..., :3], margin=0.5)
    torch.testing.assert_close(wrapped(q, pos, neg, margin=0.5), expected)
    # wrapping a wrapped loss truncates again (nested MRL composes): 8 -> 7 -> (6, 3)
    twice = matryoshka(wrapped, [7], [3.0])
    torch.testing.assert_close(twice(q, pos, neg, margin=0.5), 3.0 * expected)
    with pytest.raises(ValueError, match="dim 6"):  # outer 4 < inner 6
        matryoshka(wrapped, [4], [1.0])(q, pos, neg)


def test_matryoshka_validation():
    with pytest.raises(ValueError, match="`weights` has 1"):
        matryoshka(info_nce, [8, 4], [1.0])
    with pytest.raises(ValueError, match="positive int"):
        matryoshka(info_nce, [8, 0], [1.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        matryoshka(info_nce, [8, 4], [1.0, -1.0])
    with pytest.raises(ValueError, match="duplicates"):
        matryoshka(info_nce, [4, 4], [1.0, 1.0])
    q, pos, neg, _ = make_batch(d=8)
    with pytest.raises(ValueError, match="dim 16"):
        matryoshka(info_nce, [16, 4], [1.0, 1.0])(q, pos, neg)


# ------------------------------------------------------------------------------------------
# distillation
# ------------------------------------------------------------------------------------------
def test_candidate_scores_naive():
    q, pos, neg, _ = make_batch()
    s = candidate_scores(q, pos, neg)
    assert s.shape == (4, 1 + 3)
    for i in range(4):
        torch.testing.assert_close(s[i, 0], naive_cos(q[i], pos[i]))
        for k in range(3):
            torch.testing.assert_close(s[i, 1 + k], naive_cos(q[i], neg[i][k]))
    assert candidate_scores(q, pos).shape == (4, 1)


@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_distill_kl_matches_scipy(temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.rand(5, 8, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.rand(5, 8, generator=g, dtype=torch.float64)
    got = distill_kl(student, teacher, temperature)
    per_query = [scipy.stats.entropy(scipy.special.softmax(t / temperature), scipy.special.softmax(s / temperature))
                 for s, t in zip(student.detach().numpy(), teacher.numpy())]
    np.testing.assert_allclose(float(got.detach()), np.mean(per_query), rtol=1e-10)
    np.testing.assert_allclose(distill_kl(student, teacher, temperature, reduction="none").detach().numpy(),
                               per_query, rtol=1e-10)
    # gradient of KL(P_t || P_s) w.r.t. student logits is (P_s - P_t) / T, averaged over queries
    (grad,) = torch.autograd.grad(got, [student])
    expected = (scipy.special.softmax(student.detach().numpy() / temperature, axis=1)
                - scipy.special.softmax(teacher.numpy() / temperature, axis=1)) / temperature / 5
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-8, atol=1e-12)


def test_distill_kl_zero_when_equal_and_teacher_is_constant():
    q, pos, neg, _ = make_batch()
    scores = candidate_scores(q, pos, neg)
    assert float(distill_kl(scores, scores.clone())) == 0.0
    teacher = scores.clone().requires_grad_()
    student = (scores + 0.1 * torch.randn_like(scores)).requires_grad_()
    loss = distill_kl(student, teacher)
    assert loss > 0
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    with pytest.raises(ValueError, match="`teacher_scores` shape"):
        distill_kl(scores, scores[:, :2])
    with pytest.raises(ValueError, match="`temperature`"):
        distill_kl(scores, scores, temperature=-1)


def test_gather_with_grad_is_identity_without_process_group():
    t = torch.randn(3, 4)
    assert gather_with_grad(t) is t


def test_half_precision_inputs_are_scored_in_float32():
    # bf16 logits at tau = 0.01 would be quantised in steps of 0.5; the loss must equal the float32
    # loss of the same (bf16-rounded) embeddings exactly, and gradients come back in bf16.
    q, pos, neg, mixed = (t.to(torch.bfloat16) for t in make_batch(dtype=torch.float32, seed=11))
    q.requires_grad_()
    loss = info_nce(q, pos, neg, mixed_neg=mixed, focal_gamma=0.5)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, info_nce(q.float(), pos.float(), neg.float(), mixed_neg=mixed.float(), focal_gamma=0.5))
    (g,) = torch.autograd.grad(loss, [q])
    assert g.dtype == torch.bfloat16
    s = candidate_scores(q, pos, neg)
    assert torch.equal(distill_kl(s, s.flip(1)), distill_kl(s.float(), s.flip(1).float()))
    mixes = mix_hard_negatives(q, neg, num_mix=2, generator=torch.Generator().manual_seed(0))
    assert mixes.dtype == torch.bfloat16
    ref = mix_hard_negatives(q.float(), neg.float(), num_mix=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mixes, ref.to(torch.bfloat16))
