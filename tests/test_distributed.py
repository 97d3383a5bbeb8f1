"""Cross-device negatives: two real gloo processes must reproduce the one-process loss and gradients.

Each of two ranks holds half of a fixed batch; it gathers q, pos, neg and mixed_neg with
``gather_with_grad`` and computes ``info_nce`` over the global batch. The documented convention
(kalm_lib.losses.gather_with_grad): the loss equals the one-process loss on the full batch, and the
gradient reaching a rank's local embeddings is world_size times the one-process gradient, which
DDP's averaging undoes. Both halves of that statement are checked: on leaf embedding tensors
(grad / world_size) and through a tiny DDP-wrapped linear encoder (averaged parameter grads).
The configs with mixed negatives also guard against gloo's scatter writing non-contiguous
gradients in the wrong layout (see kalm_lib.losses._ContiguousGrad): without that fix their
``mixed_neg`` gradients differ by up to 8e-2.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kalm_lib.losses import gather_with_grad, info_nce

WORLD = 2
N, M, K, D_IN, D = 6, 3, 2, 5, 8  # global batch of N queries, split N/2 per rank
CONFIGS = {
    "in_batch_hard_neg": dict(temperature=0.05),
    "focal_mixed": dict(temperature=0.05, focal_gamma=0.5, use_mixed=True),
    "focal_normalize_detach": dict(temperature=0.1, focal_gamma=0.5, focal_detach=True, focal_normalize=True,
                                   use_mixed=True),
    # a batch mixing task types: per-query in-batch mask over the global batch (one rank's rows on, the other's
    # partly off), so masked columns of gathered rows must give zero gradient on the rank that owns them
    "per_row_in_batch_mask": dict(temperature=0.05, focal_gamma=0.5, use_mixed=True,
                                  in_batch=torch.tensor([True, False, True, False, False, True])),
}


def fixed_batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(N, D, generator=g, dtype=dtype)
    return dict(
        q=q,
        pos=q + 0.7 * torch.randn(N, D, generator=g, dtype=dtype),
        neg=torch.randn(N, M, D, generator=g, dtype=dtype) + 0.3 * q[:, None],
        mixed=torch.randn(N, K, D, generator=g, dtype=dtype),
        x=torch.randn(N * (2 + M), D_IN, generator=g, dtype=dtype),  # encoder inputs: q | pos | neg rows
    )


def loss_on(q, pos, neg, mixed, config):
    kw = {k: v for k, v in config.items() if k != "use_mixed"}
    return info_nce(q, pos, neg, mixed_neg=mixed if config.get("use_mixed") else None, **kw)


def make_encoder(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Linear(D_IN, D).to(dtype)


def encode_split(encoder, x, n):
    # One forward for all rows (DDP expects one forward per backward), then split q | pos | neg.
    e = encoder(x)
    return e[:n], e[n:2 * n], e[2 * n:].reshape(n, M, D)


def local_rows(x, rank, n_local):
    """Rank's share of the encoder inputs, laid out as q | pos | neg for its own queries."""
    q, pos, neg = x[:N], x[N:2 * N], x[2 * N:].reshape(N, M, D_IN)
    sl = slice(rank * n_local, (rank + 1) * n_local)
    return torch.cat([q[sl], pos[sl], neg[sl].reshape(-1, D_IN)])


def _worker(rank, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        data = fixed_batch()
        n_local = N // WORLD
        sl = slice(rank * n_local, (rank + 1) * n_local)
        result = {}
        for name, config in CONFIGS.items():
            leaves = [data[k][sl].clone().requires_grad_() for k in ("q", "pos", "neg", "mixed")]
            gathered = [gather_with_grad(t) for t in leaves]
            loss = loss_on(*gathered, config)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
            result[name] = dict(loss=loss.detach(), grads=[g.detach() for g in grads])
        # Through a DDP-wrapped encoder: DDP averages parameter grads over ranks.
        ddp = torch.nn.parallel.DistributedDataParallel(make_encoder())
        q, pos, neg = encode_split(ddp, local_rows(data["x"], rank, n_local), n_local)
        loss = loss_on(gather_with_grad(q), gather_with_grad(pos), gather_with_grad(neg), None,
                       CONFIGS["in_batch_hard_neg"])
        loss.backward()
        result["ddp"] = dict(loss=loss.detach(), grads=[p.grad.detach().clone() for p in ddp.module.parameters()])
        torch.save(result, f"{out_path}.rank{rank}")
        # rank 0 hosts the TCP store: make sure nobody is still talking to it when it exits
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "result"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.rank{r}") for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_gloo_ranks_reproduce_one_process_loss_and_gradients(two_rank_results, name):
    data = fixed_batch()
    leaves = [data[k].clone().requires_grad_() for k in ("q", "pos", "neg", "mixed")]
    loss = loss_on(*leaves, CONFIGS[name])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    if not CONFIGS[name].get("use_mixed"):
        assert grads[3].abs().max() == 0  # mixed negatives unused in this config
    n_local = N // WORLD
    for rank, result in enumerate(two_rank_results):
        got = result[name]
        # every rank computes the global-batch loss: equal to the one-process loss
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
        sl = slice(rank * n_local, (rank + 1) * n_local)
        for g_rank, g_full in zip(got["grads"], grads):
            # documented convention: local grads are world_size x the one-process grads
            torch.testing.assert_close(g_rank / WORLD, g_full[sl], rtol=1e-6, atol=1e-6)
            if g_full[sl].abs().max() > 0:
                # ...and not equal without the scaling (the test can tell the conventions apart)
                assert not torch.allclose(g_rank, g_full[sl], rtol=1e-6, atol=1e-6)


def test_ddp_averaged_parameter_grads_equal_one_process(two_rank_results):
    data = fixed_batch()
    encoder = make_encoder()
    q, pos, neg = encode_split(encoder, data["x"], N)
    loss = loss_on(q, pos, neg, None, CONFIGS["in_batch_hard_neg"])
    loss.backward()
    for result in two_rank_results:
        torch.testing.assert_close(result["ddp"]["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
        for g_rank, p in zip(result["ddp"]["grads"], encoder.parameters()):
            assert p.grad.abs().max() > 0
            torch.testing.assert_close(g_rank, p.grad, rtol=1e-6, atol=1e-6)
