"""KaLM instruction set (configs/eval/instructions/kalm.yaml), the online MTEB configs, and prompt tables.

Offline: mteb.get_benchmark works from mteb's own metadata, so every task of MTEB(cmn, v1), MTEB(eng, v1) and
MTEB(eng, v2) can be checked without their data.
"""

from __future__ import annotations

import mteb
import pytest
from mteb.models.model_implementations.kalm_models import KaLM_v2_task_prompts

from kalm_lib import evaluation as ev
from kalm_lib.evaluation import tasks as et
from kalm_lib.prompts import (ASYMMETRIC_MTEB_TYPES, default_prompt_table, instruction_prompt, load_instruction_set,
                              prompt_table)

BENCHMARKS = {"mteb-cmn-v1": ("MTEB(cmn, v1)", 31), "mteb-eng-v1": ("MTEB(eng, v1)", 56),
              "mteb-eng-v2": ("MTEB(eng, v2)", 41)}


def _leaf_tasks(benchmark: str) -> list:
    """A benchmark's tasks as the encoder sees them (an aggregate such as CQADupstackRetrieval: its sub-tasks)."""
    out = []
    for task in mteb.get_benchmark(benchmark).tasks:
        subs = getattr(task, "tasks", None)
        out += list(subs) if isinstance(subs, (list, tuple)) else [task]
    return out


@pytest.mark.parametrize("config_name", sorted(BENCHMARKS))
def test_online_config_loads_and_names_mtebs_own_benchmark(config_name):
    config = ev.load_eval_config(config_name)
    name, n_tasks = BENCHMARKS[config_name]
    assert config.benchmark == name and len(mteb.get_benchmark(config.benchmark).tasks) == n_tasks
    assert config.instructions.enabled == "on" and config.instructions.instruction_set == "kalm"
    assert config.device == "auto" and config.gpu_batch_size > config.batch_size and config.mteb_cache == "default"


@pytest.mark.parametrize("config_name", sorted(BENCHMARKS))
def test_every_benchmark_task_has_its_own_instruction_and_the_encoder_applies_it(config_name):
    config = ev.load_eval_config(config_name)
    instructions = load_instruction_set(config.instructions.instruction_set)
    encoder = ev.MtebEncoder(None, name="t/m", revision="r", instructions=config.instructions, use_instructions=True)
    missing = [t.metadata.name for t in _leaf_tasks(config.benchmark) if t.metadata.name not in instructions.tasks]
    assert missing == []
    for task in _leaf_tasks(config.benchmark):
        md = task.metadata
        listed_type, text = instructions.tasks[md.name]
        assert listed_type == md.type, md.name
        asymmetric = md.type in ASYMMETRIC_MTEB_TYPES
        side = "query" if asymmetric else None
        assert encoder.prompt_for(md.name, md.type, side, md.prompt) == instruction_prompt(text), md.name
        if asymmetric:
            assert encoder.prompt_for(md.name, md.type, "document", md.prompt) == ""


def test_published_entries_are_kalms_own_and_offline_entries_are_the_tasks():
    """Entries either equal KaLM's published set as mteb ships it, or are absent from it (written here)."""
    instructions = load_instruction_set()
    written = []
    for name, (_, text) in instructions.tasks.items():
        if name in et.TASKS_BY_NAME:
            continue
        published = KaLM_v2_task_prompts.get(name) or KaLM_v2_task_prompts.get(f"{name}-query")
        if published is None:
            written.append(name)
        else:
            assert text == published, name
    assert 0 < len(written) <= 15 and all(n not in KaLM_v2_task_prompts for n in written)
    for spec in et.OFFLINE_TASKS:   # one instruction per offline task, the same in tasks.py and the set
        assert instructions.tasks[spec.name] == (et.MTEB_TYPES[spec.type][0], spec.instruction)


def test_saved_prompt_table_gives_the_prompts_of_the_default_policy():
    """What a saved folder carries (default_prompt_table, resolved the way mteb resolves a SentenceTransformer's
    prompts) equals what kalm eval's default instruction policy applies, task by task and side by side."""
    tasks = [t for b, _ in BENCHMARKS.values() for t in _leaf_tasks(b)]
    ev.resolve_tasks(ev.EvalConfig(tasks=et.offline_task_names(), quick=True))  # offline tasks known to mteb
    offline = [(s.name, et.MTEB_TYPES[s.type][0], s.instruction) for s in et.OFFLINE_TASKS]
    cases = [(t.metadata.name, t.metadata.type, t.metadata.prompt) for t in tasks] + offline
    table = ev.MtebEncoder(None, name="t/m", revision="r", prompts=default_prompt_table())
    policy = ev.MtebEncoder(None, name="t/m", revision="r", instructions=ev.InstructionConfig(), use_instructions=True)
    for name, mteb_type, own in cases:
        for side in (("query", "document") if mteb_type in ASYMMETRIC_MTEB_TYPES else (None,)):
            want = policy.prompt_for(name, mteb_type, side, own)
            assert table.prompt_for(name, mteb_type, side, own) == want, (name, side)
            assert want != "" or side == "document", name
    # a task the table does not name falls back to its type, then to query / document, as in mteb
    assert table.prompt_for("NoSuchTask", "Clustering", None) == instruction_prompt(
        load_instruction_set().types["Clustering"])


def test_symmetric_none_and_per_task_overrides_in_tables_and_policy():
    none = prompt_table(load_instruction_set(), symmetric="none")
    assert none["STSB"] == "" and none["LCQMC"] == "" and none["TNews"].startswith("Instruct: ")
    assert none["T2Retrieval-query"].startswith("Instruct: ") and none["T2Retrieval-document"] == ""
    v1 = ev.load_eval_config("kalm-v1-style")
    encoder = ev.MtebEncoder(None, name="t/m", revision="r", instructions=v1.instructions, use_instructions=True)
    assert encoder.prompt_for("STSB", "STS", None) == "" and encoder.prompt_for("TNews", "Classification", None)
    default = default_prompt_table()
    assert default["STSB"] == instruction_prompt(load_instruction_set().tasks["STSB"][1])
    assert default["query"] == "" and default["document"] == "" and default["Retrieval-document"] == ""
