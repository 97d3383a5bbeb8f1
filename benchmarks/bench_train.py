"""Training throughput and memory of kalm_lib.train against sentence-transformers, measured in the same run.

(a) **Throughput** (pairs/s): this trainer (stage ``pretrain``: InfoNCE, in-batch negatives) against
    ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss`` on the same model (all-MiniLM-L6-v2), the
    same (query, positive) pairs, batch size, max length, learning rate and temperature (MNRL scale 20 =
    tau 0.05), fp32 on CPU. Each side runs in a fresh subprocess, sides interleaved over ``--rounds`` so load
    from other processes hits both alike; the rate is taken between the end of step 1 and the last step
    (warm-up excluded). The ratio is median(kalm) / median(sentence-transformers). Where the gain comes
    from: every text of the batch (queries and positives together) is sorted by token length and forwarded
    in chunks that pad only to their own longest text; sentence-transformers pads each column to its longest.
(b) **Peak memory**: GradCache at batch 512 (chunks of 32 texts) against the plain step at batch 32, next to
    sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (mini-batch 32) at 512 and MNRL at 32.
    Peak RSS of each subprocess (``ru_maxrss``) and its increase over the RSS after loading model + data.

Usage: ``python -m benchmarks.bench_train [--data pretrain.jsonl] [--steps 25] [--rounds 2]``; writes
``benchmarks/results/train.json`` with provenance. Without ``--data`` it curates the cpu-demo pre-training
pairs (no mining needed) into a temporary folder.
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
                  "grad_cache": args.grad_cache, "chunk_size": args.chunk_size},
        "checkpoint": {"every_steps": 0, "keep_last": 1}, "log": {"progress_bar": False}})
    stamps: list[float] = []
    base = {"rss_after_load_mb": None}

    def on_step(metrics):
        stamps.append(time.perf_counter())
        if base["rss_after_load_mb"] is None:
            base["rss_after_load_mb"] = _rss_mb()

    train(config, callbacks=[on_step])
    return _report(stamps, args.batch, base["rss_after_load_mb"])


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
    base = {"rss_after_load_mb": None}

    class Stamp(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())
            if base["rss_after_load_mb"] is None:
                base["rss_after_load_mb"] = _rss_mb()

    tmp = tempfile.mkdtemp(prefix="bench-st-")
    training_args = SentenceTransformerTrainingArguments(
        output_dir=tmp, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=2e-5,
        warmup_ratio=0.1, save_strategy="no", report_to="none", logging_steps=10_000, seed=0, use_cpu=True,
        dataloader_drop_last=True, disable_tqdm=True, bf16=False, fp16=False)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset, loss=loss,
                                         callbacks=[Stamp()])
    trainer.train()
    return _report(stamps, args.batch, base["rss_after_load_mb"])


def _report(stamps: list[float], batch: int, rss_after_step1: float | None) -> dict:
    steps = len(stamps)
    rate = (steps - 1) * batch / (stamps[-1] - stamps[0]) if steps > 1 else None
    return {"steps": steps, "pairs_per_s": rate, "peak_rss_mb": _peak_mb(), "rss_after_step1_mb": rss_after_step1}


# ----------------------------------------------------------------------------------------------- driver
def _run_worker(kind: str, data: Path, *, steps: int, batch: int, max_length: int, grad_cache: bool = False,
                chunk_size: int | None = None, threads: int = 1) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), **MALLOC_ENV}
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--worker", kind, "--data", str(data), "--steps",
           str(steps), "--batch", str(batch), "--max-length", str(max_length)]
    if grad_cache:
        cmd.append("--grad-cache")
    if chunk_size:
        cmd += ["--chunk-size", str(chunk_size)]
    # rss_before: the interpreter + torch + model baseline, measured by a worker that only loads
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _default_data() -> Path:
    out = Path(tempfile.mkdtemp(prefix="bench-train-data-"))
    subprocess.run([sys.executable, "-m", "kalm_lib.cli", "curate", "--config", "cpu-demo", "--out", str(out),
                    "--set", "mining.enabled=false"], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return out / "pretrain.jsonl"


def run(data: Path, *, steps: int, rounds: int, batch: int, max_length: int, chunk_size: int,
        big_batch: int, mem_chunk: int, skip_memory: bool = False, skip_throughput: bool = False,
        threads: int = 1) -> dict:
    from tqdm.auto import tqdm

    throughput: dict[str, list[dict]] = {"kalm": [], "sentence_transformers": []}
    rounds = 0 if skip_throughput else rounds
    bar = tqdm(total=2 * rounds + (0 if skip_memory else 4), desc="bench_train", unit="run")
    result: dict = {}
    for _ in range(rounds):
        throughput["kalm"].append(_run_worker("kalm", data, steps=steps, batch=batch, max_length=max_length,
                                              chunk_size=chunk_size, threads=threads))
        bar.update(1)
        throughput["sentence_transformers"].append(_run_worker("st", data, steps=steps, batch=batch,
                                                               max_length=max_length, threads=threads))
        bar.update(1)
    if rounds:
        med = {k: statistics.median(r["pairs_per_s"] for r in v) for k, v in throughput.items()}
        result["throughput"] = {"runs": throughput, "median_pairs_per_s": med,
                             "ratio_kalm_over_st": med["kalm"] / med["sentence_transformers"],
                             "settings": {"model": "all-MiniLM-L6-v2", "batch": batch, "max_length": max_length,
                                          "steps": steps, "rounds": rounds, "kalm_chunk_size": chunk_size,
                                          "temperature": 0.05, "lr": 2e-5, "threads": threads, "dtype": "fp32"}}
    if not skip_memory:
        mem_steps = 2
        jobs = {  # independent processes (peak RSS is per process): run side by side
            "kalm_gradcache_big": ("kalm", dict(steps=mem_steps, batch=big_batch, grad_cache=True, chunk_size=mem_chunk)),
            "kalm_plain_small": ("kalm", dict(steps=mem_steps + 1, batch=mem_chunk, chunk_size=None)),
            "st_cached_mnrl_big": ("st", dict(steps=mem_steps, batch=big_batch, grad_cache=True, chunk_size=mem_chunk)),
            "st_mnrl_small": ("st", dict(steps=mem_steps + 1, batch=mem_chunk)),
        }
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = {name: pool.submit(_run_worker, kind, data, max_length=max_length, threads=threads, **kw)
                       for name, (kind, kw) in jobs.items()}
            memory = {name: f.result() for name, f in futures.items()}
        bar.update(4)
        baseline = _run_worker_baseline(threads)
        for row in memory.values():
            row["increase_over_loaded_mb"] = row["peak_rss_mb"] - baseline["rss_loaded_mb"]
        k_big, k_small = memory["kalm_gradcache_big"], memory["kalm_plain_small"]
        s_big, s_small = memory["st_cached_mnrl_big"], memory["st_mnrl_small"]
        result["memory"] = {
            "runs": memory, "baseline": baseline,
            "settings": {"big_batch": big_batch, "small_batch": mem_chunk, "gradcache_chunk_texts": mem_chunk,
                         "st_mini_batch_size": mem_chunk, "max_length": max_length},
            "kalm_peak_ratio_big_over_small": k_big["peak_rss_mb"] / k_small["peak_rss_mb"],
            "kalm_increase_ratio_big_over_small": k_big["increase_over_loaded_mb"] / k_small["increase_over_loaded_mb"],
            "st_peak_ratio_big_over_small": s_big["peak_rss_mb"] / s_small["peak_rss_mb"],
            "st_increase_ratio_big_over_small": s_big["increase_over_loaded_mb"] / s_small["increase_over_loaded_mb"],
        }
    bar.close()
    return result


def _run_worker_baseline(threads: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), **MALLOC_ENV}
    code = ("import json, resource; from kalm_lib.model import EmbeddingModel; import sentence_transformers, psutil; "
            "m = EmbeddingModel.from_pretrained('minilm'); m.train(); "
            "print(json.dumps({'rss_loaded_mb': psutil.Process().memory_info().rss / 2**20}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="unified-record JSONL of (query, pos) pairs (default: cpu-demo pretrain pairs)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=16, help="kalm: texts per length-sorted forward")
    parser.add_argument("--big-batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per worker (1: robust on shared cores)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "train.json"))
    parser.add_argument("--worker", choices=["kalm", "st"], help=argparse.SUPPRESS)
    parser.add_argument("--grad-cache", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = (worker_kalm if args.worker == "kalm" else worker_st)(args)
        print(json.dumps(result))
        return 0
    data = Path(args.data) if args.data else _default_data()
    from kalm_lib import provenance

    result = run(data, steps=args.steps, rounds=args.rounds, batch=args.batch, max_length=args.max_length,
                 chunk_size=args.chunk_size, big_batch=args.big_batch, mem_chunk=32, skip_memory=args.skip_memory,
                 skip_throughput=args.skip_throughput,
                 threads=args.threads)
    result["provenance"] = provenance.collect(vars(args), seed=0, data_hashes={
        "pairs": str(data), "pairs_sha256": provenance.sha256_file(data)}, benchmark="bench_train")
    out = Path(args.out)
    provenance.write(out, result)  # atomic JSON write
    t = result.get("throughput")
    if t:
        print(f"throughput: kalm {t['median_pairs_per_s']['kalm']:.1f} pairs/s vs sentence-transformers "
              f"{t['median_pairs_per_s']['sentence_transformers']:.1f} pairs/s -> {t['ratio_kalm_over_st']:.2f}x")
    if "memory" in result:
        m = result["memory"]
        print(f"memory: GradCache batch {args.big_batch} / plain batch 32: peak RSS {m['kalm_peak_ratio_big_over_small']:.2f}x, "
              f"increase over loaded model {m['kalm_increase_ratio_big_over_small']:.2f}x; sentence-transformers "
              f"CachedMNRL {m['st_peak_ratio_big_over_small']:.2f}x / {m['st_increase_ratio_big_over_small']:.2f}x")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
