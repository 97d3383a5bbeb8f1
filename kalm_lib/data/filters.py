"""Curation filters: Unicode normalisation, length filters, exact/near-duplicate removal, and
:class:`RecordFilter`, which applies them (and the leakage check) to one record at a time.

Each filter works on unified records and tells why it rejects one (a reason string), so the curation
report can account for every row: ``records in = kept + rejected``. The in-memory curation and the
streaming pipeline run the same :class:`RecordFilter`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from typing import Any

import numpy as np

from kalm_lib.data.records import Tally, bad_text, excerpt

__all__ = ["normalize_text", "match_key", "normalized_key", "loose_key", "length_reason", "MinHashDeduper",
           "FilterConfig", "RecordFilter"]

_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"[\W_]+", re.UNICODE)
# control (Cc, except newline/tab) and invisible format characters (zero-width, bidi marks, BOM); a regex
# rather than a per-character unicodedata loop: this runs on every text of a 1M-row stream
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_SPACES = re.compile(r"[ \t]+")


def normalize_text(text: str, form: str = "NFKC") -> str:
    """Unicode normalisation (NFKC by default: full-width -> half-width, compatibility forms folded),
    control characters other than newline/tab removed, runs of spaces/tabs collapsed, ends stripped."""
    if form:
        text = unicodedata.normalize(form, text)
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    return text.strip()


def match_key(text: str) -> str:
    """Key for exact matching (dedup, leakage): NFKC, case-folded, whitespace collapsed."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def normalized_key(text: str) -> str:
    """:func:`match_key` of a text that is already NFKC-normalised (skips the second normalisation)."""
    return _WS.sub(" ", text.casefold()).strip()


def loose_key(text: str) -> str:
    """Key that ignores punctuation and spacing too (cheap near-duplicate: 'Hello, world!' == 'hello world')."""
    return _PUNCT.sub("", match_key(text))


def length_reason(text: str, min_chars: int, max_chars: int) -> str | None:
    """``empty_text`` / ``too_short`` / ``too_long`` (characters, checked before any tokenizer), or None."""
    n = len(text)
    if n == 0:
        return "empty_text"
    if n < min_chars:
        return "too_short"
    if n > max_chars:
        return "too_long"
    return None


class MinHashDeduper:
    """Near-duplicate detection: MinHash over character n-gram shingles + LSH banding, then the exact
    Jaccard similarity of candidate pairs is checked against ``threshold``.

    Written by hand (numpy, ~40 lines) rather than adding a dependency: it must be deterministic across
    machines (sha1-based shingle hashes, fixed permutation seeds) and streamable (``add`` one at a time).
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 64, bands: int = 16, ngram: int = 5, seed: int = 0):
        if num_perm % bands:
            raise ValueError("num_perm must be divisible by bands")
        self.threshold, self.num_perm, self.bands, self.ngram = threshold, num_perm, bands, ngram
        rng = np.random.default_rng(seed)
        self._prime = np.uint64((1 << 61) - 1)
        self._a = rng.integers(1, (1 << 61) - 1, size=num_perm, dtype=np.uint64)
        self._b = rng.integers(0, (1 << 61) - 1, size=num_perm, dtype=np.uint64)
        self._buckets: list[dict[bytes, list[int]]] = [dict() for _ in range(bands)]
        self._shingles: list[frozenset] = []

    def shingles(self, text: str) -> frozenset:
        t = match_key(text)
        n = self.ngram
        grams = {t[i:i + n] for i in range(max(1, len(t) - n + 1))}
        return frozenset(int.from_bytes(hashlib.sha1(g.encode("utf-8")).digest()[:7], "little") for g in grams)

    def signature(self, sh: frozenset) -> np.ndarray:
        x = np.fromiter(sh, dtype=np.uint64, count=len(sh))
        # (a*x + b) mod p on uint64 wraps, which keeps it a valid (if not strictly universal) hash family
        h = (self._a[:, None] * x[None, :] + self._b[:, None]) % self._prime
        return h.min(axis=1)

    def add(self, text: str) -> int | None:
        """Register ``text``; return the index of an earlier near-duplicate (Jaccard >= threshold) or None."""
        sh = self.shingles(text)
        sig = self.signature(sh)
        r = self.num_perm // self.bands
        keys = [sig[i * r:(i + 1) * r].tobytes() for i in range(self.bands)]
        seen = set()
        for band, key in enumerate(keys):
            for j in self._buckets[band].get(key, ()):
                if j in seen:
                    continue
                seen.add(j)
                other = self._shingles[j]
                jac = len(sh & other) / max(1, len(sh | other))
                if jac >= self.threshold:
                    return j
        idx = len(self._shingles)
        self._shingles.append(sh)
        for band, key in enumerate(keys):
            self._buckets[band].setdefault(key, []).append(idx)
        return None


# ---------------------------------------------------------------------------------------------- records
@dataclasses.dataclass
class FilterConfig:
    """Knobs of the record filters (YAML section ``filters`` of a curation config)."""

    normalize: str = "NFKC"              # "" disables Unicode normalisation
    min_chars: int = 2
    max_chars: int = 4000                # characters, checked before any tokenizer sees the text
    dedup_exact: bool = True
    dedup_near: bool = True
    near_threshold: float = 0.85         # Jaccard of character 5-gram shingles
    leakage: bool = True
    leakage_min_chars: int = 8           # shorter dev-eval strings (labels) are not leak candidates


class RecordFilter:
    """Stateful per-record curation (normalise, length, leakage, exact + near dedup), shared by the
    in-memory and streaming pipelines. ``process`` returns ``(record, None)`` or ``(None, reason)``.

    ``leakage``: a :class:`kalm_lib.data.leakage.LeakageIndex` (or None); ``exact_set``: the set of exact
    keys seen (a Bloom-filter-backed set when streaming).
    """

    def __init__(self, cfg: FilterConfig, leakage: Any, tally: Tally, seed: int = 0,
                 exact_set: Any = None):
        self.cfg, self.leakage, self.tally, self.seed = cfg, leakage, tally, seed
        self.exact = exact_set if exact_set is not None else set()
        self.near: dict[str, MinHashDeduper] = {}
        self.neg_dropped: dict[str, int] = {}
        self.leaks: dict[str, int] = {}

    def _norm(self, t: str) -> str:
        return normalize_text(t, self.cfg.normalize) if self.cfg.normalize else t.strip()

    def process(self, rec: dict) -> tuple[dict | None, str | None]:
        """Filter one record: ``(normalised record, None)`` if kept, ``(None, reason)`` if rejected (counted
        in the tally, with the record id, the field and an excerpt as a rejected-row sample)."""
        src = rec["source"]
        self.tally.seen(src)
        out = self._reason(rec)
        if isinstance(out, tuple):
            reason, field = out
            text = rec["query"] if field == "query" else rec["pos"][0] if field == "pos" else None
            self.tally.reject(src, reason, sample={"id": rec.get("id"), "field": field,
                                                   "excerpt": excerpt(text if text is not None else rec["query"])})
            return None, reason
        self.tally.keep(src)
        return out, None

    def _reason(self, rec: dict) -> dict | tuple[str, str]:
        """The filtered record, or ``(reason, field)`` (field: ``query``, ``pos`` or ``neg``)."""
        c, src = self.cfg, rec["source"]
        for field in ("query", "pos", "neg"):
            for t in [rec[field]] if field == "query" else rec[field]:
                reason = bad_text(t)
                if reason:
                    return reason, field
        # length of the raw text first: a 1 MB text is rejected before normalising it
        for field, t in [("query", rec["query"]), *(("pos", p) for p in rec["pos"])]:
            if len(t) > c.max_chars * 4:
                return "too_long", field
        q = self._norm(rec["query"])
        pos = [self._norm(p) for p in rec["pos"]]
        for field, t in [("query", q), *(("pos", p) for p in pos)]:
            r = length_reason(t, c.min_chars, c.max_chars)
            if r:
                return r, field
        leak = self.leakage if c.leakage else None
        negs, dropped = [], 0
        for n in rec["neg"]:
            n2 = self._norm(n) if len(n) <= c.max_chars * 4 else ""
            if length_reason(n2, c.min_chars, c.max_chars) or (leak is not None and leak.has_key(normalized_key(n2))):
                dropped += 1
            else:
                negs.append(n2)
        if dropped:
            self.neg_dropped[src] = self.neg_dropped.get(src, 0) + dropped
        # keys computed once per text (already NFKC-normalised): leakage and exact dedup share them
        qk, pk = normalized_key(q), [normalized_key(p) for p in pos]
        if leak is not None:
            for field, k in [("query", qk), *(("pos", k) for k in pk)]:
                if leak.has_key(k):
                    w = leak.origin.get(k, "")
                    self.leaks[w] = self.leaks.get(w, 0) + 1
                    return "leakage", field
        if c.dedup_exact:
            key = hashlib.blake2b(f"{rec['task_type']}\x1f{qk}\x1f{pk[0]}".encode("utf-8", "surrogatepass"),
                                  digest_size=12).digest()
            if key in self.exact:
                return "exact_duplicate", "query"
            self.exact.add(key)
        if c.dedup_near:
            d = self.near.setdefault(src, MinHashDeduper(c.near_threshold, seed=self.seed))
            # on the query only: several queries may share one passage (claims citing one abstract,
            # questions on one paragraph), while near-identical queries are in-batch false negatives
            if d.add(q) is not None:
                return "near_duplicate", "query"
        return {**rec, "query": q, "pos": pos, "neg": negs}
