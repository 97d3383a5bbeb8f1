"""One instruction policy in training and evaluation (issue 16): ``data.instruction_policy`` decides which side
of a record gets its instruction, the saved folder carries the matching prompt table, and ``kalm eval`` (auto)
then asks the model the way it was trained, task type by task type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kalm_lib import evaluation as ev
from kalm_lib.ablations import SWITCHES
from kalm_lib.config import ConfigError
from kalm_lib.evaluation import tasks as et
from kalm_lib.evaluation.run import _prompt_choice, resolve_model
from kalm_lib.prompts import ASYMMETRIC_MTEB_TYPES, SYMMETRIC_MTEB_TYPES, instruction_prompt, policy_prompt_table
from kalm_lib.train import load_config, train
from kalm_lib.train.config import DataConfig
from kalm_lib.train.data import _prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py

ROWS = {t: {"query": "q", "instruction": "Do it", "task_type": t}
        for t in ("sts", "pair_classification", "retrieval", "classification")}
P = instruction_prompt("Do it")


@pytest.mark.parametrize("policy, want", [
    ("both", {"sts": (P, P), "pair_classification": (P, P), "retrieval": (P, None), "classification": (P, None)}),
    ("none", {"sts": (None, None), "pair_classification": (None, None), "retrieval": (P, None),
              "classification": (P, None)}),
    ("off", {t: (None, None) for t in ROWS}),
])
def test_training_sides_follow_the_policy(policy, want):
    data = DataConfig(train_file="x.jsonl", instruction_policy=policy)
    assert {t: _prompts(row, data) for t, row in ROWS.items()} == want
    # a record without an instruction never gets one, whatever the policy
    assert _prompts({"query": "q", "instruction": "", "task_type": "sts"}, data) == (None, None)


def test_unknown_policy_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data.instruction_policy"):
        load_config({"stage": "finetune", "output_dir": str(tmp_path),
                     "data": {"train_file": "x.jsonl", "instruction_policy": "sometimes"}})


def test_instructions_switch_writes_the_policy():
    sw = SWITCHES["instructions"]
    assert sw.default == "both" and set(sw.choices) == {"both", "none", "off"}
    assert sw.overrides("none", {}) == {"data.instruction_policy": "none"}


def _sides(prompts: dict[str, str], mteb_type: str, task: str) -> tuple[bool, ...]:
    """Whether the encoder puts an instruction on each side of an offline task, given a prompt table."""
    encoder = ev.MtebEncoder(None, name="t/m", revision="r", prompts=prompts)
    sides = ("query", "document") if mteb_type in ASYMMETRIC_MTEB_TYPES else (None,)
    return tuple(bool(encoder.prompt_for(task, mteb_type, side)) for side in sides)


@pytest.mark.parametrize("policy", ["both", "none", "off"])
def test_trained_folder_is_evaluated_the_way_it_was_trained(policy, tiny_dir, tmp_path):
    """Train 2 steps under the policy; the saved folder's prompts, as ``kalm eval`` (auto) reads them, put an
    instruction on exactly the sides the trainer did, for every offline task type."""
    from tests.test_train import write_records
    data = write_records(tmp_path / "d.jsonl", n=16)
    result = train(load_config({
        "stage": "finetune", "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(tiny_dir), "max_length": 32},
        "loss": {"num_hard_negatives": 1}, "data": {"train_file": str(data), "instruction_policy": policy},
        "train": {"seed": 0, "max_steps": 2, "batch_size": 4, "lr": 1e-4}, "checkpoint": {"every_steps": 0}}))
    folder = Path(result.final_model)
    saved = json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"]
    assert saved == {**saved, **policy_prompt_table(policy)}
    loaded = resolve_model(str(folder))
    prompts, on = _prompt_choice(loaded, ev.InstructionConfig())
    assert on and prompts == saved
    data_config = DataConfig(train_file="x", instruction_policy=policy)
    for spec in et.OFFLINE_TASKS:
        mteb_type = et.MTEB_TYPES[spec.type][0]
        trained = _prompts({"query": "q", "instruction": "x", "task_type": spec.type}, data_config)
        want = tuple(p is not None for p in trained)
        if mteb_type not in ASYMMETRIC_MTEB_TYPES:   # one kind of text: both training sides agree
            assert len(set(want)) == 1 or spec.type not in ("sts", "pair_classification"), spec.name
            want = want[:1]
        assert _sides(prompts, mteb_type, spec.name) == want, (policy, spec.name)
    assert any(t in SYMMETRIC_MTEB_TYPES for t in (et.MTEB_TYPES[s.type][0] for s in et.OFFLINE_TASKS))


def test_a_bare_yaml_off_is_the_off_policy(tmp_path):
    """YAML 1.1 reads a bare ``off`` as false: every Literal config field that offers "off"/"on" takes it back."""
    path = tmp_path / "ft.yaml"
    path.write_text(f"stage: finetune\noutput_dir: {tmp_path}\ndata: {{train_file: x.jsonl, instruction_policy: off}}\n")
    assert load_config(str(path)).data.instruction_policy == "off"
    assert load_config(str(path), {"data.instruction_policy": "off"}).data.instruction_policy == "off"
    with pytest.raises(ConfigError, match="data.instruction_policy"):   # `on` is not a policy
        load_config(str(path), {"data.instruction_policy": True})
