"""``kalm curate`` and ``kalm mine``: argument parsing and printing over :mod:`kalm_lib.data`."""

from __future__ import annotations

import argparse
import json
import sys

from kalm_lib.atomic import write_jsonl
from kalm_lib.data.curate import STAGES, curate, load_config, stream_curate_sources
from kalm_lib.data.mining import MiningConfig, load_model, mine_hard_negatives
from kalm_lib.data.records import Tally, read_records

__all__ = ["curate_main", "mine_main", "cli_main"]


def curate_main(argv: list[str]) -> int:
    """``kalm curate --config configs/curation/cpu-demo.yaml --out DIR [--set key=value ...] [--stream ...]``"""
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
        mapping = dict(kv.split("=", 1) for kv in a.columns.split(",")) if a.columns else None
        report = stream_curate_sources(cfg, a.out, a.input, a.stage, mapping=mapping)
    else:
        report = curate(cfg, a.out)
    summary = {"outputs": report["outputs"], "read": {k: report["read"][k] for k in ("rows_in", "kept", "rejected")},
               "curate": {k: report["curate"][k] for k in ("rows_in", "kept", "rejected", "rejected_by_reason")},
               "seconds": report["seconds"]}
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    return 0


def mine_main(argv: list[str]) -> int:
    """``kalm mine --in records.jsonl --out mined.jsonl [--model minilm] [--num-neg 7] ...``"""
    ap = argparse.ArgumentParser(prog="kalm mine",
                                 description="Hard-negative mining and ranking-consistency filtering")
    ap.add_argument("--in", dest="inp", required=True, help="unified-record JSONL")
    ap.add_argument("--out", required=True, help="output JSONL (records with mined neg)")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--num-neg", type=int, default=7)
    ap.add_argument("--window", type=int, nargs=2, default=(50, 100), metavar=("START", "END"))
    ap.add_argument("--window-ref-size", type=int, default=10000)
    ap.add_argument("--top-k", type=int, default=50, help="consistency top-k (0 disables filtering)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    tally = Tally()
    recs = list(read_records(a.inp, tally))
    cfg = MiningConfig(model=a.model, num_neg=a.num_neg, window_start=a.window[0], window_end=a.window[1],
                       window_ref_size=a.window_ref_size, consistency_top_k=a.top_k or None, seed=a.seed)
    kept, stats = mine_hard_negatives(recs, load_model(a.model, cfg.max_length), cfg, show_progress=True)
    write_jsonl(a.out, kept)
    summary = {s: {k: v for k, v in st.items() if k not in ("pos_sim", "neg_sim")}
               for s, st in stats["per_source"].items()}
    print(json.dumps({"read": tally.as_dict(), "kept": len(kept), "mining": summary}, indent=1), file=sys.stderr)
    return 0


cli_main = curate_main  # the entry kalm_lib.cli calls for ``kalm curate``
