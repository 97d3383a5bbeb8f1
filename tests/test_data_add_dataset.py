"""'Add a dataset' as data/README.md says: a data card + a file format (a new one here) + one registry entry
per use (a training source, an evaluation task); then curation and evaluation read it like any other."""

import hashlib
import json

import pytest

from kalm_lib.data import cards
from kalm_lib.data import formats as F
from kalm_lib.data.curate import CurationConfig, SourceSpec, curate
from kalm_lib.data.mining import MiningConfig
from kalm_lib.data.sources import I_SIMILAR, SOURCES, SourceDef
from kalm_lib.evaluation import tasks as et

TRAIN = [("1", "The cat sat on the warm mat all day.", "A cat spent the whole day on a warm mat."),
         ("0", "Prices rose sharply in the spring.", "The river froze early this winter."),
         ("1", "She planted tomatoes in the garden.", "Tomatoes were planted in her garden."),
         ("1", "The museum opens at nine in the morning.", "Doors of the museum open at 9 am."),
         ("1", "Two dogs chase a red ball on the beach.", "A red ball is chased by two dogs at the sea.")]
TEST = [("1", "Two dogs chase a red ball on the beach.", "Dogs run after a ball by the sea."),  # leaks into train
        ("0", "He reads the newspaper every morning.", "The newspaper was printed in blue ink."),
        ("1", "The train leaves from platform four.", "Platform four is where the train departs.")]
HEADER = ("label", "sentence_a", "sentence_b")


def _tsv(rows) -> bytes:
    return "".join("\t".join(r) + "\n" for r in [HEADER, *rows]).encode("utf-8")


@pytest.fixture
def toy(tmp_path, monkeypatch):
    # 1. the files and their data card (front matter: source, licence, per split file/rows/sha256/role/format)
    data_dir, cards_dir = tmp_path / "data", tmp_path / "data_cards"
    (data_dir / "xx-toy").mkdir(parents=True)
    cards_dir.mkdir()
    splits = {}
    for split, rows, role in (("train", TRAIN, "train"), ("test", TEST, "dev-eval")):
        raw = _tsv(rows)
        (data_dir / "xx-toy" / f"{split}.tsv").write_bytes(raw)
        splits[split] = (f"  {split}:\n    file: {split}.tsv\n    format: tsv\n    rows: {len(rows)}\n"
                         f"    sha256: {hashlib.sha256(raw).hexdigest()}\n    role: {role}\n"
                         f"    task_type: pair_classification\n    lang: en\n")
    (cards_dir / "xx-toy.md").write_text(
        "---\nname: xx-toy\nlicense: cc0-1.0\nnon_commercial: false\nresearch_only: false\nlanguages:\n- en\n"
        "splits:\n" + "".join(splits.values()) + "---\n\n# Toy paraphrases\n", encoding="utf-8")
    monkeypatch.setattr(cards, "CARDS_DIR", cards_dir)
    monkeypatch.setattr(cards, "DATA_DIR", data_dir)
    # 2. its file format is new: label first, then the two sentences, with a header
    monkeypatch.setitem(F.FORMATS, "toy_pairs", F.Layout("tsv", ("text1", "text2", "label"), (1, 2, 0), 3,
                                                         header=HEADER, texts=("text1", "text2")))
    # 3. one registry entry per use: a training source and an evaluation task
    monkeypatch.setitem(SOURCES, "toy", SourceDef("xx-toy", "train", "toy_pairs", "positive_pairs",
                                                  "pair_classification", "paraphrase", I_SIMILAR, "en"))
    spec = et.OfflineTask("KalmDev-Toy-en", "pair_classification", "en", "xx-toy", {"test": "test"}, "toy_pairs",
                          I_SIMILAR, description="toy paraphrase pairs")
    monkeypatch.setitem(et.TASKS_BY_NAME, spec.name, spec)
    return tmp_path


def test_curation_reads_the_new_dataset(toy):
    cfg = CurationConfig(name="toy", sources=[SourceSpec("toy", "finetune")], mining=MiningConfig(enabled=False))
    report = curate(cfg, toy / "out", show_progress=False)
    rows = [json.loads(line) for line in (toy / "out" / "finetune.jsonl").read_text().splitlines()]
    # label-1 pairs become records; the one whose sentence is also in the dev-eval split is a leak
    assert [(r["query"], r["pos"]) for r in rows] == [(a, [b]) for lab, a, b in TRAIN[:4] if lab == "1"]
    assert report["read"]["per_source"]["toy"]["rejected_by_reason"] == {"negative_pair": 1}
    assert report["curate"]["per_source"]["toy"]["rejected_by_reason"] == {"leakage": 1}
    assert report["leakage"]["rejected_by_dev_split"] == {"xx-toy/test": 1}
    prov = json.loads((toy / "out" / "provenance.json").read_text())
    assert prov["data"] == {"xx-toy/train": cards.load_registry(verify=False)["xx-toy"].splits["train"].sha256}


def test_evaluation_reads_the_new_dataset(toy):
    task = et.build_task("KalmDev-Toy-en")
    task.load_data()
    test = task.dataset["test"]
    assert list(test["sentence1"]) == [a for _, a, _ in TEST]
    assert list(test["sentence2"]) == [b for _, _, b in TEST]
    assert list(test["labels"]) == [int(lab) for lab, _, _ in TEST]
    assert task.metadata.type == "PairClassification" and task.metadata.main_score == "max_ap"
