"""The mteb adapter: an :class:`~kalm_lib.model.EmbeddingModel` as mteb's ``EncoderProtocol``.

:class:`MtebEncoder` adds task-aware KaLM instructions (query vs document side, symmetric tasks on both sides
or none, per task type and per task) and a Matryoshka dim; model name, checkpoint revision and the hash of
everything that changes the embeddings go into mteb's ``ModelMeta``, and every prompt it used is kept in
:attr:`MtebEncoder.prompts_used` (written to ``kalm_eval.json`` by :func:`kalm_lib.evaluation.evaluate_encoder`).
:class:`InstructionConfig` is the policy (DESIGN.md §1.1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from kalm_lib.data.records import SYMMETRIC_TASK_TYPES
from kalm_lib.evaluation.vocabulary import task_type_of

__all__ = ["DEFAULT_TYPE_INSTRUCTIONS", "InstructionConfig", "MtebEncoder"]

# Default instruction per task type, used for tasks that bring none (KaLM / mteb style wording).
DEFAULT_TYPE_INSTRUCTIONS = {
    "sts": "Retrieve semantically similar text.",
    "pair_classification": "Retrieve text that are semantically similar to the given text",
    "classification": "Classify the given text into its category",
    "clustering": "Identify the topic or theme of the given texts",
    "retrieval": "Given a query, retrieve relevant documents that answer the query",
    "reranking": "Given a query, retrieve relevant documents that answer the query",
}
ASYMMETRIC_TASK_TYPES = ("retrieval", "reranking")  # the document side never gets an instruction


@dataclasses.dataclass
class InstructionConfig:
    """How task instructions become prompts (DESIGN.md §1.1).

    ``enabled``: "auto" turns instructions on for models trained by this workbench (a ``kalm_config.json``
    in the folder) and off for plain models such as all-MiniLM-L6-v2, whose public scores used none.
    ``symmetric``: for STS / pair classification put the instruction on "both" sides (V2 paper) or "none"
    (V1 evaluation); ``symmetric_per_task`` overrides it per task name.
    ``per_type`` / ``per_task`` override the instruction text by task type or task name.
    Asymmetric tasks (retrieval, reranking) never instruct the document side.
    """

    enabled: Literal["auto", "on", "off"] = "auto"
    symmetric: Literal["both", "none"] = "both"
    symmetric_per_task: dict[str, Literal["both", "none"]] = dataclasses.field(default_factory=dict)
    per_type: dict[str, str] = dataclasses.field(default_factory=dict)
    per_task: dict[str, str] = dataclasses.field(default_factory=dict)


def _instruction_prompt(instruction: str) -> str:
    # kalm_lib.model imports torch (about a second): the results / report side of this package must not pay
    # for it, so the model module is imported only when a prompt is actually built.
    from kalm_lib.model import instruction_prompt

    return instruction_prompt(instruction)


class MtebEncoder:
    """mteb ``EncoderProtocol`` adapter for :class:`~kalm_lib.model.EmbeddingModel`.

    Prompt choice for a call (task, side): no instruction when instructions are disabled; the document side
    of retrieval/reranking never gets one; symmetric tasks get one on both sides or none (config); everything
    else (queries, classification, clustering texts) gets ``instruction_prompt(instruction)`` where the
    instruction comes from ``per_task`` > the task's own (``TaskMetadata.prompt``) > ``per_type`` > defaults.
    Every prompt used is recorded in :attr:`prompts_used` for provenance.
    """

    def __init__(self, model, *, name: str, revision: str, instructions: InstructionConfig | None = None,
                 use_instructions: bool = True, dim: int | None = None, batch_size: int = 32,
                 config_hash: str | None = None):
        self.model = model
        self.name = name
        self.revision = revision
        self.instructions = instructions or InstructionConfig()
        self.use_instructions = use_instructions
        self.dim = dim
        self.batch_size = batch_size
        self.config_hash = config_hash
        self.prompts_used: dict[str, dict[str, str]] = {}
        self._meta = None

    # -- prompts ---------------------------------------------------------------------------------------
    def instruction_for(self, task_name: str, task_type: str, task_prompt: Any = None) -> str:
        """The instruction text for a task (before the KaLM query template is applied)."""
        ins = self.instructions
        if task_name in ins.per_task:
            return ins.per_task[task_name]
        if isinstance(task_prompt, str) and task_prompt:
            return task_prompt
        if isinstance(task_prompt, dict) and task_prompt.get("query"):
            return task_prompt["query"]
        return ins.per_type.get(task_type, DEFAULT_TYPE_INSTRUCTIONS.get(task_type, ""))

    def prompt_for(self, task_name: str, task_type: str, side: str | None, task_prompt: Any = None) -> str:
        """Raw prefix for texts of ``task_name`` on ``side`` ("query", "document" or None)."""
        if not self.use_instructions:
            return ""
        if task_type in ASYMMETRIC_TASK_TYPES and side == "document":
            return ""
        if task_type in SYMMETRIC_TASK_TYPES:
            mode = self.instructions.symmetric_per_task.get(task_name, self.instructions.symmetric)
            if mode == "none":
                return ""
        instruction = self.instruction_for(task_name, task_type, task_prompt)
        return _instruction_prompt(instruction) if instruction else ""

    # -- EncoderProtocol -------------------------------------------------------------------------------
    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs):
        """Encode an mteb DataLoader of text batches with the task-aware prompt; float32 [n, d]."""
        texts = [text for batch in inputs for text in batch["text"]]
        side = getattr(prompt_type, "value", prompt_type)
        task_type = task_type_of(task_metadata.type)
        prompt = self.prompt_for(task_metadata.name, task_type, side, getattr(task_metadata, "prompt", None))
        self.prompts_used.setdefault(task_metadata.name, {})[str(side or "symmetric")] = prompt
        if not texts:
            return np.zeros((0, self.dim or self.model.embedding_dim), dtype=np.float32)
        return self.model.encode(texts, prompt=prompt or None, batch_size=kwargs.get("batch_size", self.batch_size),
                                 dim=self.dim, show_progress=False, normalize=True)

    def similarity(self, embeddings1, embeddings2):
        """Cosine similarity matrix (embeddings are L2-normalised, so a dot product)."""
        import torch  # only when mteb scores (see _instruction_prompt)

        a = torch.as_tensor(np.asarray(embeddings1, dtype=np.float32))
        b = torch.as_tensor(np.asarray(embeddings2, dtype=np.float32))
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T

    def similarity_pairwise(self, embeddings1, embeddings2):
        """Row-wise cosine similarity."""
        import torch  # only when mteb scores (see _instruction_prompt)

        a = torch.as_tensor(np.asarray(embeddings1, dtype=np.float32))
        b = torch.as_tensor(np.asarray(embeddings2, dtype=np.float32))
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)

    @property
    def mteb_model_meta(self):
        """mteb ModelMeta: name, revision, dims; ``experiment_kwargs`` = hash of everything that changes the
        embeddings (model settings, instruction config) and the Matryoshka dim. The prompts themselves, per
        task and side, are in ``kalm_eval.json`` beside the results."""
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
