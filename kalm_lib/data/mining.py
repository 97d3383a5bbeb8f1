"""Hard-negative mining and ranking-consistency filtering with any ``EmbeddingModel`` (DESIGN.md §1.4).

For each record, the candidates are the positives of every record of the same source (its task's passage
pool). Candidates are ranked by cosine similarity to the query (with its instruction in the KaLM
template; passages without). Then

- **mining**: negatives are sampled from ranks ``[start, end)`` of that ranking after removing the
  record's own positives and the query text itself (paper: ranks 50-100, M = 7). On a small pool the
  window is scaled by ``pool_size / window_ref_size`` (never below ``num_neg`` candidates wide), since
  ranks 50-100 of a 300-passage pool are not "hard";
- **ranking-consistency filtering**: a record is dropped when its positive is not within the top-k of
  the candidates (paper: k = 50; scaled the same way, with a floor ``min_top_k``) — only for languages
  the miner can rank. Per source and language, the miner's recall@k of the positives is compared with
  chance (a random ranking); when its lift above chance is below ``consistency_min_lift`` the filter is
  skipped for that language (and the report says so), as it is for ``consistency_skip_langs`` and for
  languages outside ``consistency_langs`` (the miner's languages, when given). The ranking is computed
  for mining anyway, so the check costs nothing.

Encoding is batched on ``device`` (``auto``: cuda when present); search is exact: L2-normalised
embeddings, a matmul in chunks of queries and ``torch.topk`` on the same device; ``faiss`` (IndexFlatIP,
also exact) is used when installed and ``use_faiss`` is not False. :func:`remine` re-mines a pipeline
run's curated fine-tuning records with the run's own stage-1 model (a stage between pre-training and
fine-tuning).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kalm_lib import locking, provenance
from kalm_lib.atomic import write_json, write_jsonl
from kalm_lib.config import ConfigError, from_dict
from kalm_lib.data.filters import match_key
from kalm_lib.data.records import DataFormatError, Tally, read_records
from kalm_lib.model import EmbeddingModel, format_query
from kalm_lib.runtime import progress_bar

__all__ = ["MINED_TASK_TYPES", "REMINE_DIR", "MiningConfig", "check_mining_config", "resolve_device", "scaled_window",
           "scaled_top_k", "exact_search", "load_model", "mine_hard_negatives", "remine"]

REMINE_DIR = "remine"   # <run_dir>/remine/{finetune.jsonl, report.json}: the re-mining stage's own folder

# Task types whose records get mined negatives; classification/clustering records already carry negatives
# from other classes (example-based labelling), and a nearest "other" text may be a same-class example.
MINED_TASK_TYPES = ("retrieval", "reranking", "pair_classification", "sts", "nli", "pretrain")


@dataclasses.dataclass
class MiningConfig:
    """Knobs of mining + consistency filtering (YAML section ``mining`` of a curation config)."""

    enabled: bool = True
    model: str = "minilm"             # EmbeddingModel.from_pretrained name/path, or "tiny-<arch>" (random init)
    device: str = "auto"              # "auto": cuda when present, else cpu; or "cpu", "cuda", "cuda:1"
    num_neg: int = 7                  # M negatives per query in total (existing hard negatives count)
    window_start: int = 50            # rank window [start, end) at the reference pool size
    window_end: int = 100
    window_ref_size: int = 10000      # pool size at which the window is used as is
    consistency_top_k: int | None = 50  # None: no consistency filtering
    min_top_k: int = 10
    consistency_skip_langs: list[str] = dataclasses.field(default_factory=list)  # e.g. ["zh"] when the
    # mining model does not know the language: its ranking would drop exactly the examples to learn from
    consistency_langs: list[str] | None = None  # the miner's languages: only these are filtered (None: all)
    consistency_min_lift: float | None = 0.25   # skip the filter for a language whose recall@k lift above
    # chance, (recall - chance) / (1 - chance), is below this (None: no check)
    task_types: list[str] = dataclasses.field(default_factory=lambda: list(MINED_TASK_TYPES))
    batch_size: int = 64              # encoding batch (GPU: 256+)
    chunk_size: int = 1024            # queries per matmul chunk
    max_length: int | None = 256      # encoder max tokens while mining (cheap on CPU)
    use_faiss: bool | None = None     # None: use faiss when importable
    seed: int = 0


def check_mining_config(cfg: MiningConfig, where: str = "mining") -> None:
    """Values that cannot work are a :class:`~kalm_lib.config.ConfigError` naming the key."""
    problems = []
    if cfg.num_neg < 0:
        problems.append(f"num_neg must be >= 0 (got {cfg.num_neg})")
    if not 0 <= cfg.window_start < cfg.window_end:
        problems.append(f"need 0 <= window_start < window_end (got {cfg.window_start}, {cfg.window_end})")
    if cfg.window_ref_size < 1 or cfg.batch_size < 1 or cfg.chunk_size < 1:
        problems.append("window_ref_size, batch_size and chunk_size must be >= 1")
    if cfg.consistency_top_k is not None and cfg.consistency_top_k < 1:
        problems.append(f"consistency_top_k must be >= 1 or null (got {cfg.consistency_top_k})")
    if not (cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith(("cuda", "mps"))):
        problems.append(f"device must be auto, cpu, cuda[:N] or mps (got {cfg.device!r})")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def resolve_device(device: str | None) -> str:
    """``auto``/None -> ``cuda`` when a GPU is present, else ``cpu``; an explicit cuda device that is not
    there is a clear error."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"mining.device={device!r} but no CUDA device is available (use auto or cpu)")
    return device


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
                 chunk_size: int = 1024, use_faiss: bool | None = None,
                 device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products (cosine on normalised inputs): ``(scores [n, k], indices [n, k])``, best first.

    ``device``: where the torch matmul runs (``cuda``: the corpus is moved there once, queries per chunk);
    faiss (CPU) is used instead when installed and ``use_faiss`` is not False.
    """
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
    c = c.to(device or "cpu")
    scores, idx = [], []
    for start in range(0, q.shape[0], chunk_size):
        sim = q[start:start + chunk_size].to(c.device) @ c.T
        s, i = torch.topk(sim, k, dim=1)
        scores.append(s.cpu())
        idx.append(i.cpu())
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat(scores).numpy(), torch.cat(idx).numpy()


def load_model(name: str, max_length: int | None = None, device: str | None = None) -> EmbeddingModel:
    """``EmbeddingModel`` by name or folder on ``device`` (``auto``/None: cuda when present); ``tiny-<arch>``
    gives a small random-init decoder (tests, smoke runs)."""
    dev = resolve_device(device)
    if name.startswith("tiny-"):
        m = EmbeddingModel.tiny_decoder(name[5:], seed=0).to(dev)
    else:
        m = EmbeddingModel.from_pretrained(name, device=dev)
    if max_length:
        m.max_length = min(m.max_length, max_length)
    return m


def mine_hard_negatives(records: list[dict], model: Any, cfg: MiningConfig | None = None,
                        show_progress: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """Mine negatives for (and consistency-filter) the records whose task type is in ``cfg.task_types``.

    Returns ``(kept records, stats)``; stats has per-source counts (``mined``, ``dropped_inconsistent``),
    the windows used, the per-language consistency decision (``consistency``: recall@k, chance, lift,
    filtered or why not; summed up in ``consistency_by_lang``) and similarity samples (``pos_sim``,
    ``neg_sim``) for plots. Input order is kept. Records of other task types pass through unchanged.
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
    stats["consistency_by_lang"] = _by_lang(stats["per_source"])
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


def _chance(n: int, k: int, p: int) -> float:
    """Probability that a random ranking of ``n`` candidates puts one of ``p`` positives in its top ``k``."""
    if n - k < p:
        return 1.0
    return 1.0 - math.prod((n - k - j) / (n - j) for j in range(p))


def _consistency(records: list[dict], idxs: list[int], hits: list[bool], pos_counts: list[int], n: int,
                 top_k: int | None, cfg: MiningConfig) -> dict[str, dict[str, Any]]:
    """Per language of one source: the miner's recall@k of the positives vs chance, and whether the
    consistency filter applies (``filtered``) or why not (``why``)."""
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for row, i in enumerate(idxs):
        groups[records[i]["lang"]].append(row)
    out = {}
    for lang, rows in sorted(groups.items()):
        d: dict[str, Any] = {"records": len(rows)}
        if top_k is None:
            out[lang] = {**d, "filtered": False, "why": "consistency_top_k is null"}
            continue
        recall = sum(hits[r] for r in rows) / len(rows)
        chance = sum(_chance(n, top_k, pos_counts[r]) for r in rows) / len(rows)
        lift = (recall - chance) / (1 - chance) if chance < 1 else None
        d.update(recall_at_k=round(recall, 4), chance=round(chance, 4),
                 lift=None if lift is None else round(lift, 4))
        if lang in cfg.consistency_skip_langs:
            why = "in consistency_skip_langs"
        elif cfg.consistency_langs is not None and lang not in cfg.consistency_langs:
            why = f"not one of the miner's languages {cfg.consistency_langs}"
        elif cfg.consistency_min_lift is not None and lift is not None and lift < cfg.consistency_min_lift:
            why = (f"the miner cannot rank it: recall@{top_k} {recall:.2f} vs chance {chance:.2f} "
                   f"(lift {lift:.2f} < consistency_min_lift {cfg.consistency_min_lift})")
        else:
            why = None
        out[lang] = {**d, "filtered": why is None, "why": why or "ranked above chance"}
    return out


def _by_lang(per_source: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per language: the sources whose consistency filter ran, and the skipped ones with the reason."""
    out: dict[str, dict[str, Any]] = {}
    for src, st in sorted(per_source.items()):
        for lang, d in st["consistency"].items():
            e = out.setdefault(lang, {"filtered_sources": [], "skipped_sources": {}})
            if d["filtered"]:
                e["filtered_sources"].append(src)
            else:
                e["skipped_sources"][src] = d["why"]
    return out


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
    device = str(getattr(model, "device", "cpu"))
    scores, ranked = exact_search(q_emb, p_emb, depth, cfg.chunk_size, cfg.use_faiss, device=device)
    pos_ids = [{pool_index[match_key(p)] for p in records[i]["pos"]} for i in idxs]
    hits = [bool(pos_ids[row] & set(ranked[row, :top_k].tolist())) for row in range(len(idxs))] if top_k else []
    decisions = _consistency(records, idxs, hits, [len(p) for p in pos_ids], n, top_k, cfg)
    st = {"pool_size": n, "window": [s, e], "top_k": top_k, "records": len(idxs), "mined": 0,
          "dropped_inconsistent": 0, "consistency": decisions, "pos_sim": [], "neg_sim": []}
    for row, i in enumerate(idxs):
        rec = records[i]
        if top_k and decisions[rec["lang"]]["filtered"] and not hits[row]:
            drop.add(i)
            st["dropped_inconsistent"] += 1
            continue
        qkey = match_key(rec["query"])
        excluded = {match_key(t) for t in rec["neg"]}  # do not duplicate existing negatives
        cands = [(j, sc) for j, sc in zip(ranked[row].tolist(), scores[row].tolist())
                 if j not in pos_ids[row] and match_key(pool[j]) != qkey]
        window = [c for c in cands[s:e] if match_key(pool[c[0]]) not in excluded]
        need = max(0, cfg.num_neg - len(rec["neg"]))
        picked = rng.sample(window, min(need, len(window)))
        picked.sort(key=lambda c: -c[1])
        out_neg[i] = list(rec["neg"]) + [pool[j] for j, _ in picked]
        st["mined"] += len(picked)
        st["neg_sim"].extend(round(float(sc), 4) for _, sc in picked)
        pos_sc = [sc for j, sc in zip(ranked[row].tolist(), scores[row].tolist()) if j in pos_ids[row]]
        if pos_sc:
            st["pos_sim"].append(round(float(pos_sc[0]), 4))
    return st


# ---------------------------------------------------------------------------------------------- re-mining
def remine(run_dir: str | Path, model: Any = None, config: MiningConfig | dict | None = None, *,
           show_progress: bool = False) -> dict[str, Any]:
    """Re-mine a pipeline run's curated fine-tuning records with the run's own model (the paper mines with
    an earlier checkpoint of the model it trains): a stage between pre-training and fine-tuning.

    Reads ``<run_dir>/curated/finetune.unmined.jsonl`` (the records before curation's mining) or, when
    curation did not mine, ``<run_dir>/curated/finetune.jsonl``; ``model``: an ``EmbeddingModel``, a name /
    folder, or None for ``<run_dir>/train/pretrain/final``; ``config``: :class:`MiningConfig` (or its dict;
    ``model`` there is ignored). Writes ``<run_dir>/remine/finetune.jsonl`` and ``<run_dir>/remine/report.json``
    (read tally, per-source mining and consistency decisions, model, device, hashes) atomically under that
    folder's lock, its own folder (a pipeline stage's outputs apart from curation's); returns the report.
    Fine-tuning and distillation read it when it is there (:func:`kalm_lib.train.launch.run_dir_overrides`).
    """
    t0 = time.perf_counter()
    cur = Path(run_dir) / "curated"
    src = cur / "finetune.unmined.jsonl"
    if not src.is_file():
        src = cur / "finetune.jsonl"
    if not src.is_file():
        raise DataFormatError(f"{run_dir}: no curated fine-tuning records ({src}); run the curation stage first")
    cfg = config if isinstance(config, MiningConfig) else from_dict(MiningConfig, config or {}, "mining")
    check_mining_config(cfg)
    if model is None:
        model = Path(run_dir) / "train" / "pretrain" / "final"
        if not model.is_dir():
            raise FileNotFoundError(f"{run_dir}: no stage-1 model at {model}; pass model= (a folder or name)")
    name = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    if isinstance(model, (str, Path)):
        model = load_model(str(model), cfg.max_length, cfg.device)
    folder = Path(run_dir) / REMINE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with locking.hold(folder / ".kalm.lock", what=f"re-mined data {folder}"):
        tally = Tally()
        records = list(read_records(src, tally, source=src.name))
        kept, stats = mine_hard_negatives(records, model, cfg, show_progress)
        out = folder / "finetune.jsonl"
        write_jsonl(out, kept)
        tally.check()
        report = {"input": str(src), "input_sha256": provenance.sha256_file(src), "output": str(out),
                  "output_sha256": provenance.sha256_file(out), "model": name,
                  "device": str(getattr(model, "device", "cpu")), "read": tally.as_dict(),
                  "records_in": len(records), "kept": len(kept), "dropped_inconsistent": stats["dropped_inconsistent"],
                  "mining": {s: {k: v for k, v in st.items() if k not in ("pos_sim", "neg_sim")}
                             for s, st in stats["per_source"].items()},
                  "consistency_by_lang": stats["consistency_by_lang"], "config": stats["config"],
                  "seconds": round(time.perf_counter() - t0, 2)}
        write_json(folder / "report.json", report, indent=1)
    return report
