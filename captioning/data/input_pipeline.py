"""tf.data input pipeline: caption token ids -> fixed-shape teacher-forcing batches.

A batch carries the row of each caption's image in the feature store (`image_index`) and its
tokens. With the store on the device (`data.feature_residency=device`) the train step gathers the
features itself; with host or disk residency the pipeline gathers the rows and sends them along
(`features`). Batches are bucketed by caption length so short captions are not padded to the
longest one: each bucket has one static length, so there is exactly one compiled step per bucket
and nothing recompiles later. The last batch of a bucket is filled with all-padding rows (zero loss
weight), so no caption is dropped and the number of steps per epoch never changes.

Batch layout (dict of numpy arrays):
  image_index: [B] int32   row of the caption's image in the feature array
  inputs:      [B, T] int32 `<start> w1 .. wn` then `<pad>`
  targets:     [B, T] int32 `w1 .. wn <end>` then `<pad>` (mask = targets != 0)
  concepts:    [B, K] uint8 (only with `concepts`): the words and frequent word pairs of the
               caption's image's references, for the auxiliary concept loss
  features:    [B, ...] (only with `features`, host or disk residency): the images' feature
               rows as stored, gathered on the pipeline's background thread
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf

from captioning.data import text
from captioning.data.datasets.base import ImageRecord


@dataclasses.dataclass(frozen=True)
class CaptionData:
    """All captions of one split as arrays.

    Attributes:
      image_index: [M] int32 row of each caption's image in the feature array.
      tokens: [M, max_len + 2] int32 `<start> w1..wn <end>` padded with 0.
      lengths: [M] int32 number of targets (words + `<end>`).
    """

    image_index: np.ndarray
    tokens: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


def build_caption_data(
    records: Sequence[ImageRecord],
    image_row: Mapping[str, int],
    vocab: text.Vocabulary,
    *,
    max_len: int,
    min_word_len: int,
) -> CaptionData:
    """Cleans and encodes every caption of `records`; `image_row` maps image_id -> feature row."""
    rows, tokens = [], []
    for record in records:
        for caption in record.captions:
            words = text.clean_caption(caption, min_word_len)
            if not words:  # Nothing left after cleaning (e.g. only digits): nothing to learn.
                continue
            rows.append(image_row[record.image_id])
            tokens.append(text.encode_caption(words, vocab, max_len))
    tokens_arr = np.stack(tokens) if tokens else np.zeros((0, max_len + 2), np.int32)
    lengths = (tokens_arr[:, 1:] != text.PAD_ID).sum(axis=1).astype(np.int32)
    return CaptionData(np.asarray(rows, np.int32), tokens_arr, lengths)


def concept_targets(data: CaptionData, num_rows: int, vocab_size: int, num_pairs: int):
    """Per-image multi-hot targets of "which words and word pairs its captions use".

    Concepts are every vocabulary word (ids 0..V-1; the special tokens stay 0) and the
    `num_pairs` most frequent adjacent word pairs of these captions ("red circle", "black dog"),
    the pairs saying which attribute goes with which object. Images without captions in `data`
    (other splits) get all zeros.

    Returns: [num_rows, vocab_size + num_pairs] uint8.
    """
    words = data.tokens[:, 1:]
    pairs = words[:, :-1].astype(np.int64) * vocab_size + words[:, 1:]
    real = (words[:, :-1] > text.END_ID) & (words[:, 1:] > text.END_ID)
    pair_ids, counts = np.unique(pairs[real], return_counts=True)
    order = np.argsort(-counts, kind="stable")[:num_pairs]
    pair_column = dict(zip(pair_ids[order].tolist(), range(len(order)), strict=True))
    targets = np.zeros((num_rows, vocab_size + num_pairs), np.uint8)
    for row, caption_words, caption_pairs, caption_real in zip(
        data.image_index, words, pairs, real, strict=True
    ):
        targets[row, caption_words[caption_words > text.END_ID]] = 1
        for pair in caption_pairs[caption_real]:
            column = pair_column.get(int(pair))
            if column is not None:
                targets[row, vocab_size + column] = 1
    return targets


def bucket_lengths(lengths: np.ndarray, num_buckets: int, max_targets: int) -> list[int]:
    """Static padded lengths (ascending) that minimise the total padded tokens.

    Exact dynamic programme over the length histogram: with K buckets, bucket (a, b] pads every
    caption in it to b, so the cost of a split is sum(count(l) * b). The last length is the longest
    caption present (at most `max_targets`).
    """
    if len(lengths) == 0:
        return [max_targets]
    longest = int(min(max(lengths), max_targets))
    counts = np.bincount(np.minimum(lengths, longest), minlength=longest + 1).astype(np.int64)
    cum = np.cumsum(counts)  # cum[j] = captions with length <= j
    k_max = max(1, min(num_buckets, longest))
    inf = np.iinfo(np.int64).max // 4
    # cost[k][j]: least padded tokens covering lengths <= j with k buckets, the last ending at j.
    cost = np.full((k_max + 1, longest + 1), inf, np.int64)
    parent = np.zeros((k_max + 1, longest + 1), np.int64)
    cost[0][0] = 0
    for k in range(1, k_max + 1):
        for j in range(1, longest + 1):
            previous = cost[k - 1][:j] + (cum[j] - cum[:j]) * j
            i = int(np.argmin(previous))
            cost[k][j], parent[k][j] = previous[i], i
    best_k = int(np.argmin(cost[1:, longest])) + 1
    bounds, j = [], longest
    for k in range(best_k, 0, -1):
        bounds.append(j)
        j = int(parent[k][j])
    return sorted(b for b in bounds if b > 0 and (b == longest or cum[b] > 0))


def fixed_options():
    """tf.data options without autotuning: every buffer and parallelism here is set explicitly.

    The autotuner adds a background optimisation thread to each iterator, whose sleep keeps
    doubling; when an epoch's iterator is finished, the training loop stalled until that thread's
    next wake-up, so some epochs ran far longer than others (configs/notes/speed.md).
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


class CaptionBatches:
    """Epoch iterators of bucketed, shuffled, fixed-shape batches over one split."""

    def __init__(
        self,
        data: CaptionData,
        *,
        batch_size: int,
        num_buckets: int,
        seed: int,
        shuffle: bool,
        prefetch: int = 2,
        concepts: np.ndarray | None = None,
        features=None,
    ):
        if len(data) == 0:
            raise ValueError("No captions to batch: the split is empty after cleaning.")
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.prefetch = prefetch
        self.concepts = concepts  # [num_rows, K] uint8 or None (see concept_targets).
        self.features = features  # [num_rows, ...] rows to send with each batch, or None.
        max_targets = data.tokens.shape[1] - 1
        self.lengths = bucket_lengths(data.lengths, num_buckets, max_targets)
        bucket_of = np.searchsorted(np.asarray(self.lengths), data.lengths)
        self._members = [np.flatnonzero(bucket_of == b) for b in range(len(self.lengths))]
        self.num_batches = sum(-(-len(m) // batch_size) for m in self._members)

    def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """[(padded length, caption indices)] for one epoch; the order depends on (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        plan = []
        for length, members in zip(self.lengths, self._members, strict=True):
            order = rng.permutation(members) if self.shuffle else members
            plan += [
                (length, order[i : i + self.batch_size])
                for i in range(0, len(order), self.batch_size)
            ]
        if self.shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        return plan

    def _batch(self, length: int, indices: np.ndarray) -> dict[str, np.ndarray]:
        pad = self.batch_size - len(indices)
        tokens = self.data.tokens[indices, : length + 1]
        image_index = self.data.image_index[indices]
        if pad:  # Fill with all-padding rows: zero loss weight, static shape.
            tokens = np.concatenate([tokens, np.zeros((pad, length + 1), np.int32)])
            image_index = np.concatenate([image_index, np.zeros(pad, np.int32)])
        batch = {"image_index": image_index, "inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        if self.concepts is not None:
            batch["concepts"] = self.concepts[image_index]
        if self.features is not None:
            batch["features"] = self.features[image_index]
        return batch

    def epoch(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """Yields `num_batches` batches, prefetched by tf.data in a background thread."""
        return self.dataset(epoch).as_numpy_iterator()

    def dataset(self, epoch: int) -> tf.data.Dataset:
        """The tf.data pipeline of one epoch (a generator over the plan, prefetched)."""
        plan = self._plan(epoch)

        def generate():
            for length, indices in plan:
                yield self._batch(length, indices)

        signature = {
            "image_index": tf.TensorSpec([self.batch_size], tf.int32),
            "inputs": tf.TensorSpec([self.batch_size, None], tf.int32),
            "targets": tf.TensorSpec([self.batch_size, None], tf.int32),
        }
        if self.concepts is not None:
            signature["concepts"] = tf.TensorSpec(
                [self.batch_size, self.concepts.shape[1]], tf.uint8
            )
        if self.features is not None:
            shape = [self.batch_size, *self.features.shape[1:]]
            signature["features"] = tf.TensorSpec(shape, tf.as_dtype(self.features.dtype))
        dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
        return dataset.prefetch(self.prefetch).with_options(fixed_options())

    def example_batches(self) -> list[dict[str, np.ndarray]]:
        """One dummy batch per bucket length (for ahead-of-time compilation)."""
        return [self._batch(length, np.zeros(0, np.int64)) for length in self.lengths]
