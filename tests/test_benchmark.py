"""The benchmark's inputs and derived figures: synthetic Flickr8k-like captions, the work per
trained word and the measured matmul peak."""

from pathlib import Path

import numpy as np
import pytest

from captioning.data import text
from captioning.tools import benchmark

SHARED_TOKENS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k_text" / "Flickr8k.token.txt"
)


def test_work_per_target_at_the_seed_sizes_is_the_issue_figure():
    config = benchmark.seed_config("float32").model
    # "The Keras notebook-size decoder needs about 5.7 MFLOP per trained target word."
    assert abs(benchmark.train_mflop_per_target(config, 1653) - 5.73) < 0.01
    config.hidden_size = 512  # Grows with the sizes it counts.
    assert benchmark.train_mflop_per_target(config, 1653) > 5.73


def test_synthetic_captions_have_flickr8k_lengths_and_vocabulary_size():
    tokenized, source = benchmark.flickr8k_captions("")
    assert "synthetic" in source and len(tokenized) == 30000
    lengths = {}
    for caption in tokenized:
        lengths[len(caption)] = lengths.get(len(caption), 0) + 1
    assert lengths == benchmark.FLICKR8K_TRAIN_LENGTHS
    assert len(text.Vocabulary.build(tokenized, 10)) == 1653  # The Keras notebook's: 1649 + 4.


def test_real_token_file_gives_the_same_distribution():
    if not SHARED_TOKENS.exists():
        pytest.skip(f"the shared Flickr8k text is absent ({SHARED_TOKENS})")
    tokenized, source = benchmark.flickr8k_captions(str(SHARED_TOKENS))
    assert str(SHARED_TOKENS) in source and len(tokenized) == 30000  # The train split only.
    lengths = {}
    for caption in tokenized:
        lengths[len(caption)] = lengths.get(len(caption), 0) + 1
    assert lengths == benchmark.FLICKR8K_TRAIN_LENGTHS
    assert len(text.Vocabulary.build(tokenized, 10)) == 1653


def test_matmul_peak_is_a_positive_rate():
    assert benchmark.matmul_peak_gflops(size=256, repeats=2) > 0.1


def test_attention_work_counts_every_product_and_the_spatial_store_reads_back(tmp_path):
    from captioning.data import feature_store

    config = benchmark.seed_config("float32").model
    config.update(benchmark.ATTENTION_MODEL)
    work = benchmark.attention_mflop_per_target(config, 1653, 64, 2048)
    # The context's gate inputs alone: 6 x 2048 x 4000 multiply-adds per word.
    assert work > 6 * 2048 * 4000 / 1e6
    config.hidden_size = 500
    assert benchmark.attention_mflop_per_target(config, 1653, 64, 2048) < work
    store = feature_store.load_feature_store(
        benchmark.spatial_store(str(tmp_path), 5), on_disk=True
    )
    assert store.features.shape == (5, 8, 8, 2048) and store.features.dtype == np.float16
    assert np.isfinite(store.features[[4, 0]].astype(np.float32)).all()
