"""One-shot GPU check: bf16 step time, tokens/s, MFU and peak memory of a Qwen2-0.5B-shaped embedding model.

Run on a GPU box (about 5 minutes on one H100/H200; writes ``benchmarks/results/gpu.json``):

    python -m benchmarks.gpu_check                 # the real check (needs CUDA)
    python -m benchmarks.gpu_check --smoke         # tiny shapes on CPU: the same code paths, seconds

What it measures, each on a random-init Qwen2-0.5B-shaped decoder (24 layers, hidden 896, 14 heads, 2 KV heads,
MLP 4864; bidirectional, mean pooling) at sequence length 512, bf16 autocast, gradient checkpointing, AdamW:

1. ``plain``: the fine-tuning step of the paper's setting, 48 queries x (1 positive + 7 hard negatives) per GPU
   (432 sequences), InfoNCE with focal weights, one forward/backward.
2. ``gradcache``: a large contrastive batch at fixed memory, 512 query/positive pairs (1024 sequences) in
   chunks of 64 through :func:`kalm_lib.train.gradcache.grad_cache_step`.
3. ``fsdp2_1proc``: the plain step under FSDP2 in a one-process group, as a ratio to ``plain`` (the cost of
   the sharding wrapper itself). It runs the trainer's path: ``accelerate launch --config_file
   configs/accelerate/fsdp.yaml --num_processes 1`` starts this script again (``--fsdp-part``), whose
   accelerator and prepare are :mod:`kalm_lib.train.engines`' (on CPU, ``--smoke``, that includes the
   trainer's switch from accelerate's DDP fallback to FSDP2, so the rehearsal runs ``fully_shard`` too).

4. ``padding_free``: the same model trained on texts of mixed lengths (uniform in seq/8..seq, 64 per step,
   InfoNCE on 32 pairs), padded (sdpa) against padding-free (:meth:`EmbeddingModel.forward_packed`: the batch's
   real tokens packed in one row, FlashAttention-2 varlen), same batches: real tokens/s of each, their ratio,
   and the largest difference of the two paths' embeddings (bf16). Needs the ``flash_attn`` package; without it
   the part reports why it was skipped. ``--smoke`` runs the packed path through its masked CPU twin.

MFU = model FLOPs / (step time x peak bf16 FLOP/s), model FLOPs = 6 x non-embedding parameters x tokens +
12 x layers x hidden x seq x tokens (attention; PaLM appendix B), recomputation by gradient checkpointing not
counted. Peak FLOP/s is looked up from the device name (dense bf16); unknown devices report ``mfu: null``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kalm_lib import provenance
from kalm_lib.atomic import write_text
from kalm_lib.losses import info_nce
from kalm_lib.model import EmbeddingModel
from kalm_lib.train import engines
from kalm_lib.train.gradcache import Chunk, grad_cache_step

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "gpu.json"
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp.yaml"
# dense bf16 peak FLOP/s by device-name fragment (vendor datasheets, no sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864)
SMOKE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the current GPU, or None when unknown (CPU, unlisted devices)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def build_model(shape: dict, seq: int, device: torch.device) -> EmbeddingModel:
    model = EmbeddingModel.tiny_decoder("qwen2", max_length=seq, seed=0, **shape)
    model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.backbone.config.use_cache = False
    return model.to(device)


def non_embedding_params(model: EmbeddingModel) -> int:
    emb = model.backbone.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def model_flops(model: EmbeddingModel, n_seqs: int, seq: int) -> float:
    cfg = model.backbone.config
    tokens = n_seqs * seq
    return 6 * non_embedding_params(model) * tokens + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq * tokens


def random_features(n: int, seq: int, vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (n, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def plain_step_fn(model, optimizer, device, n_queries: int, n_neg: int, seq: int, gen: torch.Generator,
                  backward=None, update=None):
    """The fine-tuning step: q, pos, n_neg negatives per query in one forward; focal InfoNCE; AdamW.
    ``backward(loss)`` / ``update()``: how the engine back-propagates and steps (default: plain torch)."""
    vocab = model.backbone.config.vocab_size
    backward = backward or (lambda loss: loss.backward())

    def default_update():
        optimizer.step()

    update = update or default_update

    def step() -> float:
        feats = random_features(n_queries * (2 + n_neg), seq, vocab, gen)
        with _autocast(device):
            emb = model({k: v.to(device) for k, v in feats.items()}).float()
        q, pos = emb[:n_queries], emb[n_queries:2 * n_queries]
        neg = emb[2 * n_queries:].view(n_queries, n_neg, -1)
        loss = info_nce(q, pos, neg, temperature=0.01, focal_gamma=0.5)
        backward(loss)
        update()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, n_queries * (2 + n_neg)


def gradcache_step_fn(model, optimizer, device, n_pairs: int, chunk: int, seq: int, gen: torch.Generator):
    """A pre-training step at a large batch: n_pairs (query, positive) pairs, GradCache chunks of ``chunk`` rows."""
    vocab = model.backbone.config.vocab_size

    def forward(features):
        with _autocast(device):
            return model(features).float()

    def step() -> float:
        feats = random_features(2 * n_pairs, seq, vocab, gen)
        chunks = [Chunk(rows=list(range(s, min(s + chunk, 2 * n_pairs))),
                        features={k: v[s:s + chunk] for k, v in feats.items()})
                  for s in range(0, 2 * n_pairs, chunk)]
        loss, _ = grad_cache_step(forward, chunks, device,
                                  loss_fn=lambda reps: (info_nce(reps[:n_pairs], reps[n_pairs:], temperature=0.01), {}),
                                  backward=lambda x: x.backward())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, 2 * n_pairs


def mixed_length_features(n: int, seq: int, vocab: int, pad_id: int, generator: torch.Generator) -> dict:
    """``n`` right-padded random texts of lengths uniform in seq/8..seq (what padding wastes compute on)."""
    lengths = torch.randint(max(1, seq // 8), seq + 1, (n,), generator=generator)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.randint(3, vocab, (n, seq), generator=generator) * mask + pad_id * (1 - mask)
    return {"input_ids": ids, "attention_mask": mask}


def padding_free_step_fn(model, optimizer, device, n_seqs: int, seq: int, gen: torch.Generator, packed: str | None,
                         tokens: list[int]):
    """A step on mixed-length texts: padded (``packed=None``) or packed (``"flash"`` / ``"masked"``); the real
    tokens of each step are appended to ``tokens``."""
    vocab, pad_id = model.backbone.config.vocab_size, model.tokenizer.pad_token_id

    def step() -> float:
        feats = {k: v.to(device) for k, v in mixed_length_features(n_seqs, seq, vocab, pad_id, gen).items()}
        tokens.append(int(feats["attention_mask"].sum()))
        with _autocast(device):
            emb = (model.forward_packed(feats, attention=packed) if packed else model(feats)).float()
        loss = info_nce(emb[:n_seqs // 2], emb[n_seqs // 2:], temperature=0.01)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def run_padding_free(shape: dict, seq: int, device: torch.device, warmup: int, steps: int, smoke: bool) -> dict:
    """Part 4: padded vs padding-free training steps on the same mixed-length batches (same seeds)."""
    from kalm_lib.model import padding_free_unavailable

    packed = "masked" if smoke else "flash"
    if not smoke and padding_free_unavailable() is not None:
        return {"skipped": padding_free_unavailable()}
    n_seqs = 8 if smoke else 64
    out: dict = {"sequences_per_step": n_seqs, "kernel": packed}
    for name in ("padded", "padding_free"):
        model = build_model(shape, seq, device)  # the same seed: the same weights on both sides
        if name == "padding_free" and not smoke:
            assert model.enable_padding_free(), "flash_attn present but padding_free did not turn on"
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        tokens: list[int] = []
        step = padding_free_step_fn(model, optimizer, device, n_seqs, seq, torch.Generator().manual_seed(3),
                                    None if name == "padded" else packed, tokens)
        res = time_steps(step, device, warmup, steps)
        res["real_tokens_per_s"] = statistics.fmean(tokens[warmup:]) / res["step_s_median"]
        res["padding_fraction"] = 1 - statistics.fmean(tokens) / (n_seqs * seq)
        out[name] = res
        del model, optimizer, step
    out["speedup"] = out["padded"]["step_s_median"] / out["padding_free"]["step_s_median"]
    reference = build_model(shape, seq, device).eval()  # fresh weights: both paths on one untrained model
    feats = mixed_length_features(n_seqs, seq, reference.backbone.config.vocab_size,
                                  reference.tokenizer.pad_token_id, torch.Generator().manual_seed(4))
    feats = {k: v.to(device) for k, v in feats.items()}
    with torch.no_grad(), _autocast(device):
        padded = reference(feats).float()
        if not smoke:
            reference.enable_padding_free()
        packed_emb = reference.forward_packed(feats, attention=packed).float()
    out["max_abs_diff_embeddings"] = float((padded - packed_emb).abs().max())
    return out


def time_steps(step, device: torch.device, warmup: int, steps: int) -> dict:
    """Median/min/max seconds per step after ``warmup`` steps, and the peak memory of the timed steps."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"step_s_median": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
            "steps": steps, "warmup": warmup, "peak_mem_gib": peak, "loss_first_last": [losses[0], losses[-1]]}


def summarize(result: dict, flops: float, n_seqs: int, seq: int, peak: float | None) -> dict:
    t = result["step_s_median"]
    result["tokens_per_s"] = n_seqs * seq / t
    result["sequences_per_step"] = n_seqs
    result["model_tflops_per_step"] = flops / 1e12
    result["mfu"] = flops / (t * peak) if peak else None
    return result


def run_fsdp2(shape: dict, seq: int, n_queries: int, n_neg: int, warmup: int, steps: int, smoke: bool) -> dict:
    """The plain step under FSDP2 in a one-process group, through the trainer's engine code: the accelerator
    of :func:`kalm_lib.train.engines.build_accelerator` (from the variables ``accelerate launch`` sets for
    fsdp.yaml), :func:`~kalm_lib.train.engines.prepare`, ``backward`` and ``optimizer_step``."""
    accelerator = engines.build_accelerator("no" if smoke else "bf16")
    model = build_model(shape, seq, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer, scheduler = engines.prepare(accelerator, model, optimizer, scheduler,
                                                  per_device_batch=n_queries, max_grad_norm=1.0)
    gen = torch.Generator().manual_seed(2)
    step, n_seqs = plain_step_fn(
        model, optimizer, accelerator.device, n_queries, n_neg, seq, gen,
        backward=lambda loss: engines.backward(accelerator, model, loss),
        update=lambda: engines.optimizer_step(accelerator, model, optimizer, scheduler, 1.0))
    out = time_steps(step, accelerator.device, warmup, steps)
    out["distributed_type"] = str(accelerator.distributed_type)
    out["engine"] = engines.engine_name(accelerator)
    return out


def launch_fsdp2(smoke: bool, part: Path) -> dict:
    """``accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1`` of this script's
    ``--fsdp-part``, as a user launches the trainer; returns what the part wrote."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--num_processes", "1", "--main_process_port", str(port),
           "--mixed_precision", "no" if smoke else "bf16", "-m", "benchmarks.gpu_check", "--fsdp-part", str(part)]
    subprocess.run(cmd + (["--smoke"] if smoke else []), cwd=REPO, check=True)
    result = json.loads(part.read_text())
    part.unlink()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script, not the GPU)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--skip-fsdp", action="store_true")
    p.add_argument("--fsdp-part", help=argparse.SUPPRESS)  # internal: the FSDP2 part, under accelerate launch
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU box, or --smoke for the CPU rehearsal")
    device = torch.device("cpu" if args.smoke else "cuda")
    shape, seq = (SMOKE, 32) if args.smoke else (QWEN2_05B, 512)
    n_queries, n_neg, n_pairs, chunk = (4, 7, 16, 8) if args.smoke else (48, 7, 512, 64)
    warmup, steps = (1, 2) if args.smoke else (3, 10)
    if args.fsdp_part:
        part = run_fsdp2(shape, seq, n_queries, n_neg, warmup, steps, args.smoke)
        write_text(Path(args.fsdp_part), json.dumps(part, default=str))
        return 0
    peak = peak_flops(device)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "smoke": args.smoke, "seq_len": seq, "shape": shape, "peak_bf16_flops": peak,
                    "torch": torch.__version__, "provenance": provenance.collect(seed=0)}
    torch.manual_seed(0)
    model = build_model(shape, seq, device)
    report["non_embedding_params"] = non_embedding_params(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(1)

    step, n_seqs = plain_step_fn(model, optimizer, device, n_queries, n_neg, seq, gen)
    res = time_steps(step, device, warmup, steps)
    report["plain"] = summarize(res, model_flops(model, n_seqs, seq), n_seqs, seq, peak)
    print("plain", json.dumps(report["plain"], default=str), flush=True)

    step, n_seqs = gradcache_step_fn(model, optimizer, device, n_pairs, chunk, seq, gen)
    res = time_steps(step, device, 1, max(2, steps // 3))
    report["gradcache"] = summarize(res, model_flops(model, n_seqs, seq), n_seqs, seq, peak)
    report["gradcache"]["chunk_rows"] = chunk
    print("gradcache", json.dumps(report["gradcache"], default=str), flush=True)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()

    report["padding_free"] = run_padding_free(shape, seq, device, warmup, steps, args.smoke)
    print("padding_free", json.dumps(report["padding_free"], default=str), flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not args.skip_fsdp:
        res = launch_fsdp2(args.smoke, Path(args.out).with_suffix(".fsdp2.json"))
        n_seqs = n_queries * (2 + n_neg)
        fsdp_model_flops = model_flops(build_model(shape, seq, torch.device("cpu")), n_seqs, seq)
        report["fsdp2_1proc"] = summarize(res, fsdp_model_flops, n_seqs, seq, peak)
        report["fsdp2_1proc"]["step_time_vs_plain"] = res["step_s_median"] / report["plain"]["step_s_median"]
        print("fsdp2_1proc", json.dumps(report["fsdp2_1proc"], default=str), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
