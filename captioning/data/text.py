"""Caption cleaning and the vocabulary.

Cleaning follows the Keras notebook: lowercase, strip ASCII punctuation, keep alphabetic words of
at least `min_word_len` letters (the notebook drops one-letter words such as "a"). Ids: `<pad>`=0,
`<start>`=1, `<end>`=2, `<unk>`=3, then words by decreasing train frequency (ties alphabetical).
"""

from __future__ import annotations

import collections
import json
import os
import string
from collections.abc import Iterable, Sequence

import numpy as np

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = (PAD, START, END, UNK)

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def clean_caption(caption: str, min_word_len: int = 1) -> list[str]:
    """Lowercases, strips punctuation and drops non-alphabetic or too-short words."""
    words = caption.lower().translate(_PUNCTUATION_TABLE).split()
    return [w for w in words if w.isalpha() and len(w) >= min_word_len]


class VocabularyError(ValueError):
    """A vocabulary file is missing or malformed."""


class Vocabulary:
    """Word <-> id mapping with the four special tokens first."""

    def __init__(self, words: Sequence[str]):
        self.itos: list[str] = list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    @property
    def words(self) -> list[str]:
        """The vocabulary without the special tokens."""
        return self.itos[len(SPECIAL_TOKENS) :]

    @classmethod
    def build(cls, tokenized: Iterable[Sequence[str]], min_count: int = 1) -> Vocabulary:
        """Keeps words seen at least `min_count` times, most frequent first."""
        counts = collections.Counter(w for words in tokenized for w in words)
        kept = [w for w, c in counts.items() if c >= min_count]
        kept.sort(key=lambda w: (-counts[w], w))
        return cls(kept)

    def encode(self, words: Sequence[str]) -> list[int]:
        """Words -> ids, unknown words -> `<unk>`; no markers added."""
        return [self.stoi.get(w, UNK_ID) for w in words]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, stopping at `<end>` and skipping `<pad>`/`<start>`."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i in (PAD_ID, START_ID):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return " ".join(words)

    def decode_batch(self, ids_bxt: np.ndarray) -> list[str]:
        """[batch, time] ids -> list of captions."""
        return [self.decode(row) for row in np.asarray(ids_bxt)]

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"itos": self.itos}, f, indent=0)

    @classmethod
    def load(cls, path: str) -> Vocabulary:
        if not os.path.exists(path):
            raise VocabularyError(
                f"No vocabulary at {path}: is this a run directory written by train? "
                "Train first (python main.py --mode=train ...) or point --workdir at a run."
            )
        with open(path, encoding="utf-8") as f:
            itos = json.load(f).get("itos")
        if not itos or list(itos[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
            raise VocabularyError(f"{path} is not a vocabulary file (special tokens missing).")
        return cls(itos)


def encode_caption(words: Sequence[str], vocab: Vocabulary, max_len: int) -> np.ndarray:
    """Words -> [max_len + 2] int32 `<start> w1..wn <end>`, padded with 0; truncates at max_len."""
    ids = [START_ID] + vocab.encode(words[:max_len]) + [END_ID]
    out = np.zeros(max_len + 2, np.int32)
    out[: len(ids)] = ids
    return out
