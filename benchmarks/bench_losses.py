"""Cost of the KaLM loss features, as ratios against a peer measured in the same run.

Each row times forward + backward of one loss call on random embeddings and divides by a
reference timed in the same process (min over repeats, interleaved, so machine load cancels):

- ``info_nce_vs_bare_ce``: ``info_nce`` (input checks, normalisation, in-batch + hard negatives)
  against a bare ``F.cross_entropy`` over the same pre-built candidate matrix: the overhead of
  the library's conveniences.
- ``focal_mixing_vs_plain``: ``info_nce`` with focal gamma 0.5 and K = M pairwise mixes per
  query (mixing included) against plain ``info_nce``: the price of the two V2 additions.
- ``matryoshka5_vs_single``: the 5-dim Matryoshka wrapper (896/512/256/128/64) against one
  full-dim ``info_nce``.
- ``in_batch_mask_vs_two_calls``: one ``info_nce`` call with a per-query in-batch mask (half the
  queries without in-batch negatives, as a batch mixing task types) against what the trainer did
  before the mask: both bool calls, rows picked with ``torch.where``, the mean redone by hand.

Usage: ``python -m benchmarks.bench_losses [--batch 64] [--out results/bench_losses.json]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
import torch.nn.functional as F

from kalm_lib import provenance
from kalm_lib.losses import info_nce, matryoshka, mix_hard_negatives


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    fn_a(), fn_b()  # warm-up
    ta, tb = float("inf"), float("inf")
    for _ in range(repeats):  # interleave so that load from other processes hits both sides alike
        ta = min(ta, _time(fn_a, 1))
        tb = min(tb, _time(fn_b, 1))
    return ta, tb


def run(batch: int = 64, num_neg: int = 7, dim: int = 896, repeats: int = 10, seed: int = 0) -> dict:
    """Time the four comparisons; returns a dict of rows with seconds and ratios."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, dim, generator=g).requires_grad_()
    pos = torch.randn(batch, dim, generator=g).requires_grad_()
    neg = torch.randn(batch, num_neg, dim, generator=g).requires_grad_()
    leaves = [q, pos, neg]

    def backward(loss):
        torch.autograd.grad(loss, leaves)

    def bare_ce():
        qn, pn, nn_ = F.normalize(q, dim=-1), F.normalize(pos, dim=-1), F.normalize(neg, dim=-1)
        cand = torch.cat([pn, nn_.reshape(-1, dim)])
        backward(F.cross_entropy(qn @ cand.T / 0.01, torch.arange(batch)))

    def plain():
        backward(info_nce(q, pos, neg))

    def focal_mixing():
        mixes = mix_hard_negatives(q, neg, num_mix=num_neg, generator=torch.Generator().manual_seed(seed))
        backward(info_nce(q, pos, neg, focal_gamma=0.5, mixed_neg=mixes))

    mrl = matryoshka(functools.partial(info_nce), [dim, 512, 256, 128, 64], [1, 0.3, 0.2, 0.1, 0.1])
    mask = torch.arange(batch) % 2 == 0

    def masked():
        backward(info_nce(q, pos, neg, in_batch=mask))

    def two_calls():
        on = info_nce(q, pos, neg, in_batch=True, reduction="none")
        off = info_nce(q, pos, neg, in_batch=False, reduction="none")
        backward(torch.where(mask, on, off).mean())

    def matryoshka5():
        backward(mrl(q, pos, neg))

    rows = {}
    for name, (a, b) in {
        "info_nce_vs_bare_ce": (plain, bare_ce),
        "focal_mixing_vs_plain": (focal_mixing, plain),
        "matryoshka5_vs_single": (matryoshka5, plain),
        "in_batch_mask_vs_two_calls": (masked, two_calls),
    }.items():
        ta, tb = _pair(a, b, repeats)
        rows[name] = {"seconds": ta, "peer_seconds": tb, "ratio": ta / tb}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-neg", type=int, default=7)
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write results + provenance as JSON here")
    args = parser.parse_args(argv)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    rows = run(args.batch, args.num_neg, args.dim, args.repeats, args.seed)
    for name, row in rows.items():
        print(f"{name:26s} ratio {row['ratio']:.2f}  ({row['seconds'] * 1e3:.1f} ms vs {row['peer_seconds'] * 1e3:.1f} ms)")
    if args.out:
        record = provenance.collect(config, seed=args.seed, benchmark="bench_losses", results=rows,
                                    torch_threads=torch.get_num_threads())
        provenance.write(args.out, record)
    else:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
