"""Issue 14: the soup folder carries its OWN model card (README.md): the soup recipe, its ingredients with their
weights and weight hashes, and its scores, instead of the card copied from ingredient 0."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from kalm_lib import soup
from kalm_lib.model import EmbeddingModel

QUERIES = ["how do I reset my card pin", "what is the capital of france", "symptoms of the flu in children",
           "who wrote hamlet"]
DOCS = ["To change your PIN, open the card menu and choose reset.", "Paris is the capital and largest city of France.",
        "Children with influenza often have fever, cough and aches.", "Hamlet is a tragedy by William Shakespeare."]


def _noisy_copy(src: Path, dst: Path, seed: int) -> Path:
    shutil.copytree(src, dst)  # README.md and kalm_config.json (with the card) come along, as after training
    state = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in state.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def souped(tmp_path_factory):
    run = tmp_path_factory.mktemp("soup_card") / "run"
    model = EmbeddingModel.tiny_decoder("qwen2", seed=0)
    model.card = {"base_model": "tiny-qwen2-test", "data": ["en-trec"], "language": ["en"],
                  "recipe": {"stage": "finetune", "lr": 1e-4}, "title": "ingredient zero's own title"}
    first = model.save(run / "train" / "finetune" / "checkpoint-10")
    _noisy_copy(first, run / "train" / "finetune" / "checkpoint-20", seed=1)
    (run / "pairs.jsonl").write_text("".join(json.dumps({"query": q, "pos": [d], "instruction": ""}) + "\n"
                                             for q, d in zip(QUERIES, DOCS)))
    config = soup.SoupConfig(run_dir=str(run), ingredients=["train/finetune/checkpoint-*"], recipe="weights",
                             weights=[0.25, 0.75], scorer="pairs", pairs_file="pairs.jsonl",
                             heldout_pairs_file="pairs.jsonl", device="cpu")
    result = soup.run_soup(config, progress=False)
    return run, result


def test_soup_readme_is_its_own_card_naming_ingredients_and_weights(souped):
    run, result = souped
    folder = Path(result.folder)
    readme = (folder / "README.md").read_text(encoding="utf-8")
    ingredient0 = (run / "train" / "finetune" / "checkpoint-10" / "README.md").read_text(encoding="utf-8")
    assert readme != ingredient0 and "ingredient zero's own title" not in readme
    assert "# Model soup of 2 checkpoints (recipe weights)" in readme
    for step, weight in ((10, 0.25), (20, 0.75)):
        digest = hashlib.sha256((run / "train" / "finetune" / f"checkpoint-{step}" / "model.safetensors")
                                .read_bytes()).hexdigest()   # independent of the soup's own hashing
        assert f"| `finetune/checkpoint-{step}` | {weight} | `{digest[:16]}` |" in readme
    record = soup.load_result(run)
    assert f"| selection score (the tasks the weights were chosen on: in-sample) | {record['chosen']['score']:.2f} |" \
        in readme
    held = record["heldout"]["chosen"]["heldout_score"]
    assert f"| held-apart score, chosen | {held:.2f} |" in readme


def test_soup_card_front_matter_loads_in_huggingface_hub(souped):
    _, result = souped
    card = ModelCard.load(Path(result.folder) / "README.md")
    # what both ingredients' cards agree on carries over; the soup's parameter count is its own weights'
    assert card.data.base_model == "tiny-qwen2-test" and card.data.language == ["en"]
    assert card.data.datasets == ["en-trec"] and card.data.library_name == "sentence-transformers"
    n_params = sum(t.numel() for t in load_file(str(Path(result.folder) / "model.safetensors")).values())
    assert f"| parameters | {n_params} |" in card.text and "## Soup ingredients" in card.text
