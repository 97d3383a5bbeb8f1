"""One reader per card file format: training and evaluation see the same texts (SciFact first), bad rows are
counted (training) or an error naming file:line (evaluation)."""

import ast
import csv
import gzip
import io

import pytest

from kalm_lib.data import formats as F
from kalm_lib.data.cards import load_registry
from kalm_lib.data.readers import ReadOptions, read_source
from kalm_lib.data.records import DataFormatError, Tally
from kalm_lib.data.sources import SOURCES, source_paths
from kalm_lib.evaluation import tasks as et

# evaluation's retrieval builders -> the card file formats they read
EVAL_BUILDER_FORMATS = {"scifact": "scifact_claims", "cmrc": "squad_json", "cmrc_rerank": "squad_json",
                        "trecqa": "trecqa"}


@pytest.fixture(scope="module")
def registry():
    return load_registry(verify=False)


def _train_reads():
    """{(card, split): {format}} of every split a training source reads (its split and extra splits)."""
    out: dict = {}
    for sd in SOURCES.values():
        out.setdefault((sd.card, sd.split), set()).add(sd.format)
        for extra in sd.extra_splits:
            fmt = "scifact_corpus" if sd.format == "scifact_claims" else sd.format
            out.setdefault((sd.card, extra), set()).add(fmt)
    return out


def _eval_reads():
    """{(card, split): {format}} of every split an offline evaluation task reads."""
    out: dict = {}
    for t in et.OFFLINE_TASKS:
        fmt = EVAL_BUILDER_FORMATS.get(t.reader, t.reader)
        for split in list(t.splits.values()) + ([t.train_split] if t.train_split else []):
            out.setdefault((t.card, split), set()).add(fmt)
        if t.corpus_split:
            out.setdefault((t.card, t.corpus_split), set()).add("scifact_corpus")
    return out


def test_every_card_file_has_one_format(registry):
    """A card split is read with one format, whoever reads it (training sources and evaluation tasks)."""
    train, ev = _train_reads(), _eval_reads()
    for key in set(train) | set(ev):
        assert len(train.get(key, set()) | ev.get(key, set())) == 1, (key, train.get(key), ev.get(key))
        assert key[1] in registry[key[0]].splits, key
    known = set(F.FORMATS) | {"scifact_claims", "scifact_corpus", "squad_json", "lines"}
    assert set().union(*train.values(), *ev.values()) <= known


def test_scifact_texts_are_identical_in_training_and_evaluation(registry):
    path, extra = source_paths(registry, "scifact")
    records = read_source("scifact", path, Tally(), extra_paths=extra)
    _, corpus, _ = et.read_scifact(et.split_file("en-scifact", "claims_dev"), extra["corpus"])
    eval_docs = {f"{d['title']} {d['text']}".strip() for d in corpus.values()}
    assert len(corpus) == 5183
    assert all(r["pos"][0] in eval_docs for r in records)  # every training positive is an evaluation document
    # independently of both readers: each abstract is its list repr's sentences decoded by Python and joined
    raw = gzip.decompress(extra["corpus"].read_bytes()).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(raw)))
    decoded = 0
    for row in rows:
        sentences = [ast.literal_eval(m.group(0)) for m in F._QUOTED.finditer(row["abstract"])]
        assert corpus[row["doc_id"]]["text"] == " ".join(sentences)
        decoded += "\\n" in row["abstract"]
    assert decoded > 900  # the ~1k abstracts whose escapes differed between the two readers are covered
    assert not any("\\n" in r["pos"][0] for r in records)  # no literal backslash-n reaches training


def test_texts_agree_for_every_split_both_read(registry):
    """Training sources and evaluation tasks reading the same card split see the same texts."""
    train, ev = _train_reads(), _eval_reads()
    both = sorted(set(train) & set(ev))
    assert ("en-scifact", "corpus") in both and ("en-banking77", "train") in both and len(both) >= 6
    for card, split in both:
        records = []
        for name, sd in SOURCES.items():
            if sd.card == card and split in (sd.split, *sd.extra_splits):
                path, extra = source_paths(registry, name)
                records += read_source(name, path, Tally(), ReadOptions(num_neg=1), extra_paths=extra)
        task = next(t for t in et.OFFLINE_TASKS if t.card == card)
        if split == task.corpus_split:  # a retrieval corpus: the training positives are its documents
            _, corpus, _ = et.read_scifact(et.split_file(card, next(iter(task.splits.values()))),
                                           et.split_file(card, split))
            eval_texts = {f"{d['title']} {d['text']}".strip() for d in corpus.values()}
            assert {p for r in records for p in r["pos"]} <= eval_texts, (card, split)
        else:  # a labelled train split: every text is a training query, and only those texts are read
            train_texts = {t for r in records for t in [r["query"], *r["pos"], *r["neg"]]}
            eval_texts = {t for t, _ in et.read_text_label(et.split_file(card, split), task.reader)}
            assert train_texts == eval_texts, (card, split, len(train_texts ^ eval_texts))


def test_blank_texts_are_left_out_on_both_sides(registry):
    """ChnSentiCorp's train split has one blank review: evaluation always skipped it; training now rejects it
    as empty_text instead of making a blank example."""
    path, extra = source_paths(registry, "chnsenticorp")
    t = Tally()
    read_source("chnsenticorp", path, t, extra_paths=extra)
    assert t.rejected["chnsenticorp"]["empty_text"] == 1
    rows = et.read_text_label(path, "csv_label_text")
    assert len(rows) == registry["zh-chnsenticorp-htl"].splits["train"].rows - 1


# ---------------------------------------------------------------------------------------------- bad rows
def _write(tmp_path, name, text: bytes):
    p = tmp_path / name
    p.write_bytes(text)
    return p


def test_bad_rows_counted_for_training_and_fatal_for_evaluation(tmp_path):
    p = _write(tmp_path, "pairs.tsv", b"a\tb\t1\n\nc\td\n\t \t0\ne\tf\tx\nnul\x00\tg\t1\nh\t\xff\t1\ni\tj\t0\n")
    t = Tally()
    rows = F.read_pair_label(p, "tsv_pair", F.CountRows(t, "s"))
    assert rows == [("a", "b", 1), ("i", "j", 0)]
    assert dict(t.rejected["s"]) == {"bad_columns": 1, "empty_text": 1, "bad_label": 1, "nul_byte": 1,
                                     "invalid_utf8": 1}
    assert t.rows_in["s"] == 7  # the blank line is not a row
    with pytest.raises(DataFormatError, match=r"pairs.tsv:3: bad_columns"):
        F.read_pair_label(p, "tsv_pair")
    with pytest.raises(et.EvalDataError, match=r"pairs.tsv:3: bad_columns"):
        F.read_rows(p, "tsv_pair", F.StrictRows(error=et.EvalDataError))


def test_header_and_json_lines(tmp_path):
    p = _write(tmp_path, "b.csv", b"txt,category\nhello,x\n")
    with pytest.raises(DataFormatError, match=r"b.csv:1: expected a header starting with \['text', 'category'\]"):
        F.read_text_label(p, "csv_text_label", F.CountRows(Tally(), "s"))
    p = _write(tmp_path, "t.jsonl", b'{"sentence": "s1", "label_desc": "a"}\n{"sentence": 3, "label_desc": "a"}\n'
                                    b'{"label_desc": "a"}\n[1]\n{broken\n{"sentence": " ", "label_desc": "b"}\n')
    t = Tally()
    assert F.read_text_label(p, "tnews", F.CountRows(t, "s")) == [("s1", "a")]
    assert dict(t.rejected["s"]) == {"wrong_type": 1, "missing_field": 1, "not_an_object": 1, "malformed_json": 1,
                                     "empty_text": 1}
    assert F.read_text_label(p.with_name("t.jsonl"), "tnews", F.StrictRows(skip=("empty_text", "wrong_type",
                             "missing_field", "not_an_object", "malformed_json"))) == [("s1", "a")]


def test_scifact_abstract_decoding():
    # numpy-printed list without commas; escapes decoded; no sentence glued to the next
    assert F._abstract("['First line.\\nStill first.'\n 'It\\'s second.' \"Third \\\"q\\\".\"]") == \
        "First line.\nStill first. It's second. Third \"q\"."
    assert F._abstract("no list here") == "no list here"


def test_split_cells_keeps_the_leakage_view(registry):
    """The leakage check indexes every cell (header and labels too) of each dev-eval file."""
    card = registry["en-banking77"]
    cells = list(F.split_cells(card.split_path("test"), "csv"))
    assert cells[:2] == ["text", "category"] and len(cells) == 2 * (card.splits["test"].rows + 1)
    emotion = registry["en-emotion"]
    texts = list(F.split_cells(emotion.split_path("validation"), "lines_header"))
    assert len(texts) == emotion.splits["validation"].rows and not any(t.endswith(";sadness") for t in texts)
