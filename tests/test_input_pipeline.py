"""Teacher-forcing batches: shapes, masks, buckets, determinism."""

import numpy as np

from captioning.data import backbone, input_pipeline, text
from captioning.data.datasets.base import ImageRecord
from captioning.decoding import decode


def _records(n):
    words = ["red", "blue", "circle", "square", "left", "of", "big"]
    rng = np.random.default_rng(0)
    return [
        ImageRecord(
            f"img{i}",
            f"/x/img{i}.png",
            tuple(" ".join(rng.choice(words, rng.integers(2, 9))) for _ in range(5)),
            "train",
        )
        for i in range(n)
    ]


def _data(n=20, max_len=10):
    records = _records(n)
    vocab = text.Vocabulary.build(text.clean_caption(c) for r in records for c in r.captions)
    rows = {r.image_id: i for i, r in enumerate(records)}
    data = input_pipeline.build_caption_data(records, rows, vocab, max_len=max_len, min_word_len=1)
    return records, vocab, data


def test_caption_data_shapes_and_lengths():
    records, vocab, data = _data()
    assert len(data) == 5 * len(records)
    assert data.tokens.shape == (100, 12)
    assert (data.tokens[:, 0] == text.START_ID).all()
    first = text.clean_caption(records[0].captions[0])
    assert data.lengths[0] == len(first) + 1  # words + <end>
    assert vocab.decode(data.tokens[0]) == " ".join(first)


def test_batches_teacher_forcing_and_mask():
    _, _, data = _data()
    batches = input_pipeline.CaptionBatches(
        data, batch_size=16, num_buckets=3, seed=0, shuffle=True
    )
    seen = []
    for batch in batches.epoch(0):
        b, t = batch["inputs"].shape
        assert b == 16 and batch["targets"].shape == (16, t) and t in batches.lengths
        real = batch["targets"] != text.PAD_ID
        # Inputs are targets shifted right behind <start>.
        assert (batch["inputs"][:, 0][real[:, 0]] == text.START_ID).all()
        np.testing.assert_array_equal(
            batch["inputs"][:, 1:][real[:, 1:]], batch["targets"][:, :-1][real[:, 1:]]
        )
        seen.append(int(real.sum()))
    assert len(seen) == batches.num_batches
    # Every target of every caption is trained exactly once per epoch: nothing dropped.
    assert sum(seen) == int(data.lengths.sum())


def test_pipelines_do_not_autotune():
    # tf.data's autotuning thread held up the end of epochs (README, Results); buffers and
    # parallelism are explicit, so it stays off in the training and the export pipelines.
    _, _, data = _data()
    batches = input_pipeline.CaptionBatches(data, batch_size=8, num_buckets=2, seed=0, shuffle=True)
    assert batches.dataset(0).options().autotune.enabled is False
    export = backbone._image_dataset(["missing.png"], size=32, batch_size=4)
    assert export.options().autotune.enabled is False


def test_epoch_order_depends_only_on_seed_and_epoch():
    _, _, data = _data()

    def first_rows(seed, epoch):
        batches = input_pipeline.CaptionBatches(
            data, batch_size=8, num_buckets=2, seed=seed, shuffle=True
        )
        return [b["image_index"].tolist() for b in batches.epoch(epoch)]

    assert first_rows(0, 1) == first_rows(0, 1)
    assert first_rows(0, 1) != first_rows(0, 2)
    assert first_rows(0, 1) != first_rows(1, 1)


def test_bucket_lengths_minimise_padding():
    lengths = np.array([2, 3, 3, 4, 5, 9, 11])
    assert input_pipeline.bucket_lengths(lengths, 1, 12) == [11]  # Longest present.
    assert input_pipeline.bucket_lengths(lengths, 3, 12) == [3, 5, 11]
    assert input_pipeline.bucket_lengths(np.array([40, 50]), 2, 30) == [30]  # Capped.

    def padded(bounds, lens):
        return int(np.asarray(bounds)[np.searchsorted(bounds, lens)].sum())

    rng = np.random.default_rng(0)
    lens = rng.integers(1, 9, 200)
    best = min(
        padded(sorted({a, b, 8}), lens) for a in range(1, 9) for b in range(1, 9)
    )  # Brute force over every choice of 3 buckets ending at the longest length.
    assert padded(input_pipeline.bucket_lengths(lens, 3, 8), lens) == best


def test_padded_image_batches_cover_every_row_once():
    got = list(decode.padded_image_batches(10, 4))
    assert [valid for _, valid in got] == [4, 4, 2]
    assert all(len(rows) == 4 for rows, _ in got)
    assert np.concatenate([rows[:v] for rows, v in got]).tolist() == list(range(10))


def test_concept_targets_mark_words_and_frequent_pairs_of_each_image():
    records = [
        ImageRecord("a", "", ("red circle", "a red circle", "red circle left"), "train"),
        ImageRecord("b", "", ("blue square", "blue square", "a blue square"), "train"),
    ]
    vocab = text.Vocabulary.build(text.clean_caption(c) for r in records for c in r.captions)
    rows = {"a": 0, "b": 2}  # Row 1 belongs to an image of another split.
    data = input_pipeline.build_caption_data(records, rows, vocab, max_len=8, min_word_len=1)
    targets = input_pipeline.concept_targets(data, 3, len(vocab), num_pairs=2)
    assert targets.shape == (3, len(vocab) + 2) and targets.dtype == np.uint8
    words_of = {
        row: {vocab.itos[i] for i in np.flatnonzero(targets[row, : len(vocab)])} for row in (0, 2)
    }
    assert words_of == {0: {"red", "circle", "a", "left"}, 2: {"blue", "square", "a"}}
    assert not targets[1].any()
    # The two most frequent pairs are "red circle" (3x) and "blue square" (3x); "a red",
    # "circle left" and "a blue" are left out.
    assert targets[0, len(vocab) :].sum() == 1 and targets[2, len(vocab) :].sum() == 1
    assert targets[0, len(vocab) :].tolist() != targets[2, len(vocab) :].tolist()


def test_batches_carry_concepts_of_their_images():
    records, vocab, data = _data()
    concepts = input_pipeline.concept_targets(data, len(records), len(vocab), num_pairs=4)
    batches = input_pipeline.CaptionBatches(
        data, batch_size=16, num_buckets=2, seed=0, shuffle=True, concepts=concepts
    )
    for batch in batches.epoch(0):
        np.testing.assert_array_equal(batch["concepts"], concepts[batch["image_index"]])
    assert all("concepts" in b for b in batches.example_batches())
