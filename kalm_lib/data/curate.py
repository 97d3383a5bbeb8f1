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
import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Literal

from kalm_lib import locking, provenance
from kalm_lib.atomic import open_atomic, write_json, write_jsonl
from kalm_lib.config import ConfigError, from_dict, load_config_data, to_dict
from kalm_lib.data.cards import DataCard, HubSpec, load_registry
from kalm_lib.data.filters import FilterConfig, RecordFilter
from kalm_lib.data.leakage import build_leakage_index
from kalm_lib.data.mining import MiningConfig, check_mining_config, load_model, mine_hard_negatives
from kalm_lib.data.readers import ReadOptions, read_source
from kalm_lib.data.records import MAX_LINE_BYTES, Tally, excerpt
from kalm_lib.data.sources import SOURCES, source_paths
from kalm_lib.data.streaming import (BloomSet, ScalableBloomFilter, SourceShards, iter_hub_records, iter_input,
                                     shard_files, stream_curate)
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
    JSONL.gz / parquet file, a folder of such shards, ``hf:<dataset id>[:<config>]:<split>``, or (``card``) the
    hub dataset a data card's ``hub:`` block names, streamed with the card's revision and column mapping."""

    path: str = ""
    stage: Literal["pretrain", "finetune"] = "pretrain"
    columns: dict[str, str] | None = None  # hf: record field -> dataset column, e.g. {query: anchor, pos: positive}
    card: str | None = None                # instead of path: a data card's hub: block (id, revision, columns)


@dataclasses.dataclass
class StreamConfig:
    """Sizing of the streaming dedup filters (section ``stream``): a unique row is wrongly rejected as a
    duplicate with probability at most ``dedup_fpr`` per filter (text key, record id), at any row count."""

    expected_rows: int | dict[str, int] = 10_000_000  # rows you expect per stage, or {pretrain: N, finetune: M}
    dedup_fpr: float = 1e-4              # memory ~1.44 log2(1/fpr) bits per expected row (2.4 B at 1e-4)
    stages: list[str] = dataclasses.field(default_factory=list)   # streamed even in a memory run, written as
    # <out>/<stage>/<source>.jsonl (one file per source: what the trainer streams per process, data.streaming)

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
    if set(st.stages) - set(STAGES):
        raise ConfigError(f"{where}: stream.stages must name stages of {list(STAGES)}, got {st.stages}")
    for i in cfg.inputs:
        if bool(i.path) == bool(i.card):
            raise ConfigError(f"{where}: inputs: each input needs a path or a card (not both): {to_dict(i)}")
    if cfg.max_line_bytes < 1024 or cfg.rejected_samples < 0:
        raise ConfigError(f"{where}: max_line_bytes must be >= 1024 and rejected_samples >= 0")
    check_mining_config(cfg.mining, f"{where}: mining")
    return cfg


# ---------------------------------------------------------------------------------------------- the plan
Plan = list[tuple[str, str, Any]]  # (stage, "source" | "input", SourceSpec | InputSpec), in config order


def _plan(cfg: CurationConfig, inputs: list[str] | None, stage: str, mapping: dict[str, str] | None,
          registry: dict[str, DataCard] | None = None) -> Plan:
    """What to read: ``inputs`` (command line) replace the config's sources and inputs."""
    if inputs:
        plan: Plan = [(stage, "input", InputSpec(str(i), stage, mapping)) for i in inputs]
    else:
        plan = [(s.stage, "source", s) for s in cfg.sources] + [(i.stage, "input", i) for i in cfg.inputs]
    if not plan:
        raise ConfigError(f"curation config {cfg.name!r}: nothing to curate (no sources and no inputs; "
                          f"give --input FILE or a config with sources)")
    for _, kind, item in plan:  # a missing local input or card is a mistake to report before any work
        if kind == "input" and item.card:
            _card_hub(registry or load_registry(verify=False), item)
        elif kind == "input" and not item.path.startswith("hf:"):
            shard_files(item.path)
    return plan


def _card_hub(registry: dict[str, DataCard], item: InputSpec) -> HubSpec:
    """The hub spec of a card input: the card's ``hub:`` block, with the input's own column mapping on top."""
    card = registry.get(item.card)
    if card is None or card.hub is None:
        raise ConfigError(f"inputs: card {item.card!r} " + ("has no hub: block" if card else "is not in data_cards/"))
    return dataclasses.replace(card.hub, columns=item.columns) if item.columns else card.hub


def _iter_plan(cfg: CurationConfig, plan: Plan, registry: dict[str, DataCard] | None, tally: Tally,
               seen_ids: Any) -> Iterator[tuple[str, dict]]:
    """``(stage, record)`` of every plan item in order; raw rows and unreadable files counted in ``tally``;
    input record ids deduplicated per stage (``seen_ids``: stage -> set or set-like)."""
    for stage, kind, item in plan:
        if kind == "source":
            path, extra = source_paths(registry, item.name)
            opts = ReadOptions(num_neg=item.num_neg, max_rows=item.max_rows, seed=cfg.seed)
            recs = read_source(item.name, path, tally, opts, extra_paths=extra)
        elif item.card:  # the card's name is the records' source (one file per source when streamed by source)
            recs = iter_hub_records(_card_hub(registry, item), None, tally, source=item.card)
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
        elif item.card:
            hub = _card_hub(registry, item)
            hashes[f"hf:{hub.path}"] = {"card": item.card, "config": hub.config, "split": hub.split,
                                        "revision": hub.revision, "data_files": hub.data_files}
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
    columns) replace the config's sources and inputs. The stages in ``stream.stages`` are streamed all the
    same (bounded-memory filters, one file per source under ``<out>/<stage>/``): a paper-scale pre-training
    set next to a fine-tuning set mined in memory.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    plan = _plan(cfg, inputs, stage, mapping, registry)
    with locking.hold(out_dir / ".kalm.lock", what=f"curation output {out_dir}"):
        registry = registry or load_registry(verify=True)
        leakage = build_leakage_index(registry, cfg.filters.leakage_min_chars) if cfg.filters.leakage else None
        read_tally, cur_tally = Tally(cfg.rejected_samples), Tally(cfg.rejected_samples)
        with _Sinks(cfg, out_dir, leakage, cur_tally) as sinks:
            for item in (progress_bar()(plan, desc="curate", unit="source") if show_progress else plan):
                for st, r in _iter_plan(cfg, [item], registry, read_tally, sinks.seen_ids):
                    sinks.add(st, r)
            t_filter = time.perf_counter() - t0
            staged = sinks.staged
            unmined, mining_stats = staged.get("finetune", []), {}
            if cfg.mining.enabled and staged.get("finetune"):
                staged["finetune"], mining_stats = _mine(staged["finetune"], cfg.mining, model, cur_tally,
                                                         show_progress)
            _check(read_tally, cur_tally)
            outputs = {**_write_stages(out_dir, staged, unmined if mining_stats else None), **sinks.publish()}
        write_json(out_dir / "mining_similarities.json",
                   {s: {"pos_sim": st["pos_sim"], "neg_sim": st["neg_sim"]}
                    for s, st in mining_stats.get("per_source", {}).items()}, indent=1)
        report = {
            "config_name": cfg.name, "mode": "memory", "strict": cfg.strict, "config": to_dict(cfg),
            "inputs": [item.path or f"card:{item.card}" for _, kind, item in plan if kind == "input"],
            "outputs": outputs,
            "stages": sinks.summaries(),
            "read": read_tally.as_dict(),
            "curate": cur_tally.as_dict(),
            "rejected_samples": {"file": "rejected_samples.jsonl",
                                 "rows": _write_samples(out_dir, read=read_tally, curate=cur_tally)},
            "negatives_dropped": sinks.negatives_dropped(),
            "leakage": {"dev_eval_texts": len(leakage) if leakage else 0,
                        "rejected_by_dev_split": sinks.leaks()},
            "mining": {s: {k: v for k, v in st.items() if k not in ("pos_sim", "neg_sim")}
                       for s, st in mining_stats.get("per_source", {}).items()},
            "mining_consistency": mining_stats.get("consistency_by_lang", {}),
            "mining_seconds": mining_stats.get("seconds"),
            "filter_seconds": round(t_filter, 2),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if sinks.shards:
            report["dedup"] = sinks.dedup_stats()
        write_json(out_dir / "curation_report.json", report, indent=1)
        provenance.write(out_dir / "provenance.json",
                         provenance.collect(to_dict(cfg), seed=cfg.seed, outputs=outputs, stage="curate",
                                            data_hashes=_data_hashes(cfg, plan, registry, hash_inputs=True)))
    return report


class _Sinks:
    """Where the curated records of each stage go in a memory run: a list per stage (one
    :class:`RecordFilter` over all of them, as always), or, for the stages of ``stream.stages``, straight to
    one file per source (:class:`~kalm_lib.data.streaming.SourceShards`) through a filter whose exact dedup
    and record-id check are scalable Bloom filters sized by the ``stream`` section (no near-dup removal)."""

    def __init__(self, cfg: CurationConfig, out_dir: Path, leakage: Any, tally: Tally):
        st = cfg.stream
        self.memory = RecordFilter(cfg.filters, leakage, tally, cfg.seed)
        self.staged: dict[str, list[dict]] = {s: [] for s in STAGES if s not in st.stages}
        self.blooms = {s: (ScalableBloomFilter(st.rows_for(s), st.dedup_fpr),
                           ScalableBloomFilter(st.rows_for(s), st.dedup_fpr)) for s in st.stages}
        self.streamed = {s: RecordFilter(dataclasses.replace(cfg.filters, dedup_near=False), leakage, tally,
                                         cfg.seed, exact_set=BloomSet(self.blooms[s][0])) for s in st.stages}
        self.seen_ids: dict[str, Any] = {s: BloomSet(self.blooms[s][1]) if s in st.stages else set() for s in STAGES}
        self.out_dir, self.shards = out_dir, {s: SourceShards(out_dir / s) for s in st.stages}
        self.rows: dict[str, dict[str, int]] = {}

    def __enter__(self) -> "_Sinks":
        return self

    def __exit__(self, *exc: Any) -> None:
        for shards in self.shards.values():
            shards.discard()  # a no-op after publish

    def add(self, stage: str, rec: dict) -> None:
        if stage in self.shards:
            kept, _ = self.streamed[stage].process(rec)
            if kept is not None:
                self.shards[stage].write(kept, json.dumps(kept, ensure_ascii=False) + "\n")
        else:
            kept, _ = self.memory.process(rec)
            if kept is not None:
                self.staged[stage].append(kept)

    def publish(self) -> dict[str, dict[str, Any]]:
        """Publish every streamed stage's folder; ``{"<stage>/<source>.jsonl": {rows, sha256}}``."""
        outputs = {}
        for stage, shards in self.shards.items():
            self.rows[stage] = shards.publish()
            (self.out_dir / f"{stage}.jsonl").unlink(missing_ok=True)  # a stale single file of an earlier run
            for name, n in self.rows[stage].items():
                outputs[f"{stage}/{name}"] = {"rows": n, "sha256": provenance.sha256_file(self.out_dir / stage / name)}
        return outputs

    def summaries(self) -> dict[str, dict[str, Any]]:
        out = {s: _stage_summary(recs) for s, recs in self.staged.items()}
        for s, rows in self.rows.items():
            out[s] = {"records": sum(rows.values()), "by_source": {n[:-len(".jsonl")]: k for n, k in rows.items()},
                      "streamed": True, "folder": s}
        return {s: out[s] for s in STAGES}

    def negatives_dropped(self) -> dict[str, int]:
        total = collections.Counter(self.memory.neg_dropped)
        for f in self.streamed.values():
            total.update(f.neg_dropped)
        return dict(total)

    def leaks(self) -> dict[str, int]:
        total = collections.Counter(self.memory.leaks)
        for f in self.streamed.values():
            total.update(f.leaks)
        return dict(sorted(total.items()))

    def dedup_stats(self) -> dict[str, Any]:
        return {s: {"text_keys": keys.stats(), "ids": ids.stats()} for s, (keys, ids) in self.blooms.items()}


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
    """``<out>/<stage>.jsonl`` for every stage held in memory (+ ``finetune.unmined.jsonl``), atomically;
    ``{file: {rows, sha256}}``. Stale outputs of an earlier run are removed: an unmined file when mining did
    not run, a stage's per-source folder when the stage is now one file."""
    files = {f"{stage}.jsonl": rows for stage, rows in staged.items()}
    for stage in staged:
        if (out_dir / stage).is_dir():
            shutil.rmtree(out_dir / stage)
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
    for ``stage``) streamed through the bounded-memory filters into ``<out>/<stage>.jsonl``, or one file per
    source under ``<out>/<stage>/`` for the stages of ``stream.stages`` (+ report, rejected-row samples,
    provenance). The outputs are published at the end, after the accounting checks, or not at all."""
    out_dir = Path(out_dir)
    plan = _plan(cfg, inputs, stage, mapping, registry)
    st_cfg = cfg.stream
    with locking.hold(out_dir / ".kalm.lock", what=f"curation output {out_dir}"):
        registry = registry or load_registry(verify=True)
        leakage = build_leakage_index(registry, cfg.filters.leakage_min_chars) if cfg.filters.leakage else None
        read_tally, cur_tally = Tally(cfg.rejected_samples), Tally(cfg.rejected_samples)
        parts = {}
        with contextlib.ExitStack() as stack:
            files: dict[str, Any] = {}
            for st in STAGES:  # one file per stage, or one per source for the stages of stream.stages
                if st in st_cfg.stages:
                    files[st] = SourceShards(out_dir / st)
                    stack.callback(files[st].discard)  # a no-op once published
                else:
                    files[st] = stack.enter_context(open_atomic(out_dir / f"{st}.jsonl"))
            for st in STAGES:
                ids = BloomSet(ScalableBloomFilter(st_cfg.rows_for(st), st_cfg.dedup_fpr))
                records = (r for _, r in _iter_plan(cfg, [p for p in plan if p[0] == st], registry, read_tally,
                                                    {st: ids}))
                parts[st] = stream_curate(records, files[st], cfg.filters, leakage=leakage, tally=cur_tally,
                                          expected_rows=st_cfg.rows_for(st), dedup_fpr=st_cfg.dedup_fpr)
                parts[st]["dedup_ids"] = ids.bloom.stats()
            _check(read_tally, cur_tally)
            shard_rows = {st: f.publish() for st, f in files.items() if isinstance(f, SourceShards)}
        outputs = {}
        for st in STAGES:
            names = [f"{st}/{n}" for n in shard_rows[st]] if st in shard_rows else [f"{st}.jsonl"]
            if st in shard_rows:  # the other layout, from an earlier run
                (out_dir / f"{st}.jsonl").unlink(missing_ok=True)
            elif (out_dir / st).is_dir():
                shutil.rmtree(out_dir / st)
            for name in names:
                rows = shard_rows[st][name.split("/", 1)[1]] if st in shard_rows else parts[st]["rows_out"]
                outputs[name] = {"rows": rows, "sha256": provenance.sha256_file(out_dir / name)}
        (out_dir / "finetune.unmined.jsonl").unlink(missing_ok=True)
        report = {"config_name": cfg.name, "mode": "stream", "strict": cfg.strict, "config": to_dict(cfg),
                  "inputs": [item.path or f"card:{item.card}" for _, kind, item in plan if kind == "input"],
                  "outputs": outputs,
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
