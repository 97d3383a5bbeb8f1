"""Encoding throughput of ``EmbeddingModel.encode`` vs ``SentenceTransformer.encode``: same model, same texts.

Both sides load all-MiniLM-L6-v2 from the bundled folder and encode the same real sentences (STS Benchmark
English test, both columns) with the same batch size, max length and L2 normalisation, in the same process,
interleaved A/B/A/B over ``--rounds`` timed rounds per side (after one warm-up each), so load from other processes
hits both alike. Reported: median sentences/s per side with quartiles and min/max over rounds, the ratio of the
medians (``throughput_ratio``; aim >= 1.0) and of each round's pair, the padding waste of each side's batches
(pad positions / all positions, recorded by wrapping each side's tokenizer call during the warm-up), the load
average before and after, and the largest absolute difference between the two embeddings (the same model).

Usage: ``python -m benchmarks.bench_encode [--quick] [--n 1000] [--batch-size 32] [--rounds 30]``; writes
``benchmarks/results/encode.json`` (``encode_quick.json`` with ``--quick``: 256 sentences, about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.ab import compare, load_average, pad_fraction
from kalm_lib import provenance
from kalm_lib.evaluation.tasks import read_pair_score, split_file, split_sha256
from kalm_lib.model import EmbeddingModel, minilm_path

HERE = Path(__file__).resolve().parent


def _texts(n: int) -> list[str]:
    rows = read_pair_score(split_file("stsb-multi-mt", "en_test", "dev-eval"), "csv_pair_score")
    texts = [t for r in rows for t in (r[0], r[1])]
    return texts[:n]


def _recording(obj, name: str, masks: list) -> None:
    """Wrap ``obj.<name>`` (a tokenizer call returning features) so that each batch's attention mask is kept."""
    inner = getattr(obj, name)

    def call(*a, **kw):
        out = inner(*a, **kw)
        masks.append(out["attention_mask"])
        return out

    setattr(obj, name, call)


def run(n: int = 1000, batch_size: int = 32, rounds: int = 30, threads: int | None = None) -> dict:
    """Time both encoders, interleaved; returns the result record (without provenance)."""
    import torch
    from sentence_transformers import SentenceTransformer  # the comparison side only

    if threads:
        torch.set_num_threads(threads)
    load_start = load_average()
    texts = _texts(n)
    ours = EmbeddingModel.from_pretrained("minilm")
    st = SentenceTransformer(minilm_path(), device="cpu")
    st.max_seq_length = ours.max_length  # same truncation on both sides

    def enc_ours():
        return ours.encode(texts, batch_size=batch_size, show_progress=False, normalize=True)

    def enc_st():
        return st.encode(texts, batch_size=batch_size, show_progress_bar=False, normalize_embeddings=True,
                         convert_to_numpy=True)

    masks: dict[str, list] = {"ours": [], "st": []}
    _recording(ours, "tokenize", masks["ours"])
    _recording(st, "preprocess", masks["st"])
    a, b = enc_ours(), enc_st()  # warm-up, padding waste, and the equality check
    del ours.tokenize, st.preprocess  # back to the class methods: the timed rounds run unwrapped
    times: dict[str, list[float]] = {"ours": [], "st": []}
    for _ in range(rounds):  # interleaved A/B/A/B: machine load hits both sides alike
        t0 = time.perf_counter(); enc_ours(); times["ours"].append(time.perf_counter() - t0)  # noqa: E702
        t0 = time.perf_counter(); enc_st(); times["st"].append(time.perf_counter() - t0)  # noqa: E702
    rate = {k: [len(texts) / t for t in v] for k, v in times.items()}
    cmp = compare(rate["ours"], rate["st"], rate["ours"], rate["st"])
    return {
        "texts": len(texts), "batch_size": batch_size, "rounds": rounds, "torch_threads": torch.get_num_threads(),
        "max_length": ours.max_length,
        "sentences_per_s": {"embedding_model": cmp["ours"], "sentence_transformer": cmp["theirs"]},
        "throughput_ratio": cmp["ratio_of_medians"], "per_round_ratio": cmp["per_round_ratio"], "target_ratio": 1.0,
        "padding_fraction": {"embedding_model": pad_fraction(masks["ours"]),
                             "sentence_transformer": pad_fraction(masks["st"])},
        "max_abs_diff": float(np.abs(a - b).max()),
        "load_average_start": load_start, "load_average_end": load_average(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="256 sentences (about a minute on 2 cores)")
    p.add_argument("--n", type=int, default=None, help="sentences per round (default 1000; 256 with --quick)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=30, help="timed rounds per side, after one warm-up")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.n is None:
        args.n = 256 if args.quick else 1000
    out = args.out or str(HERE / "results" / ("encode_quick.json" if args.quick else "encode.json"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = run(args.n, args.batch_size, args.rounds, args.threads)
    record = provenance.collect(vars(args), seed=None, benchmark="encode", result=res,
                                data_hashes={"stsb-multi-mt/en_test": split_sha256("stsb-multi-mt", "en_test")})
    provenance.write(out, record)
    s = res["sentences_per_s"]
    print(f"encode: EmbeddingModel {s['embedding_model']['median']:.1f} sent/s (IQR {s['embedding_model']['q1']:.1f}-"
          f"{s['embedding_model']['q3']:.1f}) vs SentenceTransformer {s['sentence_transformer']['median']:.1f} "
          f"(IQR {s['sentence_transformer']['q1']:.1f}-{s['sentence_transformer']['q3']:.1f}) -> "
          f"{res['throughput_ratio']:.2f}x; padding {res['padding_fraction']['embedding_model']:.1%} vs "
          f"{res['padding_fraction']['sentence_transformer']:.1%}; max abs diff {res['max_abs_diff']:.1e}; "
          f"load {res['load_average_start']} -> {res['load_average_end']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
