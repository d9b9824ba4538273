"""Vocabulary and the one tokenizer used everywhere (training targets, metrics, decoded text).

The tokenizer is deliberately simple and fully specified, so a caption means the same token list
in training, in `evaluate_captions` and in the app:

    Unicode NFKC -> lowercase -> NFKC again, dropping combining marks left over -> drop apostrophes ("dog's" -> "dogs") -> every other non-alphanumeric character
    becomes a space ("t-shirt" -> "t shirt", "dog ." -> "dog") -> split on whitespace.

NFKC makes the same word one token however it was typed: "café" with a combining accent is
"café", full-width "ＤＯＧ" is "dog", and "İstanbul" (whose lowercase is "i" + a combining dot) is
"istanbul". On plain ASCII text every step but the last three is the identity, so vocabularies and
scores made before NFKC was added are unchanged (the tokenizer keeps its name).

Vocabularies are stored as JSON (never pickle) and carry the tokenizer's name, so a vocabulary made
with another tokenizer is refused on load.
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from .fileio import write_json_atomic

TOKENIZER_NAME = "lower-strip-punct-v1"
PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3 in every vocabulary

_APOSTROPHES = re.compile(r"['\u2019`]")
_NON_WORD = re.compile(r"[^\w\s]|_")


def tokenize(text: str) -> list[str]:
    """Split a caption into lowercase word tokens with punctuation stripped.

    Args:
        text: a raw caption, e.g. ``"A dog's ball ."``.

    Returns:
        e.g. ``["a", "dogs", "ball"]``; an empty list for an empty or all-punctuation string.
    """
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).lower())
    if not text.isascii():  # marks with no precomposed form (the dot of "İ".lower()) would split the word
        text = "".join(c for c in text if not unicodedata.combining(c))
    text = _APOSTROPHES.sub("", text)
    return _NON_WORD.sub(" ", text).split()


class Vocabulary:
    """Word <-> id mapping with the four special tokens at ids 0..3.

    Args:
        words: the ordinary words, in id order (ids start at 4).
    """

    def __init__(self, words: Sequence[str]):
        words = list(words)
        clash = set(words) & set(SPECIAL_TOKENS)
        if clash:
            raise ValueError(f"words may not contain special tokens: {sorted(clash)}")
        if len(set(words)) != len(words):
            raise ValueError("words contain duplicates")
        self.itos: list[str] = list(SPECIAL_TOKENS) + words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 5, max_size: int | None = None) -> "Vocabulary":
        """Build from training captions, keeping words seen at least ``min_freq`` times.

        Words are ordered by frequency (descending), ties alphabetically, so the result is
        deterministic for a given caption multiset.

        Args:
            captions: raw caption strings (tokenized here).
            min_freq: minimum count for a word to get its own id; rarer words map to ``<unk>``.
            max_size: optional cap on the number of ordinary words.
        """
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts = Counter(tok for c in captions for tok in tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[:max_size]
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Tokenize and map to ids; unknown words become ``<unk>``.

        Args:
            text: raw caption.
            add_special: wrap in ``<start>`` ... ``<end>``.
        """
        ids = [self.stoi.get(t, self.unk_id) for t in tokenize(text)]
        return [self.start_id, *ids, self.end_id] if add_special else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Map ids back to a caption: stops at the first ``<end>``, drops every special token."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i < len(SPECIAL_TOKENS):
                continue
            words.append(self.itos[i])
        return " ".join(words)

    # -- JSON persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"tokenizer": TOKENIZER_NAME, "special_tokens": list(SPECIAL_TOKENS), "itos": self.itos}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        if not isinstance(d, dict) or "itos" not in d:
            raise ValueError("not a Neural Storyteller vocabulary (no 'itos' list)")
        if d.get("tokenizer") != TOKENIZER_NAME:
            raise ValueError(f"vocabulary was made with tokenizer {d.get('tokenizer')!r}, this code uses {TOKENIZER_NAME!r}")
        itos = d["itos"]
        if list(itos[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
            raise ValueError(f"vocabulary must start with the special tokens {SPECIAL_TOKENS}, got {itos[:4]}")
        return cls(itos[len(SPECIAL_TOKENS):])

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON (atomically: a temp file then rename)."""
        write_json_atomic(path, self.to_dict(), indent=0)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        """Read a vocabulary written by :meth:`save`; raises ``ValueError`` on a malformed file."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)
