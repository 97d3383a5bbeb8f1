"""Training throughput and memory of kalm_lib.train against sentence-transformers, measured in the same run.

(a) **Throughput** (pairs/s): this trainer (stage ``pretrain``: InfoNCE, in-batch negatives) against
    ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss`` on the same model (all-MiniLM-L6-v2), the
    same (query, positive) pairs, batch size, max length, learning rate and temperature (MNRL scale 20 =
    tau 0.05), fp32 on CPU. Each side runs in a fresh subprocess, the sides interleaved A/B/A/B over
    ``--rounds`` so load from other processes hits both alike. Each run's first ``--warmup`` steps are not
    timed; every later step is (>= 30 timed steps per side by default). Reported: median pairs/s over all
    timed steps with quartiles and min/max, each round's median and the per-round ratio, the padding waste
    (fraction of pad positions in the batches each side forwards) and the load average before/after each run.
    Where the gain comes from: every text of the batch (queries and positives together) is sorted by token
    length and forwarded in chunks (at most ``--chunk-size`` texts and ``--chunk-tokens`` padded positions) that
    pad only to their own longest text; sentence-transformers pads each column to its longest.
(b) **Peak memory**: GradCache at ``--big-batch`` (chunks of 32 texts) against sentence-transformers'
    ``CachedMultipleNegativesRankingLoss`` (mini-batch 32) at the same batch: absolute peak RSS of each fresh
    subprocess (``ru_maxrss``), and the plain step at batch 32 (kalm chunks of 32 texts; MNRL) for scale.

Usage: ``python -m benchmarks.bench_train [--quick] [--data pretrain.jsonl]``; writes
``benchmarks/results/train.json`` (``train_quick.json`` with ``--quick``: batch 16, max length 128, memory at batch
64 without the batch-32 runs; about 6 minutes on 2 cores) with provenance. Without ``--data`` it curates the cpu-demo pre-training pairs
(no mining needed) into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.ab import compare, load_average, pad_fraction

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# glibc raises its mmap threshold after large frees, so freed activation memory stays in the heap and peak RSS
# then measures the allocator's history rather than live tensors; a fixed threshold (same for every worker,
# both libraries) makes large tensors mmapped and returned on free, so peak RSS follows live memory.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pairs(data: Path, n: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    import random

    random.Random(0).shuffle(rows)  # one random order, shared by both sides
    return [(r["query"], r["pos"][0]) for r in rows[:n]]


# ----------------------------------------------------------------------------------------------- workers
def worker_kalm(args) -> dict:
    import torch  # noqa: F401

    from kalm_lib.train import load_config, train

    n = args.steps * args.batch
    pairs = _pairs(Path(args.data), n)
    tmp = Path(tempfile.mkdtemp(prefix="bench-kalm-"))
    file = tmp / "pairs.jsonl"
    with open(file, "w", encoding="utf-8") as f:
        for i, (q, p) in enumerate(pairs):  # one task, no instruction: the same batches as a random sampler
            f.write(json.dumps({"id": str(i), "query": q, "pos": [p], "neg": [], "task_type": "pretrain",
                                "source": "bench", "instruction": ""}, ensure_ascii=False) + "\n")
    config = load_config({
        "stage": "pretrain", "output_dir": str(tmp / "run"),
        "model": {"name_or_path": "minilm", "max_length": args.max_length},
        "loss": {"temperature": 0.05},
        "data": {"train_file": str(file)},
        "train": {"seed": 0, "max_steps": args.steps, "batch_size": args.batch, "lr": 2e-5, "warmup_ratio": 0.1,
                  "grad_cache": args.grad_cache, "chunk_size": args.chunk_size or None,
                  "chunk_tokens": args.chunk_tokens or None},
        "checkpoint": {"every_steps": 0, "keep_last": 1}, "log": {"progress_bar": False, "every_steps": 1}})
    stamps: list[float] = []
    padding: list[float] = []
    base = {"rss_after_load_mb": None}

    def on_step(metrics):
        stamps.append(time.perf_counter())
        padding.append(metrics["padding_fraction"])  # pad positions / all positions of the step's chunks
        if base["rss_after_load_mb"] is None:
            base["rss_after_load_mb"] = _rss_mb()

    train(config, callbacks=[on_step])
    return _report(stamps, args.batch, base["rss_after_load_mb"], args.warmup, padding)


def worker_st(args) -> dict:
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    from transformers import TrainerCallback

    from kalm_lib.model import minilm_path

    n = args.steps * args.batch
    pairs = _pairs(Path(args.data), n)
    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = args.max_length
    dataset = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
    if args.grad_cache:
        loss = losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=args.chunk_size)
    else:
        loss = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    stamps: list[float] = []
    masks: list = []  # attention masks of the columns collated since the last step
    padding: list[float] = []
    base = {"rss_after_load_mb": None}

    class Stamp(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())
            # accelerate's loader collates one batch ahead, so these masks run a batch early: the mean over
            # the run is unaffected
            padding.append(pad_fraction(masks))
            masks.clear()
            if base["rss_after_load_mb"] is None:
                base["rss_after_load_mb"] = _rss_mb()

    tmp = tempfile.mkdtemp(prefix="bench-st-")
    training_args = SentenceTransformerTrainingArguments(
        output_dir=tmp, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=2e-5,
        warmup_ratio=0.1, save_strategy="no", report_to="none", logging_steps=10_000, seed=0, use_cpu=True,
        dataloader_drop_last=True, disable_tqdm=True, bf16=False, fp16=False)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset, loss=loss,
                                         callbacks=[Stamp()])
    collate = trainer.data_collator.preprocess_fn  # what pads each column: record its masks, change nothing

    def recording(*a, **kw):
        out = collate(*a, **kw)
        masks.append(out["attention_mask"])
        return out

    trainer.data_collator.preprocess_fn = recording
    trainer.train()
    return _report(stamps, args.batch, base["rss_after_load_mb"], args.warmup, padding)


def _report(stamps: list[float], batch: int, rss_after_step1: float | None, warmup: int,
            padding: list[float]) -> dict:
    """Per-step pairs/s of the timed steps (each step's time = its stamp minus the previous one; the first
    ``warmup`` steps untimed), padding waste of the timed steps, peak RSS."""
    warmup = max(1, warmup)  # the first step has no previous stamp
    rates = [batch / (b - a) for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]
    return {"steps": len(stamps), "timed_steps": len(rates), "step_pairs_per_s": rates,
            "pairs_per_s": statistics.median(rates) if rates else None,
            "padding_fraction": statistics.fmean(padding[warmup:]) if padding[warmup:] else None,
            "peak_rss_mb": _peak_mb(), "rss_after_step1_mb": rss_after_step1}


# ----------------------------------------------------------------------------------------------- driver
def _run_worker(kind: str, data: Path, *, steps: int, batch: int, max_length: int, grad_cache: bool = False,
                chunk_size: int | None = None, threads: int = 1, warmup: int = 1, chunk_tokens: int | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), **MALLOC_ENV}
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--worker", kind, "--data", str(data), "--steps",
           str(steps), "--batch", str(batch), "--max-length", str(max_length), "--warmup", str(warmup),
           "--chunk-size", str(chunk_size or 0), "--chunk-tokens", str(chunk_tokens or 0)]
    if grad_cache:
        cmd.append("--grad-cache")
    load_before = load_average()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_average_before"], result["load_average_after"] = load_before, load_average()
    return result


def _default_data() -> Path:
    out = Path(tempfile.mkdtemp(prefix="bench-train-data-"))
    subprocess.run([sys.executable, "-m", "kalm_lib.cli", "curate", "--config", "cpu-demo", "--out", str(out),
                    "--set", "mining.enabled=false"], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return out / "pretrain.jsonl"


def throughput(data: Path, *, steps: int, rounds: int, batch: int, max_length: int, chunk_size: int,
               warmup: int, threads: int, bar, chunk_tokens: int = 0) -> dict:
    """(a): ``rounds`` x (kalm run, sentence-transformers run), each ``steps`` steps of which ``warmup`` untimed."""
    runs: dict[str, list[dict]] = {"kalm": [], "sentence_transformers": []}
    for _ in range(rounds):
        runs["kalm"].append(_run_worker("kalm", data, steps=steps, batch=batch, max_length=max_length,
                                        chunk_size=chunk_size, threads=threads, warmup=warmup,
                                        chunk_tokens=chunk_tokens))
        bar.update(1)
        runs["sentence_transformers"].append(_run_worker("st", data, steps=steps, batch=batch, max_length=max_length,
                                                         threads=threads, warmup=warmup))
        bar.update(1)
    k, s = runs["kalm"], runs["sentence_transformers"]
    cmp = compare([r for run in k for r in run["step_pairs_per_s"]], [r for run in s for r in run["step_pairs_per_s"]],
                  [run["pairs_per_s"] for run in k], [run["pairs_per_s"] for run in s])
    return {"runs": runs, "pairs_per_s": {"kalm": cmp["ours"], "sentence_transformers": cmp["theirs"]},
            "ratio_kalm_over_st": cmp["ratio_of_medians"], "per_round_ratio": cmp["per_round_ratio"],
            "padding_fraction": {name: statistics.fmean(r["padding_fraction"] for r in v) for name, v in runs.items()},
            "target_ratio": 1.5,
            "settings": {"model": "all-MiniLM-L6-v2", "batch": batch, "max_length": max_length, "steps": steps,
                         "warmup_steps": warmup, "rounds": rounds, "kalm_chunk_size": chunk_size,
                         "kalm_chunk_tokens": chunk_tokens or None,
                         "temperature": 0.05, "lr": 2e-5, "threads": threads, "dtype": "fp32"}}


def memory(data: Path, *, big_batch: int, mem_chunk: int, max_length: int, threads: int, bar,
           small: bool = True) -> dict:
    """(b): peak RSS of GradCache vs CachedMNRL at ``big_batch`` (and, with ``small``, the plain steps at
    ``mem_chunk``), each in its own process (peak RSS is per process), two at a time: one kalm and one ST job.
    Two steps each: the second step's peak includes the AdamW state created by the first."""
    from concurrent.futures import ThreadPoolExecutor

    steps = 2
    jobs = {
        "kalm_gradcache_big": ("kalm", dict(steps=steps, batch=big_batch, grad_cache=True, chunk_size=mem_chunk)),
        "st_cached_mnrl_big": ("st", dict(steps=steps, batch=big_batch, grad_cache=True, chunk_size=mem_chunk)),
    }
    if small:
        jobs["kalm_plain_small"] = ("kalm", dict(steps=steps + 1, batch=mem_chunk, chunk_size=mem_chunk))
        jobs["st_mnrl_small"] = ("st", dict(steps=steps + 1, batch=mem_chunk))
    out: dict = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run_worker, kind, data, max_length=max_length, threads=threads, **kw)
                   for name, (kind, kw) in jobs.items()}
        for name, f in futures.items():
            out[name] = f.result()
            for key in ("step_pairs_per_s", "pairs_per_s", "padding_fraction"):
                out[name].pop(key, None)  # two or three steps: no speed or padding measurement
            bar.update(1)
    kb, sb = out["kalm_gradcache_big"]["peak_rss_mb"], out["st_cached_mnrl_big"]["peak_rss_mb"]
    result = {"runs": out,
              "settings": {"big_batch": big_batch, "small_batch": mem_chunk, "gradcache_chunk_texts": mem_chunk,
                           "st_mini_batch_size": mem_chunk, "max_length": max_length, "threads": threads},
              "gradcache_peak_mb": {"kalm": kb, "sentence_transformers": sb},
              "gradcache_peak_ratio_kalm_over_st": kb / sb, "target_ratio_at_most": 1.0}
    if small:
        result["kalm_peak_ratio_big_over_small"] = kb / out["kalm_plain_small"]["peak_rss_mb"]
        result["st_peak_ratio_big_over_small"] = sb / out["st_mnrl_small"]["peak_rss_mb"]
    return result


QUICK = dict(batch=16, max_length=128, steps=16, rounds=2, big_batch=64)   # 2 x 15 timed steps per side
FULL = dict(batch=32, max_length=128, steps=12, rounds=3, big_batch=512)   # 3 x 11 timed steps per side


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="unified-record JSONL of (query, pos) pairs (default: cpu-demo pretrain pairs)")
    parser.add_argument("--quick", action="store_true", help=f"smaller settings {QUICK} (about 5 min on 2 cores)")
    parser.add_argument("--steps", type=int, help=f"steps per run, warm-up included (default {FULL['steps']})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, help=f"A/B rounds (default {FULL['rounds']})")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--chunk-size", type=int, default=16, help="kalm: texts per length-sorted forward (0: one)")
    parser.add_argument("--chunk-tokens", type=int, default=1024,
                        help="kalm: token budget (rows x longest) per forward, with --chunk-size (0: none)")
    parser.add_argument("--big-batch", type=int)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per worker (1: robust on shared cores)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--worker", choices=["kalm", "st"], help=argparse.SUPPRESS)
    parser.add_argument("--grad-cache", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        print(json.dumps((worker_kalm if args.worker == "kalm" else worker_st)(args)))
        return 0
    from kalm_lib import provenance
    from tqdm.auto import tqdm

    data = Path(args.data) if args.data else _default_data()
    result: dict = {"load_average_start": load_average()}
    bar = tqdm(total=(0 if args.skip_throughput else 2 * args.rounds) + (0 if args.skip_memory else 2 if args.quick else 4),
               desc="bench_train", unit="run")
    if not args.skip_throughput:
        result["throughput"] = throughput(data, steps=args.steps, rounds=args.rounds, batch=args.batch,
                                          max_length=args.max_length, chunk_size=args.chunk_size,
                                          warmup=args.warmup, threads=args.threads, bar=bar,
                                          chunk_tokens=args.chunk_tokens)
    if not args.skip_memory:
        result["memory"] = memory(data, big_batch=args.big_batch, mem_chunk=32, max_length=args.max_length,
                                  threads=args.threads, bar=bar, small=not args.quick)
    bar.close()
    result["load_average_end"] = load_average()
    result["provenance"] = provenance.collect(vars(args), seed=0, data_hashes={
        "pairs": str(data), "pairs_sha256": provenance.sha256_file(data)}, benchmark="bench_train")
    out = Path(args.out or RESULTS / ("train_quick.json" if args.quick else "train.json"))
    provenance.write(out, result)  # atomic JSON write
    _print_summary(result, args)
    print(f"wrote {out}")
    return 0


def _print_summary(result: dict, args) -> None:
    t = result.get("throughput")
    if t:
        k, s = t["pairs_per_s"]["kalm"], t["pairs_per_s"]["sentence_transformers"]
        print(f"throughput: kalm {k['median']:.2f} pairs/s (IQR {k['q1']:.2f}-{k['q3']:.2f}, n={k['n']}) vs "
              f"sentence-transformers {s['median']:.2f} (IQR {s['q1']:.2f}-{s['q3']:.2f}, n={s['n']}) -> "
              f"{t['ratio_kalm_over_st']:.2f}x (per-round {t['per_round_ratio']['min']:.2f}-"
              f"{t['per_round_ratio']['max']:.2f}); padding kalm {t['padding_fraction']['kalm']:.1%}, "
              f"ST {t['padding_fraction']['sentence_transformers']:.1%}")
    if "memory" in result:
        m = result["memory"]
        print(f"memory at batch {args.big_batch}: GradCache peak {m['gradcache_peak_mb']['kalm']:.0f} MB vs "
              f"CachedMNRL {m['gradcache_peak_mb']['sentence_transformers']:.0f} MB -> "
              f"{m['gradcache_peak_ratio_kalm_over_st']:.2f}x")
    print(f"load average: start {result['load_average_start']}, end {result['load_average_end']}")


if __name__ == "__main__":
    sys.exit(main())
