"""Offline MTEB tasks built from the data cards' dev-eval splits (no hub access, no ``../shared`` at run time).

Each :class:`OfflineTask` names a card split under ``data/`` and a reader that turns it into the columns an
mteb task type expects; :func:`build_task` wraps it in a real ``mteb`` task subclass (``AbsTaskSTS``,
``AbsTaskClassification``, ...), so mteb's own evaluators compute every metric.

Names say they are ours (``KalmDev-...``). Where the data and split are exactly those of a public MTEB task
(STSBenchmark test, Banking77 test, Emotion validation, C-MTEB STSB and PAWSX), ``mteb_equivalent`` names
the public task so published scores line up (:mod:`kalm_lib.evaluate` ``load_reference_scores``).

``quick=True`` keeps at most ``quick_max`` items per split (chosen by sha256 of a stable key, never by a
random generator, and written into the task description) and fewer classifier runs, so the whole quick
suite runs in a few minutes on 2 CPU cores with MiniLM. Full mode uses every row, as the public
evaluation did.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

# our task type (the unified record vocabulary) -> (mteb type, mteb category, main score)
TASK_TYPES = {
    "sts": ("STS", "t2t", "cosine_spearman"),
    "pair_classification": ("PairClassification", "t2t", "max_ap"),
    "classification": ("Classification", "t2c", "accuracy"),
    "clustering": ("Clustering", "t2c", "v_measure"),
    "retrieval": ("Retrieval", "t2t", "ndcg_at_10"),
    "reranking": ("Reranking", "t2t", "map_at_1000"),
}
MTEB_TYPE_TO_OURS = {v[0]: k for k, v in TASK_TYPES.items()}
LANGS = {"en": "eng-Latn", "zh": "cmn-Hans"}
SYMMETRIC_TYPES = ("sts", "pair_classification")


class EvalDataError(ValueError):
    """A dev-eval file that cannot be turned into a task (missing, wrong format); names file and row."""


@dataclasses.dataclass(frozen=True)
class OfflineTask:
    """One offline evaluation task: which card split, how to read it, how to present it to mteb."""

    name: str                       # mteb task name, "KalmDev-<Data>-<lang>"
    type: str                       # one of TASK_TYPES
    lang: str                       # "en" | "zh"
    card: str                       # data card name (folder under data/)
    splits: dict[str, str]          # mteb eval split -> card split
    reader: str                     # key of READERS
    instruction: str                # task instruction (KaLM query format)
    train_split: str | None = None  # card split the classifier is fitted on (classification only)
    corpus_split: str | None = None  # card split holding the documents (retrieval only)
    mteb_equivalent: str | None = None  # public MTEB task with the same data and split
    quick: bool = True              # part of the quick suite
    quick_max: int = 500            # items (pairs / texts / queries) kept per split in quick mode
    score_range: tuple[float, float] = (0.0, 5.0)  # STS gold score range
    description: str = ""

    @property
    def mteb_type(self) -> str:
        return TASK_TYPES[self.type][0]

    @property
    def main_score(self) -> str:
        return TASK_TYPES[self.type][2]


# ---------------------------------------------------------------------------------------------- registry
OFFLINE_TASKS: tuple[OfflineTask, ...] = (
    # English -----------------------------------------------------------------------------------------
    OfflineTask("KalmDev-STSB-en", "sts", "en", "stsb-multi-mt", {"test": "en_test"}, "csv_pair_score",
                "Retrieve semantically similar text.", mteb_equivalent="STSBenchmark",
                description="STS Benchmark English test (= MTEB STSBenchmark test)."),
    OfflineTask("KalmDev-Banking77-en", "classification", "en", "en-banking77", {"test": "test"}, "csv_text_label",
                "Given a online banking query, find the corresponding intents", train_split="train",
                mteb_equivalent="Banking77Classification", quick_max=500,
                description="Banking77 test (= MTEB Banking77Classification test); classifier fitted on train."),
    OfflineTask("KalmDev-Emotion-en", "classification", "en", "en-emotion", {"validation": "validation"},
                "semicolon_text_label",
                "Classify the emotion expressed in the given Twitter message into one of the six emotions: "
                "anger, fear, joy, love, sadness, and surprise", train_split="train",
                mteb_equivalent="EmotionClassification", quick=False,
                description="Emotion validation (= MTEB EmotionClassification validation)."),
    OfflineTask("KalmDev-TREC-en", "classification", "en", "en-trec", {"test": "test"}, "trec",
                "Classify the type of answer the given question asks for", train_split="train", quick=False,
                description="TREC question classification, 6 coarse labels."),
    OfflineTask("KalmDev-MRPC-en", "pair_classification", "en", "en-mrpc", {"test": "test"}, "mrpc",
                "Retrieve semantically similar text.", quick_max=300, description="MRPC test paraphrase pairs."),
    OfflineTask("KalmDev-SciFact-en", "retrieval", "en", "en-scifact", {"test": "claims_dev"}, "scifact",
                "Given a scientific claim, retrieve documents that support or refute the claim",
                corpus_split="corpus", quick_max=40,
                description="SciFact held-back train claims -> abstracts (not MTEB SciFact test)."),
    OfflineTask("KalmDev-TrecQA-en", "reranking", "en", "en-trecqa", {"dev": "dev"}, "trecqa",
                "Given a question, retrieve sentences that answer the question", quick_max=30,
                description="TrecQA dev answer selection: rerank each question's candidate sentences."),
    OfflineTask("KalmDev-20News-en", "clustering", "en", "en-20news", {"dev": "dev"}, "news20",
                "Identify the topic or theme of the given news articles", quick_max=500,
                description="20 Newsgroups held-back messages, clustered by subject line (20 groups)."),
    # Chinese -----------------------------------------------------------------------------------------
    OfflineTask("KalmDev-STSB-zh", "sts", "zh", "zh-cnsd-stsb", {"validation": "dev", "test": "test"}, "tsv_pair_score",
                "Retrieve semantically similar text", mteb_equivalent="STSB", quick_max=250,
                description="Chinese STS-B (CNSD) dev+test (= C-MTEB STSB validation+test)."),
    OfflineTask("KalmDev-PAWSX-zh", "sts", "zh", "zh-pawsx", {"test": "test"}, "pawsx",
                "Retrieve semantically similar text", mteb_equivalent="PAWSX", score_range=(0.0, 1.0), quick_max=300,
                description="PAWS-X zh test scored as STS on 0/1 labels (= C-MTEB PAWSX test)."),
    OfflineTask("KalmDev-AFQMC-zh", "sts", "zh", "zh-afqmc", {"test": "heldout"}, "tsv_pair_score",
                "Retrieve semantically similar text", score_range=(0.0, 1.0), quick=False,
                description="AFQMC held-back 1/8 of train, STS on 0/1 labels (not MTEB AFQMC validation)."),
    OfflineTask("KalmDev-QBQTC-zh", "sts", "zh", "zh-qbqtc", {"dev": "dev"}, "qbqtc",
                "Given a web search query, retrieve relevant titles", score_range=(0.0, 2.0), quick=False,
                quick_max=1000, description="QBQTC dev query-title relevance 0/1/2 as STS (not MTEB QBQTC test)."),
    OfflineTask("KalmDev-LCQMC-zh", "pair_classification", "zh", "zh-lcqmc", {"dev": "dev"}, "tsv_pair_label",
                "Retrieve semantically similar text", quick_max=300, description="LCQMC dev question-matching pairs."),
    OfflineTask("KalmDev-TNews-zh", "classification", "zh", "zh-tnews", {"dev": "dev"}, "tnews",
                "Classify the fine-grained category of the given news title", train_split="train",
                quick_max=800, description="TNEWS dev (non-canonical copy); classifier fitted on its train file."),
    OfflineTask("KalmDev-HotelSentiment-zh", "classification", "zh", "zh-chnsenticorp-htl", {"dev": "dev"},
                "csv_label_text", "Classify the sentiment of the given hotel review", train_split="train",
                quick=False, description="ChnSentiCorp hotel reviews held-back fifth, binary sentiment."),
    OfflineTask("KalmDev-CSLTitles-zh", "clustering", "zh", "zh-csl", {"dev": "ctg_dev"}, "csl",
                "Identify the main category of scholar papers based on the titles", quick_max=1000,
                description="CSL paper titles clustered into 13 categories (S2S)."),
    OfflineTask("KalmDev-CSLAbstracts-zh", "clustering", "zh", "zh-csl", {"dev": "dcp_dev"}, "csl",
                "Identify the main discipline of scholar papers based on the abstracts", quick=False,
                description="CSL held-back abstracts clustered into disciplines (P2P)."),
    OfflineTask("KalmDev-CMRC2018Rerank-zh", "reranking", "zh", "zh-cmrc2018", {"dev": "dev"}, "cmrc_rerank",
                "Given a Chinese question, retrieve the Wikipedia paragraph that answers it", quick_max=100,
                description="CMRC 2018 held-back paragraphs: rerank the paragraphs of the question's own article "
                            "plus 5 paragraphs of other articles (by sha256)."),
    OfflineTask("KalmDev-CMRC2018-zh", "retrieval", "zh", "zh-cmrc2018", {"dev": "dev"}, "cmrc",
                "Given a Chinese question, retrieve the Wikipedia paragraph that answers it", quick_max=200,
                description="CMRC 2018 trial held-back paragraphs: question -> paragraph retrieval."),
)
TASKS_BY_NAME = {t.name: t for t in OFFLINE_TASKS}


def offline_task_names(quick: bool = False, langs: tuple[str, ...] | None = None) -> list[str]:
    """Names of the offline tasks (only the quick subset when ``quick``), optionally per language."""
    return [t.name for t in OFFLINE_TASKS if (t.quick or not quick) and (langs is None or t.lang in langs)]


# ---------------------------------------------------------------------------------------------- files
def split_file(card: str, split: str, role: str | None = None) -> Path:
    """Verified path (sha256 checked) of a card split through the data registry; never ``../shared``.

    With ``role`` the split must have that role in its card (evaluation reads only ``dev-eval`` splits).
    """
    from kalm_lib.data.cards import load_registry

    registry = load_registry(verify=False)  # each split is hashed on first use by split_path
    if card not in registry:
        raise EvalDataError(f"data card {card!r} is not in the registry (data_cards/{card}.md missing?)")
    entry = registry[card]
    if role is not None and split in entry.splits and entry.splits[split].role != role:
        raise EvalDataError(f"data card {card!r} split {split!r} has role {entry.splits[split].role!r}, "
                            f"not {role!r}: evaluation must not read it")
    return Path(entry.split_path(split))


def split_sha256(card: str, split: str) -> str:
    """sha256 of a card split as recorded in its card (for provenance)."""
    from kalm_lib.data.cards import load_registry

    return load_registry(verify=False)[card].splits[split].sha256


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8-sig")


def stable_key_hash(key: str) -> int:
    """sha256 of a key as an integer: the deterministic order used for quick subsets."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16)


def subsample(items: list, n: int | None, key: Callable[[Any], str]) -> list:
    """The ``n`` items with the smallest sha256(key) (all when ``n`` is None or >= len), in input order."""
    if n is None or len(items) <= n:
        return list(items)
    keep = set(sorted(range(len(items)), key=lambda i: stable_key_hash(key(items[i])))[:n])
    return [x for i, x in enumerate(items) if i in keep]


# ---------------------------------------------------------------------------------------------- readers
# Each reader takes a card split's text (and path, for error messages) and returns plain Python rows.
def _need(cond: bool, path: Path, lineno: int, msg: str) -> None:
    if not cond:
        raise EvalDataError(f"{path}:{lineno}: {msg}")


def read_pair_score(path: Path, fmt: str) -> list[tuple[str, str, float]]:
    """STS pairs (s1, s2, score) from csv (stsb-multi-mt), tsv (CNSD, AFQMC), PAWS-X tsv or QBQTC jsonl."""
    text = _read_text(path)
    rows: list[tuple[str, str, float]] = []
    if fmt == "csv_pair_score":
        for i, r in enumerate(csv.reader(io.StringIO(text)), 1):
            if not r:
                continue
            _need(len(r) == 3, path, i, f"expected sentence1,sentence2,score; got {len(r)} fields")
            rows.append((r[0], r[1], float(r[2])))
    elif fmt == "tsv_pair_score":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            p = line.split("\t")
            _need(len(p) == 3, path, i, f"expected s1<TAB>s2<TAB>score; got {len(p)} fields")
            rows.append((p[0], p[1], float(p[2])))
    elif fmt == "pawsx":
        lines = text.splitlines()
        _need(lines and lines[0].split("\t")[:4] == ["id", "sentence1", "sentence2", "label"], path, 1,
              "expected header id,sentence1,sentence2,label")
        for i, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            p = line.split("\t")
            _need(len(p) == 4, path, i, f"expected 4 fields, got {len(p)}")
            rows.append((p[1], p[2], float(p[3])))
    elif fmt == "qbqtc":
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                d = json.loads(line)
                rows.append((d["query"], d["title"], float(d["label"])))
    else:
        raise ValueError(fmt)
    return rows


def read_pair_label(path: Path, fmt: str) -> list[tuple[str, str, int]]:
    """Binary pairs (s1, s2, label) from MRPC tsv (with header) or LCQMC tsv (no header)."""
    text = _read_text(path)
    lines = text.splitlines()
    rows = []
    if fmt == "mrpc":
        _need(lines and lines[0].startswith("Quality"), path, 1, "expected MRPC header 'Quality\\t#1 ID...'")
        for i, line in enumerate(lines[1:], 2):
            if line.strip():
                p = line.split("\t")
                _need(len(p) == 5, path, i, f"expected 5 fields, got {len(p)}")
                rows.append((p[3], p[4], int(p[0])))
    elif fmt == "tsv_pair_label":
        for i, line in enumerate(lines, 1):
            if line.strip():
                p = line.split("\t")
                _need(len(p) == 3 and p[2].strip() in ("0", "1"), path, i, "expected s1<TAB>s2<TAB>0|1")
                rows.append((p[0], p[1], int(p[2])))
    else:
        raise ValueError(fmt)
    return rows


def read_text_label(path: Path, fmt: str) -> list[tuple[str, str]]:
    """Labelled texts (text, label) for classification / clustering."""
    text = _read_text(path)
    rows: list[tuple[str, str]] = []
    if fmt == "csv_text_label":  # banking77: text,category
        reader = csv.reader(io.StringIO(text))
        header = next(reader)
        _need(header[:2] == ["text", "category"], path, 1, f"expected header text,category; got {header}")
        rows = [(r[0], r[1]) for r in reader if r]
    elif fmt == "csv_label_text":  # ChnSentiCorp: label,review
        reader = csv.reader(io.StringIO(text))
        header = next(reader)
        _need(header[:2] == ["label", "review"], path, 1, f"expected header label,review; got {header}")
        rows = [(r[1], r[0]) for r in reader if r and r[1].strip()]
    elif fmt == "semicolon_text_label":  # emotion: text;label_name
        lines = text.splitlines()
        for i, line in enumerate(lines[1:], 2):
            if line.strip():
                t, sep, lab = line.rpartition(";")
                _need(bool(sep), path, i, "expected text;label")
                rows.append((t, lab))
    elif fmt == "trec":  # coarse<TAB>fine<TAB>question
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                p = line.split("\t")
                _need(len(p) == 3, path, i, "expected coarse<TAB>fine<TAB>question")
                rows.append((p[2], p[0]))
    elif fmt == "tnews":
        for line in text.splitlines():
            if line.strip():
                d = json.loads(line)
                rows.append((d["sentence"], d["label_desc"]))
    elif fmt == "news20":  # jsonl id, group, subject, body -> cluster subjects by group
        for line in text.splitlines():
            if line.strip():
                d = json.loads(line)
                if d["subject"].strip():
                    rows.append((d["subject"], d["group"]))
    elif fmt == "csl":  # prefix<TAB>input<TAB>target
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                p = line.split("\t")
                _need(len(p) >= 3, path, i, "expected prefix<TAB>input<TAB>target")
                rows.append((p[1], p[2]))
    else:
        raise ValueError(fmt)
    return rows


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


def _sentences(list_repr: str) -> str:
    """SciFact abstracts are stored as a numpy-style list repr (no commas): join its quoted sentences."""
    return " ".join(ast.literal_eval(s) for s in _QUOTED.findall(list_repr))


def read_scifact(claims_path: Path, corpus_path: Path):
    """(queries {id: text}, corpus {id: {title, text}}, qrels {qid: {did: 1}}) for SciFact claims."""
    corpus = {}
    for r in csv.DictReader(io.StringIO(_read_text(corpus_path))):
        corpus[r["doc_id"]] = {"title": r["title"], "text": _sentences(r["abstract"])}
    queries, qrels = {}, defaultdict(dict)
    for i, r in enumerate(csv.DictReader(io.StringIO(_read_text(claims_path))), 2):
        queries[r["id"]] = r["claim"]
        for did in re.findall(r"\d+", r["cited_doc_ids"] or ""):  # numpy-style list repr, no commas
            _need(str(did) in corpus, claims_path, i, f"cited doc {did} is not in the corpus")
            qrels[r["id"]][str(did)] = 1
    queries = {q: t for q, t in queries.items() if q in qrels}
    return queries, corpus, dict(qrels)


def read_cmrc(path: Path):
    """CMRC 2018 SQuAD JSON -> question -> paragraph retrieval."""
    d = json.loads(_read_text(path))
    queries, corpus, qrels = {}, {}, {}
    for art in d["data"]:
        for p in art["paragraphs"]:
            corpus[p["id"]] = {"title": art.get("title", ""), "text": p["context"]}
            for qa in p["qas"]:
                queries[qa["id"]] = qa["question"]
                qrels[qa["id"]] = {p["id"]: 1}
    return queries, corpus, qrels


def read_cmrc_rerank(path: Path, n_other: int = 5):
    """CMRC 2018 as reranking: each question's candidates are the paragraphs of its own article (hard,
    same topic) plus ``n_other`` paragraphs of other articles chosen by sha256 of (question id, paragraph id)."""
    d = json.loads(_read_text(path))
    queries, corpus, qrels, top = {}, {}, {}, {}
    article_of = {}
    for ai, art in enumerate(d["data"]):
        for p in art["paragraphs"]:
            corpus[p["id"]] = {"title": art.get("title", ""), "text": p["context"]}
            article_of[p["id"]] = ai
    for ai, art in enumerate(d["data"]):
        own = [p["id"] for p in art["paragraphs"]]
        others = [pid for pid in corpus if article_of[pid] != ai]
        for p in art["paragraphs"]:
            for qa in p["qas"]:
                qid = qa["id"]
                queries[qid] = qa["question"]
                qrels[qid] = {p["id"]: 1}
                top[qid] = own + sorted(others, key=lambda o: stable_key_hash(qid + "|" + o))[:n_other]
    return queries, corpus, qrels, top


def read_trecqa(path: Path):
    """TrecQA csv qtext,label,atext -> reranking (queries, corpus, qrels, top_ranked); keeps questions
    with at least one positive and one negative candidate (as the usual answer-selection protocol)."""
    by_q: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for i, r in enumerate(csv.DictReader(io.StringIO(_read_text(path))), 2):
        _need(r.get("label") in ("0", "1"), path, i, f"label must be 0 or 1, got {r.get('label')!r}")
        by_q[r["qtext"]].append((r["atext"], int(r["label"])))
    queries, corpus, qrels, top = {}, {}, {}, {}
    for qi, (q, cands) in enumerate(by_q.items()):
        labels = {lab for _, lab in cands}
        if labels != {0, 1}:
            continue
        qid = f"q{qi}"
        queries[qid] = q
        top[qid] = []
        qrels[qid] = {}
        for ci, (a, lab) in enumerate(cands):
            did = f"{qid}-d{ci}"
            corpus[did] = {"title": "", "text": a}
            top[qid].append(did)
            qrels[qid][did] = lab
    return queries, corpus, qrels, top


# ---------------------------------------------------------------------------------------------- mteb tasks
def _metadata(spec: OfflineTask, quick: bool, note: str):
    from mteb.abstasks.task_metadata import TaskMetadata

    mteb_type, category, main_score = TASK_TYPES[spec.type]
    desc = spec.description + (f" {note}" if note else "")
    return TaskMetadata(
        name=spec.name, dataset={"path": "local/none", "revision": "0"}, description=desc, reference=None,
        type=mteb_type, category=category, modalities=["text"], eval_splits=list(spec.splits),
        eval_langs=[LANGS[spec.lang]], main_score=main_score, date=None, domains=None, task_subtypes=None,
        license=None, annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation=None,
        prompt=spec.instruction,
    )


def _sentence_pair_loader(spec, n, read_rows, third_column: str):
    """mteb ``load_data`` for sentence-pair tasks (STS: ``score``, pair classification: ``labels``)."""
    def load_data(self, num_proc=None, **kw):
        import datasets

        dd = {}
        for split, card_split in spec.splits.items():
            rows = subsample(read_rows(split_file(spec.card, card_split, "dev-eval"), spec.reader), n,
                             key=lambda r: r[0] + "\t" + r[1])
            dd[split] = datasets.Dataset.from_dict({"sentence1": [r[0] for r in rows],
                                                    "sentence2": [r[1] for r in rows],
                                                    third_column: [r[2] for r in rows]})
        self.dataset = datasets.DatasetDict(dd)
        self.data_loaded = True

    return load_data

def build_task(spec: OfflineTask | str, *, quick: bool = False, seed: int = 42):
    """A real mteb task instance for an offline task (data read lazily in ``load_data``)."""
    import datasets
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.clustering import AbsTaskClustering
    from mteb.abstasks.pair_classification import AbsTaskPairClassification
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.sts import AbsTaskSTS

    if isinstance(spec, str):
        if spec not in TASKS_BY_NAME:
            raise KeyError(f"unknown offline task {spec!r}; known: {sorted(TASKS_BY_NAME)}")
        spec = TASKS_BY_NAME[spec]
    n = spec.quick_max if quick else None
    note = (f"Quick subset: at most {n} items per split, the ones with the smallest sha256 of their text "
            f"(deterministic).") if quick else ""
    attrs: dict[str, Any] = {"metadata": _metadata(spec, quick, note), "kalm_spec": spec, "kalm_quick": quick}

    if spec.type == "sts":
        base = AbsTaskSTS
        attrs.update(min_score=spec.score_range[0], max_score=spec.score_range[1])

        load_data = _sentence_pair_loader(spec, n, read_pair_score, "score")

    elif spec.type == "pair_classification":
        base = AbsTaskPairClassification

        load_data = _sentence_pair_loader(spec, n, read_pair_label, "labels")

    elif spec.type == "classification":
        base = AbsTaskClassification
        if quick:  # fewer classifier fits; the full mode keeps mteb's 10 runs x 8 examples per label
            attrs["n_experiments"] = 2

        def load_data(self, num_proc=None, **kw):
            train = read_text_label(split_file(spec.card, spec.train_split, "train"), spec.reader)
            labels = sorted({lab for _, lab in train})
            index = {lab: i for i, lab in enumerate(labels)}
            dd = {"train": datasets.Dataset.from_dict({"text": [t for t, _ in train],
                                                       "label": [index[lab] for _, lab in train]})}
            for split, card_split in spec.splits.items():
                rows = read_text_label(split_file(spec.card, card_split, "dev-eval"), spec.reader)
                unknown = sorted({lab for _, lab in rows} - set(index))
                if unknown:
                    raise EvalDataError(f"{spec.name}: labels {unknown[:5]} of split {card_split!r} never occur "
                                        f"in the train split {spec.train_split!r}")
                rows = subsample(rows, n, key=lambda r: r[0])
                dd[split] = datasets.Dataset.from_dict({"text": [t for t, _ in rows],
                                                        "label": [index[lab] for _, lab in rows]})
            self.dataset = datasets.DatasetDict(dd)
            self.data_loaded = True

    elif spec.type == "clustering":
        base = AbsTaskClustering
        # embed every text of the split (mteb's default embeds 4% of a large corpus)
        attrs.update(max_fraction_of_documents_to_embed=None, max_document_to_embed=None)

        def load_data(self, num_proc=None, **kw):
            dd = {}
            for split, card_split in spec.splits.items():
                rows = subsample(read_text_label(split_file(spec.card, card_split, "dev-eval"), spec.reader), n,
                                 key=lambda r: r[0])
                dd[split] = datasets.Dataset.from_dict({"sentences": [t for t, _ in rows],
                                                        "labels": [lab for _, lab in rows]})
            self.dataset = datasets.DatasetDict(dd)
            self.data_loaded = True

    elif spec.type in ("retrieval", "reranking"):
        base = AbsTaskRetrieval

        def load_data(self, num_proc=None, **kw):
            self.dataset = {"default": {}}
            for split, card_split in spec.splits.items():
                top = None
                if spec.reader == "scifact":
                    q, c, r = read_scifact(split_file(spec.card, card_split, "dev-eval"),
                                           split_file(spec.card, spec.corpus_split, "corpus"))
                elif spec.reader == "cmrc":
                    q, c, r = read_cmrc(split_file(spec.card, card_split, "dev-eval"))
                elif spec.reader == "cmrc_rerank":
                    q, c, r, top = read_cmrc_rerank(split_file(spec.card, card_split, "dev-eval"))
                elif spec.reader == "trecqa":
                    q, c, r, top = read_trecqa(split_file(spec.card, card_split, "dev-eval"))
                else:
                    raise ValueError(spec.reader)
                q, c, r, top = _subsample_retrieval(q, c, r, top, n)
                self.dataset["default"][split] = {
                    "queries": datasets.Dataset.from_dict({"id": list(q), "text": list(q.values())}),
                    "corpus": datasets.Dataset.from_dict({"id": list(c), "title": [d["title"] for d in c.values()],
                                                          "text": [d["text"] for d in c.values()]}),
                    "relevant_docs": r, "top_ranked": top,
                }
            self.data_loaded = True
    else:
        raise ValueError(f"{spec.name}: unsupported task type {spec.type!r}")

    attrs["load_data"] = load_data
    cls = type(spec.name.replace("-", "_"), (base,), attrs)
    return cls(seed=seed)


def _subsample_retrieval(queries, corpus, qrels, top, n):
    """Keep ``n`` queries (by sha256 of their id); the corpus keeps every relevant / candidate document
    plus, for retrieval, at most 5x``n`` distractors (by sha256), so recall stays meaningful."""
    if n is None or len(queries) <= n:
        return queries, corpus, qrels, top
    kept = subsample(list(queries), n, key=str)
    queries = {q: queries[q] for q in kept}
    qrels = {q: qrels[q] for q in kept}
    needed = {d for q in kept for d in qrels[q]}
    if top is not None:
        top = {q: top[q] for q in kept}
        needed |= {d for q in kept for d in top[q]}
    else:
        others = subsample([d for d in corpus if d not in needed], 5 * n, key=str)
        needed |= set(others)
    corpus = {d: v for d, v in corpus.items() if d in needed}
    return queries, corpus, qrels, top


def build_tasks(names: list[str] | None = None, *, quick: bool = False, seed: int = 42) -> list:
    """mteb task instances for the named offline tasks (default: all, or the quick subset when ``quick``)."""
    names = names or offline_task_names(quick=quick)
    return [build_task(name, quick=quick, seed=seed) for name in names]
