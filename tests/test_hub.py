"""Models by hub id (local Hugging Face cache laid out as the hub writes it), online mode, the bidirectional probe.

No network: the "hub" is a folder ``models--org--name/{refs/main, snapshots/<commit>/}`` under ``HF_HUB_CACHE``,
and online mode is checked against a local HTTP server standing in for the hub endpoint.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import transformers
from sentence_transformers import SentenceTransformer
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from kalm_lib import evaluation as ev
from kalm_lib import runtime
from kalm_lib.evaluation.cli import cli_main
from kalm_lib.model import (KALM_CONFIG, BidirectionalError, EmbeddingModel, attends_to_later_tokens,
                            instruction_prompt, read_prompt_table, tiny_tokenizer)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OWN_PROMPTS = {"query": "Represent this query: ", "document": "", "STS": "Same meaning as: ",
               "Retrieval-query": "Find passages for: "}


def _as_hub_repo(cache: Path, repo_id: str, model: EmbeddingModel, *, keep_kalm_config: bool) -> Path:
    """Save ``model`` into ``cache`` the way huggingface_hub lays out a downloaded snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    model.save(snapshot)
    if not keep_kalm_config:  # a plain sentence-transformers model on the hub: its settings are the ST files
        (snapshot / KALM_CONFIG).unlink()
        cfg = json.loads((snapshot / "config_sentence_transformers.json").read_text())
        cfg["prompts"] = OWN_PROMPTS
        (snapshot / "config_sentence_transformers.json").write_text(json.dumps(cfg))
        (snapshot / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 77}))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """An HF cache with two repos: a plain sentence-transformers model (last-token pooling, its own prompts and
    max length) and a model saved by this workbench (kalm_config.json, prompts excluded from pooling)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("KALM_ONLINE", raising=False)
    plain = EmbeddingModel.tiny_decoder("qwen2", pooling="last", seed=1)
    _as_hub_repo(cache, "org/tiny-st", plain, keep_kalm_config=False)
    ours = EmbeddingModel.tiny_decoder("llama", pooling="mean", include_prompt=False, max_length=96, seed=2)
    _as_hub_repo(cache, "kalm-test/tiny-kalm", ours, keep_kalm_config=True)
    return {"cache": cache, "plain": plain, "ours": ours}


@pytest.fixture()
def restore_hub_mode(monkeypatch):
    """configure_hub writes the environment and huggingface_hub's constant: put both back after the test."""
    for name in runtime.OFFLINE_ENVS:
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield
    runtime.configure_hub(False)


# ---------------------------------------------------------------------------------------------- hub ids
def test_hub_id_resolves_from_the_cache_with_its_own_settings(hub_cache):
    texts = ["a short one", "a considerably longer sentence with many more tokens in it"]
    st = EmbeddingModel.from_pretrained("org/tiny-st")
    assert (st.pooling, st.max_length) == ("last", 77)                      # its own pooling and max length
    assert st.prompts == OWN_PROMPTS and st.card["base_model"] == "org/tiny-st"
    assert st.bidirectional
    np.testing.assert_allclose(st.encode(texts), hub_cache["plain"].encode(texts), atol=1e-5)

    ours = EmbeddingModel.from_pretrained("kalm-test/tiny-kalm")
    assert (ours.pooling, ours.include_prompt, ours.max_length) == ("mean", False, 96)   # our kalm_config.json
    np.testing.assert_allclose(ours.encode(texts, prompt="query: "), hub_cache["ours"].encode(texts, prompt="query: "),
                               atol=1e-5)


def test_a_sentence_transformers_decoder_keeps_its_own_attention(hub_cache):
    """A hub embedding model whose config does not say is_causal (e.g. a causal last-token embedder) loads as
    SentenceTransformer(folder) loads it; only a bare decoder LLM gets the KaLM default (bidirectional)."""
    snapshot = hub_cache["cache"] / "models--org--tiny-st" / "snapshots" / COMMIT
    config = json.loads((snapshot / "config.json").read_text())
    del config["is_causal"]
    (snapshot / "config.json").write_text(json.dumps(config))
    model = EmbeddingModel.from_pretrained("org/tiny-st")
    assert not model.bidirectional and not attends_to_later_tokens(model.backbone)
    texts = ["a short one", "a considerably longer sentence with many more tokens in it"]
    st = SentenceTransformer(str(snapshot), device="cpu")
    np.testing.assert_allclose(st.encode(texts), model.encode(texts), atol=1e-5)
    bare = snapshot.parent / "bare"   # the same weights without sentence-transformers files: a base LLM
    bare.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (bare / f).write_bytes((snapshot / f).read_bytes())
    assert EmbeddingModel.from_pretrained(bare).bidirectional


def test_resolve_model_by_hub_id_names_the_commit_and_carries_the_folders_prompts(hub_cache):
    loaded = ev.resolve_model("org/tiny-st")
    assert (loaded.name, loaded.revision, loaded.trained_here) == ("org/tiny-st", COMMIT, False)
    assert {k: loaded.prompts[k] for k in OWN_PROMPTS} == OWN_PROMPTS
    pinned = ev.resolve_model(f"org/tiny-st@{COMMIT}")
    assert pinned.revision == COMMIT


def test_kalm_eval_by_hub_id_uses_the_models_own_prompts(hub_cache, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli_main(["org/tiny-st", "--tasks", "KalmDev-STSB-en", "--quick", "--out", str(out), "--device", "cpu",
                     "--set", "quick=true"]) == 0
    record = json.loads((out / ev.RECORDS_DIR / "org__tiny-st" / COMMIT / "kalm_eval.json").read_text())
    # instructions "auto": the folder's prompt table, looked up as mteb does (an STS task -> its "STS" prompt)
    assert record["prompts"]["KalmDev-STSB-en"] == {"symmetric": OWN_PROMPTS["STS"]}
    assert record["prompt_source"] == "model prompt table"
    assert (out / ev.RESULTS_DIR / "org__tiny-st" / COMMIT / "KalmDev-STSB-en.json").is_file()
    err = capsys.readouterr().err
    assert "KalmDev-STSB-en" in err and "1/1" in err           # progress per task on stderr


def test_missing_hub_model_offline_is_a_clear_error(hub_cache, tmp_path, capsys):
    with pytest.raises(runtime.HubModelNotFound, match="hub access is off .*KALM_ONLINE=1"):
        EmbeddingModel.from_pretrained("org/not-cached")
    with pytest.raises(FileNotFoundError, match="does not exist"):   # looks local: never a hub lookup
        EmbeddingModel.from_pretrained("./no/such/folder")
    assert cli_main(["org/not-cached", "--tasks", "KalmDev-STSB-en", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "org/not-cached" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- online mode
def test_configure_hub_decides_once_from_flag_and_environment(restore_hub_mode, monkeypatch):
    monkeypatch.delenv("KALM_ONLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert runtime.configure_hub() is False and not runtime.hub_online()          # default: offline
    assert all(os.environ[n] == "1" for n in runtime.OFFLINE_ENVS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")                                     # the user's own choice
    assert runtime.configure_hub() is True and huggingface_hub.constants.HF_HUB_OFFLINE is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KALM_ONLINE", "1")
    assert runtime.configure_hub() is True and runtime.hub_online()
    assert runtime.configure_hub(False) is False and huggingface_hub.constants.HF_HUB_OFFLINE is True  # flag wins
    monkeypatch.setenv("KALM_ONLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert runtime.configure_hub() is False                                      # KALM_ONLINE=0 forces offline
    assert runtime.configure_hub(True) is True


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_online_mode_is_honoured_when_asked(hub_cache, restore_hub_mode, monkeypatch):
    """Offline, a missing model never reaches the endpoint; online, the lookup goes to the hub (a local stand-in
    recording requests), and a cached model still resolves."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    _Recorder.requests = []
    try:
        runtime.configure_hub(False)
        with pytest.raises(runtime.HubModelNotFound, match="hub access is off"):
            runtime.hub_snapshot("org/not-cached")
        assert _Recorder.requests == []
        monkeypatch.setenv("KALM_ONLINE", "1")
        assert runtime.configure_hub() is True
        with pytest.raises(runtime.HubModelNotFound, match="the hub did not give it"):
            runtime.hub_snapshot("org/not-cached")
        assert any("org/not-cached" in path for path in _Recorder.requests)
        assert runtime.hub_snapshot("org/tiny-st").name == COMMIT   # hub down: the cached snapshot still serves
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------------------- probe
class ToyCausalConfig(transformers.PretrainedConfig):
    """A decoder family whose attention ignores config.is_causal (always causal), like an unported family."""

    model_type = "kalm-test-toycausal"

    def __init__(self, vocab_size=8192, hidden_size=32, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kwargs)


class ToyCausalModel(transformers.PreTrainedModel):
    config_class = ToyCausalConfig
    base_model_prefix = "toy"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        q, k, v = self.qkv(self.embed(input_ids)).chunk(3, dim=-1)
        hidden = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # ignores the config
        return BaseModelOutput(last_hidden_state=hidden)


@pytest.fixture(scope="module")
def toy_family():
    transformers.AutoConfig.register(ToyCausalConfig.model_type, ToyCausalConfig, exist_ok=True)
    transformers.AutoModel.register(ToyCausalConfig, ToyCausalModel, exist_ok=True)


def test_probe_refuses_a_family_that_ignores_is_causal(toy_family, tmp_path):
    tok = tiny_tokenizer()
    ToyCausalModel(ToyCausalConfig(vocab_size=len(tok))).save_pretrained(tmp_path / "toy")
    tok.save_pretrained(tmp_path / "toy")
    with pytest.raises(BidirectionalError, match="kalm-test-toycausal.*ignored config.is_causal"):
        EmbeddingModel.from_pretrained(tmp_path / "toy")                   # bidirectional by default
    causal = EmbeddingModel.from_pretrained(tmp_path / "toy", bidirectional=False, pooling="last")
    assert not attends_to_later_tokens(causal.backbone) and causal.encode("still usable").shape == (32,)


def test_a_family_outside_any_list_becomes_bidirectional_and_is_checked(tmp_path):
    """olmo2 (never in a hard-coded decoder list): switched through config.is_causal and verified by the probe."""
    tok = tiny_tokenizer()
    config = transformers.Olmo2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    transformers.AutoModel.from_config(config).save_pretrained(tmp_path / "olmo2")
    tok.save_pretrained(tmp_path / "olmo2")
    bidi = EmbeddingModel.from_pretrained(tmp_path / "olmo2")
    causal = EmbeddingModel.from_pretrained(tmp_path / "olmo2", bidirectional=False)
    assert bidi.bidirectional and attends_to_later_tokens(bidi.backbone)
    assert not causal.bidirectional and not attends_to_later_tokens(causal.backbone)
    bidi.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["is_causal"] is False
    assert EmbeddingModel.from_pretrained(tmp_path / "saved").bidirectional


# ---------------------------------------------------------------------------------------------- device
def test_device_auto_and_batch_sizes():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.resolve_device("auto") == want and runtime.resolve_device(None) == want
    assert runtime.resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            runtime.resolve_device("cuda")
    assert runtime.batch_size_for("cpu", 32, 256) == 32 and runtime.batch_size_for("cuda", 32, 256) == 256
    cfg = ev.load_eval_config("mteb-eng-v2")
    assert (cfg.device, cfg.batch_size, cfg.gpu_batch_size) == ("auto", 32, 256)


def test_hub_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    assert runtime.hub_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert runtime.hub_cache_dir() == tmp_path / "home" / "hub"


def test_prompt_table_read_keeps_empty_entries(hub_cache):
    snapshot = hub_cache["cache"] / "models--kalm-test--tiny-kalm" / "snapshots" / COMMIT
    table = read_prompt_table(snapshot)
    assert table["KalmDev-CMRC2018-zh-document"] == "" and table["KalmDev-CMRC2018-zh-query"].startswith("Instruct: ")
    assert table["STSB"] == instruction_prompt("Retrieve semantically similar text")
