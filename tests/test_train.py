"""The trainer: objectives, GradCache == plain gradients, 2-process == 1-process, kill -9 / resume, bad input.

Everything runs a tiny random-init Qwen2 decoder (saved once per session, so subprocesses load it fast)
on a small JSONL written here. Torch runs single-threaded: on 2 shared cores, OpenMP threads spinning
against other processes make each op ~100x slower, and one thread also keeps runs comparable bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from kalm_lib import locking
from kalm_lib.config import ConfigError
from kalm_lib.data.records import REJECTION_REASONS
from kalm_lib.model import EmbeddingModel
from kalm_lib.train import DataError, NonFiniteLossError, load_config, make_objective, train
from kalm_lib.train.cli import cli_main
from kalm_lib.train.data import build_batch, epoch_batches, load_records, plan_steps
from kalm_lib.train.config import DataConfig
from kalm_lib.train.gradcache import embed_with_graph, grad_cache_step, make_chunks, padding_chunk, tokenize_unpadded
from kalm_lib.train.setup import LOCK_FILE, enable_gradient_checkpointing

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
WORDS = ("apple banana cherry dog cat house river mountain blue green red car train plane book music sun moon "
         "star tree stone water fire cloud").split()


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def write_records(path: Path, n: int = 64, *, n_neg: int = 4, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            topic = rng.sample(WORDS, 3)
            task = ("retrieval", "classification")[i % 2]
            f.write(json.dumps({
                "id": f"r{i}", "query": " ".join(topic) + f" question {i}",
                "pos": [" ".join(topic) + " answer " + " ".join(rng.sample(WORDS, rng.randint(1, 8)))],
                "neg": [" ".join(rng.sample(WORDS, 5)) for _ in range(n_neg)], "task_type": task,
                "category": task, "instruction": "Find the matching text" if i % 3 else "", "lang": "en",
                "source": f"src-{task}"}) + "\n")
    return path


@pytest.fixture(scope="session")
def teacher_dir(tiny_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "qwen2-wide"
    EmbeddingModel.tiny_decoder("qwen2", seed=1, hidden_size=96, max_length=64).save(path)
    return path


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("data") / "finetune.jsonl")


def stage_config(tiny_dir: Path, data_file: Path, out: Path, **sections) -> dict:
    config = {
        "stage": "finetune", "output_dir": str(out),
        "model": {"name_or_path": str(tiny_dir), "max_length": 64},
        "loss": {"temperature": 0.05, "num_hard_negatives": 3, "focal_gamma": 0.5, "mix_mode": "pairwise",
                 "num_mix": 2, "matryoshka_dims": [64, 32], "matryoshka_weights": [1.0, 0.3]},
        "data": {"train_file": str(data_file), "homogeneous_ratio": 0.75},
        "train": {"seed": 0, "max_steps": 8, "batch_size": 8, "lr": 1e-3, "chunk_size": 16},
        "checkpoint": {"every_steps": 0, "keep_last": 2},
        "log": {"progress_bar": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    return config


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


# ------------------------------------------------------------------------------------------ config errors
def test_config_rejects_unknown_keys_wrong_types_and_bad_combinations(tiny_dir, data_file, tmp_path):
    base = stage_config(tiny_dir, data_file, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['temprature'\]"):
        load_config(base, ["loss.temprature=0.02"])
    with pytest.raises(ConfigError, match=r"config.train.batch_size: expected an integer"):
        load_config(base, ["train.batch_size=big"])
    with pytest.raises(ConfigError, match=r"loss.mix_mode.*'blend'"):
        load_config(base, ["loss.mix_mode=blend"])
    with pytest.raises(ConfigError, match=r"loss.mix_mode: pairwise mixing needs loss.num_hard_negatives >= 2"):
        load_config(base, ["loss.num_hard_negatives=1"])
    with pytest.raises(ConfigError, match=r"loss.matryoshka_weights: has 1 entries for 2 dims"):
        load_config(base, ["loss.matryoshka_weights=[1.0]"])
    with pytest.raises(ConfigError, match=r"distill.teacher"):
        load_config(base, ["loss.distill_weight_kl=0.7"])
    with pytest.raises(ConfigError, match=r"in_batch_by_task.poetry: unknown task type"):
        load_config(base, ["loss.in_batch_by_task.poetry=true"])
    # the ablation switches' spellings are accepted (off -> null)
    config = load_config(base, ["loss.mix_mode=null", "loss.matryoshka_dims=null", "loss.in_batch_by_task.nli=false"])
    assert config.loss.mix_mode is None and config.loss.matryoshka_dims is None
    with pytest.raises(ConfigError, match=r"loss.matryoshka_dims: must be a non-empty list of distinct"):
        load_config(base, ["loss.matryoshka_dims=[32, 32]", "loss.matryoshka_weights=[1, 1]"])
    with pytest.raises(ConfigError, match=r"loss.focal_gamma: must be >= 0"):
        load_config(base, ["loss.focal_gamma=-0.5"])
    # the CLI reports the error and exits 2 before any work
    path = write_yaml(tmp_path / "c.yaml", base)
    assert cli_main(["--config", str(path), "train.lr=fast"]) == 2
    assert not (tmp_path / "run").exists()


def test_in_batch_switch_per_task_type_keeps_the_defaults_under_overrides():
    config = load_config({"data": {"train_file": "x.jsonl"}, "loss": {"in_batch_by_task": {"nli": False}}})
    L = config.loss
    assert [L.in_batch_for(t) for t in ("retrieval", "nli", "classification", "clustering")] == [True, False, False, False]
    L = load_config({"data": {"train_file": "x.jsonl"}, "loss": {"in_batch": False,
                                                                 "in_batch_by_task": {"clustering": True}}}).loss
    assert [L.in_batch_for(t) for t in ("retrieval", "classification", "clustering")] == [False, False, True]


def test_stage_configs_are_found_by_the_one_resolver(tmp_path, monkeypatch):
    by_path = load_config(REPO / "configs" / "train" / "smoke" / "finetune.yaml")
    monkeypatch.chdir(tmp_path)  # a notebook runs from notebooks/: repo-relative paths and names still resolve
    assert load_config("smoke/finetune") == by_path == load_config("configs/train/smoke/finetune.yaml")
    with pytest.raises(FileNotFoundError, match=r"known train configs: .*smoke/finetune"):
        load_config("smoke/finetuned")
    done = subprocess.run([PY, "-m", "kalm_lib.train", "--config", "smoke/pretrain", "--print-config",
                           "train.lr=5e-4"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["train"]["lr"] == 5e-4 and json.loads(done.stdout)["stage"] == "pretrain"


def test_bad_data_fails_before_training(tiny_dir, data_file, tmp_path):
    base = stage_config(tiny_dir, data_file, tmp_path / "run")
    with pytest.raises(DataError, match=r"dataset not found: .*nope.jsonl"):
        train(load_config(base, [f"data.train_file={tmp_path / 'nope.jsonl'}"]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"query": "", "pos": ["x"]}\n{"query": "q", "pos": []}\n\n')
    with pytest.raises(DataError, match=r"no usable records.*rejected_empty_query': 1.*rejected_no_positive': 1"):
        train(load_config(base, [f"data.train_file={empty}"]))
    with pytest.raises(DataError, match=r"global batch of 128 .* larger than the 64 usable records"):
        train(load_config(base, ["train.batch_size=128"]))
    assert not (tmp_path / "run").exists()


def test_batch_size_is_the_global_batch_split_over_the_processes(tiny_dir, data_file):
    config = load_config(stage_config(tiny_dir, data_file, Path("unused"), train={"batch_size": 8, "max_steps": None,
                                                                                  "epochs": 1.0}))
    records, _ = load_records(data_file)
    one, two, four = (plan_steps(records, config, world) for world in (1, 2, 4))
    assert one == (8, 8, 8) and two == (8, 4, 8) and four == (8, 2, 8)   # same global batch and steps
    with pytest.raises(ConfigError, match=r"train.batch_size: the global batch of 8 does not split over 3 "
                                          r"processes; use a multiple of 3 \(e.g. 9\)"):
        plan_steps(records, config, 3)


def test_load_records_counts_rejections(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([
        json.dumps({"query": "q1", "pos": ["p"], "task_type": "retrieval"}),
        "{not json",
        json.dumps({"query": "q2", "pos": ["p"], "task_type": "poetry"}),
        json.dumps({"query": "q3", "pos": ["p"], "neg": [""]}),
    ]) + "\n")
    records, counts = load_records(path)
    assert [r["query"] for r in records] == ["q1"]
    # the reasons of the one record check (kalm_lib.data.records), the same names curation and streaming count
    assert counts == {"rows_in": 4, "kept": 1, "rejected_malformed_json": 1, "rejected_unknown_task_type": 1,
                      "rejected_empty_text": 1}
    assert {k.removeprefix("rejected_") for k in counts if k.startswith("rejected_")} <= set(REJECTION_REASONS)
    assert counts["rows_in"] == counts["kept"] + sum(v for k, v in counts.items() if k.startswith("rejected_"))


# ------------------------------------------------------------------------------------------ batching
def test_batches_are_task_homogeneous_and_deterministic(data_file):
    records, _ = load_records(data_file)
    a = epoch_batches(records, 8, seed=3, epoch=0, homogeneous_ratio=1.0)
    assert a == epoch_batches(records, 8, seed=3, epoch=0, homogeneous_ratio=1.0)
    assert a != epoch_batches(records, 8, seed=3, epoch=1, homogeneous_ratio=1.0)
    assert len(a) == 8 and sorted(i for b in a for i in b) == list(range(64))
    for b in a:
        assert len({records[i]["task_type"] for i in b}) == 1
    mixed = epoch_batches(records, 8, seed=3, epoch=0, homogeneous_ratio=0.5)
    assert any(len({records[i]["task_type"] for i in b}) == 2 for b in mixed)
    assert all(len(set(b)) == 8 for b in mixed)


def test_chunks_keep_every_token_and_the_batch_order():
    tokens = [([1] * n, [1] * n) for n in (5, 1, 9, 3, 7, 2)]
    chunks = make_chunks(tokens, pad_token_id=0, max_rows=2)
    assert [len(c.rows) for c in chunks] == [2, 2, 2]
    assert [c.rows for c in chunks] == [[2, 4], [0, 3], [5, 1]]  # longest first
    assert sum(c.num_tokens for c in chunks) == 27
    assert sum(c.padded_tokens for c in chunks) == 9 * 2 + 5 * 2 + 2 * 2
    budget = make_chunks(tokens, pad_token_id=0, max_tokens=16, padding_side="left")
    assert all(c.padded_tokens <= 16 or len(c.rows) == 1 for c in budget)
    first = budget[0].features
    assert first["attention_mask"][0].tolist() == [1] * 9 and first["input_ids"].shape[1] == 9


# ------------------------------------------------------------------------------------------ objective
@pytest.mark.parametrize("focal", [{}, {"focal_gamma": 0.5}, {"focal_gamma": 0.5, "focal_normalize": True}],
                         ids=["plain", "focal", "focal_normalize"])
def test_per_task_in_batch_switch_matches_independent_formulas(focal):
    """One objective call over a batch mixing task types with and without in-batch negatives equals the
    per-query formulas (and the focal reduction: mean of w * nll, or sum(w * nll) / sum(w) normalised)."""
    torch.manual_seed(0)
    n, m, d = 6, 2, 8
    q, pos, neg = torch.randn(n, d), torch.randn(n, d), torch.randn(n, m, d)
    flags = torch.tensor([True, False, True, False, False, True])
    config = load_config({"data": {"train_file": "x.jsonl"},
                          "loss": {"num_hard_negatives": m, "temperature": 0.1, **focal}})
    loss, details = make_objective(config, step_seed=0)(q, pos, neg, in_batch=flags, teacher=None)
    qn, pn, nn_ = F.normalize(q, dim=-1), F.normalize(pos, dim=-1), F.normalize(neg, dim=-1)
    expected = []
    for i in range(n):
        if flags[i]:  # own positive against every positive and hard negative of the batch
            cands = torch.cat([pn, nn_.reshape(-1, d)])
            target = i
        else:          # own positive and own hard negatives only
            cands = torch.cat([pn[i:i + 1], nn_[i]])
            target = 0
        logits = cands @ qn[i] / 0.1
        expected.append(-(logits[target] - torch.logsumexp(logits, 0)))
    nll = torch.stack(expected)
    w = (1 - torch.exp(-nll)) ** focal.get("focal_gamma", 0.0)
    want = (w * nll).sum() / w.sum() if focal.get("focal_normalize") else (w * nll).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(details["focal_weight_mean"], w.mean(), rtol=1e-5, atol=1e-6)
    assert 0 <= float(details["accuracy"]) <= 1


# ------------------------------------------------------------------------------------------ GradCache
def _batch_features(model, config, data_file):
    records, _ = load_records(data_file)
    batch = build_batch(records, list(range(8)), config, epoch=0, rank=0, world=1)
    tokens = tokenize_unpadded(model, batch.texts, batch.prompts)
    return batch, tokens


@pytest.mark.parametrize("checkpointing", [False, True])
def test_grad_cache_gives_the_plain_gradients_with_dropout(tiny_dir, data_file, checkpointing):
    config = load_config(stage_config(tiny_dir, data_file, Path("unused")))
    model = EmbeddingModel.from_pretrained(tiny_dir).train()
    for module in model.modules():  # turn on attention dropout so the RNG replay matters
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.3
    if checkpointing:
        enable_gradient_checkpointing(model)
    batch, tokens = _batch_features(model, config, data_file)
    chunks = make_chunks(tokens, pad_token_id=model.tokenizer.pad_token_id, max_rows=5)
    assert len(chunks) >= 3
    n, m = batch.local_queries, config.loss.num_hard_negatives
    flags = torch.tensor(batch.in_batch)

    def loss_fn(emb):
        objective = make_objective(config, step_seed=7)
        return objective(emb[:n], emb[n:2 * n], emb[2 * n:].reshape(n, m, -1), in_batch=flags, teacher=None)

    def grads():
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    torch.manual_seed(11)
    plain_loss, _ = loss_fn(embed_with_graph(model, chunks, torch.device("cpu")))
    plain_loss.backward()
    plain, rng_after_plain = grads(), torch.get_rng_state()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    cached_loss, _ = grad_cache_step(model, chunks, torch.device("cpu"), loss_fn, lambda t: t.backward())
    cached = grads()
    torch.testing.assert_close(cached_loss, plain_loss.detach(), rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), rng_after_plain)  # the step consumes the RNG like a plain one
    for k in plain:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)
    # not vacuous: dropout really is on, so a different RNG stream gives different gradients
    model.zero_grad(set_to_none=True)
    torch.manual_seed(12)
    grad_cache_step(model, chunks, torch.device("cpu"), loss_fn, lambda t: t.backward())
    assert any(not torch.allclose(p.grad, plain[k], rtol=1e-4, atol=1e-6) for k, p in model.named_parameters())


def test_padding_chunks_change_neither_the_loss_nor_the_gradients(tiny_dir, data_file):
    """The chunks a process adds so that every process runs as many forwards/backwards as the busiest one."""
    config = load_config(stage_config(tiny_dir, data_file, Path("unused")))
    model = EmbeddingModel.from_pretrained(tiny_dir).train()
    batch, tokens = _batch_features(model, config, data_file)
    chunks = make_chunks(tokens, pad_token_id=model.tokenizer.pad_token_id, max_rows=7)
    padded = chunks + [padding_chunk(model.tokenizer.pad_token_id) for _ in range(2)]
    assert padded[-1].is_padding and padded[-1].num_tokens == 0 and padded[-1].padded_tokens == 0
    n, m = batch.local_queries, config.loss.num_hard_negatives
    flags = torch.tensor(batch.in_batch)

    def loss_fn(emb):
        return make_objective(config, step_seed=7)(emb[:n], emb[n:2 * n], emb[2 * n:].reshape(n, m, -1),
                                                   in_batch=flags, teacher=None)

    def step(cs, cached):
        model.zero_grad(set_to_none=True)
        if cached:
            loss, _ = grad_cache_step(model, cs, torch.device("cpu"), loss_fn, lambda t: t.backward())
        else:
            loss, _ = loss_fn(embed_with_graph(model, cs, torch.device("cpu")))
            loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    for cached in (False, True):
        (a, ga), (b, gb) = step(chunks, cached), step(padded, cached)
        assert torch.equal(a, b) and all(torch.equal(ga[k], gb[k]) for k in ga)


# ------------------------------------------------------------------------------------------ training runs
def test_tiny_run_learns_writes_metrics_provenance_and_loadable_checkpoints(tiny_dir, data_file, tmp_path):
    from sentence_transformers import SentenceTransformer

    config = load_config(stage_config(tiny_dir, data_file, tmp_path / "run", train={"max_steps": 24},
                                      checkpoint={"every_steps": 10, "keep_last": 2}))
    seen = []
    result = train(config, callbacks=[seen.append])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25)) and seen == rows
    first, last = sum(r["loss"] for r in rows[:6]) / 6, sum(r["loss"] for r in rows[-6:]) / 6
    assert last < 0.5 * first, (first, last)
    for key in ("loss", "lr", "focal_weight_mean", "accuracy", "pairs_per_s", "tokens_per_s", "memory_mb"):
        assert rows[-1][key] is not None
    assert [r["lr"] for r in rows[:5]] == pytest.approx([0, 1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3 * 20 / 21])  # warmup 3
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-24"]
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert prov["seed"] == 0 and prov["data"]["train_file_sha256"] and prov["packages"]["torch"]
    assert prov["config"]["loss"]["focal_gamma"] == 0.5 and prov["rows"]["kept"] == 64
    # the final model is a sentence-transformers folder that gives the EmbeddingModel's embeddings
    texts = ["apple banana", "a river under the moon"]
    ours = EmbeddingModel.from_pretrained(result.final_model).encode(texts)
    st = SentenceTransformer(str(result.final_model), device="cpu").encode(texts)
    torch.testing.assert_close(torch.from_numpy(st), torch.from_numpy(ours), rtol=1e-4, atol=1e-5)
    assert torch.equal(weights(result.final_model)["layers.0.mlp.up_proj.weight"],
                       weights(tmp_path / "run" / "checkpoint-24")["layers.0.mlp.up_proj.weight"])


def test_resume_refuses_a_checkpoint_from_another_config(tiny_dir, data_file, tmp_path):
    base = stage_config(tiny_dir, data_file, tmp_path / "run", train={"max_steps": 2})
    train(load_config(base))
    with pytest.raises(ConfigError, match=r"different config \(differs in \['loss.temperature'\]\)"):
        train(load_config(base, ["loss.temperature=0.02"]))
    # output/logging knobs may change on resume; the finished run just comes back
    again = train(load_config(base, ["log.every_steps=5"]))
    assert again.steps == 2 and again.resumed_from.name == "checkpoint-2"


def test_a_second_run_into_the_same_output_folder_is_refused(tiny_dir, data_file, tmp_path):
    """Issue 15: two `kalm train` into one folder cannot both run; the second is refused naming the holder."""
    out = tmp_path / "run"
    config = stage_config(tiny_dir, data_file, out, train={"max_steps": 2})
    path = write_yaml(tmp_path / "c.yaml", config)
    with locking.hold(out / LOCK_FILE, what="training output (the first run)"):
        done = subprocess.run([PY, "-m", "kalm_lib.train", "--config", str(path)], cwd=REPO, env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)
        with pytest.raises(locking.LockHeld, match=rf"in use by another process \(pid {os.getpid()} "):
            train(load_config(config))
    assert done.returncode == 4, done.stderr[-2000:]
    said = [line for line in done.stderr.splitlines() if "kalm train" in line]
    assert len(said) == 1 and f"pid {os.getpid()} on " in said[0], done.stderr[-2000:]
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.jsonl").exists()  # nothing was run
    result = train(load_config(config))  # the lock is free again; the run holds it while it runs, then releases it
    assert result.steps == 2 and not (out / LOCK_FILE).exists()


def test_non_finite_loss_stops_with_step_and_ids_and_keeps_the_good_checkpoint(tiny_dir, data_file, tmp_path):
    config = load_config(stage_config(tiny_dir, data_file, tmp_path / "run", train={"max_steps": 20, "lr": 1e30,
                                                                                    "warmup_ratio": 0.0},
                                      checkpoint={"every_steps": 1, "keep_last": 1}))
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+) .*record ids: \['r\d+'") as info:
        train(config)
    failed = int(str(info.value).split("at step ")[1].split()[0])
    kept = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert [p.name for p in kept] == [f"checkpoint-{failed - 1}"]
    assert all(torch.isfinite(t).all() for t in weights(kept[0]).values())


def test_distillation_caches_teacher_scores_once(tiny_dir, teacher_dir, data_file, tmp_path):
    import numpy as np

    base = stage_config(tiny_dir, data_file, tmp_path / "run", stage="distill", train={"max_steps": 2},
                        loss={"distill_weight_cl": 0.3, "distill_weight_kl": 0.7, "mix_mode": "none"},
                        distill={"teacher": str(teacher_dir), "cache_dir": str(tmp_path / "cache")})
    result = train(load_config(base))
    assert result.metrics["loss_kl"] > 1e-4  # a different (wider) teacher: the KL term is really there
    (cache,) = (tmp_path / "cache").glob("teacher_scores-*.npz")
    z = np.load(cache)
    # the cached scores are the teacher's cosine similarities, computed independently here
    records, _ = load_records(data_file)
    teacher = EmbeddingModel.from_pretrained(teacher_dir, max_length=64)
    row = records[1]
    q = teacher.encode([row["query"]], prompt="Instruct: Find the matching text \n Query: ")[0]
    cands = teacher.encode(row["pos"] + row["neg"])
    np.testing.assert_allclose(z["scores"][z["offsets"][1]:z["offsets"][2]], cands @ q, rtol=1e-4, atol=1e-5)
    stamp = cache.stat().st_mtime_ns
    train(load_config(base, [f"output_dir={tmp_path / 'run2'}"]))
    assert cache.stat().st_mtime_ns == stamp and len(list((tmp_path / "cache").glob("*.npz"))) == 1


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(tiny_dir, data_file, tmp_path):
    """A real subprocess killed with SIGKILL mid-run, restarted with the same command."""
    # 60 steps: on an idle machine a tiny step takes milliseconds, and the kill must land before the end
    config = stage_config(tiny_dir, data_file, tmp_path / "killed", train={"max_steps": 60},
                          checkpoint={"every_steps": 3, "keep_last": 2})
    path = write_yaml(tmp_path / "c.yaml", config)
    cmd = [PY, "-m", "kalm_lib.train", "--config", str(path)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoint-6").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # somewhere after step 6, at any point of a step or a checkpoint write
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final").exists()
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    straight = train(load_config({**config, "output_dir": str(tmp_path / "straight")}))
    a, b = weights(tmp_path / "killed" / "final"), weights(straight.final_model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert losses == [json.loads(x)["loss"] for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_same_global_batch(tiny_dir, data_file, tmp_path):
    """torchrun starts 2 gloo processes (4 queries each of the global 8, GradCache chunks of 5 with DDP no_sync)
    vs 1 process: train.batch_size is the global batch, the same config on any process count."""
    config = stage_config(tiny_dir, data_file, tmp_path / "two", train={"max_steps": 4, "batch_size": 8,
                                                                         "grad_cache": True, "chunk_size": 5})
    path = write_yaml(tmp_path / "c.yaml", config)
    torchrun = str(Path(PY).with_name("torchrun"))
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "kalm_lib.train", "--config",
                           str(path)], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "provenance.json").read_text())["world_size"] == 2
    one = train(load_config(config, [f"output_dir={tmp_path / 'one'}"]))
    a, b = weights(tmp_path / "two" / "final"), weights(one.final_model)
    moved = weights(Path(config["model"]["name_or_path"]))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.allclose(a[k], moved[k]) for k in a)  # training really changed the weights
    two_losses = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one_losses = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert two_losses == pytest.approx(one_losses, rel=1e-4)


def test_every_shipped_stage_config_validates():
    paths = sorted((REPO / "configs" / "train").glob("*/*.yaml"))
    assert {p.parent.name for p in paths} >= {"smoke", "cpu-demo", "gpu-qwen2-0.5b"}
    for path in paths:
        config = load_config(path)
        assert path.stem.split("-")[0] == config.stage, path   # <stage>.yaml or <stage>-<variant>.yaml
    gpu = load_config(REPO / "configs" / "train" / "gpu-qwen2-0.5b" / "finetune.yaml")
    assert (gpu.model.name_or_path, gpu.model.bidirectional, gpu.model.pooling, gpu.model.max_length) == \
        ("Qwen/Qwen2-0.5B", True, "mean", 512)
    assert (gpu.loss.temperature, gpu.loss.num_hard_negatives, gpu.loss.focal_gamma) == (0.01, 7, 0.5)
    assert gpu.loss.matryoshka_dims == [896, 512, 256, 128, 64]
    assert gpu.loss.matryoshka_weights == [1.0, 0.3, 0.2, 0.1, 0.1]
    assert (gpu.train.lr, gpu.train.warmup_ratio, gpu.train.batch_size, gpu.train.mixed_precision,
            gpu.train.gradient_checkpointing) == (1e-5, 0.1, 384, "bf16", True)   # global: 48 per GPU x 8


def test_run_dir_overrides_follow_the_run_directory_contract(tmp_path):
    from kalm_lib.train import run_dir_overrides

    assert run_dir_overrides(tmp_path, "pretrain") == {"output_dir": str(tmp_path / "train" / "pretrain")}
    (tmp_path / "curated").mkdir()
    (tmp_path / "curated" / "finetune.jsonl").write_text("{}\n")
    (tmp_path / "train" / "pretrain" / "final").mkdir(parents=True)
    assert run_dir_overrides(tmp_path, "finetune") == {
        "output_dir": str(tmp_path / "train" / "finetune"),
        "data.train_file": str(tmp_path / "curated" / "finetune.jsonl"),
        "model.name_or_path": str(tmp_path / "train" / "pretrain" / "final")}
    assert "model.name_or_path" not in run_dir_overrides(tmp_path, "finetune", start_from=None)
    assert "model.name_or_path" not in run_dir_overrides(tmp_path, "distill")  # no finetune/final yet


def test_lora_trains_adapters_only_and_saves_merged_weights(tiny_dir, data_file, tmp_path):
    config = load_config(stage_config(tiny_dir, data_file, tmp_path / "run", train={"max_steps": 3},
                                      model={"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}}))
    result = train(config)
    base, tuned = weights(tiny_dir), weights(result.final_model)
    assert base.keys() == tuned.keys()  # merged: a plain backbone folder, no adapter tensors
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all("proj" in k for k in changed)  # only LoRA-targeted projections moved
    assert "embed_tokens.weight" not in changed and not any("norm" in k for k in changed)
    EmbeddingModel.from_pretrained(result.final_model).encode(["still loads"])


def test_bf16_mixed_precision_with_checkpointing_runs_the_gpu_presets_path_on_cpu(tiny_dir, data_file, tmp_path):
    """The GPU preset trains with bf16 autocast + gradient checkpointing; accelerate's CPU autocast runs the same
    code path here: matmuls in bf16, float32 master weights, a finite loss that goes down."""
    config = load_config(stage_config(tiny_dir, data_file, tmp_path / "run",
                                      train={"max_steps": 24, "mixed_precision": "bf16",
                                             "gradient_checkpointing": True}))
    linear_dtypes = set()

    def record(module, _inputs, output):
        if isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor):
            linear_dtypes.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        result = train(config)
    finally:
        handle.remove()
    assert torch.bfloat16 in linear_dtypes   # autocast really ran the projections in bf16
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-6:]) / 6 < 0.7 * sum(losses[:6]) / 6, losses
    saved = weights(result.final_model)
    assert {t.dtype for t in saved.values()} == {torch.float32}   # master weights stay float32
    assert json.loads((tmp_path / "run" / "provenance.json").read_text())["config"]["train"]["mixed_precision"] == "bf16"
    # the same process then trains in fp32 again (accelerate's process-wide state follows each stage's precision)
    linear_dtypes.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        train(load_config(stage_config(tiny_dir, data_file, tmp_path / "fp32", train={"max_steps": 2,
                                                                                     "mixed_precision": "no"})))
    finally:
        handle.remove()
    assert linear_dtypes == {torch.float32}


# ------------------------------------------------------------------------------------------ checkpoints
def test_a_killed_runs_temporaries_are_removed_and_final_is_replaced_whole(tiny_dir, data_file, tmp_path):
    from kalm_lib.train.checkpoint import FINAL_DIR, publish_final, remove_stale_temp

    out = tmp_path / "run"
    train(load_config(stage_config(tiny_dir, data_file, out, train={"max_steps": 2})))
    stale = [out / ".tmp-checkpoint-4", out / ".final.tmp-123-abcd", out / ".checkpoint-2.old-9-ffff",
             out / ".final.old-9-ffff"]
    for folder in stale:
        (folder / "sub").mkdir(parents=True)
    assert sorted(remove_stale_temp(out)) == sorted(stale)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert (out / "checkpoint-2").is_dir() and (out / FINAL_DIR).is_dir()
    # re-publishing replaces the folder as a whole: nothing of the old one survives
    (out / FINAL_DIR / "left-over.txt").write_text("old")
    publish_final(out / "checkpoint-2", out)
    assert not (out / FINAL_DIR / "left-over.txt").exists() and (out / FINAL_DIR / "model.safetensors").is_file()
    assert not (out / FINAL_DIR / "trainer_state").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------------------------------ notebooks
def test_notebook_helpers_plan_train_and_summarise_a_stage(tiny_dir, data_file, tmp_path, monkeypatch, capsys):
    """What notebooks 02/03/03b call: plan (preset + run dir + overrides), train, read the metrics."""
    from kalm_lib.train import plan_stage, read_metrics, loss_figure, run_stage, throughput_table

    monkeypatch.setenv("KALM_HEADLESS", "1")  # no widget: the plain path of a papermill run
    run_dir = tmp_path / "run"
    (run_dir / "curated").mkdir(parents=True)
    (run_dir / "curated" / "finetune.jsonl").write_bytes(data_file.read_bytes())
    plan = plan_stage("finetune", run_dir, preset="smoke", seed=3,
                      overrides=[f"model.name_or_path={tiny_dir}", "train.max_steps=2", "log.progress_bar=false"])
    assert plan.config_path == REPO / "configs" / "train" / "smoke" / "finetune.yaml"
    c = plan.config
    assert (c.output_dir, c.data.train_file, c.train.seed) == (
        str(run_dir / "train" / "finetune"), str(run_dir / "curated" / "finetune.jsonl"), 3)
    assert plan.eval_dir == run_dir / "train" / "finetune" / "eval"
    assert plan.table().loc["config", "finetune"] == "configs/train/smoke/finetune.yaml"
    result = run_stage(plan)
    assert result.steps == 2 and "2 steps -> " in capsys.readouterr().out
    metrics = read_metrics(result.output_dir)
    assert list(metrics["step"]) == [1, 2]
    assert {"pairs_per_s", "tokens_per_s", "memory_mb"} <= set(throughput_table(metrics).columns)
    assert list(loss_figure(metrics).data[0].y) == list(metrics["loss"])


def test_score_change_pairs_tasks_and_averages_per_language():
    import pandas as pd

    from kalm_lib.train import score_change

    rows = [("en", "sts", "A", 50.0, 55.0), ("en", "retrieval", "B", 20.0, 10.0), ("zh", "sts", "C", 30.0, 42.0)]
    before = pd.DataFrame([{"run": "kalm/x-start", "lang": l, "task_type": t, "task": k, "main_score": b}
                           for l, t, k, b, _ in rows])
    after = pd.DataFrame([{"run": "kalm/x", "lang": l, "task_type": t, "task": k, "main_score": a}
                          for l, t, k, _, a in reversed(rows)])  # order does not matter: tasks are matched
    table, by_lang, fig = score_change(before, after)
    assert list(table.columns) == ["kalm/x-start", "kalm/x", "delta"]
    assert table["delta"].to_dict() == {("en", "retrieval", "B"): -10.0, ("en", "sts", "A"): 5.0,
                                        ("zh", "sts", "C"): 12.0}
    assert by_lang["delta"].to_dict() == {"en": -2.5, "zh": 12.0}
    assert sorted(fig.data[0].y) == [-10.0, 5.0] and list(fig.data[1].y) == [12.0]


def test_a_teachers_queries_take_its_own_saved_format(tmp_path):
    """The distillation teacher is asked the way it was trained (issue 13.6): a workbench model the KaLM way,
    a gte/Qwen3-style saved 'Instruct: ...\\nQuery: ' prompt with the record's instruction in its place, any other
    saved query prompt as it is, none: bare text; an explicit template wins."""
    from kalm_lib.model import KALM_CONFIG
    from kalm_lib.train.data import _prompts, teacher_query_format

    def folder(name, query=None, document=None, kalm=False):
        path = tmp_path / name
        EmbeddingModel.tiny_decoder("qwen2", seed=0, max_length=32).save(path)
        if not kalm:
            (path / KALM_CONFIG).unlink()
            st = json.loads((path / "config_sentence_transformers.json").read_text())
            st["prompts"] = {k: v for k, v in (("query", query), ("document", document)) if v}
            (path / "config_sentence_transformers.json").write_text(json.dumps(st))
        return str(path)

    row = {"query": "q", "instruction": "Find the claim's evidence", "task_type": "retrieval"}
    sym = {"query": "q", "instruction": "Same meaning?", "task_type": "sts"}
    bare = {"query": "q", "instruction": "", "task_type": "retrieval"}
    kalm = teacher_query_format(folder("kalm", kalm=True))
    assert kalm.kind == "kalm" and kalm.prompts(row, ["sts"]) == _prompts(row, DataConfig(train_file="x"))
    assert kalm.prompts(sym, ["sts"]) == ("Instruct: Same meaning? \n Query: ",) * 2
    gte = teacher_query_format(folder("gte", query="Instruct: Given a web search query, retrieve passages\nQuery: "))
    assert gte.prompts(row, []) == ("Instruct: Find the claim's evidence\nQuery: ", None)
    assert gte.prompts(bare, [])[0] == "Instruct: Given a web search query, retrieve passages\nQuery: "
    e5 = teacher_query_format(folder("e5", query="query: ", document="passage: "))
    assert (e5.kind, e5.prompts(row, []), e5.prompts(sym, ["sts"])) == \
        ("saved-prompt", ("query: ", "passage: "), ("query: ", "query: "))
    assert teacher_query_format(folder("plain")).prompts(row, []) == (None, None)
    explicit = teacher_query_format(folder("plain2"), "<{instruction}> ")
    assert explicit.prompts(row, [])[0] == "<Find the claim's evidence> "
    with pytest.raises(ConfigError, match="teacher_query_template: needs an {instruction}"):
        load_config({"data": {"train_file": "x.jsonl"}, "distill": {"teacher_query_template": "Query: "}})


def test_label_text_positives_train_on_the_class_text(tiny_dir, tmp_path):
    """data.positives: label_text (KaLM V2's switch): a record with a label gets pos = [its class text] and as
    many negatives from the other classes of its source; records without a label are left as they are."""
    from kalm_lib.train.data import label_text_positives

    rows = [{"id": f"c{i}", "query": f"text {i}", "pos": [f"text {i + 3}"], "neg": ["x", "y", "z"],
             "task_type": "classification", "source": "topics", "label": ("sports", "music", "cars", "food")[i % 4]}
            for i in range(12)]
    rows.append({"id": "q0", "query": "question", "pos": ["answer"], "neg": ["no"], "task_type": "retrieval",
                 "source": "qa"})
    out = label_text_positives(rows, seed=0)
    for before, after in zip(rows[:12], out[:12]):
        assert after["pos"] == [before["label"]] and len(after["neg"]) == 3
        assert set(after["neg"]) <= {"sports", "music", "cars", "food"} - {before["label"]}
        assert len(set(after["neg"])) == 3                        # 3 other classes: each once
    assert out[12] == rows[12] and rows[0]["pos"] == ["text 3"]   # unlabelled unchanged, input not modified
    assert out == label_text_positives(rows, seed=0) and out != label_text_positives(rows, seed=1)
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({**r, "id": f"{r['id']}-{k}"}) + "\n" for k in range(2) for r in rows[:12]))
    config = stage_config(tiny_dir, data, tmp_path / "run", data={"positives": "label_text"},
                          train={"max_steps": 2, "batch_size": 8})
    assert train(load_config(config)).steps == 2
    with pytest.raises(ConfigError, match="data.positives: label_text positives need every class"):
        load_config(config, ["data.streaming=true", f"data.train_files=[{data}]", "data.homogeneous_ratio=1"])
