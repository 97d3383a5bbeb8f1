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
