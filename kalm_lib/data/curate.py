"""Curation (``kalm curate``): bundled raw data -> curated pre-training / fine-tuning JSONL + a curation report.

Steps (DESIGN.md §1.4): read each configured source into unified records (:mod:`~kalm_lib.data.readers`);
normalise text (Unicode NFKC); reject empty / too-short / too-long texts; reject records that contain any
dev-eval text (:mod:`~kalm_lib.data.leakage`, every dev-eval split of every data card); remove exact and
near duplicates (:mod:`~kalm_lib.data.filters`); mine hard negatives and drop ranking-inconsistent records
(:mod:`~kalm_lib.data.mining`, fine-tuning stage only). Outputs, as in docs/CONTRACTS.md "Curated data"::

    <out>/pretrain.jsonl  <out>/finetune.jsonl  <out>/curation_report.json  <out>/provenance.json
    <out>/mining_similarities.json   (positive / mined-negative cosine samples per source, for plots)

The report accounts for every row twice: raw rows read (``read``: rows in = used + rejected) and records
curated (``curate``: records in = kept + rejected), each per source and per rejection reason.
:func:`curate` holds everything in memory; :func:`stream_curate_sources` streams the same sources (or record
shards) through the bounded-memory filters of :mod:`~kalm_lib.data.streaming`.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path
from typing import Any, Iterator, Literal

from kalm_lib import provenance
from kalm_lib.atomic import write_json, write_jsonl
from kalm_lib.config import ConfigError, from_dict, load_config_data, to_dict
from kalm_lib.data.cards import DataCard, load_registry
from kalm_lib.data.filters import FilterConfig, RecordFilter
from kalm_lib.data.leakage import build_leakage_index
from kalm_lib.data.mining import MiningConfig, load_model, mine_hard_negatives
from kalm_lib.data.readers import ReadOptions, read_source
from kalm_lib.data.records import Tally
from kalm_lib.data.sources import SOURCES, source_paths
from kalm_lib.data.streaming import BloomFilter, BloomSet, iter_input, stream_curate
from kalm_lib.runtime import progress_bar

__all__ = ["STAGES", "SourceSpec", "CurationConfig", "load_config", "curate", "stream_curate_sources"]

STAGES = ("pretrain", "finetune")


@dataclasses.dataclass
class SourceSpec:
    """One source in a curation preset: a name from :data:`~kalm_lib.data.sources.SOURCES`, its stage and
    row cap."""

    name: str
    stage: Literal["pretrain", "finetune"]
    max_rows: int | None = None
    num_neg: int = 3                     # negatives per example-based (classification/clustering) record


@dataclasses.dataclass
class CurationConfig:
    """A curation preset (``configs/curation/<name>.yaml``)."""

    name: str = "custom"
    seed: int = 0
    sources: list[SourceSpec] = dataclasses.field(default_factory=list)
    filters: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    mining: MiningConfig = dataclasses.field(default_factory=MiningConfig)


def load_config(path_or_preset: str | Path, overrides: list[str] | None = None) -> CurationConfig:
    """A curation config from a YAML path or a preset name in ``configs/curation/`` (+ ``a.b=v`` overrides),
    found by :func:`kalm_lib.config.resolve_config`."""
    data, where = load_config_data(path_or_preset, "curation", overrides)
    cfg = from_dict(CurationConfig, data, where=where)
    for s in cfg.sources:
        if s.name not in SOURCES:
            raise ConfigError(f"{where}: unknown source {s.name!r}; known: {sorted(SOURCES)}")
    return cfg


# ---------------------------------------------------------------------------------------------- in memory
def curate(cfg: CurationConfig, out_dir: str | Path, *, registry: dict[str, DataCard] | None = None,
           model: Any = None, show_progress: bool = True) -> dict[str, Any]:
    """Run the whole curation in memory; writes the outputs to ``out_dir`` and returns the report."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    registry = registry or load_registry(verify=True)
    leakage = build_leakage_index(registry, cfg.filters.leakage_min_chars) if cfg.filters.leakage else None
    read_tally, cur_tally = Tally(), Tally()
    filt = RecordFilter(cfg.filters, leakage, cur_tally, cfg.seed)
    staged: dict[str, list[dict]] = {s: [] for s in STAGES}
    specs = progress_bar()(cfg.sources, desc="curate", unit="source") if show_progress else cfg.sources
    for spec in specs:
        for r in _read_spec(cfg, spec, registry, read_tally):
            kept, _ = filt.process(r)
            if kept is not None:
                staged[spec.stage].append(kept)
    t_filter = time.perf_counter() - t0
    mining_stats: dict[str, Any] = {}
    if cfg.mining.enabled and staged["finetune"]:
        staged["finetune"], mining_stats = _mine(staged["finetune"], cfg.mining, model, cur_tally, show_progress)
    read_tally.check()
    cur_tally.check()
    outputs = _write_stages(out_dir, staged)
    write_json(out_dir / "mining_similarities.json",
               {s: {"pos_sim": st["pos_sim"], "neg_sim": st["neg_sim"]}
                for s, st in mining_stats.get("per_source", {}).items()}, indent=1)
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
    write_json(out_dir / "curation_report.json", report, indent=1)
    hashes = {}
    for s in cfg.sources:
        sd = SOURCES[s.name]
        hashes[f"{sd.card}/{sd.split}"] = registry[sd.card].splits[sd.split].sha256
    provenance.write(out_dir / "provenance.json",
                     provenance.collect(to_dict(cfg), seed=cfg.seed, data_hashes=hashes, outputs=outputs,
                                        stage="curate"))
    return report


def _read_spec(cfg: CurationConfig, spec: SourceSpec, registry: dict[str, DataCard], tally: Tally) -> list[dict]:
    """The records of one configured source (raw rows counted in ``tally``)."""
    path, extra = source_paths(registry, spec.name)
    opts = ReadOptions(num_neg=spec.num_neg, max_rows=spec.max_rows, seed=cfg.seed)
    return read_source(spec.name, path, tally, opts, extra_paths=extra)


def _mine(records: list[dict], mining: MiningConfig, model: Any, cur_tally: Tally,
          show_progress: bool) -> tuple[list[dict], dict[str, Any]]:
    """Mine negatives for the fine-tuning records; consistency drops count as curation rejections."""
    t1 = time.perf_counter()
    model = model or load_model(mining.model, mining.max_length)
    kept, stats = mine_hard_negatives(records, model, mining, show_progress)
    kept_ids = {r["id"] for r in kept}
    for r in records:  # consistency drops are curation rejections of already-kept records
        if r["id"] not in kept_ids:
            cur_tally.kept[r["source"]] -= 1
            cur_tally.reject(r["source"], "inconsistent_ranking")
    stats["seconds"] = round(time.perf_counter() - t1, 2)
    return kept, stats


def _write_stages(out_dir: Path, staged: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """``<out>/<stage>.jsonl`` for every stage (atomically); ``{file: {rows, sha256}}``."""
    outputs = {}
    for stage in STAGES:
        path = out_dir / f"{stage}.jsonl"
        n = write_jsonl(path, staged[stage])
        outputs[f"{stage}.jsonl"] = {"rows": n, "sha256": provenance.sha256_file(path)}
    return outputs


def _stage_summary(records: list[dict]) -> dict[str, Any]:
    c = collections.Counter
    return {"records": len(records),
            "by_source": dict(c(r["source"] for r in records)),
            "by_task_type": dict(c(r["task_type"] for r in records)),
            "by_lang": dict(c(r["lang"] for r in records)),
            "by_category": dict(c(r["category"] for r in records)),
            "mean_neg": round(sum(len(r["neg"]) for r in records) / max(1, len(records)), 3)}


# ---------------------------------------------------------------------------------------------- streaming
def stream_curate_sources(cfg: CurationConfig, out_dir: str | Path, inputs: list[str] | None = None,
                          stage: str = "pretrain", mapping: dict[str, str] | None = None, *,
                          registry: dict[str, DataCard] | None = None) -> dict:
    """``kalm curate --stream``: the config's bundled sources (or ``inputs``: record shards / hub specs)
    streamed through the bounded-memory filters into ``<out>/<stage>.jsonl`` (+ report, provenance)."""
    out_dir = Path(out_dir)
    read_tally = Tally()
    registry = registry or load_registry(verify=True)
    leakage = build_leakage_index(registry, cfg.filters.leakage_min_chars) if cfg.filters.leakage else None
    plan: dict[str, list] = {s: [] for s in STAGES}
    if inputs:
        plan[stage] = [("input", i) for i in inputs]
    else:
        for spec in cfg.sources:
            plan[spec.stage].append(("source", spec))
    outputs, parts = {}, {}
    for st in STAGES:
        records = _stream_plan(cfg, plan[st], registry, read_tally, mapping)
        parts[st] = stream_curate(records, out_dir / f"{st}.jsonl", cfg.filters, leakage=leakage)
        outputs[f"{st}.jsonl"] = {"rows": parts[st]["rows_out"],
                                  "sha256": provenance.sha256_file(out_dir / f"{st}.jsonl")}
    report = {"config_name": cfg.name, "mode": "stream", "outputs": outputs, "read": read_tally.as_dict(),
              "curate": _merge_tallies(p["curate"] for p in parts.values()).as_dict(),
              "seconds": round(sum(p["seconds"] for p in parts.values()), 2),
              "note": "streaming: Bloom-filter exact dedup, no near-dup removal, no mining (run `kalm mine`)"}
    write_json(out_dir / "curation_report.json", report, indent=1)
    provenance.write(out_dir / "provenance.json", provenance.collect(to_dict(cfg), seed=cfg.seed, outputs=outputs,
                                                                     stage="curate-stream", inputs=inputs))
    return report


def _stream_plan(cfg: CurationConfig, items: list, registry: dict[str, DataCard], tally: Tally,
                 mapping: dict[str, str] | None) -> Iterator[dict]:
    """Records of one stage's inputs / sources, one at a time; record ids deduplicated across shards."""
    ids = BloomSet(BloomFilter(1_000_000, 1e-6))
    for kind, item in items:
        if kind == "input":
            yield from iter_input(item, tally, seen_ids=ids, mapping=mapping)
        else:
            yield from _read_spec(cfg, item, registry, tally)


def _merge_tallies(tallies) -> Tally:
    """One Tally from several ``Tally.as_dict()`` results."""
    merged = Tally()
    for d in tallies:
        for s, v in d["per_source"].items():
            merged.seen(s, v["rows_in"])
            merged.keep(s, v["kept"])
            for r, n in v["rejected_by_reason"].items():
                merged.reject(s, r, n)
    return merged
