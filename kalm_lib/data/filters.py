"""Curation filters: Unicode normalisation, length filters, exact/near-duplicate removal, leakage check.

Each filter works on unified records and tells why it rejects one (a reason string), so the curation
report can account for every row: ``records in = kept + rejected``.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Iterable

import numpy as np

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


class LeakageIndex:
    """Every dev-eval text (as :func:`match_key`), so a training record that contains one is rejected."""

    def __init__(self, texts: Iterable[str] = (), min_chars: int = 8):
        # very short strings (labels such as "1", "sadness", "工学") are not texts that can leak
        self.min_chars = min_chars
        self.keys: set[str] = set()
        self.origin: dict[str, str] = {}
        self.add(texts)

    def add(self, texts: Iterable[str], origin: str = "") -> None:
        for t in texts:
            if isinstance(t, str):
                k = match_key(t)
                if len(k) >= self.min_chars and not k.replace(".", "").isdigit():
                    if k not in self.keys:
                        self.keys.add(k)
                        self.origin[k] = origin

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, text: str) -> bool:
        return match_key(text) in self.keys

    def has_key(self, key: str) -> bool:
        """Membership of a precomputed :func:`match_key`."""
        return key in self.keys

    def where(self, text: str) -> str | None:
        """The dev-eval split a leaked text came from (card/split), or None."""
        return self.origin.get(match_key(text)) if text in self else None
