"""Hard-negative mining and ranking-consistency filtering with any ``EmbeddingModel`` (DESIGN.md §1.4).

For each record, the candidates are the positives of every record of the same source (its task's passage
pool). Candidates are ranked by cosine similarity to the query (with its instruction in the KaLM
template; passages without). Then

- **mining**: negatives are sampled from ranks ``[start, end)`` of that ranking after removing the
  record's own positives and the query text itself (paper: ranks 50-100, M = 7). On a small pool the
  window is scaled by ``pool_size / window_ref_size`` (never below ``num_neg`` candidates wide), since
  ranks 50-100 of a 300-passage pool are not "hard";
- **ranking-consistency filtering**: a record is dropped when its positive is not within the top-k of
  the candidates (paper: k = 50; scaled the same way, with a floor ``min_top_k``).

Search is exact: L2-normalised embeddings, a torch matmul in chunks of queries and ``torch.topk``;
``faiss`` (IndexFlatIP, also exact) is used when installed and ``use_faiss`` is not False.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Any

import numpy as np
import torch

from kalm_lib.data.filters import match_key
from kalm_lib.model import EmbeddingModel, format_query
from kalm_lib.runtime import progress_bar

__all__ = ["MINED_TASK_TYPES", "MiningConfig", "scaled_window", "scaled_top_k", "exact_search", "load_model",
           "mine_hard_negatives"]

# Task types whose records get mined negatives; classification/clustering records already carry negatives
# from other classes (example-based labelling), and a nearest "other" text may be a same-class example.
MINED_TASK_TYPES = ("retrieval", "reranking", "pair_classification", "sts", "nli", "pretrain")


@dataclasses.dataclass
class MiningConfig:
    """Knobs of mining + consistency filtering (YAML section ``mining`` of a curation config)."""

    enabled: bool = True
    model: str = "minilm"             # EmbeddingModel.from_pretrained name/path, or "tiny-<arch>" (random init)
    num_neg: int = 7                  # M negatives per query in total (existing hard negatives count)
    window_start: int = 50            # rank window [start, end) at the reference pool size
    window_end: int = 100
    window_ref_size: int = 10000      # pool size at which the window is used as is
    consistency_top_k: int | None = 50  # None: no consistency filtering
    min_top_k: int = 10
    consistency_skip_langs: list[str] = dataclasses.field(default_factory=list)  # e.g. ["zh"] when the
    # mining model does not know the language: its ranking would drop exactly the examples to learn from
    task_types: list[str] = dataclasses.field(default_factory=lambda: list(MINED_TASK_TYPES))
    batch_size: int = 64
    chunk_size: int = 1024            # queries per matmul chunk
    max_length: int | None = 256      # encoder max tokens while mining (cheap on CPU)
    use_faiss: bool | None = None     # None: use faiss when importable
    seed: int = 0


def scaled_window(pool_size: int, start: int, end: int, ref_size: int, num_neg: int) -> tuple[int, int]:
    """Rank window scaled to the pool size: ``[start, end) * pool/ref`` when the pool is smaller than
    ``ref_size``, at least ``num_neg`` wide, inside ``[0, pool_size)``."""
    if pool_size <= 0:
        return 0, 0
    f = min(1.0, pool_size / ref_size)
    s = int(round(start * f))
    e = max(int(round(end * f)), s + num_neg)
    e = min(e, pool_size)
    s = max(0, min(s, e - num_neg))
    return s, e


def scaled_top_k(pool_size: int, k: int, ref_size: int, min_k: int) -> int:
    """Consistency top-k scaled to the pool size, with a floor ``min_k`` (and at most the pool size)."""
    f = min(1.0, pool_size / ref_size)
    return max(1, min(pool_size, max(min_k, int(round(k * f)))))


def exact_search(queries: np.ndarray | torch.Tensor, corpus: np.ndarray | torch.Tensor, k: int,
                 chunk_size: int = 1024, use_faiss: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products (cosine on normalised inputs): ``(scores [n, k], indices [n, k])``, best first."""
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    c = torch.as_tensor(np.asarray(corpus, dtype=np.float32))
    k = min(k, c.shape[0])
    if use_faiss is not False:
        try:
            import faiss  # optional dependency (exact IndexFlatIP); torch.topk otherwise

            index = faiss.IndexFlatIP(c.shape[1])
            index.add(c.numpy())
            s, i = index.search(q.numpy(), k)
            return s, i
        except ImportError:
            if use_faiss:
                raise
    scores, idx = [], []
    for start in range(0, q.shape[0], chunk_size):
        sim = q[start:start + chunk_size] @ c.T
        s, i = torch.topk(sim, k, dim=1)
        scores.append(s)
        idx.append(i)
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat(scores).numpy(), torch.cat(idx).numpy()


def load_model(name: str, max_length: int | None = None):
    """``EmbeddingModel`` by name; ``tiny-<arch>`` gives a small random-init decoder (tests, smoke runs)."""
    if name.startswith("tiny-"):
        m = EmbeddingModel.tiny_decoder(name[5:], seed=0)
    else:
        m = EmbeddingModel.from_pretrained(name)
    if max_length:
        m.max_length = min(m.max_length, max_length)
    return m


def mine_hard_negatives(records: list[dict], model: Any, cfg: MiningConfig | None = None,
                        show_progress: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """Mine negatives for (and consistency-filter) the records whose task type is in ``cfg.task_types``.

    Returns ``(kept records, stats)``; stats has per-source counts (``mined``, ``dropped_inconsistent``),
    the windows used, and similarity samples (``pos_sim``, ``neg_sim``) for plots. Input order is kept.
    Records of other task types pass through unchanged.
    """
    cfg = cfg or MiningConfig()
    by_source: dict[str, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(records):
        if r["task_type"] in cfg.task_types:
            by_source[r["source"]].append(i)
    drop: set[int] = set()
    out_neg: dict[int, list[str]] = {}
    stats: dict[str, Any] = {"per_source": {}}
    sources = sorted(by_source)
    if show_progress:
        sources = progress_bar()(sources, desc="mining", unit="source")
    for src in sources:
        rng = random.Random(f"{cfg.seed}-{src}")
        stats["per_source"][src] = _mine_source(records, by_source[src], model, cfg, rng, drop, out_neg)
    kept = []
    for i, r in enumerate(records):
        if i in drop:
            continue
        kept.append({**r, "neg": out_neg[i]} if i in out_neg else r)
    stats["dropped_inconsistent"] = len(drop)
    stats["config"] = dataclasses.asdict(cfg)
    return kept, stats


def _pool(records: list[dict], idxs: list[int]) -> tuple[list[str], dict[str, int]]:
    """The passage pool of one source: every distinct positive (by match key), in first-seen order."""
    pool: list[str] = []
    pool_index: dict[str, int] = {}
    for i in idxs:
        for p in records[i]["pos"]:
            k = match_key(p)
            if k not in pool_index:
                pool_index[k] = len(pool)
                pool.append(p)
    return pool, pool_index


def _mine_source(records: list[dict], idxs: list[int], model: Any, cfg: MiningConfig, rng: random.Random,
                 drop: set[int], out_neg: dict[int, list[str]]) -> dict[str, Any]:
    """Mine the records ``idxs`` of one source against its pool: adds inconsistent ones to ``drop``, the
    new negative lists to ``out_neg``; returns the source's stats."""
    pool, pool_index = _pool(records, idxs)
    n = len(pool)
    s, e = scaled_window(n, cfg.window_start, cfg.window_end, cfg.window_ref_size, cfg.num_neg)
    top_k = (scaled_top_k(n, cfg.consistency_top_k, cfg.window_ref_size, cfg.min_top_k)
             if cfg.consistency_top_k else None)
    # ranking depth: window end + room for the excluded texts (positives, the query itself)
    depth = min(n, max(e, top_k or 0) + max(len(records[i]["pos"]) for i in idxs) + 1)
    q_texts = [format_query(records[i]["instruction"], records[i]["query"]) for i in idxs]
    q_emb = model.encode(q_texts, batch_size=cfg.batch_size, show_progress=False)
    p_emb = model.encode(pool, batch_size=cfg.batch_size, show_progress=False)
    scores, ranked = exact_search(q_emb, p_emb, depth, cfg.chunk_size, cfg.use_faiss)
    st = {"pool_size": n, "window": [s, e], "top_k": top_k, "records": len(idxs), "mined": 0,
          "dropped_inconsistent": 0, "pos_sim": [], "neg_sim": []}
    for row, i in enumerate(idxs):
        rec = records[i]
        pos_ids = {pool_index[match_key(p)] for p in rec["pos"]}
        qkey = match_key(rec["query"])
        check = top_k is not None and rec["lang"] not in cfg.consistency_skip_langs
        if check and not pos_ids & set(ranked[row, :top_k].tolist()):
            drop.add(i)
            st["dropped_inconsistent"] += 1
            continue
        excluded = {match_key(t) for t in rec["neg"]}  # do not duplicate existing negatives
        cands = [(j, sc) for j, sc in zip(ranked[row].tolist(), scores[row].tolist())
                 if j not in pos_ids and match_key(pool[j]) != qkey]
        window = [c for c in cands[s:e] if match_key(pool[c[0]]) not in excluded]
        need = max(0, cfg.num_neg - len(rec["neg"]))
        picked = rng.sample(window, min(need, len(window)))
        picked.sort(key=lambda c: -c[1])
        out_neg[i] = list(rec["neg"]) + [pool[j] for j, _ in picked]
        st["mined"] += len(picked)
        st["neg_sim"].extend(round(float(sc), 4) for _, sc in picked)
        pos_sc = [sc for j, sc in zip(ranked[row].tolist(), scores[row].tolist()) if j in pos_ids]
        if pos_sc:
            st["pos_sim"].append(round(float(pos_sc[0]), 4))
    return st
