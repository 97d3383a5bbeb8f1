"""The leakage check: every text of every dev-eval split, so curation rejects a training record holding one.

The dev-eval splits are read cell by cell through :func:`kalm_lib.data.formats.split_cells` (each card file
by its card ``format``), labels included; very short strings are not texts that can leak.
"""

from __future__ import annotations

from typing import Iterable

from kalm_lib.data.cards import DataCard, dev_eval_splits
from kalm_lib.data.filters import match_key
from kalm_lib.data.formats import split_cells

__all__ = ["LeakageIndex", "split_texts", "build_leakage_index"]


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


def split_texts(card: DataCard, split: str) -> Iterable[str]:
    """Every text cell of a card split (labels and header cells too; the index filters them by length)."""
    return split_cells(card.split_path(split), card.splits[split].format)


def build_leakage_index(registry: dict[str, DataCard], min_chars: int = 8) -> LeakageIndex:
    """Index of the texts of every dev-eval split in the registry."""
    idx = LeakageIndex(min_chars=min_chars)
    for card, split in dev_eval_splits(registry):
        idx.add(split_texts(registry[card], split), origin=f"{card}/{split}")
    return idx
