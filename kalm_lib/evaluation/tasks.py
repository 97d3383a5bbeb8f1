"""Offline MTEB tasks built from the data cards' dev-eval splits (no hub access, no ``../shared`` at run time).

Each :class:`OfflineTask` names a card split under ``data/`` and its file format; the rows are read by the
format readers of :mod:`kalm_lib.data.formats`, the same the training sources use (so a SciFact abstract, say,
is the same string in training and evaluation). :func:`build_task` wraps a task in a real ``mteb`` task
subclass (``AbsTaskSTS``, ``AbsTaskClassification``, ...), so mteb's own evaluators compute every metric.
Task types are those of the training records (:data:`kalm_lib.data.records.TASK_TYPES`), mapped onto mteb's
by :data:`MTEB_TYPES`.

Names say they are ours (``KalmDev-...``). Where the data and split are exactly those of a public MTEB task
(STSBenchmark test, Banking77 test, Emotion validation, C-MTEB STSB and PAWSX), ``mteb_equivalent`` names
the public task so published scores line up (:mod:`kalm_lib.evaluation.results` ``load_reference_scores``).

``quick=True`` keeps at most ``quick_max`` items per split (chosen by sha256 of a stable key, never by a
random generator, and written into the task description) and fewer classifier runs, so the whole quick
suite runs in a few minutes on 2 CPU cores with MiniLM. Full mode uses every row, as the public
evaluation did.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from kalm_lib.data.cards import load_registry
from kalm_lib.data.formats import (read_pair_label, read_pair_score, read_scifact_claims, read_scifact_corpus,
                                   read_squad, read_text_label)
from kalm_lib.data.records import TASK_TYPES, DataFormatError

__all__ = ["MTEB_TYPES", "MTEB_TYPE_TO_OURS", "LANGS", "EvalDataError", "OfflineTask", "OFFLINE_TASKS",
           "TASKS_BY_NAME", "offline_task_names", "split_file", "split_sha256", "subsample", "stable_key_hash",
           "read_pair_score", "read_pair_label", "read_text_label", "read_scifact", "read_cmrc",
           "read_cmrc_rerank", "read_trecqa", "build_task", "build_tasks"]

# Each evaluation task type is a record task type (kalm_lib.data.records.TASK_TYPES) -> (mteb type, mteb
# category, main score).
MTEB_TYPES = {
    "sts": ("STS", "t2t", "cosine_spearman"),
    "pair_classification": ("PairClassification", "t2t", "max_ap"),
    "classification": ("Classification", "t2c", "accuracy"),
    "clustering": ("Clustering", "t2c", "v_measure"),
    "retrieval": ("Retrieval", "t2t", "ndcg_at_10"),
    "reranking": ("Reranking", "t2t", "map_at_1000"),
}
assert set(MTEB_TYPES) <= set(TASK_TYPES)
MTEB_TYPE_TO_OURS = {v[0]: k for k, v in MTEB_TYPES.items()}
LANGS = {"en": "eng-Latn", "zh": "cmn-Hans"}


class EvalDataError(DataFormatError):
    """A dev-eval split that cannot be turned into a task (not in the registry, wrong role, labels unknown to
    the train split, a cited document missing). Bad rows are the format readers' DataFormatError."""


@dataclasses.dataclass(frozen=True)
class OfflineTask:
    """One offline evaluation task: which card split, how to read it, how to present it to mteb."""

    name: str                       # mteb task name, "KalmDev-<Data>-<lang>"
    type: str                       # one of kalm_lib.data.records.TASK_TYPES (and a key of MTEB_TYPES)
    lang: str                       # "en" | "zh"
    card: str                       # data card name (folder under data/)
    splits: dict[str, str]          # mteb eval split -> card split
    reader: str                     # file format (kalm_lib.data.formats.FORMATS) or, for retrieval /
                                    # reranking, a builder: scifact, cmrc, cmrc_rerank, trecqa
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
        return MTEB_TYPES[self.type][0]

    @property
    def main_score(self) -> str:
        return MTEB_TYPES[self.type][2]


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
    OfflineTask("KalmDev-STSB-zh", "sts", "zh", "zh-cnsd-stsb", {"validation": "dev", "test": "test"}, "tsv_pair",
                "Retrieve semantically similar text", mteb_equivalent="STSB", quick_max=250,
                description="Chinese STS-B (CNSD) dev+test (= C-MTEB STSB validation+test)."),
    OfflineTask("KalmDev-PAWSX-zh", "sts", "zh", "zh-pawsx", {"test": "test"}, "pawsx",
                "Retrieve semantically similar text", mteb_equivalent="PAWSX", score_range=(0.0, 1.0), quick_max=300,
                description="PAWS-X zh test scored as STS on 0/1 labels (= C-MTEB PAWSX test)."),
    OfflineTask("KalmDev-AFQMC-zh", "sts", "zh", "zh-afqmc", {"test": "heldout"}, "tsv_pair",
                "Retrieve semantically similar text", score_range=(0.0, 1.0), quick=False,
                description="AFQMC held-back 1/8 of train, STS on 0/1 labels (not MTEB AFQMC validation)."),
    OfflineTask("KalmDev-QBQTC-zh", "sts", "zh", "zh-qbqtc", {"dev": "dev"}, "qbqtc",
                "Given a web search query, retrieve relevant titles", score_range=(0.0, 2.0), quick=False,
                quick_max=1000, description="QBQTC dev query-title relevance 0/1/2 as STS (not MTEB QBQTC test)."),
    OfflineTask("KalmDev-LCQMC-zh", "pair_classification", "zh", "zh-lcqmc", {"dev": "dev"}, "tsv_pair",
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
    return load_registry(verify=False)[card].splits[split].sha256


def stable_key_hash(key: str) -> int:
    """sha256 of a key as an integer: the deterministic order used for quick subsets."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16)


def subsample(items: list, n: int | None, key: Callable[[Any], str]) -> list:
    """The ``n`` items with the smallest sha256(key) (all when ``n`` is None or >= len), in input order."""
    if n is None or len(items) <= n:
        return list(items)
    keep = set(sorted(range(len(items)), key=lambda i: stable_key_hash(key(items[i])))[:n])
    return [x for i, x in enumerate(items) if i in keep]


# ---------------------------------------------------------------------------------------------- retrieval
# Rows come from the format readers of kalm_lib.data.formats (the ones training uses); read_text_label,
# read_pair_score and read_pair_label are those readers. Below: (queries, corpus, qrels[, top_ranked]).
def read_scifact(claims_path: Path, corpus_path: Path):
    """(queries {id: text}, corpus {id: {title, text}}, qrels {qid: {did: 1}}) for SciFact claims."""
    docs = read_scifact_corpus(corpus_path)
    corpus = {d: {"title": title, "text": abstract} for d, (title, abstract) in docs.items()}
    queries, qrels = {}, defaultdict(dict)
    for cid, claim, cited, where in read_scifact_claims(claims_path):
        queries[cid] = claim
        for did in cited:
            if did not in corpus:
                raise EvalDataError(f"{where}: cited doc {did} is not in the corpus")
            qrels[cid][did] = 1
    queries = {q: t for q, t in queries.items() if q in qrels}
    return queries, corpus, dict(qrels)


def read_cmrc(path: Path):
    """CMRC 2018 SQuAD JSON -> question -> paragraph retrieval."""
    queries, corpus, qrels = {}, {}, {}
    for title, paragraphs in read_squad(path):
        for pid, context, qas in paragraphs:
            corpus[pid] = {"title": title, "text": context}
            for qid, question in qas:
                queries[qid] = question
                qrels[qid] = {pid: 1}
    return queries, corpus, qrels


def read_cmrc_rerank(path: Path, n_other: int = 5):
    """CMRC 2018 as reranking: each question's candidates are the paragraphs of its own article (hard,
    same topic) plus ``n_other`` paragraphs of other articles chosen by sha256 of (question id, paragraph id)."""
    articles = read_squad(path)
    queries, corpus, qrels, top = {}, {}, {}, {}
    article_of = {}
    for ai, (title, paragraphs) in enumerate(articles):
        for pid, context, _qas in paragraphs:
            corpus[pid] = {"title": title, "text": context}
            article_of[pid] = ai
    for ai, (_title, paragraphs) in enumerate(articles):
        own = [pid for pid, _c, _q in paragraphs]
        others = [pid for pid in corpus if article_of[pid] != ai]
        for pid, _context, qas in paragraphs:
            for qid, question in qas:
                queries[qid] = question
                qrels[qid] = {pid: 1}
                top[qid] = own + sorted(others, key=lambda o: stable_key_hash(qid + "|" + o))[:n_other]
    return queries, corpus, qrels, top


def read_trecqa(path: Path):
    """TrecQA csv qtext,label,atext -> reranking (queries, corpus, qrels, top_ranked); keeps questions
    with at least one positive and one negative candidate (as the usual answer-selection protocol)."""
    by_q: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for question, answer, label in read_pair_label(path, "trecqa"):
        by_q[question].append((answer, label))
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
def _metadata(spec: OfflineTask, note: str, revision: str):
    """mteb ``TaskMetadata`` of an offline task (``note``: the quick-subset sentence of the description).

    ``revision`` is ``quick-<n>`` for a quick subset and ``full`` for the whole split: mteb writes it into every
    result file as the dataset revision, so a quick subset never passes for the full split (results derive the
    ``scope`` column from it)."""
    from mteb.abstasks.task_metadata import TaskMetadata  # heavy (mteb): only when tasks are built

    mteb_type, category, main_score = MTEB_TYPES[spec.type]
    desc = spec.description + (f" {note}" if note else "")
    return TaskMetadata(
        name=spec.name, dataset={"path": "local/none", "revision": revision}, description=desc, reference=None,
        type=mteb_type, category=category, modalities=["text"], eval_splits=list(spec.splits),
        eval_langs=[LANGS[spec.lang]], main_score=main_score, date=None, domains=None, task_subtypes=None,
        license=None, annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation=None,
        prompt=spec.instruction,
    )


def _sentence_pair_loader(spec: OfflineTask, n: int | None, read: Callable, third_column: str):
    """mteb ``load_data`` for sentence-pair tasks (STS: ``score``, pair classification: ``labels``)."""
    def load_data(self, num_proc=None, **kw):
        import datasets  # heavy: only when a task's data is loaded

        dd = {}
        for split, card_split in spec.splits.items():
            rows = subsample(read(split_file(spec.card, card_split, "dev-eval"), spec.reader), n,
                             key=lambda r: r[0] + "\t" + r[1])
            dd[split] = datasets.Dataset.from_dict({"sentence1": [r[0] for r in rows],
                                                    "sentence2": [r[1] for r in rows],
                                                    third_column: [r[2] for r in rows]})
        self.dataset = datasets.DatasetDict(dd)
        self.data_loaded = True

    return load_data


def _classification_loader(spec: OfflineTask, n: int | None):
    """mteb ``load_data`` for classification: the classifier is fitted on the card's train split."""
    def load_data(self, num_proc=None, **kw):
        import datasets  # heavy: only when a task's data is loaded

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

    return load_data


def _clustering_loader(spec: OfflineTask, n: int | None):
    """mteb ``load_data`` for clustering: texts and their labels."""
    def load_data(self, num_proc=None, **kw):
        import datasets  # heavy: only when a task's data is loaded

        dd = {}
        for split, card_split in spec.splits.items():
            rows = subsample(read_text_label(split_file(spec.card, card_split, "dev-eval"), spec.reader), n,
                             key=lambda r: r[0])
            dd[split] = datasets.Dataset.from_dict({"sentences": [t for t, _ in rows],
                                                    "labels": [lab for _, lab in rows]})
        self.dataset = datasets.DatasetDict(dd)
        self.data_loaded = True

    return load_data


def _read_retrieval(spec: OfflineTask, card_split: str):
    """(queries, corpus, qrels, top_ranked or None) of one split of a retrieval / reranking task."""
    path = split_file(spec.card, card_split, "dev-eval")
    if spec.reader == "scifact":
        return (*read_scifact(path, split_file(spec.card, spec.corpus_split, "corpus")), None)
    if spec.reader == "cmrc":
        return (*read_cmrc(path), None)
    if spec.reader == "cmrc_rerank":
        return read_cmrc_rerank(path)
    if spec.reader == "trecqa":
        return read_trecqa(path)
    raise ValueError(f"{spec.name}: unknown retrieval reader {spec.reader!r}")


def _retrieval_loader(spec: OfflineTask, n: int | None):
    """mteb ``load_data`` for retrieval and reranking (reranking: ``top_ranked`` candidates)."""
    def load_data(self, num_proc=None, **kw):
        import datasets  # heavy: only when a task's data is loaded

        self.dataset = {"default": {}}
        for split, card_split in spec.splits.items():
            q, c, r, top = _subsample_retrieval(*_read_retrieval(spec, card_split), n)
            self.dataset["default"][split] = {
                "queries": datasets.Dataset.from_dict({"id": list(q), "text": list(q.values())}),
                "corpus": datasets.Dataset.from_dict({"id": list(c), "title": [d["title"] for d in c.values()],
                                                      "text": [d["text"] for d in c.values()]}),
                "relevant_docs": r, "top_ranked": top,
            }
        self.data_loaded = True

    return load_data


def build_task(spec: OfflineTask | str, *, quick: bool = False, seed: int = 42, quick_cap: int | None = None):
    """A real mteb task instance for an offline task (data read lazily in ``load_data``). ``quick_cap`` lowers
    the task's own ``quick_max`` (a cheaper quick subset for many short runs, e.g. an ablation grid's cells);
    the subset's size is in its revision (``quick-<n>``), so capped and uncapped scores never mix."""
    # mteb is heavy: imported only when tasks are built
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.clustering import AbsTaskClustering
    from mteb.abstasks.pair_classification import AbsTaskPairClassification
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.sts import AbsTaskSTS

    if isinstance(spec, str):
        if spec not in TASKS_BY_NAME:
            raise KeyError(f"unknown offline task {spec!r}; known: {sorted(TASKS_BY_NAME)}")
        spec = TASKS_BY_NAME[spec]
    if quick_cap is not None and quick_cap < 1:
        raise ValueError(f"quick_cap must be >= 1, got {quick_cap}")
    n = (spec.quick_max if quick_cap is None else min(spec.quick_max, quick_cap)) if quick else None
    note = (f"Quick subset: at most {n} items per split, the ones with the smallest sha256 of their text "
            f"(deterministic).") if quick else ""
    revision = f"quick-{n}" if quick else "full"
    attrs: dict[str, Any] = {"metadata": _metadata(spec, note, revision), "kalm_spec": spec, "kalm_quick": quick}
    if spec.type == "sts":
        base, load_data = AbsTaskSTS, _sentence_pair_loader(spec, n, read_pair_score, "score")
        attrs.update(min_score=spec.score_range[0], max_score=spec.score_range[1])
    elif spec.type == "pair_classification":
        base, load_data = AbsTaskPairClassification, _sentence_pair_loader(spec, n, read_pair_label, "labels")
    elif spec.type == "classification":
        base, load_data = AbsTaskClassification, _classification_loader(spec, n)
        if quick:  # fewer classifier fits; the full mode keeps mteb's 10 runs x 8 examples per label
            attrs["n_experiments"] = 2
    elif spec.type == "clustering":
        base, load_data = AbsTaskClustering, _clustering_loader(spec, n)
        # embed every text of the split (mteb's default embeds 4% of a large corpus)
        attrs.update(max_fraction_of_documents_to_embed=None, max_document_to_embed=None)
    elif spec.type in ("retrieval", "reranking"):
        base, load_data = AbsTaskRetrieval, _retrieval_loader(spec, n)
    else:
        raise ValueError(f"{spec.name}: unsupported task type {spec.type!r}")
    attrs["load_data"] = load_data
    cls = type(spec.name.replace("-", "_"), (base,), attrs)
    _mteb_registry().setdefault(spec.name, cls)
    return cls(seed=seed)


def _mteb_registry() -> dict:
    """mteb 2.x's task registry (name -> class). mteb has no public hook to add a task; it drops the prompt keys
    of task names it does not know (``AbsEncoder.validate_task_to_prompt_name``), so without registering, stock
    mteb would ignore a saved model's per-task prompt for a KalmDev-* task. (``import mteb.get_tasks`` would give
    the function of that name, hence importlib.)"""
    return importlib.import_module("mteb.get_tasks")._TASKS_REGISTRY


@functools.lru_cache(maxsize=1)
def register_with_mteb() -> None:
    """Make every offline task known to mteb's task registry (once per process; building a class reads no data)."""
    for name in offline_task_names():
        build_task(name)


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


def build_tasks(names: list[str] | None = None, *, quick: bool = False, seed: int = 42,
                quick_cap: int | None = None) -> list:
    """mteb task instances for the named offline tasks (default: all, or the quick subset when ``quick``)."""
    names = names or offline_task_names(quick=quick)
    return [build_task(name, quick=quick, seed=seed, quick_cap=quick_cap) for name in names]
