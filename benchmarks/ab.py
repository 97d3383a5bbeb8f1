"""Shared pieces of the interleaved A/B benchmarks (bench_train, bench_encode): spreads, load, padding waste.

Every comparison here is "ours vs the sentence-transformers peer" measured alternately in the same run
(A/B/A/B), so that load from other processes on a shared machine hits both sides alike; the machine's load
average is recorded before and after, so a reader can tell an idle-machine number from a loaded one.
"""

from __future__ import annotations

import os
import statistics
from typing import Sequence

__all__ = ["spread", "load_average", "pad_fraction", "compare"]


def spread(values: Sequence[float]) -> dict:
    """Median, quartiles (IQR) and min/max of a sample, with its size."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return {"n": 0}
    q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else (vals[0],) * 3
    return {"n": len(vals), "median": statistics.median(vals), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": vals[0], "max": vals[-1]}


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages of the machine (the number of runnable processes; 2 cores here)."""
    return [round(x, 2) for x in os.getloadavg()]


def pad_fraction(masks) -> float:
    """Fraction of padding among all positions of the given attention masks ([B, T] tensors, 1 = real token)."""
    real = sum(int(m.sum()) for m in masks)
    total = sum(int(m.numel()) for m in masks)
    return 1.0 - real / total if total else 0.0


def compare(ours: Sequence[float], theirs: Sequence[float], ours_rounds: Sequence[float],
            theirs_rounds: Sequence[float]) -> dict:
    """Ratio of medians (ours / theirs, higher is better for rates) with each side's spread, and the ratio of
    each round's pair (the same round of both sides ran back to back, under about the same load)."""
    a, b = spread(ours), spread(theirs)
    per_round = [x / y for x, y in zip(ours_rounds, theirs_rounds) if y]
    return {"ours": a, "theirs": b, "ratio_of_medians": a["median"] / b["median"] if b.get("median") else None,
            "per_round_ratio": spread(per_round)}
