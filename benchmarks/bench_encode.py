"""Encoding throughput of ``EmbeddingModel.encode`` vs ``SentenceTransformer.encode``: same model, same texts.

Both sides load all-MiniLM-L6-v2 from the bundled folder, encode the same real sentences (STS Benchmark
English test, both columns) with the same batch size and L2 normalisation, in the same process, interleaved
(min over repeats) so load from other processes hits both alike. The result is a ratio
(``throughput_ratio`` = EmbeddingModel sentences/s ÷ SentenceTransformer sentences/s; aim >= 1.0) plus the
largest absolute difference between the two embeddings (they must be the same model).

Usage: ``python -m benchmarks.bench_encode [--n 1000] [--batch-size 32] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from kalm_lib import provenance
from kalm_lib.evaluation.tasks import read_pair_score, split_file, split_sha256
from kalm_lib.model import EmbeddingModel, minilm_path

HERE = Path(__file__).resolve().parent


def _texts(n: int) -> list[str]:
    rows = read_pair_score(split_file("stsb-multi-mt", "en_test", "dev-eval"), "csv_pair_score")
    texts = [t for r in rows for t in (r[0], r[1])]
    return texts[:n]


def run(n: int = 1000, batch_size: int = 32, repeats: int = 3, threads: int | None = None) -> dict:
    """Time both encoders; returns the result record (without provenance)."""
    import torch
    from sentence_transformers import SentenceTransformer  # the comparison side only

    if threads:
        torch.set_num_threads(threads)
    texts = _texts(n)
    ours = EmbeddingModel.from_pretrained("minilm")
    st = SentenceTransformer(minilm_path(), device="cpu")
    st.max_seq_length = ours.max_length  # same truncation on both sides

    def enc_ours():
        return ours.encode(texts, batch_size=batch_size, show_progress=False, normalize=True)

    def enc_st():
        return st.encode(texts, batch_size=batch_size, show_progress_bar=False, normalize_embeddings=True,
                         convert_to_numpy=True)

    a, b = enc_ours(), enc_st()  # warm-up, and the equality check
    t_ours, t_st = float("inf"), float("inf")
    for _ in range(repeats):  # interleaved: machine load hits both sides alike
        t0 = time.perf_counter(); enc_ours(); t_ours = min(t_ours, time.perf_counter() - t0)
        t0 = time.perf_counter(); enc_st(); t_st = min(t_st, time.perf_counter() - t0)
    return {
        "texts": len(texts), "batch_size": batch_size, "repeats": repeats, "torch_threads": torch.get_num_threads(),
        "max_length": ours.max_length, "embedding_model_s": t_ours, "sentence_transformer_s": t_st,
        "embedding_model_sent_per_s": len(texts) / t_ours, "sentence_transformer_sent_per_s": len(texts) / t_st,
        "throughput_ratio": t_st / t_ours, "max_abs_diff": float(np.abs(a - b).max()),
        "load_average_end": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(HERE / "results" / "encode.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = run(args.n, args.batch_size, args.repeats, args.threads)
    record = provenance.collect(vars(args), seed=None, benchmark="encode", result=res,
                                data_hashes={"stsb-multi-mt/en_test": split_sha256("stsb-multi-mt", "en_test")})
    provenance.write(args.out, record)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
