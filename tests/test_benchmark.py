"""The benchmark's inputs and derived figures: synthetic Flickr8k-like captions, the work per
trained word and the measured matmul peak."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from captioning.data import text
from captioning.tools import benchmark
from captioning.tools import benchmark_training as bt
from captioning.training import train

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


def test_matmul_peak_is_a_positive_rate_in_either_dtype():
    for dtype in ("float32", "bfloat16"):
        assert bt.matmul_peak_gflops(dtype, size=256, repeats=2) > 0.1


def test_spatial_store_reads_back_float16_rows(tmp_path):
    from captioning.data import feature_store

    store = feature_store.load_feature_store(
        benchmark.spatial_store(str(tmp_path), 5), on_disk=True
    )
    assert store.features.shape == (5, 8, 8, 2048) and store.features.dtype == np.float16
    assert np.isfinite(store.features[[4, 0]].astype(np.float32)).all()


def _tiny_row_config(**train):
    model = {**benchmark.SEED_MODEL, "embed_dim": 8, "hidden_size": 16, "train_embeddings": True}
    return bt.config_for(
        model, benchmark.SEED_TRAIN, **{"batch_size": 32, "num_buckets": 2, "log_every": 2, **train}
    )


def test_timed_row_trains_through_the_run_loop_without_recompiling(tmp_path):
    tokenized = benchmark.flickr8k_captions("")[0][:400]
    features = np.random.default_rng(0).normal(size=(80, 32)).astype(np.float32)
    data = bt.prepared_data(tokenized, features)
    figures, phase, state = bt.timed_row(_tiny_row_config(), data, 0.5, logdir=str(tmp_path))
    assert figures["train_targets_per_s"] > 0 and figures["train_window_rates"]
    assert figures["recompiles_after_warmup"] == 0
    assert figures["xla_mflop_per_target"] > figures["xla_mflop_per_position"] > 0
    assert phase.steps_per_epoch == 13 and "params" in state
    assert list(tmp_path.glob("events.out.tfevents.*")), "the windows are logged as a run logs them"


def test_compile_counter_fires_on_a_new_shape():
    double = jax.jit(lambda x: 2 * x + 1)
    with bt.count_compiles() as events:
        double(jnp.ones(3)).block_until_ready()
        first = len(events)
        double(jnp.ones(3)).block_until_ready()
        assert len(events) == first >= 1
        double(jnp.ones(5)).block_until_ready()
        assert len(events) == first + 1


def test_xla_flops_per_word_match_the_hand_count(tmp_path):
    """The hand count (every matmul's forward and two backward products) against XLA's cost
    analysis of the compiled step at the seed sizes, per position computed (padding included).
    XLA skips the frozen embeddings' input gradient (2 x E x 4H per word) and adds what the hand
    count leaves out: the image projection (once per caption), the LSTM's gates, the softmax and
    the optimizer; together within 10 %."""
    tokenized = benchmark.flickr8k_captions("")[0]
    vocab, _ = benchmark.caption_records(tokenized)
    features = np.zeros((len(tokenized) // 5, 2048), np.float32)
    data = bt.prepared_data(tokenized, features, vocab=vocab)
    config = bt.config_for(benchmark.SEED_MODEL, benchmark.SEED_TRAIN, batch_size=64, num_buckets=1)
    config.train.num_epochs = 1
    config.model.train_embeddings = False
    config.model.glove_path = bt.write_glove(str(tmp_path / "glove.6B.200d.txt"), vocab.words, 200)

    phase, _, _ = train.make_phase(config, data)
    _, per_position = bt.xla_mflop_per_target(phase)
    hand = benchmark.train_mflop_per_target(config.model, len(vocab))
    skipped = 2 * config.model.embed_dim * 4 * config.model.hidden_size / 1e6
    assert abs(per_position / hand - 1) < 0.10, (per_position, hand, skipped)


def test_xla_flops_of_show_attend_tell_match_the_hand_count():
    """The attention row's hand count against XLA's, per position computed (one bucket: every
    caption padded to the longest, so the per-caption work is shared by that many positions), at
    a quarter of configs/flickr8k_attention.py's sizes (compiling the full step is slow); what
    is left out (the gating scalar, the softmax, the optimizer) stays within 3 %."""
    tokenized = benchmark.flickr8k_captions("")[0][:3000]
    vocab, _ = benchmark.caption_records(tokenized)
    features = np.zeros((len(tokenized) // 5, 8, 8, 512), np.float16)
    data = bt.prepared_data(tokenized, features, vocab=vocab)
    sizes = {"embed_dim": 128, "hidden_size": 256, "attention_dim": 128}
    model = {**benchmark.ATTENTION_MODEL, **sizes}
    config = bt.config_for(model, benchmark.SEED_TRAIN, batch_size=64, num_buckets=1)
    config.train.num_epochs = 1
    phase, _, _ = train.make_phase(config, data)
    _, per_position = bt.xla_mflop_per_target(phase)
    channels = 512 + 2 * config.model.attention_positions  # (row, column) appended.
    (length,) = phase.train_batches.lengths
    hand = benchmark.attention_mflop_per_target(config.model, len(vocab), 64, channels, length)
    assert abs(per_position / hand - 1) < 0.03, (per_position, hand)
    without_keys = benchmark.attention_mflop_per_target(
        config.model, len(vocab), 64, channels, float("inf")
    )
    assert per_position / without_keys - 1 > 0.05  # The per-caption term is worth counting.


def test_evicted_shards_leave_the_page_cache(tmp_path):
    store = benchmark.spatial_store(str(tmp_path / "kept"), 3, evict=False)
    kept = sorted(Path(store).glob("shard_*.npz"))
    assert bt.cached_share(kept) > 0.9  # Just written: in the cache.
    bt.evict(kept)
    assert bt.cached_share(kept) < 0.1
    store = benchmark.spatial_store(str(tmp_path / "evicted"), 3)
    assert bt.cached_share(sorted(Path(store).glob("shard_*.npz"))) < 0.1


def test_disk_row_on_a_tiny_store_reads_what_the_cache_lacks():
    tokenized = benchmark.flickr8k_captions("")[0][:300]
    config = benchmark.disk_config("float32", 2, batch_size=16, num_buckets=1)
    config.model.update(hidden_size=16, embed_dim=8, attention_dim=8)
    figures = benchmark.benchmark_disk(config, tokenized, 0.3, 40, "coco_disk", device_images=20)
    assert figures["coco_disk_train_targets_per_s"] > 0
    assert figures["coco_disk_device_train_targets_per_s"] > 0
    assert figures["coco_disk_cached_share"] < 0.2  # Evicted when the timing started.
    assert figures["coco_disk_vs_device"] > 0 and figures["coco_disk_store_gb"] > 0


def test_profile_sums_the_innermost_xla_ops_by_kind(tmp_path):
    from captioning.tools import profile_ops

    assert profile_ops.op_kind("ynn_fusion") == profile_ops.op_kind("dot.3") == "products"
    assert profile_ops.op_kind("copy.6") == profile_ops.op_kind("transpose.1") == "movement"
    assert profile_ops.op_kind("wrapped_tanh") == "other"

    def loop(x, w):  # Products inside a loop: the loop's own event must not count twice.
        return jax.lax.fori_loop(0, 8, lambda i, h: jnp.tanh(h @ w), x)

    fn = jax.jit(loop)
    x, w = jnp.ones((256, 256)), jnp.full((256, 256), 0.01)
    fn(x, w).block_until_ready()
    out, seconds, wall = profile_ops.traced(lambda: fn(x, w))
    assert out.shape == (256, 256) and set(seconds) == {"products", "movement", "other"}
    assert seconds["products"] > seconds["other"] > 0  # 8 products of 2 x 256^3 FLOPs each.
    assert sum(seconds.values()) <= wall * 1.05


def test_transformer_cache_row_decodes_the_words_recomputing_does():
    from flax import nnx

    from captioning import models
    from captioning.tools import benchmark_inference

    config = bt.config_for(benchmark.TRANSFORMER_MODEL, benchmark.SEED_TRAIN).model
    config.update(embed_dim=32, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
    model = models.create_model(config, 50, (4, 4, 8), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    features = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4, 4, 8)), jnp.float32)
    figures = benchmark_inference.benchmark_cached_decoding(graphdef, params, features, 12)
    assert figures["transformer_same_words_share"] == 1.0
    assert figures["transformer_cached_greedy_captions_per_s"] > 0
    assert figures["transformer_recomputed_greedy_captions_per_s"] > 0
