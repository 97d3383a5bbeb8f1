"""Curation benchmarks: throughput (rows/s), mining time, and streaming memory on a generated 1M-row input.

    .venv/bin/python -m benchmarks.bench_curation [--rows 1000000] [--skip-mining] [--skip-streaming]

Every number comes with a peer measured in the same run (house rule: ratios, not absolute asserts):

- throughput: the full in-memory filter pipeline over every bundled source (no caps) vs the I/O floor
  (JSON-serialising the same records), and with vs without MinHash near-dup removal;
- mining: encoding vs exact search time on the bundled fine-tuning records (MiniLM), torch chunked matmul
  vs a full numpy argsort of the same similarity matrix;
- streaming: peak RSS while streaming N generated rows through ``stream_curate`` (sampled every 100k rows)
  vs loading the same rows into memory first (the in-memory pipeline's way), each in a fresh subprocess;
- dedup: unique rows wrongly rejected as duplicates at 470k rows (the paper's 470M, 1000x down) by the old
  fixed-size Bloom filters vs the filters sized from the expected rows (stated rate 1e-4).

Writes ``benchmarks/results/curation.json`` (with provenance).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kalm_lib import provenance  # noqa: E402  (after the path setup: runnable as a script)
from kalm_lib.atomic import write_json  # noqa: E402
from kalm_lib.data.cards import load_registry  # noqa: E402
from kalm_lib.data.filters import FilterConfig, RecordFilter  # noqa: E402
from kalm_lib.data.formats import read_scifact_corpus  # noqa: E402
from kalm_lib.data.leakage import build_leakage_index  # noqa: E402
from kalm_lib.data.mining import exact_search, load_model  # noqa: E402
from kalm_lib.data.readers import ReadOptions, read_source  # noqa: E402
from kalm_lib.data.records import Tally  # noqa: E402
from kalm_lib.data.sources import SOURCES, source_paths  # noqa: E402
from kalm_lib.data.streaming import BloomFilter, ScalableBloomFilter  # noqa: E402
from kalm_lib.model import format_query  # noqa: E402


def bench_throughput() -> dict:
    reg = load_registry(verify=True)
    t0 = time.perf_counter()
    leak = build_leakage_index(reg)
    t_leak = time.perf_counter() - t0
    t0 = time.perf_counter()
    read_tally = Tally()
    records = []
    for name in SOURCES:
        path, extra = source_paths(reg, name)
        records += read_source(name, path, read_tally, ReadOptions(), extra_paths=extra)
    t_read = time.perf_counter() - t0
    raw_rows = read_tally.as_dict()["rows_in"]
    out = {"raw_rows": raw_rows, "records": len(records), "read_seconds": round(t_read, 2),
           "read_rows_per_s": round(raw_rows / t_read), "leakage_index_seconds": round(t_leak, 2),
           "leakage_index_texts": len(leak)}
    for near in (False, True):
        t = Tally()
        f = RecordFilter(FilterConfig(dedup_near=near), leak, t)
        t0 = time.perf_counter()
        kept = [k for k, _ in map(f.process, records) if k is not None]
        dt = time.perf_counter() - t0
        out[f"filter_near_dup_{near}"] = {"seconds": round(dt, 2), "records_per_s": round(len(records) / dt),
                                          "kept": len(kept), "rejected": t.as_dict()["rejected_by_reason"]}
    t0 = time.perf_counter()
    n = sum(len(json.dumps(r, ensure_ascii=False)) for r in records)
    t_io = time.perf_counter() - t0
    out["io_floor"] = {"seconds": round(t_io, 3), "records_per_s": round(len(records) / t_io), "chars": n}
    full = out["filter_near_dup_True"]["seconds"]
    out["ratios"] = {"filter_vs_io_floor": round(full / t_io, 2),
                     "near_dup_cost": round(full / out["filter_near_dup_False"]["seconds"], 2)}
    return out


def bench_mining(max_records: int) -> dict:
    reg = load_registry(verify=False)
    path, extra = source_paths(reg, "scifact")
    recs = read_source("scifact", path, Tally(), ReadOptions(max_rows=max_records), extra_paths=extra)
    # the texts the scifact source uses as positives: "title abstract"
    corpus = [f"{t} {a}".strip() for t, a in read_scifact_corpus(reg["en-scifact"].split_path("corpus")).values()]
    m = load_model("minilm", 128)
    t0 = time.perf_counter()
    q = m.encode([format_query(r["instruction"], r["query"]) for r in recs], batch_size=64)
    t_q = time.perf_counter() - t0
    t0 = time.perf_counter()
    c = m.encode(corpus, batch_size=64)
    t_c = time.perf_counter() - t0
    t0 = time.perf_counter()
    s, i = exact_search(q, c, 100, chunk_size=256, use_faiss=False)
    t_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = np.argsort(-(q @ c.T), axis=1)[:, :100]
    t_np = time.perf_counter() - t0
    agree = float((ref[:, :10] == i[:, :10]).mean())
    # how often the cited abstract is in the top 50 of the whole SciFact corpus (consistency at paper k)
    index = {t: j for j, t in enumerate(corpus)}
    hits = [index.get(r["pos"][0]) in set(i[k, :50].tolist()) for k, r in enumerate(recs)]
    return {"queries": len(recs), "corpus": len(corpus), "encode_queries_s": round(t_q, 2),
            "encode_corpus_s": round(t_c, 2), "encode_texts_per_s": round((len(recs) + len(corpus)) / (t_q + t_c), 1),
            "search_torch_s": round(t_s, 4), "search_numpy_argsort_s": round(t_np, 4),
            "ratio_numpy_vs_torch_search": round(t_np / max(t_s, 1e-9), 2), "top10_agreement": agree,
            "positive_in_top50": round(float(np.mean(hits)), 3), "threads": torch.get_num_threads()}


_GEN = r'''
import json, gzip, sys, os
out, n, shards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(out, exist_ok=True)
per = n // shards
for s in range(shards):
    with open(f"{out}/shard-{s:03d}.jsonl", "w") as f:
        for i in range(s * per, (s + 1) * per):
            j = i - 1 if i % 50 == 0 and i else i
            f.write(json.dumps({"id": f"g{i}", "query": f"synthetic query {j} on topic {j % 997}",
                                "pos": [f"a positive passage number {j} that talks about topic {j % 997} at length"],
                                "neg": [], "task_type": "pretrain", "category": "weak", "instruction": "",
                                "lang": "en", "source": "gen"}) + "\n")
'''

_STREAM = r'''
import json, sys, psutil, resource
from kalm_lib.data.records import Tally
from kalm_lib.data.streaming import iter_input, stream_curate, ScalableBloomFilter, BloomSet
proc = psutil.Process()
samples = []
def tick(n):
    samples.append([n, proc.memory_info().rss])
n_rows = int(sys.argv[4])  # filters sized from the expected rows, as kalm curate --stream does
res = stream_curate(iter_input(sys.argv[1], Tally(), seen_ids=BloomSet(ScalableBloomFilter(n_rows, 1e-4))), sys.argv[2],
                    expected_rows=n_rows, dedup_fpr=1e-4, on_progress=tick, progress_every=int(sys.argv[3]))
tick(res["rows_in"])
res["rss_samples"] = samples
# sampled RSS, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's peak
res["peak_rss"] = max(r for _, r in samples)
print(json.dumps({k: v for k, v in res.items() if k != "curate"} | {"rejected": res["curate"]["rejected_by_reason"]}))
'''

_INMEM = r'''
import json, sys, psutil, resource
from kalm_lib.data.records import Tally, read_records
from kalm_lib.data.streaming import shard_files
proc = psutil.Process()
samples, recs, t = [], [], Tally()
for f in shard_files(sys.argv[1]):
    recs.extend(read_records(f, t, "gen", set()))
    samples.append([len(recs), proc.memory_info().rss])
print(json.dumps({"rows": len(recs), "rss_samples": samples, "peak_rss": max(r for _, r in samples)}))
'''


def bench_streaming(rows: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", _GEN, f"{tmp}/in", str(rows), "10"], check=True, env=env)
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        s = json.loads(subprocess.run([sys.executable, "-c", _STREAM, f"{tmp}/in", f"{tmp}/out.jsonl",
                                       str(max(1, rows // 10)), str(rows)], check=True,
                                      env=env, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        t_stream = time.perf_counter() - t0
        m = json.loads(subprocess.run([sys.executable, "-c", _INMEM, f"{tmp}/in"], check=True, env=env,
                                      capture_output=True, text=True).stdout.strip().splitlines()[-1])
    rss = [r for _, r in s["rss_samples"]]
    first, last = rss[0], rss[-1]
    per_row_in_memory = (m["rss_samples"][-1][1] - m["rss_samples"][0][1]) / max(1, m["rss_samples"][-1][0] - m["rss_samples"][0][0])
    return {"rows": rows, "generate_s": round(t_gen, 1), "stream_wall_s": round(t_stream, 1),
            "stream_rows_per_s": round(rows / s["seconds"]), "stream": s,
            "stream_rss_first_sample_mb": round(first / 2**20, 1),
            "stream_rss_growth_first_sample_to_end_mb": round((last - first) / 2**20, 1),
            "in_memory_bytes_per_row": round(per_row_in_memory),
            "stream_peak_rss_mb": round(s["peak_rss"] / 2**20, 1),
            "in_memory_peak_rss_mb": round(m["peak_rss"] / 2**20, 1), "in_memory": m,
            "ratio_in_memory_vs_stream_peak_rss": round(m["peak_rss"] / s["peak_rss"], 2)}


def bench_dedup(rows: int = 470_000) -> dict:
    """Streaming dedup on ``rows`` unique keys (the paper's 470M stage-1 pairs scaled down 1000x): unique rows
    wrongly rejected as duplicates by the old fixed-size filters (10M text keys, 1M ids, scaled down: 10k, 1k)
    vs the filters sized from the expected row count (and vs a 10x underestimate, where they grow)."""
    def false_rejections(bloom) -> int:
        return sum(bloom.add(f"unique row {i}") for i in range(rows))

    out: dict = {"rows": rows}
    for name, bloom in (("fixed_text_10k_at_1e-4", BloomFilter(rows // 47, 1e-4)),
                        ("fixed_ids_1k_at_1e-6", BloomFilter(rows // 470, 1e-6)),
                        ("sized_at_1e-4", ScalableBloomFilter(rows, 1e-4)),
                        ("underestimated_10x_at_1e-4", ScalableBloomFilter(rows // 10, 1e-4))):
        t0 = time.perf_counter()
        fp = false_rejections(bloom)
        out[name] = {"false_rejection_rate": round(fp / rows, 6), "bytes": bloom.nbytes,
                     "seconds": round(time.perf_counter() - t0, 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="generated rows for the streaming benchmark")
    ap.add_argument("--mining-records", type=int, default=400)
    ap.add_argument("--skip-mining", action="store_true")
    ap.add_argument("--skip-streaming", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-dedup", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "curation.json"))
    a = ap.parse_args(argv)
    out = Path(a.out)
    # sections not run this time keep their previous numbers (each section records its own provenance)
    results = json.loads(out.read_text()) if out.exists() else {}
    if not a.skip_throughput:
        results["throughput"] = bench_throughput()
        print(json.dumps(results["throughput"], indent=1))
    if not a.skip_mining:
        results["mining"] = bench_mining(a.mining_records)
        print(json.dumps(results["mining"], indent=1))
    if not a.skip_dedup:
        results["dedup"] = bench_dedup()
        print(json.dumps(results["dedup"], indent=1))
    if not a.skip_streaming:
        results["streaming"] = bench_streaming(a.rows)
        print(json.dumps({k: v for k, v in results["streaming"].items() if k not in ("stream", "in_memory")}, indent=1))
    ran = [k for k, skip in (("throughput", a.skip_throughput), ("mining", a.skip_mining),
                             ("dedup", a.skip_dedup), ("streaming", a.skip_streaming)) if not skip]
    for k in ran:
        results.setdefault("provenance_by_section", {})[k] = provenance.collect(vars(a), seed=0)
    results.pop("provenance", None)
    write_json(out, results, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
