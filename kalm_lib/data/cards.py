"""Data cards: one Markdown file per dataset with Hugging Face-style YAML front matter.

A card names the source (repository, commit, paths), the licence (with non-commercial / research-only
flags), the languages, and every split with its file, row count, sha256 and role:

- ``train``: may enter curated training sets;
- ``dev-eval``: evaluation only; the curation leakage check removes its texts from training data;
- ``corpus``: a shared passage pool (retrieval documents) used by training and evaluation alike.

``load_registry()`` reads all cards; ``card.split_path(split)`` returns a verified path (a missing file
or a sha256 mismatch is a :class:`DataCardError` naming the card and split).

A hub-only card (``data_cards/hub-*.md``) bundles nothing: no ``splits``, and a ``hub:`` block instead
(:class:`HubSpec`: hub id, config, split, revision, licence, column mapping, the fields rows lack, what was
verified) that curation (``inputs: [{card: ...}]``) and the trainer (``data.sources: [{card: ...}]``) stream.

Hugging Face dataset-card keys sit beside our own fields (:func:`with_hf_keys` computes them, so they never
disagree with ours): ``language`` (ISO codes; an older card's deprecated ``languages`` is still read), ``license`` (``other``
needs a ``license_name``), ``task_categories`` (the Hub's task categories, from our ``task_types`` through
:data:`HF_TASK_CATEGORIES_OF`, mteb's own mapping), ``size_categories`` (the Hub's bucket of the row count) and
``configs`` (``config_name`` + ``data_files``; paths relative to the card's data folder ``data/<name>/``, the root
of a Hub dataset repository made of that folder with the card as its ``README.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any

import yaml

from kalm_lib.provenance import REPO_ROOT, sha256_file

__all__ = ["CARDS_DIR", "DATA_DIR", "ROLES", "HF_TASK_CATEGORIES_OF", "HF_SIZE_CATEGORIES", "HF_READ_ARGS",
           "DataCardError", "Split", "HubSpec", "DataCard", "parse_front_matter", "load_card", "load_registry", "dev_eval_splits",
           "hf_task_categories", "hf_size_category", "hf_configs", "with_hf_keys"]

CARDS_DIR = REPO_ROOT / "data_cards"
DATA_DIR = REPO_ROOT / "data"
ROLES = ("train", "dev-eval", "corpus")

# our task type -> the Hub's task categories (huggingface.js packages/tasks/src/pipelines.ts). Retrieval, reranking,
# sts, classification, clustering and pair_classification follow mteb's TaskMetadata._hf_task_type (what mteb
# writes into its own dataset cards); NLI pairs are text classification (as the SNLI/MNLI cards on the Hub say);
# weak pre-training pairs are sentence-transformers training data (feature-extraction, sentence-similarity).
HF_TASK_CATEGORIES_OF: dict[str, tuple[str, ...]] = {
    "retrieval": ("text-retrieval",), "reranking": ("text-ranking",), "sts": ("sentence-similarity",),
    "classification": ("text-classification",), "clustering": ("text-classification",),
    "pair_classification": ("text-classification",), "nli": ("text-classification",),
    "pretrain": ("feature-extraction", "sentence-similarity"),
}
# the Hub's size buckets (huggingface_hub.DatasetCardData): (upper bound, label); n >= 1e12 is "n>1T"
HF_SIZE_CATEGORIES = ((10 ** 3, "n<1K"), (10 ** 4, "1K<n<10K"), (10 ** 5, "10K<n<100K"), (10 ** 6, "100K<n<1M"),
                      (10 ** 7, "1M<n<10M"), (10 ** 8, "10M<n<100M"), (10 ** 9, "100M<n<1B"), (10 ** 10, "1B<n<10B"),
                      (10 ** 11, "10B<n<100B"), (10 ** 12, "100B<n<1T"))
# how the Hub's csv/json builders read each of our file formats (a config's keyword arguments, when all its splits
# share the format; QUOTE_NONE = 3: our TSV files have bare quotes inside texts). Not "lines": the text builder keeps
# blank lines as rows, which our row counts skip
HF_READ_ARGS: dict[str, dict[str, Any]] = {
    "csv": {}, "csv_noheader": {"header": None}, "jsonl": {},
    "tsv": {"sep": "\t", "quoting": 3}, "tsv_noheader": {"sep": "\t", "header": None, "quoting": 3},
}
_GROUPED_SPLIT = re.compile(r"^(?P<config>\w+?)_(?P<split>train|dev|validation|test)$")


class DataCardError(ValueError):
    """A card that cannot be used: bad front matter, unknown split, missing file, sha256 mismatch."""


@dataclasses.dataclass(frozen=True)
class Split:
    name: str
    file: str
    rows: int
    sha256: str
    role: str
    task_type: str
    lang: str
    format: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class HubSpec:
    """Where a dataset is on the hub and how its rows become unified records (a card's ``hub:`` block, or a
    training/curation config's own): read with ``datasets`` streaming (:mod:`kalm_lib.data.streaming`,
    :mod:`kalm_lib.data.shards`).

    ``path``: a hub id (``org/name``) or a local builder (``json``, ``parquet``) with ``data_files``;
    ``columns``: record field -> dataset column (``{query: anchor, pos: positive, neg: negative}``; a string
    column for ``pos``/``neg`` becomes a 1-list); the other fields fill what the rows lack.
    """

    path: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None          # a commit sha pins the data (None: the default branch)
    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    task_type: str = "pretrain"
    category: str = "weak_pairs"
    instruction: str = ""
    lang: str = ""
    data_files: Any = None
    rows: int | None = None              # rows of the split, when known (source weights; checked nowhere)
    license: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> "HubSpec":
        """A spec from a card's ``hub:`` mapping (``id`` or ``path``); unknown keys are a DataCardError."""
        d = dict(d)
        if "id" in d:
            d["path"] = d.pop("id")
        known = {f.name for f in dataclasses.fields(cls)} | {"verified", "note"}
        unknown = sorted(set(d) - known)
        if unknown or not isinstance(d.get("path"), str):
            raise DataCardError(f"{where}: hub needs an 'id' (and only {sorted(known)}); got {sorted(d)}")
        return cls(**{k: v for k, v in d.items() if k not in ("verified", "note")})


@dataclasses.dataclass
class DataCard:
    """One dataset: front-matter fields in ``meta``; splits by name; files under ``data_dir/name``."""

    name: str
    meta: dict[str, Any]
    splits: dict[str, Split]
    data_dir: Path
    card_path: Path
    _verified: set = dataclasses.field(default_factory=set, repr=False)

    @property
    def license(self) -> str:
        return self.meta.get("license", "unknown")

    @property
    def non_commercial(self) -> bool:
        return bool(self.meta.get("non_commercial"))

    @property
    def research_only(self) -> bool:
        return bool(self.meta.get("research_only"))

    @property
    def languages(self) -> list[str]:
        """The card's ``language`` (Hub key; an older card's ``languages`` is read too) as a list."""
        language = self.meta.get("language") or self.meta.get("languages") or []
        return [language] if isinstance(language, str) else list(language)

    @property
    def source(self) -> dict[str, Any]:
        return dict(self.meta.get("source") or {})

    @property
    def hub(self) -> HubSpec | None:
        """The card's ``hub:`` block as a :class:`HubSpec` (where to stream the dataset from), or None."""
        block = self.meta.get("hub")
        return HubSpec.from_dict(block, f"data card {self.name!r} ({self.card_path})") if block else None

    def splits_with_role(self, role: str) -> list[str]:
        """Names of the splits with the given role (train, dev-eval, corpus)."""
        return [s for s, sp in self.splits.items() if sp.role == role]

    def split_path(self, split: str, verify: bool = True) -> Path:
        """Path of a split's file; checks existence and (once per process) its sha256 against the card."""
        if split not in self.splits:
            raise DataCardError(f"data card {self.name!r} ({self.card_path}): no split {split!r}; "
                                f"splits: {sorted(self.splits)}")
        sp = self.splits[split]
        path = self.data_dir / self.name / sp.file
        if not path.is_file():
            raise DataCardError(f"data card {self.name!r} split {split!r}: file missing: {path}")
        if verify and split not in self._verified:
            digest = sha256_file(path)
            if digest != sp.sha256:
                raise DataCardError(f"data card {self.name!r} split {split!r}: sha256 mismatch for {path}: "
                                    f"card says {sp.sha256}, file has {digest}")
            self._verified.add(split)
        return path

    def verify(self) -> None:
        """Check every split's file (existence + sha256)."""
        for s in self.splits:
            self.split_path(s, verify=True)

    def data_hashes(self) -> dict[str, str]:
        """``{"<card>/<split>": sha256}`` for provenance records."""
        return {f"{self.name}/{s}": sp.sha256 for s, sp in self.splits.items()}


def parse_front_matter(text: str, where: str) -> dict[str, Any]:
    """The YAML mapping between the leading ``---`` lines of a Markdown card."""
    if not text.startswith("---"):
        raise DataCardError(f"{where}: a data card must start with YAML front matter ('---')")
    parts = text.split("\n---", 1)
    if len(parts) != 2:
        raise DataCardError(f"{where}: front matter is not closed by a '---' line")
    try:
        meta = yaml.safe_load(parts[0][3:])
    except yaml.YAMLError as e:
        raise DataCardError(f"{where}: front matter is not valid YAML: {e}") from None
    if not isinstance(meta, dict):
        raise DataCardError(f"{where}: front matter must be a mapping")
    return meta


def _check_hf_keys(meta: dict[str, Any], name: str, path: Path) -> None:
    """What the Hub refuses, as a DataCardError naming the card (an older card's deprecated ``languages`` is still
    read; :func:`with_hf_keys` renames it, and the bundled cards carry only ``language``)."""
    if "languages" in meta and "language" in meta:
        raise DataCardError(f"data card {name!r} ({path}): both 'language' and the deprecated 'languages'; "
                            "keep 'language'")
    if meta.get("license") == "other" and not meta.get("license_name"):
        raise DataCardError(f"data card {name!r} ({path}): license 'other' needs a 'license_name' (a short id)")


def load_card(path: str | Path, data_dir: str | Path | None = None) -> DataCard:
    """Parse one card file (no file verification; see :meth:`DataCard.verify`); files under ``data_dir``
    (default :data:`DATA_DIR`)."""
    path, data_dir = Path(path), DATA_DIR if data_dir is None else data_dir
    meta = parse_front_matter(path.read_text(encoding="utf-8"), str(path))
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise DataCardError(f"{path}: front matter needs a 'name'")
    if name != path.stem:
        raise DataCardError(f"data card {name!r}: file name {path.name} must be {name}.md")
    _check_hf_keys(meta, name, path)
    raw_splits = meta.get("splits")
    if meta.get("hub") and raw_splits in (None, {}):  # a hub-only card: nothing bundled, streamed from the hub
        raw_splits = {}
    elif not isinstance(raw_splits, dict) or not raw_splits:
        raise DataCardError(f"data card {name!r} ({path}): needs a non-empty 'splits' mapping (or a 'hub' block)")
    splits = {}
    required = ("file", "rows", "sha256", "role", "task_type", "lang", "format")
    for s, e in raw_splits.items():
        if not isinstance(e, dict):
            raise DataCardError(f"data card {name!r} split {s!r}: expected a mapping")
        missing = [k for k in required if k not in e]
        if missing:
            raise DataCardError(f"data card {name!r} split {s!r}: missing field(s) {missing}")
        if e["role"] not in ROLES:
            raise DataCardError(f"data card {name!r} split {s!r}: role {e['role']!r} not in {ROLES}")
        if not isinstance(e["rows"], int) or isinstance(e["rows"], bool):
            raise DataCardError(f"data card {name!r} split {s!r}: rows must be an integer")
        splits[s] = Split(name=s, **{k: e[k] for k in required},
                          extra={k: v for k, v in e.items() if k not in required})
    card = DataCard(name=name, meta=meta, splits=splits, data_dir=Path(data_dir), card_path=path)
    card.hub  # a malformed hub block fails when the card is read
    return card


@functools.lru_cache(maxsize=8)
def _cached(cards_dir: str, data_dir: str, verify: bool) -> tuple[DataCard, ...]:
    cards = [load_card(p, data_dir) for p in sorted(Path(cards_dir).glob("*.md"))]
    if verify:
        for c in cards:
            c.verify()
    return tuple(cards)


def load_registry(cards_dir: str | Path | None = None, data_dir: str | Path | None = None,
                  verify: bool = True) -> dict[str, DataCard]:
    """All cards in ``cards_dir`` (default :data:`CARDS_DIR`) as ``{name: DataCard}``, files under
    ``data_dir`` (default :data:`DATA_DIR`); with ``verify`` every split file is hashed.

    The defaults are read when called, so a test (or a fork with its own bundle) can point the module's
    ``CARDS_DIR`` / ``DATA_DIR`` elsewhere. Results are cached per (cards_dir, data_dir, verify) for the
    life of the process.
    """
    cards_dir = Path(CARDS_DIR if cards_dir is None else cards_dir)
    data_dir = Path(DATA_DIR if data_dir is None else data_dir)
    if not cards_dir.is_dir():
        raise DataCardError(f"data cards folder not found: {cards_dir}")
    cards = _cached(str(cards_dir.resolve()), str(data_dir.resolve()), verify)
    if not cards:
        raise DataCardError(f"no data cards (*.md) in {cards_dir}")
    return {c.name: c for c in cards}


def dev_eval_splits(registry: dict[str, DataCard]) -> list[tuple[str, str]]:
    """``[(card, split)]`` of every dev-eval split (what the leakage check protects)."""
    return [(c.name, s) for c in registry.values() for s in c.splits_with_role("dev-eval")]


def hf_task_categories(task_types: list[str]) -> list[str]:
    """The Hub's task categories of our task types (:data:`HF_TASK_CATEGORIES_OF`), first-seen order, no repeats."""
    unknown = [t for t in task_types if t not in HF_TASK_CATEGORIES_OF]
    if unknown:
        raise DataCardError(f"task type(s) {unknown} have no Hub task category; known: {sorted(HF_TASK_CATEGORIES_OF)}")
    return list(dict.fromkeys(c for t in task_types for c in HF_TASK_CATEGORIES_OF[t]))


def hf_size_category(rows: int) -> str:
    """The Hub's ``size_categories`` bucket of a row count (``999`` -> ``n<1K``, ``1000`` -> ``1K<n<10K``)."""
    return next((label for bound, label in HF_SIZE_CATEGORIES if rows < bound), "n>1T")


def hf_configs(splits: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The Hub's ``configs`` of a card's splits: ``<group>_<train|dev|validation|test>`` is split ``train``... of
    config ``<group>`` (``en_dev`` -> config ``en``, split ``dev``); any other split belongs to ``default``. Paths
    are the split files, relative to the card's data folder; a config whose splits share one of the formats in
    :data:`HF_READ_ARGS` carries how to read it (``sep``, ``header``, ``quoting``)."""
    configs: dict[str, list[dict[str, str]]] = {}
    formats: dict[str, set[str]] = {}
    for split, entry in splits.items():
        match = _GROUPED_SPLIT.match(split)
        config, hf_split = (match["config"], match["split"]) if match else ("default", split)
        configs.setdefault(config, []).append({"split": hf_split, "path": entry["file"]})
        formats.setdefault(config, set()).add(entry["format"])
    read_args = {c: HF_READ_ARGS.get(next(iter(f))) if len(f) == 1 else None for c, f in formats.items()}
    return [{"config_name": c, "data_files": files, **(read_args[c] or {})} for c, files in configs.items()]


def with_hf_keys(meta: dict[str, Any]) -> dict[str, Any]:
    """A card's front matter with the Hub keys computed from our fields, in place of any stale ones: ``language``
    (from ``language`` or the deprecated ``languages``), ``task_types`` (ours; older cards kept them in
    ``task_categories``) followed by ``task_categories`` (the Hub's), then ``size_categories`` (all rows of the
    bundled splits, or the hub block's ``rows``) and ``configs`` (bundled splits only) before ``splits``/``hub``.
    Other keys keep their order and values; applying it twice changes nothing."""
    task_types = meta.get("task_types") or list(meta.get("task_categories") or [])
    splits = meta.get("splits") or {}
    rows = sum(e["rows"] for e in splits.values()) if splits else (meta.get("hub") or {}).get("rows")
    extra: dict[str, Any] = {**({"size_categories": [hf_size_category(rows)]} if rows else {}),
                             **({"configs": hf_configs(splits)} if splits else {})}
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if key in ("languages", "language"):
            out["language"] = list(value) if isinstance(value, (list, tuple)) else [value]
        elif key in ("task_types", "task_categories"):
            out.setdefault("task_types", task_types)
            out.setdefault("task_categories", hf_task_categories(task_types))
        elif key in ("size_categories", "configs"):
            continue
        else:
            if key in ("splits", "hub"):
                out.update(extra)
                extra = {}
            out[key] = value
    out.update(extra)
    return out
