"""The paper's distillation ablations (KL only / CL only, V2.5) and the example-based vs label-text positive switch
(issue 13.6): what each switch value writes, what the trainer makes of it, and the GPU grids that use them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kalm_lib import ablations as A
from kalm_lib.train import load_config
from kalm_lib.train.data import load_training_data

ROOT = Path(__file__).resolve().parent.parent
DISTILL_CONFIGS = [ROOT / "configs/train/gpu-qwen2-0.5b/distill.yaml",
                   ROOT / "configs/train/gpu-rehearsal/distill.yaml"]


def _cells(grid) -> dict[str, A.Cell]:
    return {c.name: c for c in A.expand(A.load_grid(grid))}


@pytest.mark.parametrize("config", DISTILL_CONFIGS, ids=lambda p: p.parent.name)
def test_distillation_switch_gives_the_three_objectives_of_the_paper(config):
    cells = _cells({"switches": {"distillation": ["kl_only", "cl_only"]}})
    assert list(cells) == ["full", "distillation=kl_only", "distillation=cl_only"]
    own = yaml.safe_load(config.read_text())["loss"]     # the distill file's own a * L_CL + b * L_KL
    full = load_config(config, cells["full"].overrides)
    assert (full.stage, full.loss.distill_weight_cl, full.loss.distill_weight_kl) == \
        ("distill", own["distill_weight_cl"], own["distill_weight_kl"])
    kl = load_config(config, cells["distillation=kl_only"].overrides)
    assert (kl.stage, kl.loss.distill_weight_cl, kl.loss.distill_weight_kl) == ("distill", 0.0, 1.0)
    assert kl.distill.teacher == full.distill.teacher      # KL only still needs the teacher's scores
    cl = load_config(config, cells["distillation=cl_only"].overrides)
    assert (cl.stage, cl.loss.distill_weight_cl, cl.loss.distill_weight_kl) == ("finetune", 1.0, 0.0)
    # everything else of the distill stage is the same run: hard negatives, focal, MRL, temperature, data
    for other in (kl, cl):
        assert (other.loss.num_hard_negatives, other.loss.focal_gamma, other.loss.matryoshka_dims,
                other.loss.temperature, other.train.lr) == \
            (full.loss.num_hard_negatives, full.loss.focal_gamma, full.loss.matryoshka_dims,
             full.loss.temperature, full.train.lr)


def test_distillation_switch_conflicts_with_nothing_else_writing_its_keys():
    assert set(A.SWITCHES["distillation"].keys) == {"loss.distill_weight_cl", "loss.distill_weight_kl", "stage"}
    assert {A.OVERRIDE_KEYS[k] for k in ("distill_weight_cl", "distill_weight_kl", "stage")} == \
        set(A.SWITCHES["distillation"].keys)
    with pytest.raises(A.GridError, match="distillation"):
        A.load_grid({"switches": {"distillation": ["kl"]}})   # not one of its values


@pytest.mark.parametrize("grid, config", [
    ("gpu-distill", "configs/train/gpu-qwen2-0.5b/distill.yaml"),
    ("gpu-rehearsal-distill", "configs/train/gpu-rehearsal/distill.yaml")])
def test_gpu_distillation_grids_pass_the_trainer_runner_checks(grid, config, tmp_path):
    spec = A.load_grid(grid)
    assert [c.name for c in A.expand(spec)] == ["full", "distillation=kl_only", "distillation=cl_only"]
    A.make_run_fn("trainer", tmp_path, finetune_config=config).check(spec)


def test_a_distillation_cell_without_a_teacher_is_refused_before_any_work(tmp_path):
    """KL only on a fine-tuning config (no teacher) is caught by the one knob validation, naming the key."""
    run_fn = A.make_run_fn("trainer", tmp_path, finetune_config="configs/train/gpu-rehearsal/finetune.yaml")
    with pytest.raises(A.GridError, match="distill.teacher"):
        run_fn.check(A.load_grid({"switches": {"distillation": ["kl_only"]}}))


def test_positives_switch_writes_the_label_text_key_only_when_asked():
    cells = _cells({"switches": {"positives": ["label_text"]}})
    assert cells["full"].overrides == {}                  # example-based: the curated records as they are
    assert cells["positives=label_text"].overrides == {"data.positives": "label_text"}
    assert A.OVERRIDE_KEYS["positives"] == "data.positives"
    with pytest.raises(A.GridError, match="positives"):
        A.load_grid({"switches": {"positives": ["labels"]}})


def test_label_text_cells_train_on_the_class_text_as_positive(tmp_path):
    """The switch's cell, through the trainer's config and data path: a classification record's positive becomes
    its class text, its negatives other classes of the same source; other records are untouched."""
    rows = [{"id": f"c{i}", "query": f"text {i}", "pos": [f"other text of class {i % 2}"], "neg": ["x", "y"],
             "task_type": "classification", "label": ["card arrival", "lost card"][i % 2], "source": "bank"}
            for i in range(4)]
    rows += [{"id": "e0", "query": "sad day", "pos": ["gloomy"], "neg": ["z"], "task_type": "classification",
              "label": "sadness", "source": "emo"},
             {"id": "e1", "query": "great day", "pos": ["lovely"], "neg": ["w"], "task_type": "classification",
              "label": "joy", "source": "emo"},
             {"id": "r0", "query": "q", "pos": ["p"], "neg": ["n"], "task_type": "retrieval", "source": "qa"}]
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cell = _cells({"switches": {"positives": ["label_text"]}})["positives=label_text"]
    config = load_config("configs/train/gpu-rehearsal/finetune.yaml", {**cell.overrides, "data.train_file": str(data)})
    got = {r["id"]: r for r in load_training_data(config)[0]}
    for r in rows[:4]:
        other = {"card arrival": "lost card", "lost card": "card arrival"}[r["label"]]
        assert got[r["id"]]["pos"] == [r["label"]] and got[r["id"]]["neg"] == [other, other]
    assert got["e0"]["pos"] == ["sadness"] and got["e0"]["neg"] == ["joy"]     # classes of its own source only
    assert got["r0"] == {**rows[-1], **{k: got["r0"][k] for k in got["r0"] if k not in rows[-1]}}
    example = load_config("configs/train/gpu-rehearsal/finetune.yaml", {"data.train_file": str(data)})
    assert [r["pos"] for r in load_training_data(example)[0]] == [r["pos"] for r in rows]


@pytest.mark.parametrize("grid", ["gpu-qwen2-0.5b", "gpu-rehearsal"])
def test_the_gpu_recipe_grids_compare_example_based_and_label_text_positives(grid, tmp_path):
    spec = A.load_grid(grid)
    assert spec.switches["positives"] == ["label_text"]
    stage = "gpu-qwen2-0.5b" if grid == "gpu-qwen2-0.5b" else "gpu-rehearsal"
    A.make_run_fn("trainer", tmp_path, finetune_config=f"configs/train/{stage}/finetune.yaml",
                  pretrain_config=f"configs/train/{stage}/pretrain.yaml").check(spec)
