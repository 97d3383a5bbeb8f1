"""EmbeddingModel: bidirectionality, pooling, prompts, Matryoshka, encode, save/load round trips, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from kalm_lib.model import EmbeddingModel, format_query, instruction_prompt, pool

ARCHS = ["qwen2", "qwen3", "llama"]
ATTNS = ["sdpa", "eager"]


@pytest.fixture(scope="module")
def minilm():
    return EmbeddingModel.from_pretrained("minilm")


def hidden_states(model, input_ids, attention_mask):
    with torch.no_grad():
        return model.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def test_query_template_is_exact():
    assert instruction_prompt("Find the answer") == "Instruct: Find the answer \n Query: "
    assert format_query("Find the answer", "why?") == "Instruct: Find the answer \n Query: why?"
    assert format_query(None, "why?") == "why?"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ATTNS)
def test_later_token_changes_earlier_state_only_when_bidirectional(arch, attn):
    ids = torch.tensor([[101, 7592, 2088, 2003, 2307, 102], [101, 7592, 2088, 2003, 4937, 102]])
    mask = torch.ones_like(ids)
    for bidirectional in (True, False):
        model = EmbeddingModel.tiny_decoder(arch, attn_implementation=attn, bidirectional=bidirectional)
        assert model.bidirectional is bidirectional
        h = hidden_states(model, ids, mask)
        early_changed = not torch.allclose(h[0, :4], h[1, :4], atol=1e-6)
        assert early_changed is bidirectional, (arch, attn, bidirectional)
        assert not torch.allclose(h[0, 4], h[1, 4])  # the changed token itself always differs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_row_equals_row_alone(arch, attn, side):
    model = EmbeddingModel.tiny_decoder(arch, attn_implementation=attn)
    model.tokenizer.padding_side = side
    texts = ["a short one", "a considerably longer sentence with many more tokens in it"]
    for pooling in ("mean", "last"):
        model.pooling = pooling
        together = model.encode(texts, batch_size=2)
        alone = np.stack([model.encode([t], batch_size=1)[0] for t in texts])
        np.testing.assert_allclose(together, alone, atol=1e-5)


def test_pooling_against_hand_computation():
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert torch.allclose(pool(hidden, right, None, "mean")[0], hidden[0, :3].mean(0))
    assert torch.allclose(pool(hidden, right, None, "last")[0], hidden[0, 2])
    assert torch.allclose(pool(hidden, left, None, "last")[0], hidden[0, 3])
    assert torch.allclose(pool(hidden, left, None, "cls")[0], hidden[0, 1])
    assert torch.allclose(pool(hidden, right, None, "cls")[1], hidden[1, 0])
    pool_mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    assert torch.allclose(pool(hidden, right, pool_mask, "mean")[1], hidden[1, 2:].mean(0))


def test_prompt_tokens_excluded_from_mean_pooling(minilm):
    prompt = instruction_prompt("Retrieve passages")
    minilm.include_prompt = False
    try:
        features = minilm.tokenize(["what is a cat", "dogs"], prompt=prompt)
        n_prompt = len(minilm.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1  # + [CLS]
        expected = features["attention_mask"].clone()
        expected[:, :n_prompt] = 0
        assert torch.equal(features["pool_mask"], expected)
        with torch.no_grad():
            got = minilm(features)
            h = minilm.backbone(input_ids=features["input_ids"],
                                attention_mask=features["attention_mask"]).last_hidden_state
        real = int(features["attention_mask"][1].sum())
        assert torch.allclose(got[1], h[1, n_prompt:real].mean(0), atol=1e-6)
    finally:
        minilm.include_prompt = True


def test_encode_keeps_input_order_and_matryoshka(minilm):
    texts = ["x", "a much longer sentence about the weather today", "medium length text", "yo"]
    batched = minilm.encode(texts, batch_size=2)
    one_by_one = np.stack([minilm.encode(t) for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert batched.dtype == np.float32 and batched.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    raw = minilm.encode(texts, normalize=False)
    small = minilm.encode(texts, dim=64)
    expected = raw[:, :64] / np.linalg.norm(raw[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(small, expected, atol=1e-5)


def test_long_texts_are_truncated_not_rejected(minilm):
    long_text = "word " * 5000
    emb = minilm.encode([long_text])
    assert emb.shape == (1, 384) and np.isfinite(emb).all()
    ids = minilm.tokenize([long_text])["input_ids"]
    assert ids.shape[1] == minilm.max_length


def test_save_then_sentence_transformers_gives_identical_embeddings(minilm, tmp_path):
    minilm.prompts = {"query": instruction_prompt("Retrieve semantically similar text")}
    minilm.include_prompt = False
    try:
        minilm.save(tmp_path / "m")
        st = SentenceTransformer(str(tmp_path / "m"), device="cpu")
        texts = ["A man is playing a guitar.", "The new movie is awesome", "猫坐在垫子上"]
        np.testing.assert_allclose(st.encode(texts, prompt_name="query", convert_to_numpy=True),
                                   minilm.encode(texts, prompt="query"), atol=1e-6)
        np.testing.assert_allclose(st.encode(texts), minilm.encode(texts), atol=1e-6)
        reloaded = EmbeddingModel.from_pretrained(tmp_path / "m")
        assert reloaded.settings() == minilm.settings()
        np.testing.assert_array_equal(reloaded.encode(texts, prompt="query"), minilm.encode(texts, prompt="query"))
    finally:
        minilm.prompts, minilm.include_prompt = {}, True


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_bidirectional_decoder_survives_save_and_sentence_transformers(pooling, tmp_path):
    model = EmbeddingModel.tiny_decoder("qwen2", pooling=pooling)
    model.save(tmp_path / "d")
    texts = ["hello there", "a longer sentence to force padding in the batch"]
    st = SentenceTransformer(str(tmp_path / "d"), device="cpu")
    np.testing.assert_allclose(st.encode(texts), model.encode(texts), atol=1e-5)
    reloaded = EmbeddingModel.from_pretrained(tmp_path / "d")
    assert reloaded.bidirectional and reloaded.pooling == pooling
    np.testing.assert_array_equal(reloaded.encode(texts), model.encode(texts))
    causal = EmbeddingModel.from_pretrained(tmp_path / "d", bidirectional=False)
    assert not causal.bidirectional
    assert not np.allclose(causal.encode(texts), model.encode(texts), atol=1e-4)


def test_embed_is_differentiable_and_unnormalised():
    model = EmbeddingModel.tiny_decoder("llama").train()
    emb = model.embed(["one text", "two texts here"])
    assert emb.requires_grad and emb.shape == (2, 64)
    emb.sum().backward()
    assert model.backbone.embed_tokens.weight.grad is not None
    assert not torch.allclose(emb.norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        np.testing.assert_allclose(F.normalize(emb, dim=-1).numpy(), model.encode(["one text", "two texts here"]),
                                   atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    ([], "empty"), ([""], "texts\\[0\\] is an empty string"), (["ok", 3], "texts\\[1\\] is int"),
    (None, "list of strings"),
])
def test_bad_texts_are_clear_value_errors(minilm, bad, message):
    with pytest.raises(ValueError, match=message):
        minilm.encode(bad)


def test_other_bad_inputs(minilm, tmp_path):
    with pytest.raises(ValueError, match="dim=1000"):
        minilm.encode(["x"], dim=1000)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        EmbeddingModel.from_pretrained("minilm", pooling="max")
    with pytest.raises(ValueError, match="unknown backbone arch 'gpt9'"):
        EmbeddingModel.tiny_decoder("gpt9")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EmbeddingModel.from_pretrained(tmp_path / "nowhere")
