"""The streamed data path at scale: N generated rows (default 10M) through streaming curation (one file per
source) and then through the trainer's streamed feed (kalm_lib.train.stream.StreamFeed: per-process shares, the
one record check, batches with negatives and prompts), with the resident set size sampled all along.

    .venv/bin/python -m benchmarks.bench_streaming [--rows 10000000] [--peer-rows 1000000] [--per-device 512]

The peer, in the same run: the trainer's in-memory path (kalm_lib.train.data.load_records, what every process
did before ``data.streaming``) on the first ``--peer-rows`` rows, its RSS growth per row extrapolated to N and to
the paper's 470M pairs. Each phase runs in a fresh subprocess; RSS is sampled by a thread every 0.5 s (not
ru_maxrss, which Linux keeps across exec). Flatness = RSS growth from the first sample after warm-up (10% of the
rows) to the end, against the bytes read. Writes ``benchmarks/results/streaming.json`` (with provenance).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kalm_lib import provenance  # noqa: E402  (after the path setup: runnable as a script)
from kalm_lib.atomic import write_json  # noqa: E402

PAPER_PAIRS = 470_000_000

# a thread sampling this process's RSS, and the row counter each phase advances
_SAMPLER = r'''
import json, sys, threading, time, psutil
proc, samples, state = psutil.Process(), [], {"rows": 0, "done": False}
def _sample():
    t0 = time.perf_counter()
    while not state["done"]:
        samples.append([round(time.perf_counter() - t0, 2), state["rows"], proc.memory_info().rss])
        time.sleep(0.5)
threading.Thread(target=_sample, daemon=True).start()
def finish(**extra):
    state["done"] = True
    samples.append([None, state["rows"], proc.memory_info().rss])
    print(json.dumps({"samples": samples, **extra}))
'''

_GEN = r'''
import json, os, sys
out, n, sources, shards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
os.makedirs(out, exist_ok=True)
files = [[open(f"{out}/src{s}-{k:05d}.jsonl", "w") for k in range(shards)] for s in range(sources)]
for i in range(n):
    j = i - 1 if i % 50 == 0 and i else i          # 2% exact duplicates
    s = i % sources
    files[s][(i // sources) % shards].write(json.dumps(
        {"id": f"g{i}", "query": f"synthetic query {j} on topic {j % 997}",
         "pos": [f"a positive passage number {j} that talks about topic {j % 997} at length"], "neg": [],
         "task_type": "pretrain", "category": "weak_pairs", "instruction": "", "lang": "en",
         "source": f"src{s}"}) + "\n")
for fs in files:
    for f in fs:
        f.close()
'''

_CURATE = _SAMPLER + r'''
from kalm_lib.data.curate import load_config, stream_curate_sources
from kalm_lib.data.filters import RecordFilter
n, src, out = int(sys.argv[3]), sys.argv[1], sys.argv[2]
process = RecordFilter.process
def counting(self, rec):                         # the row counter the sampler reports
    state["rows"] += 1
    return process(self, rec)
RecordFilter.process = counting
cfg = load_config({"name": "bench", "filters": {"leakage": False},
                   "stream": {"expected_rows": n, "stages": ["pretrain"], "dedup_fpr": 1e-4}})
t0 = time.perf_counter()
report = stream_curate_sources(cfg, out, [src], "pretrain")
finish(seconds=round(time.perf_counter() - t0, 1), rows_in=report["curate"]["rows_in"],
       rows_out=sum(v["rows"] for k, v in report["outputs"].items() if k.startswith("pretrain/")),
       rejected=report["curate"]["rejected_by_reason"], dedup=report["dedup"]["pretrain"])
'''

_FEED = _SAMPLER + r'''
from kalm_lib.train import load_config
from kalm_lib.train.stream import StreamFeed
folder, per_device, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
config = load_config({"stage": "pretrain", "output_dir": "unused", "model": {"name_or_path": "unused"},
                      "loss": {"num_hard_negatives": 1},
                      "data": {"streaming": True, "train_file": folder},
                      "train": {"max_steps": batches, "batch_size": per_device}})
feed = StreamFeed.open(config, rank=0, world=1, per_device=per_device, gather=lambda o: [o])
t0 = time.perf_counter()
texts = 0
for _ in range(batches):
    texts += len(feed.next().texts)
    state["rows"] += per_device
feed.tally.check()
finish(seconds=round(time.perf_counter() - t0, 1), texts=texts, read=feed.tally.as_dict()["rows_in"],
       dropped=dict(feed.mixture.dropped), epoch=feed.epoch)
'''

_MEMORY = _SAMPLER + r'''
import glob
from kalm_lib.train.data import load_records
records = []
base = proc.memory_info().rss                    # after the imports: what the records add is measured from here
t0 = time.perf_counter()
for path in sorted(glob.glob(sys.argv[1] + "/*.jsonl"))[:int(sys.argv[2])]:
    rows, _ = load_records(path)
    records.extend(rows)
    state["rows"] = len(records)
finish(seconds=round(time.perf_counter() - t0, 1), rows=len(records), base_rss=base)
'''


def run(script: str, *args: str) -> dict:
    """Run a phase in a fresh interpreter; its last stdout line is its JSON result (none: {})."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"phase failed ({done.returncode}): {done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def summarise(samples: list, total_rows: int, data_bytes: int) -> dict:
    """RSS at the first sample past 10% of the rows, at the peak and at the end; growth over the bytes read."""
    warm = next((r for _, n, r in samples if n >= total_rows / 10), samples[0][2])
    peak, last = max(r for _, _, r in samples), samples[-1][2]
    return {"rss_after_warmup_mb": round(warm / 2**20, 1), "rss_peak_mb": round(peak / 2**20, 1),
            "rss_end_mb": round(last / 2**20, 1), "rss_growth_after_warmup_mb": round((peak - warm) / 2**20, 1),
            "growth_per_data_byte": round((peak - warm) / max(1, data_bytes), 5),
            "samples": [[t, n, round(r / 2**20, 1)] for t, n, r in samples[:: max(1, len(samples) // 200)]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--peer-rows", type=int, default=1_000_000, help="rows the in-memory peer loads")
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--shards", type=int, default=5, help="generated shards per source")
    ap.add_argument("--per-device", type=int, default=512, help="the feed's batch (the GPU preset's per-GPU 512)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "streaming.json"))
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        t0 = time.perf_counter()
        run(_GEN, f"{tmp}/in", a.rows, a.sources, a.shards)
        gen_s = time.perf_counter() - t0
        in_bytes = sum(f.stat().st_size for f in Path(tmp, "in").iterdir())
        cur = run(_CURATE, f"{tmp}/in", f"{tmp}/curated", a.rows)
        out_bytes = sum(f.stat().st_size for f in Path(tmp, "curated", "pretrain").iterdir())
        batches = cur["rows_out"] // a.per_device - a.sources       # about one pass over every source
        feed = run(_FEED, f"{tmp}/curated/pretrain", a.per_device, batches)
        peer_files = max(1, round(a.peer_rows / (a.rows / (a.sources * a.shards))))
        peer = run(_MEMORY, f"{tmp}/in", peer_files)
    peer_rows = peer["rows"]
    per_row = (peer["samples"][-1][2] - peer["base_rss"]) / max(1, peer_rows)
    curate_sum = summarise(cur["samples"], cur["rows_in"], in_bytes)
    feed_sum = summarise(feed["samples"], batches * a.per_device, out_bytes)
    result = {
        "rows": a.rows, "input_bytes": in_bytes, "curated_bytes": out_bytes, "generate_s": round(gen_s, 1),
        "curation": {"seconds": cur["seconds"], "rows_per_s": round(cur["rows_in"] / max(cur["seconds"], 1e-9)),
                     "rows_in": cur["rows_in"], "rows_out": cur["rows_out"], "rejected": cur["rejected"],
                     "dedup": cur["dedup"], **curate_sum},
        "trainer_feed": {"seconds": feed["seconds"], "batches": batches, "per_device": a.per_device,
                         "rows_per_s": round(batches * a.per_device / max(feed["seconds"], 1e-9)),
                         "rows_read": feed["read"], "dropped_at_pass_ends": feed["dropped"], **feed_sum},
        "in_memory_peer": {"rows": peer_rows, "seconds": peer["seconds"], "bytes_per_row": round(per_row),
                           "rss_before_mb": round(peer["base_rss"] / 2**20, 1),
                           "rss_end_mb": round(peer["samples"][-1][2] / 2**20, 1),
                           "extrapolated_rss_at_rows_gb": round(per_row * a.rows / 2**30, 1),
                           "extrapolated_rss_at_470M_gb": round(per_row * PAPER_PAIRS / 2**30, 1),
                           "samples": [[t, n, round(r / 2**20, 1)] for t, n, r in peer["samples"]]},
    }
    result["ratio_in_memory_at_rows_vs_feed_peak_rss"] = round(
        per_row * a.rows / (feed_sum["rss_peak_mb"] * 2**20), 1)
    result["provenance"] = provenance.collect(vars(a), seed=0)
    write_json(Path(a.out), result, indent=1)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "samples"} if isinstance(v, dict) else v
                      for k, v in result.items() if k != "provenance"}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
