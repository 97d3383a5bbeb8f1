"""The mteb adapter: an :class:`~kalm_lib.model.EmbeddingModel` as mteb's ``EncoderProtocol``.

:class:`MtebEncoder` gives each task and side its prompt in one of two ways:

- a **prompt table** (``prompts=``, e.g. a saved folder's ``config_sentence_transformers.json``): looked up
  exactly as stock mteb looks up a ``SentenceTransformer``'s prompts (mteb's own key validation and
  ``get_prompt_name`` order), so ``kalm eval`` on a folder and ``mteb.evaluate(SentenceTransformer(folder))``
  use the same prompts;
- the **instruction policy** (:class:`InstructionConfig`, DESIGN.md §1.1): the KaLM template with the task's
  instruction from the config, the instruction set (``configs/eval/instructions/``), the task's own metadata
  or its type; query vs document side; symmetric tasks on both sides or none.

Model name, checkpoint revision and a Matryoshka dim go into mteb's ``ModelMeta``; every prompt used is kept in
:attr:`MtebEncoder.prompts_used` (written into the run settings by :func:`kalm_lib.evaluation.evaluate_encoder`).
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from typing import Any, Literal

import numpy as np

from kalm_lib.evaluation.vocabulary import mteb_type_of, task_type_of
from kalm_lib.prompts import DEFAULT_INSTRUCTION_SET, load_instruction_set, task_prompt_entries

__all__ = ["InstructionConfig", "MtebEncoder"]


@dataclasses.dataclass
class InstructionConfig:
    """How task instructions become prompts (DESIGN.md §1.1).

    ``enabled``: "on" applies this policy; "off" no prompts; "auto" uses the model's own prompts — a saved
    folder's prompt table (what stock mteb would use: every folder this workbench saves carries the KaLM table,
    all-MiniLM-L6-v2 carries none, a hub model its own) — and for a model object or a folder of ours without a
    table, this policy.
    ``instruction_set``: name of ``configs/eval/instructions/<name>.yaml`` (per task and per type; the KaLM
    set by default), or "" for none.
    ``symmetric``: for STS / pair classification / summarization put the instruction on "both" sides (V2
    paper) or "none" (V1 evaluation); ``symmetric_per_task`` overrides it per task name.
    ``per_type`` (our task types, e.g. "retrieval") / ``per_task`` override the instruction text.
    Asymmetric tasks (retrieval, reranking) never instruct the document side.
    """

    enabled: Literal["auto", "on", "off"] = "auto"
    instruction_set: str = DEFAULT_INSTRUCTION_SET
    symmetric: Literal["both", "none"] = "both"
    symmetric_per_task: dict[str, Literal["both", "none"]] = dataclasses.field(default_factory=dict)
    per_type: dict[str, str] = dataclasses.field(default_factory=dict)
    per_task: dict[str, str] = dataclasses.field(default_factory=dict)


def _own_instruction(task_prompt: Any, side: str | None) -> str:
    """The instruction a task's mteb metadata carries (a string, or per side)."""
    if isinstance(task_prompt, str):
        return task_prompt
    if isinstance(task_prompt, dict):
        return task_prompt.get(side or "query") or task_prompt.get("query") or ""
    return ""


class MtebEncoder:
    """mteb ``EncoderProtocol`` adapter for :class:`~kalm_lib.model.EmbeddingModel` (see the module docstring).

    ``prompts``: a prompt table to resolve as stock mteb does (takes precedence); otherwise, with
    ``use_instructions``, the ``instructions`` policy; otherwise no prompts.
    """

    def __init__(self, model, *, name: str, revision: str, instructions: InstructionConfig | None = None,
                 use_instructions: bool = True, prompts: dict[str, str] | None = None, dim: int | None = None,
                 batch_size: int = 32, config_hash: str | None = None):
        self.model = model
        self.name = name
        self.revision = revision
        self.instructions = instructions or InstructionConfig()
        self.prompts = dict(prompts) if prompts is not None else None
        self.use_instructions = any(self.prompts.values()) if self.prompts is not None else use_instructions
        self.dim = dim
        self.batch_size = batch_size
        self.config_hash = config_hash
        self.show_progress: bool | None = False   # per-batch bars inside a task (evaluate_encoder sets it)
        self.prompts_used: dict[str, dict[str, str]] = {}
        self._meta = None
        self._valid_prompts: dict[str, str] | None = None

    # -- prompts ---------------------------------------------------------------------------------------
    def instruction_for(self, task_name: str, task_type: str, task_prompt: Any = None, side: str | None = None) -> str:
        """The policy's instruction text for a task (before the KaLM template): ``per_task`` > the instruction
        set's task > the task's own mteb prompt > ``per_type`` > the instruction set's type."""
        ins = self.instructions
        iset = load_instruction_set(ins.instruction_set) if ins.instruction_set else None
        our_type = task_type_of(task_type)
        if task_name in ins.per_task:
            return ins.per_task[task_name]
        if iset is not None and task_name in iset.tasks:
            return iset.tasks[task_name][1]
        own = _own_instruction(task_prompt, side)
        if own:
            return own
        if our_type in ins.per_type:
            return ins.per_type[our_type]
        return iset.types.get(mteb_type_of(task_type), "") if iset is not None else ""

    def prompt_for(self, task_name: str, task_type: str, side: str | None, task_prompt: Any = None) -> str:
        """Raw prefix for texts of ``task_name`` (our or mteb's task type) on ``side`` ("query", "document" or
        None for tasks without sides)."""
        mteb_type = mteb_type_of(task_type)
        if self.prompts is not None:
            return self._table_prompt(task_name, mteb_type, side)
        if not self.use_instructions:
            return ""
        instruction = self.instruction_for(task_name, task_type, task_prompt, side)
        symmetric = self.instructions.symmetric_per_task.get(task_name, self.instructions.symmetric)
        entries = task_prompt_entries(task_name, mteb_type, instruction, symmetric=symmetric)
        return entries.get(f"{task_name}-{side}", entries.get(task_name, ""))

    def _table_prompt(self, task_name: str, mteb_type: str, side: str | None) -> str:
        """The table's prompt, found with mteb's own functions (key validation, then get_prompt_name)."""
        from mteb.models.abs_encoder import AbsEncoder, get_prompt_name  # mteb: seconds to import
        from mteb.types import PromptType

        if self._valid_prompts is None:  # validated at first use: offline tasks are known to mteb by then
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # mteb warns once per key it drops (an unknown task name)
                valid, _ = AbsEncoder.validate_task_to_prompt_name(self.prompts, raise_for_invalid_keys=False)
            self._valid_prompts = valid or {}
        metadata = types.SimpleNamespace(name=task_name, type=mteb_type)
        key = get_prompt_name(self._valid_prompts, metadata, PromptType(side) if side else None)
        return self._valid_prompts.get(key, "") if key else ""

    # -- EncoderProtocol -------------------------------------------------------------------------------
    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs):
        """Encode an mteb DataLoader of text batches with the task-aware prompt; float32 [n, d]."""
        texts = [text for batch in inputs for text in batch["text"]]
        side = getattr(prompt_type, "value", prompt_type)
        prompt = self.prompt_for(task_metadata.name, task_metadata.type, side, getattr(task_metadata, "prompt", None))
        self.prompts_used.setdefault(task_metadata.name, {})[str(side or "symmetric")] = prompt
        if not texts:
            return np.zeros((0, self.dim or self.model.embedding_dim), dtype=np.float32)
        return self.model.encode(texts, prompt=prompt or None, batch_size=kwargs.get("batch_size", self.batch_size),
                                 dim=self.dim, show_progress=self.show_progress, normalize=True)

    def similarity(self, embeddings1, embeddings2):
        """Cosine similarity matrix (embeddings are L2-normalised, so a dot product)."""
        import torch  # the results / report side of this package never pays for torch

        a = torch.as_tensor(np.asarray(embeddings1, dtype=np.float32))
        b = torch.as_tensor(np.asarray(embeddings2, dtype=np.float32))
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T

    def similarity_pairwise(self, embeddings1, embeddings2):
        """Row-wise cosine similarity."""
        import torch  # see similarity

        a = torch.as_tensor(np.asarray(embeddings1, dtype=np.float32))
        b = torch.as_tensor(np.asarray(embeddings2, dtype=np.float32))
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)

    @property
    def mteb_model_meta(self):
        """mteb ModelMeta: name, revision, size, dims, max tokens. ``experiment_kwargs`` = the hash of what
        changes the embeddings (model settings, prompts) and the Matryoshka dim: it keys reuse in a shared mteb
        cache; :attr:`results_meta` (written beside the results) leaves it out, so mteb's ResultCache loads
        them with default arguments."""
        if self._meta is None:
            from mteb.models.model_meta import ModelMeta, ScoringFunction  # mteb: seconds to import

            n_params = sum(p.numel() for p in self.model.parameters())
            self._meta = ModelMeta.create_empty({
                "name": self.name, "revision": self.revision, "n_parameters": n_params,
                "embed_dim": self.dim or self.model.embedding_dim, "max_tokens": self.model.max_length,
                "similarity_fn_name": ScoringFunction.COSINE, "use_instructions": self.use_instructions,
                "framework": ["PyTorch", "Sentence Transformers"], "open_weights": True,
                "experiment_kwargs": {"config_hash": self.config_hash, "dim": self.dim},
            })
        return self._meta

    @property
    def results_meta(self):
        """:attr:`mteb_model_meta` without ``experiment_kwargs``: the ``model_meta.json`` of a results folder."""
        return self.mteb_model_meta.model_copy(update={"experiment_kwargs": None})
