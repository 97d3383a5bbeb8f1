"""Curation (``kalm curate``): bundled raw data and/or a user's own record files -> curated pre-training /
fine-tuning JSONL + a curation report.

Steps (DESIGN.md §1.4): read each configured source into unified records (:mod:`~kalm_lib.data.readers`)
and each input (a user's unified-record JSONL / parquet files or shard folders, a hub dataset) through the
one record reader; normalise text (Unicode NFKC); reject empty / too-short / too-long texts; reject records
that contain any dev-eval text (:mod:`~kalm_lib.data.leakage`, every dev-eval split of every data card);
remove exact and near duplicates (:mod:`~kalm_lib.data.filters`); mine hard negatives and drop
ranking-inconsistent records (:mod:`~kalm_lib.data.mining`, fine-tuning stage only). Outputs, as in
docs/CONTRACTS.md "Curated data"::

    <out>/pretrain.jsonl  <out>/finetune.jsonl  <out>/curation_report.json  <out>/provenance.json
    <out>/rejected_samples.jsonl     (file, line, reason, field, excerpt of rejected rows; a few per reason)
    <out>/mining_similarities.json   (positive / mined-negative cosine samples per source, for plots)
    <out>/finetune.unmined.jsonl     (fine-tuning records before mining, when mining ran: what
                                      :func:`kalm_lib.data.mining.remine` starts from)

The report accounts for every row twice, and both identities are checked before it is written: raw rows
read (``read``: rows in = used + rejected, per source or input file; files that could not be read at all
under ``rejected_files``) and records curated (``curate``: records in = kept + rejected). A shard that
cannot be read is a rejected file, not an abort, unless ``strict: true``. :func:`curate` holds everything
in memory; :func:`stream_curate_sources` streams the same plan through the bounded-memory filters of
:mod:`~kalm_lib.data.streaming` (dedup filters sized by the ``stream`` section, stated in the report).
The output folder is locked (:mod:`kalm_lib.locking`) while a run writes it; every file is written atomically.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Iterator, Literal

from kalm_lib import locking, provenance
from kalm_lib.atomic import open_atomic, write_json, write_jsonl
from kalm_lib.config import ConfigError, from_dict, load_config_data, to_dict
from kalm_lib.data.cards import DataCard, load_registry
from kalm_lib.data.filters import FilterConfig, RecordFilter
from kalm_lib.data.leakage import build_leakage_index
from kalm_lib.data.mining import MiningConfig, check_mining_config, load_model, mine_hard_negatives
from kalm_lib.data.readers import ReadOptions, read_source
from kalm_lib.data.records import MAX_LINE_BYTES, Tally, excerpt
from kalm_lib.data.sources import SOURCES, source_paths
from kalm_lib.data.streaming import BloomSet, ScalableBloomFilter, iter_input, shard_files, stream_curate
from kalm_lib.runtime import progress_bar

__all__ = ["STAGES", "SourceSpec", "InputSpec", "StreamConfig", "CurationConfig", "load_config", "curate",
           "stream_curate_sources"]

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
class InputSpec:
    """A user's own unified records (``inputs:`` of a curation config, or ``kalm curate --input``): a JSONL /
    JSONL.gz / parquet file, a folder of such shards, or ``hf:<dataset id>[:<config>]:<split>``."""

    path: str
    stage: Literal["pretrain", "finetune"] = "pretrain"
    columns: dict[str, str] | None = None  # hf: record field -> dataset column, e.g. {query: anchor, pos: positive}


@dataclasses.dataclass
class StreamConfig:
    """Sizing of the streaming dedup filters (section ``stream``): a unique row is wrongly rejected as a
    duplicate with probability at most ``dedup_fpr`` per filter (text key, record id), at any row count."""

    expected_rows: int | dict[str, int] = 10_000_000  # rows you expect per stage, or {pretrain: N, finetune: M}
    dedup_fpr: float = 1e-4              # memory ~1.44 log2(1/fpr) bits per expected row (2.4 B at 1e-4)

    def rows_for(self, stage: str) -> int:
        """The expected rows of ``stage`` (the filters are sized for it and grow past it)."""
        rows = self.expected_rows
        return rows.get(stage, 10_000_000) if isinstance(rows, dict) else rows


@dataclasses.dataclass
class CurationConfig:
    """A curation preset (``configs/curation/<name>.yaml``)."""

    name: str = "custom"
    seed: int = 0
    sources: list[SourceSpec] = dataclasses.field(default_factory=list)
    inputs: list[InputSpec] = dataclasses.field(default_factory=list)
    filters: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    mining: MiningConfig = dataclasses.field(default_factory=MiningConfig)
    stream: StreamConfig = dataclasses.field(default_factory=StreamConfig)
    strict: bool = False                 # a shard that cannot be read stops the run (default: rejected file)
    max_line_bytes: int = MAX_LINE_BYTES  # longer record lines are rejected (line_too_long), never read whole
    rejected_samples: int = 5            # rejected-row samples kept per (source, reason)


def load_config(path_or_preset: str | Path | dict | None = None, overrides: list[str] | None = None) -> CurationConfig:
    """A curation config from a YAML path or a preset name in ``configs/curation/`` (+ ``a.b=v`` overrides),
    found by :func:`kalm_lib.config.resolve_config`; None: the defaults (no sources: give inputs)."""
    data, where = load_config_data({} if path_or_preset is None else path_or_preset, "curation", overrides)
    cfg = from_dict(CurationConfig, data, where=where)
    for s in cfg.sources:
        if s.name not in SOURCES:
            raise ConfigError(f"{where}: unknown source {s.name!r}; known: {sorted(SOURCES)}")
    f, st = cfg.filters, cfg.stream
    if not 0 <= f.min_chars <= f.max_chars:
        raise ConfigError(f"{where}: filters need 0 <= min_chars <= max_chars (got {f.min_chars}, {f.max_chars})")
    bad_stages = set(st.expected_rows) - set(STAGES) if isinstance(st.expected_rows, dict) else set()
    if bad_stages or min(st.rows_for(s) for s in STAGES) < 1 or not 0 < st.dedup_fpr < 1:
        raise ConfigError(f"{where}: stream needs expected_rows >= 1 (per stage: {list(STAGES)}) and "
                          f"0 < dedup_fpr < 1 (got {st.expected_rows}, {st.dedup_fpr})")
    if cfg.max_line_bytes < 1024 or cfg.rejected_samples < 0:
        raise ConfigError(f"{where}: max_line_bytes must be >= 1024 and rejected_samples >= 0")
    check_mining_config(cfg.mining, f"{where}: mining")
    return cfg


# ---------------------------------------------------------------------------------------------- the plan
Plan = list[tuple[str, str, Any]]  # (stage, "source" | "input", SourceSpec | InputSpec), in config order


def _plan(cfg: CurationConfig, inputs: list[str] | None, stage: str, mapping: dict[str, str] | None) -> Plan:
    """What to read: ``inputs`` (command line) replace the config's sources and inputs."""
    if inputs:
        plan: Plan = [(stage, "input", InputSpec(str(i), stage, mapping)) for i in inputs]
    else:
        plan = [(s.stage, "source", s) for s in cfg.sources] + [(i.stage, "input", i) for i in cfg.inputs]
    if not plan:
        raise ConfigError(f"curation config {cfg.name!r}: nothing to curate (no sources and no inputs; "
                          f"give --input FILE or a config with sources)")
    for _, kind, item in plan:  # a missing local input is a mistake to report before any work
        if kind == "input" and not item.path.startswith("hf:"):
            shard_files(item.path)
    return plan


def _iter_plan(cfg: CurationConfig, plan: Plan, registry: dict[str, DataCard] | None, tally: Tally,
               seen_ids: Any) -> Iterator[tuple[str, dict]]:
    """``(stage, record)`` of every plan item in order; raw rows and unreadable files counted in ``tally``;
    input record ids deduplicated per stage (``seen_ids``: stage -> set or set-like)."""
    for stage, kind, item in plan:
        if kind == "source":
            path, extra = source_paths(registry, item.name)
            opts = ReadOptions(num_neg=item.num_neg, max_rows=item.max_rows, seed=cfg.seed)
            recs = read_source(item.name, path, tally, opts, extra_paths=extra)
        else:
            recs = iter_input(item.path, tally, seen_ids=seen_ids[stage], strict=cfg.strict, mapping=item.columns,
                              max_line_bytes=cfg.max_line_bytes)
        for r in recs:
            yield stage, r


def _data_hashes(cfg: CurationConfig, plan: Plan, registry: dict[str, DataCard], hash_inputs: bool) -> dict:
    """Provenance: the sha256 of every card split read and (in memory) of every input file."""
    hashes = {}
    for _, kind, item in plan:
        if kind == "source":
            sd = SOURCES[item.name]
            hashes[f"{sd.card}/{sd.split}"] = registry[sd.card].splits[sd.split].sha256
        elif hash_inputs and not item.path.startswith("hf:"):
            for f in shard_files(item.path):
                if f.is_file():
                    hashes[str(f)] = provenance.sha256_file(f)
    return hashes


def _write_samples(out_dir: Path, **tallies: Tally) -> int:
    """``<out>/rejected_samples.jsonl``: the rejected-row samples of each step (always written, so no stale
    file of an earlier run stays beside a new report); returns the number of samples."""
    rows = [{"step": step, **s} for step, t in tallies.items() for s in t.rejected_samples()]
    return write_jsonl(out_dir / "rejected_samples.jsonl", rows)


def _check(*tallies: Tally) -> None:
    """The accounting identities of every step, before anything is reported."""
    for t in tallies:
        t.check()


# ---------------------------------------------------------------------------------------------- in memory
def curate(cfg: CurationConfig, out_dir: str | Path, *, inputs: list[str] | None = None, stage: str = "pretrain",
           mapping: dict[str, str] | None = None, registry: dict[str, DataCard] | None = None, model: Any = None,
           show_progress: bool = True) -> dict[str, Any]:
    """Run the whole curation in memory; writes the outputs to ``out_dir`` and returns the report.

    ``inputs`` (files, shard folders, ``hf:`` specs of unified records, for ``stage``; ``mapping``: hub
    columns) replace the config's sources and inputs.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    plan = _plan(cfg, inputs, stage, mapping)
    with locking.hold(out_dir / ".kalm.lock", what=f"curation output {out_dir}"):
        registry = registry or load_registry(verify=True)
        leakage = build_leakage_index(registry, cfg.filters.leakage_min_chars) if cfg.filters.leakage else None
        read_tally, cur_tally = Tally(cfg.rejected_samples), Tally(cfg.rejected_samples)
        filt = RecordFilter(cfg.filters, leakage, cur_tally, cfg.seed)
        staged: dict[str, list[dict]] = {s: [] for s in STAGES}
        seen_ids: dict[str, set] = {s: set() for s in STAGES}  # input record ids, per stage
        for item in (progress_bar()(plan, desc="curate", unit="source") if show_progress else plan):
            for st, r in _iter_plan(cfg, [item], registry, read_tally, seen_ids):
                kept, _ = filt.process(r)
                if kept is not None:
                    staged[st].append(kept)
        t_filter = time.perf_counter() - t0
        unmined, mining_stats = staged["finetune"], {}
        if cfg.mining.enabled and staged["finetune"]:
            staged["finetune"], mining_stats = _mine(staged["finetune"], cfg.mining, model, cur_tally, show_progress)
        _check(read_tally, cur_tally)
        outputs = _write_stages(out_dir, staged, unmined if mining_stats else None)
        write_json(out_dir / "mining_similarities.json",
                   {s: {"pos_sim": st["pos_sim"], "neg_sim": st["neg_sim"]}
                    for s, st in mining_stats.get("per_source", {}).items()}, indent=1)
        report = {
            "config_name": cfg.name, "mode": "memory", "strict": cfg.strict, "config": to_dict(cfg),
            "inputs": [item.path for _, kind, item in plan if kind == "input"],
            "outputs": outputs,
            "stages": {s: _stage_summary(staged[s]) for s in STAGES},
            "read": read_tally.as_dict(),
            "curate": cur_tally.as_dict(),
            "rejected_samples": {"file": "rejected_samples.jsonl",
                                 "rows": _write_samples(out_dir, read=read_tally, curate=cur_tally)},
            "negatives_dropped": filt.neg_dropped,
            "leakage": {"dev_eval_texts": len(leakage) if leakage else 0,
                        "rejected_by_dev_split": dict(sorted(filt.leaks.items()))},
            "mining": {s: {k: v for k, v in st.items() if k not in ("pos_sim", "neg_sim")}
                       for s, st in mining_stats.get("per_source", {}).items()},
            "mining_consistency": mining_stats.get("consistency_by_lang", {}),
            "mining_seconds": mining_stats.get("seconds"),
            "filter_seconds": round(t_filter, 2),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        write_json(out_dir / "curation_report.json", report, indent=1)
        provenance.write(out_dir / "provenance.json",
                         provenance.collect(to_dict(cfg), seed=cfg.seed, outputs=outputs, stage="curate",
                                            data_hashes=_data_hashes(cfg, plan, registry, hash_inputs=True)))
    return report


def _mine(records: list[dict], mining: MiningConfig, model: Any, cur_tally: Tally,
          show_progress: bool) -> tuple[list[dict], dict[str, Any]]:
    """Mine negatives for the fine-tuning records; consistency drops count as curation rejections."""
    t1 = time.perf_counter()
    model = model or load_model(mining.model, mining.max_length, mining.device)
    kept, stats = mine_hard_negatives(records, model, mining, show_progress)
    kept_ids = {r["id"] for r in kept}
    for r in records:  # consistency drops are curation rejections of already-kept records
        if r["id"] not in kept_ids:
            cur_tally.kept[r["source"]] -= 1
            cur_tally.reject(r["source"], "inconsistent_ranking",
                             sample={"id": r["id"], "field": "pos", "excerpt": excerpt(r["query"])})
    stats["seconds"] = round(time.perf_counter() - t1, 2)
    return kept, stats


def _write_stages(out_dir: Path, staged: dict[str, list[dict]],
                  unmined: list[dict] | None) -> dict[str, dict[str, Any]]:
    """``<out>/<stage>.jsonl`` for every stage (+ ``finetune.unmined.jsonl``), atomically; ``{file: {rows,
    sha256}}``. A stale unmined file of an earlier run with mining is removed when mining did not run."""
    files = {f"{stage}.jsonl": staged[stage] for stage in STAGES}
    if unmined is not None:
        files["finetune.unmined.jsonl"] = unmined
    else:
        (out_dir / "finetune.unmined.jsonl").unlink(missing_ok=True)
    outputs = {}
    for name, rows in files.items():
        n = write_jsonl(out_dir / name, rows)
        outputs[name] = {"rows": n, "sha256": provenance.sha256_file(out_dir / name)}
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
    """``kalm curate --stream``: the config's sources and inputs (or ``inputs``: record shards / hub specs
    for ``stage``) streamed through the bounded-memory filters into ``<out>/<stage>.jsonl`` (+ report,
    rejected-row samples, provenance). Both stage files are published together at the end, or not at all."""
    out_dir = Path(out_dir)
    plan = _plan(cfg, inputs, stage, mapping)
    st_cfg = cfg.stream
    with locking.hold(out_dir / ".kalm.lock", what=f"curation output {out_dir}"):
        registry = registry or load_registry(verify=True)
        leakage = build_leakage_index(registry, cfg.filters.leakage_min_chars) if cfg.filters.leakage else None
        read_tally, cur_tally = Tally(cfg.rejected_samples), Tally(cfg.rejected_samples)
        parts = {}
        with contextlib.ExitStack() as stack:
            files = {st: stack.enter_context(open_atomic(out_dir / f"{st}.jsonl")) for st in STAGES}
            for st in STAGES:
                ids = BloomSet(ScalableBloomFilter(st_cfg.rows_for(st), st_cfg.dedup_fpr))
                records = (r for _, r in _iter_plan(cfg, [p for p in plan if p[0] == st], registry, read_tally,
                                                    {st: ids}))
                parts[st] = stream_curate(records, files[st], cfg.filters, leakage=leakage, tally=cur_tally,
                                          expected_rows=st_cfg.rows_for(st), dedup_fpr=st_cfg.dedup_fpr)
                parts[st]["dedup_ids"] = ids.bloom.stats()
            _check(read_tally, cur_tally)
        outputs = {f"{st}.jsonl": {"rows": parts[st]["rows_out"],
                                   "sha256": provenance.sha256_file(out_dir / f"{st}.jsonl")} for st in STAGES}
        (out_dir / "finetune.unmined.jsonl").unlink(missing_ok=True)
        report = {"config_name": cfg.name, "mode": "stream", "strict": cfg.strict, "config": to_dict(cfg),
                  "inputs": [item.path for _, kind, item in plan if kind == "input"], "outputs": outputs,
                  "read": read_tally.as_dict(), "curate": cur_tally.as_dict(),
                  "rejected_samples": {"file": "rejected_samples.jsonl",
                                       "rows": _write_samples(out_dir, read=read_tally, curate=cur_tally)},
                  "dedup": {"stated_fpr": st_cfg.dedup_fpr, "expected_rows": st_cfg.expected_rows,
                            "meaning": "per filter: the probability that a unique row is rejected as a duplicate "
                                       "(exact_duplicate by its text key, duplicate_id by its id)",
                            **{st: {"text_keys": parts[st]["dedup"], "ids": parts[st]["dedup_ids"]}
                               for st in STAGES}},
                  "seconds": round(sum(p["seconds"] for p in parts.values()), 2),
                  "note": "streaming: Bloom-filter exact dedup, no near-dup removal, no mining (run `kalm mine`)"}
        write_json(out_dir / "curation_report.json", report, indent=1)
        provenance.write(out_dir / "provenance.json",
                         provenance.collect(to_dict(cfg), seed=cfg.seed, outputs=outputs, stage="curate-stream",
                                            inputs=report["inputs"],
                                            data_hashes=_data_hashes(cfg, plan, registry, hash_inputs=False)))
    return report
