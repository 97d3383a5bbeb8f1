"""The engines of configs/accelerate/ on CPU: DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3, each launched the way a
GPU user launches them (``accelerate launch --config_file configs/accelerate/<engine>.yaml``; on CPU the trainer
engages FSDP2/DeepSpeed where accelerate would fall back to DDP, see kalm_lib/train/engines.py).

Every engine run is 2 gloo processes on a tiny random-init Qwen2 with GradCache and a token budget per chunk
(``train.chunk_tokens``), so the two ranks cut different numbers of chunks in some steps (checked here), and is
compared with ONE in-process run of the same config (same global batch):

- loss curve: relative difference <= 1e-5 per step; final weights: |a - b| <= 1e-5 + 1e-4 |b|. What may differ
  is float summation order only (the 2-process gradient is the average of two partial sums, all-reduced or
  reduce-scattered; the loss is computed from all-gathered embeddings). Measured: max abs weight difference
  1.5e-7 (DDP), 2.1e-7 (FSDP2, ZeRO-2), 3.2e-7 (ZeRO-3); loss 3e-7 relative, after 6 AdamW steps at lr 1e-3
  (weights move by ~1e-2), so the tolerance is ~30x what fp32 reordering gives and ~1000x below a real bug
  (one rank's gradient missing or counted twice changes the weights by > 1e-3).
- the folder ``final/`` loads in SentenceTransformer, and its weights are bit-identical to the full weights
  recovered independently from the engine's own shards in ``checkpoint-N/trainer_state/`` (torch DCP for
  FSDP2, DeepSpeed's zero_to_fp32 for ZeRO).

Then: kill -9 of a 2-process FSDP2 run and a resume give bit-identical weights; resuming on another process
count is exact for unsharded checkpoints (DDP -> 1 process) and refused with a one-line error for sharded ones.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kalm_lib.config import ConfigError
from kalm_lib.model import EmbeddingModel
from kalm_lib.train import load_config, train
from kalm_lib.train.data import build_batch, epoch_batches, load_records
from kalm_lib.train.engines import resume_problem
from kalm_lib.train.gradcache import make_chunks, tokenize_unpadded

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
WORDS = ("apple banana cherry dog cat house river mountain blue green red car train plane book music sun moon "
         "star tree stone water fire cloud").split()
# engine -> (configs/accelerate file, the engine name the trainer records)
ENGINES = {"ddp": ("ddp.yaml", "ddp"), "fsdp2": ("fsdp.yaml", "fsdp2"),
           "zero2": ("deepspeed_zero2.yaml", "deepspeed-zero2"), "zero3": ("deepspeed_zero3.yaml", "deepspeed-zero3")}
STEPS, GLOBAL_BATCH, CHUNK_ROWS, CHUNK_TOKENS = 6, 8, 8, 96
RTOL, ATOL, LOSS_RTOL = 1e-4, 1e-5, 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def _records(path: Path, n: int = 48) -> Path:
    """Texts of very different lengths (2 to ~30 tokens), so a token budget cuts ranks into unequal chunks."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            topic = rng.sample(WORDS, 3)
            f.write(json.dumps({
                "id": f"r{i}", "query": " ".join(topic) + f" question {i}",
                "pos": [" ".join(topic) + " answer " + " ".join(rng.choices(WORDS, k=rng.choice([1, 2, 12, 20])))],
                "neg": [" ".join(rng.choices(WORDS, k=rng.choice([2, 15]))) for _ in range(2)],
                "task_type": "retrieval", "category": "retrieval", "instruction": "", "lang": "en",
                "source": "s"}) + "\n")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engines")
    EmbeddingModel.tiny_decoder("qwen2", seed=0, max_length=64).save(root / "tiny")
    _records(root / "data.jsonl")
    config = {
        "stage": "finetune", "output_dir": str(root / "unused"),
        "model": {"name_or_path": str(root / "tiny"), "max_length": 64},
        "loss": {"temperature": 0.05, "num_hard_negatives": 1, "focal_gamma": 0.5},
        "data": {"train_file": str(root / "data.jsonl")},
        "train": {"seed": 0, "max_steps": STEPS, "batch_size": GLOBAL_BATCH, "lr": 1e-3, "grad_cache": True,
                  "chunk_size": CHUNK_ROWS, "chunk_tokens": CHUNK_TOKENS},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "log": {"progress_bar": False},
    }
    (root / "stage.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def reference(work) -> Path:
    """The one-process run (in this process, no engine) every engine is compared with."""
    return train(load_config(work / "stage.yaml", [f"output_dir={work / 'one'}"])).output_dir


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(engine: str, work: Path, out: Path, *overrides: str, processes: int = 2) -> list[str]:
    """The documented command (configs/accelerate/README.md), on CPU: fp32, a free port."""
    return [PY, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" /
            ENGINES[engine][0]), "--num_processes", str(processes), "--main_process_port", str(_free_port()),
            "--mixed_precision", "no", "-m", "kalm_lib.train", "--config", str(work / "stage.yaml"),
            f"output_dir={out}", *overrides]


_RUNS: dict[str, Path] = {}


def engine_run(engine: str, work: Path) -> Path:
    """A finished 2-process run under ``engine`` (once per session: the kill and resume tests reuse it)."""
    if engine not in _RUNS:
        out = work / engine
        done = subprocess.run(launch_cmd(engine, work, out), cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        _RUNS[engine] = out
    return _RUNS[engine]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def weights_from_shards(state_dir: Path, engine: str, scratch: Path) -> dict[str, torch.Tensor]:
    """The full weights rebuilt from what the engine itself saved in trainer_state/ (keys as in the model
    folder, i.e. without the EmbeddingModel's ``backbone.`` prefix)."""
    if engine == "ddp":
        full = load_file(str(state_dir / "model.safetensors"))
    elif engine == "fsdp2":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(state_dir / "pytorch_model_fsdp_0", scratch / "full.pt")
        full = torch.load(scratch / "full.pt", weights_only=True)["model"]  # accelerate saves {"model": ...}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(str(state_dir), tag="pytorch_model")
    return {k.removeprefix("backbone."): v for k, v in full.items()}


# ------------------------------------------------------------------------------------------ the scenario
def test_ranks_cut_different_numbers_of_chunks(work):
    """Not vacuous: with this data and chunk_tokens, the two ranks' halves of some global batches need
    different numbers of forwards (the case where FSDP2/ZeRO collectives stop lining up without padding)."""
    config = load_config(work / "stage.yaml")
    records, _ = load_records(config.data.train_file)
    model = EmbeddingModel.from_pretrained(work / "tiny")
    counts = []
    for idx in epoch_batches(records, GLOBAL_BATCH, seed=0, epoch=0, homogeneous_ratio=1.0)[:STEPS]:
        per_rank = []
        for rank in range(2):
            batch = build_batch(records, idx, config, epoch=0, rank=rank, world=2)
            tokens = tokenize_unpadded(model, batch.texts, batch.prompts)
            per_rank.append(len(make_chunks(tokens, pad_token_id=0, max_rows=CHUNK_ROWS, max_tokens=CHUNK_TOKENS)))
        counts.append(tuple(per_rank))
    assert any(a != b for a, b in counts), counts


# ------------------------------------------------------------------------------------------ 2 processes == 1
@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_equal_one_process_and_save_the_gathered_weights(engine, work, reference, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = engine_run(engine, work)
    final, last = out / "final", out / f"checkpoint-{STEPS}"
    state = json.loads((last / "trainer_state.json").read_text())
    assert (state["engine"], state["world_size"], state["global_batch"]) == (ENGINES[engine][1], 2, GLOBAL_BATCH)
    # the same loss curve and weights as one process on the same global batch
    assert losses(out) == pytest.approx(losses(reference), rel=LOSS_RTOL)
    got, want, start = weights(final), weights(reference / "final"), weights(work / "tiny")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=k)
    assert max(float((want[k] - start[k]).abs().max()) for k in want) > 1e-3  # training really moved them
    # the model folder holds the full weights the engine's own shards hold
    shards = weights_from_shards(last / "trainer_state", engine, tmp_path)
    assert shards.keys() == got.keys() and all(torch.equal(shards[k], got[k]) for k in got)
    # ... and loads in sentence-transformers with the EmbeddingModel's embeddings
    texts = ["apple banana", "a river under the moon"]
    ours = EmbeddingModel.from_pretrained(final).encode(texts)
    st = SentenceTransformer(str(final), device="cpu").encode(texts)
    torch.testing.assert_close(torch.from_numpy(st), torch.from_numpy(ours), rtol=1e-4, atol=1e-5)


def test_plain_step_with_a_token_budget_under_ddp(work):
    """Without GradCache too (one forward per chunk, one backward): ranks with different chunk counts used to
    deadlock in DDP's per-forward buffer broadcast (the trainer turns it off and pads the chunk count)."""
    one = train(load_config(work / "stage.yaml", [f"output_dir={work / 'one-plain'}", "train.grad_cache=false"]))
    out = work / "ddp-plain"
    done = subprocess.run(launch_cmd("ddp", work, out, "train.grad_cache=false"), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert losses(out) == pytest.approx(losses(one.output_dir), rel=LOSS_RTOL)
    got, want = weights(out / "final"), weights(one.final_model)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=k)


# ------------------------------------------------------------------------------------------ kill -9 and resume
@pytest.mark.slow
def test_fsdp2_kill_9_then_resume_is_bit_identical(work):
    """2 FSDP2 processes and their launcher killed at once (SIGKILL to the process group, as a node failure),
    after checkpoint-2 and before the end; the same command resumes. The uninterrupted run is the FSDP2 run
    above (checkpoint.every_steps does not change what is trained; here every step saves, so the kill lands
    mid-run)."""
    straight = engine_run("fsdp2", work)
    out = work / "fsdp2-killed"
    cmd = launch_cmd("fsdp2", work, out, "checkpoint.every_steps=1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-2").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists() and not (out / f"checkpoint-{STEPS}").exists()  # killed mid-run
    done = subprocess.run(launch_cmd("fsdp2", work, out, "checkpoint.every_steps=1"), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((out / "provenance.json").read_text())["resumed_from"]  # it did resume
    a, b = weights(out / "final"), weights(straight / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(out) == losses(straight)


@pytest.mark.slow
def test_deepspeed_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(work):
    """Under ZeRO-2 too, the NaN guard runs before any update (a NaN loss is never back-propagated; DeepSpeed's
    own step skips a non-finite gradient norm) and the run stops with exit code 3, naming step and records."""
    out = work / "zero2-diverged"
    done = subprocess.run(launch_cmd("zero2", work, out, "train.lr=1e30", "train.warmup_ratio=0",
                                     "train.max_steps=20", "checkpoint.every_steps=1", "checkpoint.keep_last=1"),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("kalm train: non-finite")]
    assert said, done.stderr[-4000:]
    failed = int(said[0].split("at step ")[1].split()[0])
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{failed - 1}"]
    assert not (out / "final").exists()


# ------------------------------------------------------------------------------------------ another world size
def _stopped_after_step_4(run: Path, where: Path) -> Path:
    """A copy of a finished run as it was after checkpoint-4 (later checkpoint and final removed)."""
    shutil.copytree(run, where)
    shutil.rmtree(where / f"checkpoint-{STEPS}")
    shutil.rmtree(where / "final")
    return where


def test_resume_on_another_process_count_keeps_the_global_batch_or_stops_clearly(work, reference, tmp_path):
    """Documented (configs/accelerate/README.md): the global batch and the data order do not depend on the
    process count, so an unsharded checkpoint (DDP) resumes on 1 process exactly where 2 left off; a sharded
    one (FSDP2, ZeRO) stops before any work with a one-line error that says how to proceed."""
    ddp = _stopped_after_step_4(engine_run("ddp", work), tmp_path / "ddp")
    result = train(load_config(work / "stage.yaml", [f"output_dir={ddp}"]))   # 1 process now
    assert result.resumed_from == ddp / "checkpoint-4" and result.steps == STEPS
    assert json.loads((ddp / "provenance.json").read_text())["world_size"] == 1
    assert losses(ddp) == pytest.approx(losses(reference), rel=LOSS_RTOL)  # steps 1-4 on 2, 5-6 on 1 process
    got, want = weights(ddp / "final"), weights(reference / "final")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=k)

    zero3 = _stopped_after_step_4(engine_run("zero3", work), tmp_path / "zero3")
    with pytest.raises(ConfigError) as info:
        train(load_config(work / "stage.yaml", [f"output_dir={zero3}"]))
    message = str(info.value)
    assert "\n" not in message
    assert "written by 2 process(es) under deepspeed-zero3" in message and "--num_processes 2" in message
    assert "model.name_or_path=" in message  # the other way on
    assert not (zero3 / "final").exists() and (zero3 / "checkpoint-4" / "trainer_state.json").is_file()


def test_resume_rules_by_engine_and_process_count():
    ddp2 = {"engine": "ddp", "world_size": 2}
    assert resume_problem(ddp2, "ddp", 2, gathered=True) is None
    assert resume_problem(ddp2, "single", 1, gathered=True) is None          # unsharded: any count
    assert resume_problem({"world_size": 1}, "ddp", 4, gathered=True) is None  # older checkpoints: no engine field
    assert "gather_across_devices=false" in resume_problem(ddp2, "single", 1, gathered=False)
    assert "loads only there" in resume_problem({"engine": "fsdp2", "world_size": 2}, "fsdp2", 4, gathered=True)
    assert "loads only there" in resume_problem(ddp2, "deepspeed-zero2", 2, gathered=True)  # another engine
    assert resume_problem({"engine": "deepspeed-zero2", "world_size": 2}, "deepspeed-zero2", 2, gathered=True) is None


# ------------------------------------------------------------------------------------------ the GPU check
def test_gpu_check_smoke_runs_fsdp2_through_the_trainers_engine(tmp_path):
    """benchmarks/gpu_check.py --smoke: its FSDP2 part is `accelerate launch --config_file fsdp.yaml` and the
    trainer's engine code, so on CPU it really runs fully_shard (not accelerate's DDP fallback)."""
    out = tmp_path / "gpu.json"
    done = subprocess.run([PY, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(out)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    fsdp = report["fsdp2_1proc"]
    assert (fsdp["engine"], fsdp["distributed_type"]) == ("fsdp2", "DistributedType.FSDP")
    for part in ("plain", "gradcache", "fsdp2_1proc"):
        assert report[part]["step_s_median"] > 0 and all(map(torch.isfinite, torch.tensor(report[part]["loss_first_last"])))
    assert not list(tmp_path.glob("*.fsdp2.json"))  # the part file is merged and removed
