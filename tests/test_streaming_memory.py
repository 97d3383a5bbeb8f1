"""Memory of the streamed data path does not grow with the data: generated rows through streaming curation (one
file per source) and the trainer's streamed feed, with Python's allocation peak (tracemalloc) bounded by what the
data says (Bloom filter sizes, the longest line, the batch) and flat between half and all of the data, next to the
in-memory reader whose peak grows with it. benchmarks/bench_streaming.py measures the same at 10M rows (RSS)."""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import pytest

from kalm_lib.data.cards import load_registry
from kalm_lib.data.curate import load_config as curation_config, stream_curate_sources
from kalm_lib.train import load_config
from kalm_lib.train.data import load_records
from kalm_lib.train.stream import StreamFeed

WORDS = "apple banana cherry dog cat house river mountain blue green red car train plane book music".split()
N = 12_000          # rows generated (~3 MB); the half run reads the first 6,000
GLOBAL_BATCH = 32


def write_source_shards(folder: Path, n: int) -> Path:
    """n unified records over 2 sources x 2 shards, with a few exact duplicates (dedup has work to do)."""
    folder.mkdir(parents=True)
    files = {(s, k): open(folder / f"src{s}-{k:05d}.jsonl", "w", encoding="utf-8") for s in range(2) for k in range(2)}
    for i in range(n):
        j = i - 1 if i % 97 == 0 and i else i
        text = " ".join(WORDS[(j * 7 + t) % 16] for t in range(10))
        rec = {"id": f"r{i}", "query": f"query {j} {text[:30]}", "pos": [f"passage {j} about {text}"], "neg": [],
               "task_type": "pretrain", "category": "weak_pairs", "instruction": "", "lang": "en",
               "source": f"src{i % 2}"}
        files[(i % 2, (i // 2) % 2)].write(json.dumps(rec) + "\n")
    for f in files.values():
        f.close()
    return folder


def peak_bytes(fn) -> tuple[int, object]:
    tracemalloc.start()
    try:
        result = fn()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("memory")
    return {"root": root, "full": write_source_shards(root / "full", N), "half": write_source_shards(root / "half", N // 2)}


def test_streaming_curation_and_the_trainers_feed_keep_memory_flat(data, monkeypatch):
    root = data["root"]
    curate_module = sys.modules["kalm_lib.data.curate"]
    streaming_peaks, check = [], curate_module._check

    def peak_then_check(*tallies):   # called once the stream is through, before outputs are hashed and reported
        streaming_peaks.append(tracemalloc.get_traced_memory()[1])
        check(*tallies)

    monkeypatch.setattr(curate_module, "_check", peak_then_check)
    load_registry(verify=True)   # cached for the process: not part of what is measured
    max_line = max(len(line) for f in data["full"].iterdir() for line in f.read_bytes().splitlines())
    full_bytes = sum(f.stat().st_size for f in data["full"].iterdir())
    half_bytes = sum(f.stat().st_size for f in data["half"].iterdir())
    cfg = curation_config({"name": "mem", "filters": {"leakage": False},
                           "stream": {"expected_rows": N, "stages": ["pretrain"]}})

    def curate(which):
        return stream_curate_sources(cfg, root / f"cur-{which}", [str(data[which])], "pretrain")

    half_peak, _ = peak_bytes(lambda: curate("half"))
    full_peak, report = peak_bytes(lambda: curate("full"))
    dedup = report["dedup"]["pretrain"]
    filters = dedup["text_keys"]["bytes"] + dedup["ids"]["bytes"] + report["dedup"]["finetune"]["text_keys"]["bytes"] \
        + report["dedup"]["finetune"]["ids"]["bytes"]
    assert report["curate"]["rows_in"] == N and report["curate"]["rejected_by_reason"] == {"exact_duplicate": 123}
    # bounded by the data's own sizes: the Bloom filters (sized from expected rows) + a few lines, plus a fixed
    # 3 MiB for the end of the run (sha256 of each output in 1 MiB blocks, provenance's package list); holding
    # the 12k records would take ~5x their 3.3 MB
    assert full_peak <= filters + 64 * max_line + (3 << 20), (full_peak, filters)
    # flat: while streaming, the second half of the data adds (almost) nothing; holding it would add ~5x its bytes
    half_stream, full_stream = streaming_peaks
    assert full_stream <= filters + 64 * max_line + (256 << 10), (full_stream, filters)
    assert full_stream - half_stream <= (full_bytes - half_bytes) / 50, (half_stream, full_stream)
    assert full_peak - half_peak <= (full_bytes - half_bytes) / 5, (half_peak, full_peak)

    config = load_config({"stage": "pretrain", "output_dir": str(root / "run"), "model": {"name_or_path": "unused"},
                          "data": {"streaming": True, "train_file": str(root / "cur-full" / "pretrain")},
                          "train": {"max_steps": 1, "batch_size": GLOBAL_BATCH}})
    rows_out = sum(v["rows"] for k, v in report["outputs"].items() if k.startswith("pretrain/"))
    steps = rows_out // GLOBAL_BATCH - 2

    def feed(n_batches):
        f = StreamFeed.open(config, rank=0, world=1, per_device=GLOBAL_BATCH, gather=lambda o: [o])
        return [len(f.next().texts) for _ in range(n_batches)]

    feed_half, _ = peak_bytes(lambda: feed(steps // 2))
    feed_full, texts = peak_bytes(lambda: feed(steps))
    assert texts == [2 * GLOBAL_BATCH] * steps
    assert feed_full <= (64 << 10) + 16 * GLOBAL_BATCH * max_line, feed_full    # a batch and a line per source
    assert feed_full - feed_half <= (full_bytes - half_bytes) / 50, (feed_half, feed_full)

    # the in-memory reader (its peer) holds every record: its peak grows with the data, far above both
    one_shard = data["full"] / "src0-00000.jsonl"
    memory_peak, (records, _) = peak_bytes(lambda: load_records(one_shard))
    assert len(records) == N // 4 and memory_peak >= one_shard.stat().st_size
    assert memory_peak * 4 > 5 * max(full_peak, feed_full)
