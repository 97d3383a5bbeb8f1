"""Data cards: registry loads, sha256 and file checks name the card, roles follow the data README."""

import hashlib
import shutil

import pytest

from kalm_lib.data.cards import DataCardError, load_card, load_registry


def test_registry_verifies_every_bundled_file():
    reg = load_registry(verify=True)
    assert "en-scifact" in reg and "zh-cnsd-stsb" in reg
    for card in reg.values():
        for s, sp in card.splits.items():
            path = card.split_path(s)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sp.sha256
            assert sp.rows > 0


def test_sts_b_is_never_train_and_eval_only_splits():
    reg = load_registry(verify=False)
    for name in ("stsb-multi-mt", "zh-cnsd-stsb"):
        assert reg[name].splits_with_role("train") == []
    assert reg["zh-pawsx"].splits["test"].role == "dev-eval"
    assert reg["en-banking77"].splits["test"].role == "dev-eval"
    # held-back SciFact claims are disjoint from the training claims
    import pandas as pd
    tr = pd.read_csv(reg["en-scifact"].split_path("claims_train"))
    dv = pd.read_csv(reg["en-scifact"].split_path("claims_dev"))
    assert set(tr["id"]).isdisjoint(dv["id"])
    assert len(tr) + len(dv) == 1261


def _copy_card(tmp_path, name="en-trec"):
    reg = load_registry(verify=False)
    card = reg[name]
    (tmp_path / "cards").mkdir()
    (tmp_path / "data" / name).mkdir(parents=True)
    shutil.copy(card.card_path, tmp_path / "cards" / f"{name}.md")
    for sp in card.splits.values():
        shutil.copy(card.data_dir / name / sp.file, tmp_path / "data" / name / sp.file)
    return tmp_path / "cards", tmp_path / "data"


def test_sha256_mismatch_names_card(tmp_path):
    cards, data = _copy_card(tmp_path)
    f = data / "en-trec" / "test.tsv.gz"
    f.write_bytes(f.read_bytes() + b"x")
    card = load_card(cards / "en-trec.md", data)
    card.split_path("train")  # untouched split still fine
    with pytest.raises(DataCardError, match="en-trec.*test.*sha256 mismatch"):
        card.split_path("test")


def test_missing_file_and_unknown_split_name_card(tmp_path):
    cards, data = _copy_card(tmp_path)
    (data / "en-trec" / "train.tsv.gz").unlink()
    card = load_card(cards / "en-trec.md", data)
    with pytest.raises(DataCardError, match="en-trec.*train.*missing"):
        card.split_path("train")
    with pytest.raises(DataCardError, match="en-trec.*no split 'nope'"):
        card.split_path("nope")
    with pytest.raises(DataCardError, match="en-trec"):
        load_registry(cards, data, verify=True)


def test_bad_front_matter(tmp_path):
    p = tmp_path / "x.md"
    p.write_text("no front matter")
    with pytest.raises(DataCardError, match="front matter"):
        load_card(p)
    p.write_text("---\nname: x\nsplits:\n  a: {file: f, rows: 1, sha256: s, role: bogus, task_type: t, lang: en, format: csv}\n---\n")
    with pytest.raises(DataCardError, match="role 'bogus'"):
        load_card(p)


# ---------------------------------------------------------------------------------------------- Hugging Face keys
# (issue 14: `language`, `license`/`license_name`, the Hub's `task_categories`, `size_categories`, `configs`)
import logging
import warnings
from pathlib import Path

import yaml

from kalm_lib.data import cards as C

CARDS = sorted(C.CARDS_DIR.glob("*.md"))


def _front(path: Path) -> dict:
    return C.parse_front_matter(path.read_text(encoding="utf-8"), str(path))


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.stem)
def test_card_hub_keys_agree_with_our_fields(path):
    meta = _front(path)
    assert C.with_hf_keys(meta) == meta          # nothing stale: recomputing the Hub keys changes nothing
    assert "languages" not in meta and meta["language"] and all(len(code) == 2 for code in meta["language"])
    assert meta["license"] and (meta["license"] != "other" or meta["license_name"])
    card = C.load_card(path)
    rows = sum(sp.rows for sp in card.splits.values()) or (card.hub.rows if card.hub else None)
    if rows:   # the bucket by hand: the power of ten below the row count
        exp = len(str(rows)) - 1
        assert meta["size_categories"] == [{0: "n<1K", 1: "n<1K", 2: "n<1K", 3: "1K<n<10K", 4: "10K<n<100K",
                                            5: "100K<n<1M", 6: "1M<n<10M"}[exp]]
    files = sorted(d["path"] for cfg in meta.get("configs", []) for d in cfg["data_files"])
    assert files == sorted(sp.file for sp in card.splits.values())   # every bundled file in exactly one config


def test_hub_task_categories_follow_mteb_and_the_hub_list():
    """Our mapping equals mteb's own (TaskMetadata._hf_task_type on a real task of each type); every category a
    card uses is one the Hub knows (datasets' task list, or mteb's mapping for the newer text-ranking)."""
    import mteb
    from datasets.utils.metadata import known_task_ids

    from kalm_lib.evaluation.tasks import MTEB_TYPE_TO_OURS
    mteb_values = set()
    for mteb_type, ours in MTEB_TYPE_TO_OURS.items():
        task = mteb.get_tasks(task_types=[mteb_type], languages=["eng"])[0]
        assert list(C.HF_TASK_CATEGORIES_OF[ours]) == task.metadata._hf_task_type(), mteb_type
        mteb_values |= set(task.metadata._hf_task_type())
    used = {c for p in CARDS for c in _front(p)["task_categories"]}
    assert used <= set(known_task_ids) | mteb_values and "text-ranking" in mteb_values


def test_every_task_type_has_hub_categories():
    from kalm_lib.data.records import TASK_TYPES
    assert set(C.HF_TASK_CATEGORIES_OF) == set(TASK_TYPES)
    with pytest.raises(DataCardError, match="warp"):
        C.hf_task_categories(["sts", "warp"])


def test_size_buckets_are_the_hubs():
    from huggingface_hub import DatasetCardData
    labels = [label for _, label in C.HF_SIZE_CATEGORIES] + ["n>1T"]
    assert all(f"'{label}'" in DatasetCardData.__doc__ for label in labels)   # the options the library documents
    assert [C.hf_size_category(n) for n in (0, 999, 1000, 9999, 10_000, 557_850, 3_012_496, 10 ** 12)] == \
        ["n<1K", "n<1K", "1K<n<10K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "n>1T"]


def test_with_hf_keys_converts_a_legacy_card():
    legacy = {"name": "x", "license": "mit", "languages": ["zh"], "task_categories": ["pretrain", "sts"],
              "splits": {"a_train": {"file": "a_train.tsv.gz", "rows": 1500, "format": "tsv"},
                         "a_dev": {"file": "a_dev.tsv.gz", "rows": 10, "format": "tsv"},
                         "corpus": {"file": "corpus.csv.gz", "rows": 5, "format": "csv_noheader"}}}
    out = C.with_hf_keys(legacy)
    assert list(out) == ["name", "license", "language", "task_types", "task_categories", "size_categories",
                         "configs", "splits"]
    assert out["language"] == ["zh"] and out["task_types"] == ["pretrain", "sts"]
    assert out["task_categories"] == ["feature-extraction", "sentence-similarity"]
    assert out["size_categories"] == ["1K<n<10K"]
    assert out["configs"] == [
        {"config_name": "a", "data_files": [{"split": "train", "path": "a_train.tsv.gz"},
                                            {"split": "dev", "path": "a_dev.tsv.gz"}], "sep": "\t", "quoting": 3},
        {"config_name": "default", "data_files": [{"split": "corpus", "path": "corpus.csv.gz"}], "header": None}]
    assert C.with_hf_keys(out) == out


def test_deprecated_or_incomplete_hub_keys_are_refused(tmp_path):
    p = tmp_path / "x.md"
    split = "splits:\n  a: {file: f, rows: 1, sha256: s, role: train, task_type: sts, lang: en, format: csv}\n"
    p.write_text("---\nname: x\nlanguages: [en]\n" + split + "---\n")
    assert load_card(p).languages == ["en"]   # an older card of a user still loads; the bundled ones have none
    p.write_text("---\nname: x\nlanguages: [en]\nlanguage: [zh]\n" + split + "---\n")
    with pytest.raises(DataCardError, match=r"'x'.*both 'language' and the deprecated 'languages'"):
        load_card(p)
    p.write_text("---\nname: x\nlanguage: [en]\nlicense: other\n" + split + "---\n")
    with pytest.raises(DataCardError, match=r"'x'.*license 'other' needs a 'license_name'"):
        load_card(p)


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.stem)
def test_card_loads_in_huggingface_hub_without_warnings(path, caplog):
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        card = DatasetCard.load(path)
        configs = MetadataConfigs.from_dataset_card_data(card.data)   # datasets' own check of `configs`
    assert not caught and not caplog.records, ([str(w.message) for w in caught], caplog.text)
    meta = _front(path)
    assert card.data.language == meta["language"] and card.data.license == meta["license"]
    assert card.data.task_categories == meta["task_categories"] and "languages" not in card.data.to_dict()
    assert sorted(configs) == sorted(c["config_name"] for c in meta.get("configs", []))


def test_configs_load_with_datasets_and_give_the_cards_row_counts(tmp_path):
    """A Hub dataset repo made of data/<name>/ with the card as README.md: `datasets.load_dataset(repo, config)`
    reads every split the card's `configs` name, with the row counts the card states (formats the Hub's builders
    read: every one in HF_READ_ARGS)."""
    import datasets
    datasets.disable_progress_bars()
    checked = 0
    for card in load_registry(verify=False).values():
        meta = card.meta
        if not card.splits:
            continue
        repo = tmp_path / card.name
        shutil.copytree(card.data_dir / card.name, repo)
        shutil.copy(card.card_path, repo / "README.md")
        by_file = {sp.file: sp for sp in card.splits.values()}
        for cfg in meta["configs"]:
            formats = {by_file[d["path"]].format for d in cfg["data_files"]}
            if len(formats) != 1 or formats.pop() not in C.HF_READ_ARGS:
                continue
            ds = datasets.load_dataset(str(repo), cfg["config_name"], cache_dir=str(tmp_path / "cache"))
            assert {k: v.num_rows for k, v in ds.items()} == \
                {d["split"]: by_file[d["path"]].rows for d in cfg["data_files"]}, (card.name, cfg["config_name"])
            checked += 1
    assert checked >= 24
