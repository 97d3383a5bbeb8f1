"""The padding-free (packed, FlashAttention-2 varlen) forward of decoders, checked on CPU through its masked twin.

On a GPU the packed row runs through flash_attn's varlen kernels, which keep texts apart by their boundaries;
on CPU the same packed row runs through an explicit block-diagonal mask (``forward_packed(attention="masked")``),
which computes the same attention. These tests hold that twin to the ordinary padded forward: equal embeddings
(atol 1e-5) for mean, last-token and cls pooling, bidirectional and causal, left and right padding, prompts
excluded from pooling; and the packing itself (positions, boundaries) to values written out by hand.
"""

import numpy as np
import pytest
import torch

from kalm_lib.model import EmbeddingModel, pack_features, packed_attention_mask, padding_free_unavailable

TEXTS = ["a somewhat longer text goes here, with several words in it", "short", "hello world, this is a test",
         "数据 and mixed 文本 too"]


def _model(pooling, bidirectional, attn="sdpa", **kw):
    return EmbeddingModel.tiny_decoder("qwen2", pooling=pooling, bidirectional=bidirectional,
                                       attn_implementation=attn, **kw)


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_padded_forward(pooling, bidirectional, attn):
    model = _model(pooling, bidirectional, attn)
    features = model.tokenize(TEXTS)
    assert (features["attention_mask"] == 0).any(), "the batch must contain padding for the test to mean anything"
    with torch.no_grad():
        padded = model(features)
        packed = model.forward_packed(features, attention="masked")
    assert packed.shape == padded.shape == (len(TEXTS), model.embedding_dim)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_packed_forward_equals_padded_with_left_padding_and_prompt_excluded(pooling):
    model = _model(pooling, True, include_prompt=False)
    model.tokenizer.padding_side = "left"
    features = model.tokenize(TEXTS, prompt="Instruct: find it \n Query: ")
    assert features["attention_mask"][:, 0].eq(0).any()  # left padding present
    assert (features["pool_mask"] != features["attention_mask"]).any()  # prompt tokens left out of pooling
    with torch.no_grad():
        torch.testing.assert_close(model.forward_packed(features, attention="masked"), model(features),
                                   atol=1e-5, rtol=0)


def test_packed_forward_has_the_padded_gradients():
    """Training goes through it too: parameter gradients of a loss on the embeddings agree."""
    grads = []
    for packed in (False, True):
        model = _model("mean", True)
        features = model.tokenize(TEXTS)
        emb = model.forward_packed(features, attention="masked") if packed else model(features)
        (emb ** 2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)


def test_leaking_across_texts_would_be_caught():
    """Without the block-diagonal mask the packed texts see each other: the comparison above can fail."""
    model = _model("mean", True)
    features = model.tokenize(TEXTS)
    packed = pack_features(features)
    with torch.no_grad():
        hidden = model.backbone(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                attention_mask=torch.ones_like(packed["input_ids"])).last_hidden_state[0]
        leaky = torch.stack([hidden[packed["segments"] == i].mean(0) for i in range(len(TEXTS))])
        assert (leaky - model(features)).abs().max() > 1e-3


def test_pack_features_by_hand():
    features = {"input_ids": torch.tensor([[5, 6, 7], [8, 0, 0], [0, 9, 10]]),
                "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 1]]),
                "pool_mask": torch.tensor([[0, 1, 1], [1, 0, 0], [0, 1, 1]])}
    packed = pack_features(features)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert packed["segments"].tolist() == [0, 0, 0, 1, 2, 2]
    assert packed["pool_mask"].tolist() == [0, 1, 1, 1, 1, 1]
    assert packed["cu_seq_lens"].tolist() == [0, 3, 4, 6] and packed["cu_seq_lens"].dtype == torch.int32
    assert packed["max_length"] == 3


def test_packed_attention_mask_by_hand():
    segments = torch.tensor([0, 0, 1])
    m = packed_attention_mask(segments, causal=False, dtype=torch.float32)[0, 0]
    assert (m == 0).tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    m = packed_attention_mask(segments, causal=True, dtype=torch.float32)[0, 0]
    assert (m == 0).tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    assert m[0, 1] == torch.finfo(torch.float32).min


@pytest.mark.skipif(padding_free_unavailable() is None, reason="CUDA and flash_attn present: no fallback here")
def test_padding_free_falls_back_without_cuda_or_flash_attn(caplog):
    model = _model("mean", True, padding_free=True)
    assert model.padding_free is False
    assert "padding_free requested but" in caplog.text
    assert model.backbone.config._attn_implementation == "sdpa"


def test_padding_free_refuses_an_encoder():
    with pytest.raises(ValueError, match="encoder family"):
        EmbeddingModel.from_pretrained("minilm", padding_free=True)


def test_forward_packed_rejects_an_unknown_attention():
    model = _model("mean", True)
    with pytest.raises(ValueError, match="'flash' or 'masked'"):
        model.forward_packed(model.tokenize(TEXTS), attention="sdpa")


def test_gpu_check_smoke_measures_padded_against_padding_free(tmp_path):
    """benchmarks/gpu_check.py --smoke runs its padding-free part through the masked twin on CPU: the same batches
    and weights on both sides give the same first loss (bf16 autocast) and nearly the same embeddings."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--skip-fsdp", "--out", str(out)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    part = json.loads(out.read_text())["padding_free"]
    assert part["kernel"] == "masked"
    padded, free = part["padded"], part["padding_free"]
    assert padded["padding_fraction"] == free["padding_fraction"] > 0.2  # the same mixed-length batches
    assert free["loss_first_last"][0] == pytest.approx(padded["loss_first_last"][0], rel=2e-2)
    assert 0 <= part["max_abs_diff_embeddings"] < 0.05 and part["speedup"] > 0


def test_flash_packing_refuses_a_backbone_that_would_ignore_the_text_boundaries():
    model = _model("mean", True)  # sdpa: cu_seq_lens would be dropped and the packed texts would see each other
    with pytest.raises(ValueError, match="needs a flash_attention backbone"):
        model.forward_packed(model.tokenize(TEXTS), attention="flash")


def test_encode_orders_by_token_count_in_blocks_and_returns_input_order():
    """encode batches texts longest-first by token count (counted block by block): results stay in input order."""
    model = EmbeddingModel.tiny_decoder("qwen2", pooling="mean")
    texts = ["x " * n + "end" for n in (3, 40, 1, 17, 9)]
    lengths = model._token_lengths(texts, "", block=2)
    assert lengths.tolist() == [len(model.tokenizer(t)["input_ids"]) for t in texts]
    batched = model.encode(texts, batch_size=2)
    one_by_one = [model.encode(t) for t in texts]
    assert abs(batched - np.stack(one_by_one)).max() < 1e-5


def test_training_config_reaches_the_model(tmp_path):
    """``model.padding_free`` of a stage config is what the trainer's model is built with (CPU: it warns and keeps
    the padded forward, so the flag is off on the built model; an encoder refuses it before any work)."""
    from kalm_lib.config import ConfigError
    from kalm_lib.train import load_config
    from kalm_lib.train.setup import load_model

    config = load_config({"stage": "finetune", "output_dir": str(tmp_path), "data": {"train_file": "x.jsonl"},
                          "model": {"name_or_path": "tiny:qwen2", "max_length": 32, "padding_free": True}})
    assert config.model.padding_free is True
    model = load_model(config.model, seed=0)
    assert model.padding_free is False           # no CUDA / flash_attn here: the documented fallback
    with pytest.raises((ValueError, ConfigError), match="padding_free"):
        load_model(load_config({"stage": "finetune", "output_dir": str(tmp_path), "data": {"train_file": "x.jsonl"},
                                "model": {"name_or_path": "minilm", "padding_free": True}}).model, seed=0)
