"""``kalm curate`` and ``kalm mine``: argument parsing and printing over :mod:`kalm_lib.data`.

A user's mistake (a missing input or config, broken YAML, an unknown source or key, a wrong column
mapping, a shard that cannot be read in ``--strict`` mode, a folder in use) is one line on stderr naming
what and where, exit code 2, no traceback; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from kalm_lib.atomic import write_jsonl
from kalm_lib.cli import ArgumentParser  # one-line usage errors for every kalm command
from kalm_lib.config import ConfigError
from kalm_lib.data.cards import DataCardError
from kalm_lib.data.curate import STAGES, curate, load_config, stream_curate_sources
from kalm_lib.data.mining import MiningConfig, check_mining_config, load_model, mine_hard_negatives, remine
from kalm_lib.data.records import DataFormatError, Tally
from kalm_lib.data.streaming import iter_input
from kalm_lib.locking import LockHeld

__all__ = ["USER_ERRORS", "curate_main", "mine_main", "cli_main"]

# what a user can get wrong (OSError: a missing file or model folder, permissions, a full disk)
USER_ERRORS = (ConfigError, DataFormatError, DataCardError, LockHeld, OSError)
COLUMN_FIELDS = ("query", "pos", "neg", "source_name")


def _guarded(prog: str, debug: bool, run: Callable[[], int]) -> int:
    """``run()``, with a user mistake turned into one line on stderr and exit code 2 (unless ``debug``)."""
    try:
        return run()
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"{prog}: error: {' '.join(str(e).split())} (--debug shows the traceback)", file=sys.stderr)
        return 2


def parse_columns(text: str | None) -> dict[str, str] | None:
    """``"query=anchor,pos=positive"`` -> ``{"query": "anchor", "pos": "positive"}`` (``--columns``)."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        field, sep, col = (x.strip() for x in part.partition("="))
        if not sep or not col or field not in COLUMN_FIELDS:
            raise ConfigError(f"--columns: {part!r} must look like FIELD=COLUMN with FIELD one of {list(COLUMN_FIELDS)}")
        out[field] = col
    return out


# ---------------------------------------------------------------------------------------------- kalm curate
def curate_main(argv: list[str]) -> int:
    """``kalm curate [--config cpu-demo] --out DIR [--input FILE|DIR|hf:...] [--stream] [--strict] ...``"""
    ap = ArgumentParser(prog="kalm curate", description="curate bundled data or your own unified-record "
                        "JSONL into training JSONL (+ report, rejected-row samples)")
    ap.add_argument("--config", default=None,
                    help="YAML path or preset name in configs/curation/ (default: built-in filters and mining, "
                         "no sources: give --input)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set mining.enabled=false")
    ap.add_argument("--stream", action="store_true",
                    help="stream through bounded-memory filters (no mining, Bloom-filter dedup sized by stream.*)")
    ap.add_argument("--input", action="append", default=None, metavar="DIR|FILE|hf:ID[:CONFIG]:SPLIT",
                    help="unified-record files (jsonl/jsonl.gz/parquet), shard folders or a hub dataset, "
                         "instead of the config's sources (in memory or with --stream)")
    ap.add_argument("--stage", choices=STAGES, default="pretrain", help="with --input: which output they feed")
    ap.add_argument("--columns", default=None, metavar="query=COL,pos=COL[,neg=COL]",
                    help="with --input hf:...: dataset columns of the record fields (default query/pos/neg)")
    ap.add_argument("--strict", action="store_true",
                    help="a shard that cannot be read (empty, corrupt gzip, a directory...) stops the run "
                         "(default: counted as a rejected file, named in the report)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    a = ap.parse_args(argv)
    return _guarded("kalm curate", a.debug, lambda: _curate(a))


def _curate(a: argparse.Namespace) -> int:
    cfg = load_config(a.config, a.overrides + (["strict=true"] if a.strict else []))
    mapping = parse_columns(a.columns)
    if a.stream:
        report = stream_curate_sources(cfg, a.out, a.input, a.stage, mapping=mapping)
    else:
        report = curate(cfg, a.out, inputs=a.input, stage=a.stage, mapping=mapping)
    summary = {"outputs": report["outputs"],
               "read": {k: report["read"][k] for k in ("rows_in", "kept", "rejected", "files_rejected")},
               "curate": {k: report["curate"][k] for k in ("rows_in", "kept", "rejected", "rejected_by_reason")},
               "seconds": report["seconds"]}
    if report["read"]["files_rejected"]:
        summary["rejected_files"] = [f"{f['file']}: {f['reason']}" for f in report["read"]["rejected_files"]]
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    return 0


# ---------------------------------------------------------------------------------------------- kalm mine
def mine_main(argv: list[str]) -> int:
    """``kalm mine --in records.jsonl --out mined.jsonl [--model minilm] [--device auto] ...`` or
    ``kalm mine --run RUN_DIR [--model FOLDER]`` (re-mine a run's curated fine-tuning data)."""
    ap = ArgumentParser(prog="kalm mine",
                        description="Hard-negative mining and ranking-consistency filtering")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--in", dest="inp", help="unified-record JSONL (or a folder of shards)")
    src.add_argument("--run", help="a pipeline run: re-mine <run>/curated into <run>/remine/finetune.jsonl (+ "
                                   "report.json) with the run's stage-1 model (<run>/train/pretrain/final) unless "
                                   "--model")
    ap.add_argument("--out", help="with --in: output JSONL (records with mined neg)")
    ap.add_argument("--model", default=None, help="model name or folder (default: minilm; with --run: the run's)")
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    ap.add_argument("--batch-size", type=int, default=64, help="encoding batch size (GPU: 256 or more)")
    ap.add_argument("--num-neg", type=int, default=7)
    ap.add_argument("--window", type=int, nargs=2, default=(50, 100), metavar=("START", "END"))
    ap.add_argument("--window-ref-size", type=int, default=10000)
    ap.add_argument("--top-k", type=int, default=50, help="consistency top-k (0 disables filtering)")
    ap.add_argument("--langs", default=None, help="comma list: the miner's languages; others are never filtered")
    ap.add_argument("--skip-langs", default="", help="comma list of languages never filtered")
    ap.add_argument("--min-lift", type=float, default=0.25,
                    help="skip the filter for a language ranked near chance (lift below this; negative: no check)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    a = ap.parse_args(argv)
    if a.inp and not a.out:
        ap.error("--in needs --out")
    return _guarded("kalm mine", a.debug, lambda: _mine(a))


def _mine(a: argparse.Namespace) -> int:
    cfg = MiningConfig(model=a.model or "minilm", device=a.device, batch_size=a.batch_size, num_neg=a.num_neg,
                       window_start=a.window[0], window_end=a.window[1], window_ref_size=a.window_ref_size,
                       consistency_top_k=a.top_k or None, seed=a.seed,
                       consistency_langs=_langs(a.langs) if a.langs is not None else None,
                       consistency_skip_langs=_langs(a.skip_langs),
                       consistency_min_lift=a.min_lift if a.min_lift >= 0 else None)
    check_mining_config(cfg, "kalm mine")
    if a.run:
        report = remine(a.run, a.model, cfg, show_progress=True)
        print(json.dumps({k: report[k] for k in ("output", "records_in", "kept", "dropped_inconsistent",
                                                 "consistency_by_lang", "seconds")}, indent=1), file=sys.stderr)
        return 0
    tally = Tally()
    recs = list(iter_input(a.inp, tally, seen_ids=set(), strict=True))
    if not recs:
        first = next(iter(tally.rejected_samples()), {})
        raise DataFormatError(f"{a.inp}: no usable records ({tally.as_dict()['rejected_by_reason']}; first: line "
                              f"{first.get('line')} {first.get('reason')} {first.get('field') or ''})")
    kept, stats = mine_hard_negatives(recs, load_model(cfg.model, cfg.max_length, cfg.device), cfg,
                                      show_progress=True)
    write_jsonl(a.out, kept)
    summary: dict[str, Any] = {s: {k: v for k, v in st.items() if k not in ("pos_sim", "neg_sim")}
                               for s, st in stats["per_source"].items()}
    print(json.dumps({"read": tally.as_dict(), "kept": len(kept), "mining": summary,
                      "consistency_by_lang": stats["consistency_by_lang"]}, indent=1, ensure_ascii=False),
          file=sys.stderr)
    return 0


def _langs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


cli_main = curate_main  # the entry kalm_lib.cli calls for ``kalm curate``
