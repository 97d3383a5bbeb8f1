"""Task instructions as prompts: the KaLM query template and the prompt table a saved model carries.

KaLM puts a task instruction in front of queries, ``"Instruct: {instruction} \\n Query: "`` (DESIGN.md §1.1);
documents of retrieval / reranking never get one, and symmetric tasks (STS, pair classification,
summarization) get it on both sides (V2) or none (V1).

A **prompt table** is that policy written out the way sentence-transformers stores prompts
(``config_sentence_transformers.json`` ``"prompts"``) and mteb looks them up for a task: ``<Task>-query`` /
``<Task>-document`` for retrieval and reranking, ``<Task>`` otherwise, then ``<Type>-query`` / ``<Type>``,
then ``query`` / ``document`` (mteb's ``get_prompt_name`` order). Every folder :meth:`EmbeddingModel.save
<kalm_lib.model.EmbeddingModel.save>` writes carries :func:`default_prompt_table`, so stock mteb on
``SentenceTransformer(folder)`` uses the prompts ``kalm eval`` uses.

The instructions themselves are data: an **instruction set** (``configs/eval/instructions/<name>.yaml``,
:func:`load_instruction_set`) names an instruction per mteb task type and per task. This module needs
neither torch nor mteb.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Mapping

from kalm_lib.config import ConfigError, load_config_data

__all__ = ["QUERY_TEMPLATE", "SYMMETRIC_MTEB_TYPES", "ASYMMETRIC_MTEB_TYPES", "DEFAULT_INSTRUCTION_SET",
           "instruction_prompt", "format_query", "InstructionSet", "load_instruction_set", "task_prompt_entries",
           "prompt_table", "default_prompt_table", "policy_prompt_table"]

QUERY_TEMPLATE = "Instruct: {instruction} \n Query: "
# mteb task types whose texts are all of one kind (instruction on both sides or none) and those with a
# query side and a document side (the document side never gets an instruction)
SYMMETRIC_MTEB_TYPES = ("STS", "PairClassification", "Summarization")
ASYMMETRIC_MTEB_TYPES = ("Retrieval", "Reranking")
DEFAULT_INSTRUCTION_SET = "kalm"
Symmetric = Literal["both", "none"]


def instruction_prompt(instruction: str) -> str:
    """The KaLM query prefix for a task instruction: ``"Instruct: {instruction} \\n Query: "``."""
    return QUERY_TEMPLATE.format(instruction=instruction)


def format_query(instruction: str | None, text: str) -> str:
    """A query in the KaLM format, or the bare text when there is no instruction."""
    return instruction_prompt(instruction) + text if instruction else text


@dataclasses.dataclass(frozen=True)
class InstructionSet:
    """Instructions by mteb task type (``types``) and by task name (``tasks``: name -> (type, instruction))."""

    name: str
    types: dict[str, str]
    tasks: dict[str, tuple[str, str]]

    def instruction(self, task_name: str, mteb_type: str) -> str:
        """The task's own instruction, else its type's ("" when neither is known)."""
        if task_name in self.tasks:
            return self.tasks[task_name][1]
        return self.types.get(mteb_type, "")


@functools.lru_cache(maxsize=8)
def load_instruction_set(name: str = DEFAULT_INSTRUCTION_SET) -> InstructionSet:
    """The instruction set ``configs/eval/instructions/<name>.yaml`` (or a YAML path): ``types`` maps an mteb
    task type to an instruction, ``tasks`` maps a type to ``{task name: instruction}``."""
    spec = name if name.endswith((".yaml", ".yml")) else f"instructions/{name}"
    data, where = load_config_data(spec, "eval")
    types, by_type = data.get("types") or {}, data.get("tasks") or {}
    if not isinstance(types, dict) or not isinstance(by_type, dict):
        raise ConfigError(f"{where}: 'types' and 'tasks' must be mappings")
    tasks: dict[str, tuple[str, str]] = {}
    for mteb_type, entries in by_type.items():
        for task, text in (entries or {}).items():
            if task in tasks:
                raise ConfigError(f"{where}: task {task!r} is listed twice ({tasks[task][0]}, {mteb_type})")
            tasks[str(task)] = (str(mteb_type), str(text))
    return InstructionSet(name=name, types={str(k): str(v) for k, v in types.items()}, tasks=tasks)


def task_prompt_entries(key: str, mteb_type: str, instruction: str, *, symmetric: Symmetric = "both") -> dict[str, str]:
    """Prompt-table entries of one task name or task type ``key`` (the keys mteb looks up)."""
    prompt = instruction_prompt(instruction) if instruction else ""
    if mteb_type in ASYMMETRIC_MTEB_TYPES:
        return {f"{key}-query": prompt, f"{key}-document": ""}
    if mteb_type in SYMMETRIC_MTEB_TYPES and symmetric == "none":
        return {key: ""}
    return {key: prompt}


def prompt_table(instructions: InstructionSet, *, symmetric: Symmetric = "both",
                 symmetric_per_task: Mapping[str, Symmetric] | None = None) -> dict[str, str]:
    """The prompt table of an instruction set: ``query``/``document`` (empty), then every type, then every task."""
    per_task = symmetric_per_task or {}
    table = {"query": "", "document": ""}
    for mteb_type, text in instructions.types.items():
        table.update(task_prompt_entries(mteb_type, mteb_type, text, symmetric=symmetric))
    for task, (mteb_type, text) in instructions.tasks.items():
        table.update(task_prompt_entries(task, mteb_type, text, symmetric=per_task.get(task, symmetric)))
    return table


@functools.lru_cache(maxsize=1)
def _default_table() -> tuple[tuple[str, str], ...]:
    return tuple(prompt_table(load_instruction_set()).items())


def default_prompt_table() -> dict[str, str]:
    """The prompt table of the default instruction set with instructions on both sides of symmetric tasks:
    what ``kalm eval`` uses by default and what every saved model carries (a fresh dict each call)."""
    return dict(_default_table())


def policy_prompt_table(policy: Literal["both", "none", "off"]) -> dict[str, str]:
    """The prompt table a model trained under instruction policy ``policy`` (``data.instruction_policy``)
    carries, so that evaluation asks it the way it was trained: "both"/"none" = the default instruction set with
    symmetric tasks on both sides / on neither; "off" = every key of the default table with an empty prompt."""
    if policy == "off":
        return {key: "" for key, _ in _default_table()}
    return prompt_table(load_instruction_set(), symmetric=policy)
