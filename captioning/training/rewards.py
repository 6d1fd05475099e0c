"""CIDEr-D rewards for self-critical sequence training (SCST, Rennie et al. 2017).

    df = document_frequency(train_references)                  # once, all training images
    scorer = CiderD(train_references, df)                      # caches the reference vectors
    rewards = scorer.scores(sampled_captions, image_indices)   # [num_candidates] float64
    cider_d(candidates, references)                            # one-off; idf from `references`

The score is pycocoevalcap's `Cider` (which is CIDEr-D), score for score:
- Input is already tokenised: words separated by single spaces (what pycocoevalcap's `Cider`
  receives after its tokenizer). Candidate i is scored against its own image's references.
- n-grams of n = 1..4, weighted term frequency x inverse document frequency with
  idf(g) = log(number of reference sets) - log(max(1, df(g))), where df(g) counts the reference
  sets (images) in which some reference contains g. An n-gram no reference set contains gets the
  largest idf, log(number of reference sets).
- Per n and per reference: clipped cosine similarity sum_g min(h_g, r_g) * r_g / (|h| |r|)
  (0 when either vector is zero), times the Gaussian length penalty exp(-delta^2 / (2 * 6^2)).
  As in pycocoevalcap, the lengths in delta count bigrams (words - 1; 0 below two words).
- Score = 10 x the mean over n of the mean over the image's references.

Why precomputed frequencies: pycocoevalcap takes the document frequencies from the references of
the set it scores, so a batch's rewards would depend on which images share the batch. SCST takes
them once from all training references instead (as ruotianluo/self-critical.pytorch does with
its cached training-set frequencies): `document_frequency` builds them, and `CiderD` also caches
every training image's reference n-gram counts, norms and lengths, so a step only encodes the
candidates.

Without given frequencies (`cider_d(..., document_frequency=None)`, `CiderD(refs)`) they come
from the passed references, each distinct reference set counted once: SCST passes an image's
reference list once per sampled candidate, and counting every copy would lower the idf of that
image's n-grams. Sets are told apart by content (the tuple of their strings), so two images with
the very same captions in the same order also count once. With one candidate per image this is
pycocoevalcap's per-image score.

Implementation: words become integer ids and an n-gram's id is found from its (n-1)-gram prefix's
id and its last word with a sorted-array search, so n-gram counting, matching and the similarity
sums are numpy operations over the whole batch rather than Python loops over n-grams.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat

import numpy as np

MAX_N = 4
SIGMA = 6.0
SCALE = 10.0

NGram = tuple[str, ...]


@dataclass(frozen=True)
class DocumentFrequency:
    """Document frequencies of reference n-grams, counted per reference set (image).

    Attributes:
      counts: n-gram (tuple of words, n = 1..4) -> number of reference sets containing it.
        Treat it as read-only.
      num_documents: number of reference sets the counts come from.
    """

    counts: Mapping[NGram, int]
    num_documents: int

    def __post_init__(self):
        if self.num_documents < 1:
            raise ValueError(
                f"num_documents must be at least 1 (got {self.num_documents}): "
                "the idf takes the log of the number of reference sets"
            )

    @property
    def log_num_documents(self) -> float:
        """log(number of reference sets): pycocoevalcap's `ref_len`."""
        return math.log(float(self.num_documents))


def _check_candidates(candidates: Sequence[str]) -> list[str]:
    if isinstance(candidates, str):
        raise TypeError("candidates must be a list of strings, not one string")
    for i, c in enumerate(candidates):
        if not isinstance(c, str):
            raise TypeError(f"candidates[{i}] must be a string, got {type(c).__name__}")
    return list(candidates)


def _check_references(references: Sequence[Sequence[str]]) -> list[tuple[str, ...]]:
    """Validates a list of reference lists and returns them as tuples."""
    if isinstance(references, str):
        raise TypeError("references must be a list of lists of strings, not one string")
    checked = []
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise TypeError(
                f"references[{i}] must be a list of reference strings (one image's captions), "
                "not a single string"
            )
        refs = tuple(refs)
        if not refs:
            raise ValueError(f"references[{i}] is empty: every image needs at least one reference")
        for j, r in enumerate(refs):
            if not isinstance(r, str):
                raise TypeError(f"references[{i}][{j}] must be a string, got {type(r).__name__}")
        checked.append(refs)
    return checked


def _unique_sets(references: Sequence[tuple[str, ...]]) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """Distinct reference sets in first-seen order and [len(references)] indices into them."""
    index: dict[tuple[str, ...], int] = {}
    which = [index.setdefault(refs, len(index)) for refs in references]
    return list(index), np.array(which, np.int64)


def _split(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """All words of `texts` in order, and [len(texts)] word counts."""
    split = [t.split() for t in texts]
    return list(chain.from_iterable(split)), np.fromiter(map(len, split), np.int64, len(split))


def _penalty_length(num_words: np.ndarray) -> np.ndarray:
    # pycocoevalcap's `length` sums the counts of the n-grams with index n == 1, i.e. bigrams.
    return np.maximum(num_words - 1, 0).astype(np.float64)


class _GramIndex:
    """Integer ids for every n-gram (n = 1..MAX_N) of a set of texts.

    Unigram ids are word ids; an n-gram's id is `offsets[n-1]` plus the position of
    `prefix_id * num_words + last_word_id` in the sorted array `keys[n-1]`, so ids of n-grams of
    new text are found with `np.searchsorted`, without building tuples.

    Args:
      words: all words of the texts, in order.
      lengths: [num_texts] word counts.

    Attributes:
      ids: per order (0-based n - 1), [len(words)] id of the n-gram starting at each word; -1 where
        fewer than n words are left in its text.
    """

    def __init__(self, words: list[str], lengths: np.ndarray):
        self.word_ids = {w: i for i, w in enumerate(dict.fromkeys(words))}
        self.base = max(len(self.word_ids), 1)
        w = np.fromiter(map(self.word_ids.__getitem__, words), np.int64, len(words))
        position = np.arange(len(words))
        end = np.repeat(np.cumsum(lengths), lengths)
        self.keys = [np.arange(len(self.word_ids), dtype=np.int64)]
        self.offsets = [0]
        self.ids = [w]
        size = len(self.word_ids)
        for n in range(1, MAX_N):
            at = position[position + n < end]
            keys, inverse = np.unique(
                self.ids[n - 1][at] * self.base + w[at + n], return_inverse=True
            )
            ids = np.full(len(words), -1, np.int64)
            ids[at] = size + inverse
            self.keys.append(keys)
            self.offsets.append(size)
            self.ids.append(ids)
            size += len(keys)
        self.size = size
        self.order = np.repeat(np.arange(MAX_N), np.diff(self.offsets + [size]))

    def lookup(self, n: int, prefix_ids: np.ndarray, word_ids: np.ndarray) -> np.ndarray:
        """[k] ids of order-n (0-based, n >= 1) n-grams from their prefix and last-word ids.

        Ids of -1 (unknown prefix or word) and n-grams absent from the index give -1.
        """
        keys = self.keys[n]
        if keys.size == 0:
            return np.full(prefix_ids.shape, -1, np.int64)
        # Sorted distinct queries: fewer searches, and neighbouring ones share cache lines.
        key, inverse = np.unique(prefix_ids * self.base + word_ids, return_inverse=True)
        at = np.minimum(np.searchsorted(keys, key), keys.size - 1)
        found = (keys[at] == key)[inverse] & (prefix_ids >= 0) & (word_ids >= 0)
        return np.where(found, self.offsets[n] + at[inverse], -1)


class _ReferenceGrams:
    """The n-gram counts of every reference of a list of reference sets.

    Attributes:
      index: ids of all reference n-grams.
      ref_image, ref_slot: [num_refs] image of each reference and its position there.
      ref_words: [num_refs] word counts.
      ref, gram, count: [k] one entry per distinct (reference, n-gram) with its count.
    """

    def __init__(self, references: Sequence[tuple[str, ...]]):
        per_image = np.fromiter(map(len, references), np.int64, len(references))
        self.ref_image = np.repeat(np.arange(len(references)), per_image)
        self.ref_slot = np.arange(len(self.ref_image)) - np.repeat(
            np.cumsum(per_image) - per_image, per_image
        )
        self.words, self.ref_words = _split(list(chain.from_iterable(references)))
        self.index = _GramIndex(self.words, self.ref_words)
        ref_of_word = np.repeat(np.arange(len(self.ref_words)), self.ref_words)
        ids = np.concatenate(self.index.ids)
        valid = ids >= 0
        stride = max(self.index.size, 1)
        pairs, self.count = np.unique(
            np.tile(ref_of_word, MAX_N)[valid] * stride + ids[valid], return_counts=True
        )
        self.ref, self.gram = np.divmod(pairs, stride)

    def documents(self, document_of_image: np.ndarray) -> np.ndarray:
        """[index.size] number of distinct documents whose references contain each n-gram.

        Args:
          document_of_image: [num_images] document (distinct reference set) of each image.
        """
        stride = max(self.index.size, 1)
        pairs = np.unique(document_of_image[self.ref_image[self.ref]] * stride + self.gram)
        return np.bincount(pairs % stride, minlength=self.index.size).astype(np.float64)

    def gram_tuples(self) -> list[NGram]:
        """[index.size] each n-gram id's words."""
        ids = np.concatenate(self.index.ids)
        ids_at = np.flatnonzero(ids >= 0)
        _, first = np.unique(ids[ids_at], return_index=True)  # ids run 0..size-1
        starts = ids_at[first] % max(len(self.words), 1)
        words = self.words
        return [
            tuple(words[s : s + n + 1])
            for s, n in zip(starts.tolist(), self.index.order.tolist(), strict=True)
        ]


def document_frequency(references: Sequence[Sequence[str]]) -> DocumentFrequency:
    """Document frequencies from reference sets, e.g. all training images' captions.

    Identical reference sets (the same image listed several times) count once.

    Args:
      references: [num_images] lists of tokenised reference captions.
    """
    sets, _ = _unique_sets(_check_references(references))
    if not sets:
        raise ValueError("references is empty: no reference sets to count n-grams in")
    grams = _ReferenceGrams(sets)
    documents = grams.documents(np.arange(len(sets)))
    counts = dict(zip(grams.gram_tuples(), documents.astype(np.int64).tolist(), strict=True))
    return DocumentFrequency(counts, len(sets))


class CiderD:
    """CIDEr-D against a fixed list of images' references, cached for repeated scoring.

    The constructor counts every reference's n-grams once and keeps, per image, a table of its
    references' n-gram counts (rows: the image's distinct n-grams; columns: its references),
    their tf-idf norms per n and their penalty lengths; `scores` only encodes the candidates.

    Args:
      references: [num_images] lists of tokenised reference captions; `scores` refers to images
        by their position here.
      document_frequency: frequencies for the idf (e.g. `document_frequency(train_references)`);
        None takes them from `references`, each distinct reference set once.
    """

    def __init__(
        self,
        references: Sequence[Sequence[str]],
        document_frequency: DocumentFrequency | None = None,
    ):
        refs = _check_references(references)
        if not refs:
            raise ValueError("references is empty: CiderD needs at least one image's references")
        grams = _ReferenceGrams(refs)
        index = grams.index
        if document_frequency is None:
            sets, document_of_image = _unique_sets(refs)
            documents = grams.documents(document_of_image)
            self._log_n = math.log(float(len(sets)))
            self._counts: Mapping[NGram, int] | None = None
        else:
            counts = document_frequency.counts
            found = [counts.get(g) for g in grams.gram_tuples()]
            documents = np.array([0 if c is None else c for c in found], np.float64)
            self._log_n = document_frequency.log_num_documents
            # Candidate n-grams outside the references need a lookup only if the frequencies
            # know n-grams that the references lack (frequencies from another corpus).
            known = sum(c is not None for c in found)
            self._counts = None if known == len(counts) else counts
        self.num_images = len(refs)
        self._index = index
        self._idf = self._log_n - np.log(np.maximum(1.0, documents))
        self._stride = max(index.size, 1)

        num_refs = np.bincount(grams.ref_image, minlength=len(refs))
        max_refs = int(num_refs.max())
        self._num_refs = num_refs
        self._max_refs = max_refs

        # Reference norms per (image, reference slot, n) and penalty lengths per (image, slot).
        ref_flat = grams.ref_image * max_refs + grams.ref_slot
        norm2 = np.bincount(
            ref_flat[grams.ref] * MAX_N + index.order[grams.gram],
            weights=(grams.count * self._idf[grams.gram]) ** 2,
            minlength=len(refs) * max_refs * MAX_N,
        )
        self._ref_norms = np.sqrt(norm2).reshape(len(refs), max_refs, MAX_N)
        self._ref_lengths = np.zeros(len(refs) * max_refs)
        self._ref_lengths[ref_flat] = _penalty_length(grams.ref_words)
        self._ref_lengths = self._ref_lengths.reshape(len(refs), max_refs)

        # Rows keyed by image * stride + n-gram id and sorted, found by searchsorted; counts
        # rather than tf-idf values keep the table small (tf-idf = count * idf[id]).
        self._keys, row = np.unique(
            grams.ref_image[grams.ref] * self._stride + grams.gram, return_inverse=True
        )
        small = grams.count.size == 0 or grams.count.max() <= np.iinfo(np.uint8).max
        self._table = np.zeros((len(self._keys), max_refs), np.uint8 if small else np.uint32)
        self._table[row, grams.ref_slot[grams.ref]] = grams.count
        # [num_images + 1]: image i's rows are _image_rows[i]:_image_rows[i + 1].
        self._image_rows = np.searchsorted(self._keys, np.arange(len(refs) + 1) * self._stride)

    def _candidate_grams(self, candidates: list[str]) -> tuple[np.ndarray, ...]:
        """Distinct (candidate, n-gram) entries of the candidates.

        Returns:
          cand, order, count, gram: [k] each, gram = n-gram id in the index or -1;
          idf: [k] float64; num_words: [num_candidates].
        """
        words, num_words = _split(candidates)
        local = {w: i for i, w in enumerate(dict.fromkeys(words))}
        base = max(len(local), 1)
        w = np.fromiter(map(local.__getitem__, words), np.int64, len(words))
        # Global word ids of the distinct words; -1 for words no reference has.
        word_ids = np.fromiter(
            map(self._index.word_ids.get, local, repeat(-1)), np.int64, len(local)
        )[w]
        cand_of_word = np.repeat(np.arange(len(candidates)), num_words)
        position = np.arange(len(words))
        end = np.repeat(np.cumsum(num_words), num_words)
        parts = []
        prefix = cand_of_word  # Order 0 keys are (candidate, word).
        prefix_gram = np.zeros(0, np.int64)
        for n in range(MAX_N):
            at = position[position + n < end]
            # One key per distinct (candidate, n-gram): the (n-1)-gram prefix's key and the last
            # word, so `np.unique` counts each candidate's n-grams.
            _, first, inverse, count = np.unique(
                prefix[at] * base + w[at + n],
                return_index=True,
                return_inverse=True,
                return_counts=True,
            )
            start = at[first]
            if n == 0:
                gram = word_ids[start]
            else:
                gram = self._index.lookup(n, prefix_gram[prefix[start]], word_ids[start + n])
            prefix = np.full(len(words), -1, np.int64)
            prefix[at] = inverse
            prefix_gram = gram
            parts.append((cand_of_word[start], np.full(len(start), n), count, gram, start))
        cand, order, count, gram, start = (np.concatenate(p) for p in zip(*parts, strict=True))

        known = gram >= 0
        idf = np.where(known, self._idf[np.where(known, gram, 0)], self._log_n)
        if self._counts is not None and not known.all():
            # N-grams no reference has but the (foreign) frequencies may know.
            missing = np.flatnonzero(~known)
            found = [
                self._counts.get(tuple(words[s : s + n + 1]), 0)
                for s, n in zip(start[missing].tolist(), order[missing].tolist(), strict=True)
            ]
            idf[missing] = self._log_n - np.log(np.maximum(1.0, np.array(found, np.float64)))
        return cand, order, count.astype(np.float64), gram, idf, num_words

    def scores(self, candidates: Sequence[str], image_indices: np.ndarray) -> np.ndarray:
        """CIDEr-D of each candidate against the references of its image.

        Args:
          candidates: [num_candidates] tokenised captions.
          image_indices: [num_candidates] ints, positions in the constructor's `references`; an
            image may appear any number of times (several samples per image).

        Returns:
          [num_candidates] float64 scores on pycocoevalcap's scale (x10).
        """
        candidates = _check_candidates(candidates)
        idx = np.asarray(image_indices)
        if idx.shape != (len(candidates),):
            raise ValueError(
                f"image_indices has shape {idx.shape}; expected ({len(candidates)},), one index "
                "per candidate"
            )
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"image_indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise ValueError(
                f"image_indices must lie in [0, {self.num_images}); got values from "
                f"{idx.min()} to {idx.max()}"
            )
        num = len(candidates)
        if num == 0:
            return np.zeros(0)

        cand, order, count, gram, idf, num_words = self._candidate_grams(candidates)
        vec = count * idf
        segment = cand * MAX_N + order
        norm = np.sqrt(np.bincount(segment, weights=vec**2, minlength=num * MAX_N))

        # Candidate n-grams that also occur in the references of the candidate's own image.
        entry = np.flatnonzero(gram >= 0)
        key = idx[cand[entry]] * self._stride + gram[entry]
        # Search only the batch's images' rows: a small array instead of the whole table.
        images = np.unique(idx)
        lo, size = self._image_rows[images], np.diff(self._image_rows)[images]
        # Row numbers lo[k], ..., lo[k] + size[k] - 1 for each image k, concatenated (sorted).
        rows = np.repeat(lo - (np.cumsum(size) - size), size) + np.arange(size.sum())
        if rows.size:
            at = np.minimum(np.searchsorted(self._keys[rows], key), rows.size - 1)
            row = rows[at]
            hit = self._keys[row] == key
            entry, row = entry[hit], row[hit]
        else:
            entry, row = entry[:0], entry[:0]
        ref_vec = self._table[row] * idf[entry, None]  # [hits, max_refs]
        clipped = np.minimum(vec[entry, None], ref_vec) * ref_vec
        r = self._max_refs
        overlap = np.bincount(
            (segment[entry, None] * r + np.arange(r)).ravel(),
            weights=clipped.ravel(),
            minlength=num * MAX_N * r,
        )
        # `np.bincount` returns integers when it gets no entries, weights or not.
        overlap = overlap.astype(np.float64, copy=False).reshape(num, MAX_N, r)

        denom = norm.reshape(num, MAX_N, 1) * self._ref_norms[idx].transpose(0, 2, 1)
        # pycocoevalcap leaves the sum undivided when a norm is 0; the sum is then 0 as well.
        sim = np.divide(overlap, denom, out=overlap.copy(), where=denom != 0)
        delta = _penalty_length(num_words)[:, None] - self._ref_lengths[idx]  # [num, max_refs]
        sim *= np.exp(-(delta**2) / (2 * SIGMA**2))[:, None, :]
        # Padding slots (images with fewer references) have zero overlap and add nothing.
        return sim.sum(axis=2).mean(axis=1) / self._num_refs[idx] * SCALE


def cider_d(
    candidates: list[str],
    references: list[list[str]],
    document_frequency: DocumentFrequency | None = None,
) -> np.ndarray:
    """CIDEr-D of each candidate against its own references.

    Args:
      candidates: [num_candidates] tokenised captions.
      references: [num_candidates] lists of tokenised reference captions; candidate i is scored
        against references[i]. Several candidates of one image pass equal lists.
      document_frequency: frequencies for the idf (e.g. `document_frequency(train_references)`);
        None takes them from `references`, each distinct reference set once, which gives
        pycocoevalcap's `Cider().compute_score` per-image scores when every candidate has its
        own image.

    Returns:
      [num_candidates] float64 scores on pycocoevalcap's scale (x10).
    """
    candidates = _check_candidates(candidates)
    refs = _check_references(references)
    if len(candidates) != len(refs):
        raise ValueError(
            f"candidates and references differ in length ({len(candidates)} vs {len(refs)}): "
            "give one list of references per candidate"
        )
    if not candidates:
        return np.zeros(0)
    sets, which = _unique_sets(refs)
    return CiderD(sets, document_frequency).scores(candidates, which)
