"""The distillation teacher is scored with ITS OWN settings (issue 13.6).

A hub teacher such as gte-Qwen2-1.5B-instruct embeds with last-token pooling, causal attention and its own query
format. Here a tiny teacher is laid out in a local Hugging Face cache exactly as the hub writes it (a
sentence-transformers folder, no kalm_config.json, no ``is_causal`` in config.json) and addressed by its hub id;
the trainer's distill stage scores the candidates with it, and the cached scores are compared with
sentence-transformers' own encoding of the same folder (an independent implementation of pooling and attention).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from kalm_lib.model import KALM_CONFIG, EmbeddingModel
from kalm_lib.train import load_config, train

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GTE_QUERY = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "
WORDS = "apple river stone cloud music green train paper light window orange garden".split()


def hub_teacher(cache: Path, repo_id: str, *, query_prompt: str | None) -> Path:
    """A tiny decoder saved as the hub holds a sentence-transformers embedding model like gte-Qwen2: last-token
    pooling, causal (config.json without is_causal), optionally its own ``query`` prompt; returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    EmbeddingModel.tiny_decoder("qwen2", hidden_size=32, bidirectional=False, pooling="last", seed=7,
                                max_length=64).save(snapshot)
    (snapshot / KALM_CONFIG).unlink()
    st = json.loads((snapshot / "config_sentence_transformers.json").read_text())
    st["prompts"] = {"query": query_prompt} if query_prompt else {}
    (snapshot / "config_sentence_transformers.json").write_text(json.dumps(st))
    cfg = json.loads((snapshot / "config.json").read_text())
    cfg.pop("is_causal", None)
    (snapshot / "config.json").write_text(json.dumps(cfg))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def records(path: Path, instruction: str) -> Path:
    rows = []
    for i in range(16):
        a, b, c, d = (WORDS[(i + k) % len(WORDS)] for k in (0, 3, 5, 8))
        rows.append({"id": f"r{i}", "query": f"{a} {b} question {i}", "pos": [f"{a} {b} answer {c}"],
                     "neg": [f"{c} {d} other {i}", f"{d} unrelated {b}"], "task_type": "retrieval",
                     "instruction": instruction, "lang": "en", "source": "toy"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def distill(tmp_path: Path, teacher: str, data: Path) -> Path:
    """One step of the trainer's distill stage with ``teacher``; the teacher-score cache it wrote."""
    student = tmp_path / "student"
    EmbeddingModel.tiny_decoder("qwen2", seed=1, max_length=64).save(student)
    config = load_config({
        "stage": "distill", "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(student), "max_length": 64},
        "loss": {"temperature": 0.05, "num_hard_negatives": 2, "distill_weight_cl": 0.3, "distill_weight_kl": 0.7},
        "distill": {"teacher": teacher, "teacher_batch_size": 5},
        "data": {"train_file": str(data)},
        "train": {"seed": 0, "max_steps": 1, "batch_size": 4, "lr": 1e-3},
        "log": {"progress_bar": False}})
    train(config)
    [cache] = sorted((tmp_path / "out" / "teacher_cache").glob("teacher_scores-*.npz"))
    return cache


def expected_scores(snapshot: Path, rows: list[dict], query_text) -> np.ndarray:
    """Cosine scores of every record's candidates (positives, then negatives) by sentence-transformers."""
    st = SentenceTransformer(str(snapshot), device="cpu")
    st.max_seq_length = 64
    out = []
    for r in rows:
        q = st.encode([query_text(r)], normalize_embeddings=True)
        c = st.encode(r["pos"] + r["neg"], normalize_embeddings=True)
        out.extend((c @ q[0]).tolist())
    return np.asarray(out, dtype=np.float32)


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("KALM_ONLINE", raising=False)
    return cache


def test_a_hub_teacher_loads_with_its_own_pooling_attention_and_prompt(hub):
    hub_teacher(hub, "org/tiny-gte", query_prompt=GTE_QUERY)
    teacher = EmbeddingModel.from_pretrained("org/tiny-gte")
    assert (teacher.pooling, teacher.bidirectional) == ("last", False)   # not the KaLM mean + bidirectional
    assert teacher.prompts == {"query": GTE_QUERY}


def test_teacher_scores_use_the_teachers_pooling_and_attention(hub, tmp_path):
    """Records without instructions: the teacher's scores are exactly sentence-transformers' on its folder."""
    snapshot = hub_teacher(hub, "org/tiny-st-teacher", query_prompt=None)
    data = records(tmp_path / "data.jsonl", instruction="")
    z = np.load(distill(tmp_path, "org/tiny-st-teacher", data))
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    want = expected_scores(snapshot, rows, lambda r: r["query"])
    np.testing.assert_allclose(z["scores"], want, atol=2e-5)
    # the same tiny weights read as the KaLM default (bidirectional, mean pooling) give other scores
    kalm_view = EmbeddingModel.from_pretrained(snapshot, bidirectional=True, pooling="mean")
    q = kalm_view.encode([rows[0]["query"]])
    c = kalm_view.encode(rows[0]["pos"] + rows[0]["neg"])
    assert not np.allclose(c @ q[0], want[:3], atol=1e-3)


def test_teacher_queries_use_the_teachers_own_format(hub, tmp_path):
    """gte-Qwen2-style teacher: a record's instruction goes into the teacher's own template
    ``Instruct: {instruction}\\nQuery: {query}`` (not the KaLM ``Instruct: {instruction} \\n Query: ``)."""
    snapshot = hub_teacher(hub, "org/tiny-gte", query_prompt=GTE_QUERY)
    instruction = "Given a claim, retrieve documents that support it"
    data = records(tmp_path / "data.jsonl", instruction=instruction)
    z = np.load(distill(tmp_path, "org/tiny-gte", data))
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    want = expected_scores(snapshot, rows, lambda r: f"Instruct: {instruction}\nQuery: {r['query']}")
    np.testing.assert_allclose(z["scores"], want, atol=2e-5)
