"""Speed benchmark: `python -m captioning.tools.benchmark` prints one JSON object.

A tool, not part of a run: nothing in the package imports it. Defaults use the Keras notebook's
sizes (`SEED_MODEL`, "seed" meaning that notebook: GloVe-sized 200-d frozen embeddings, merge LSTM
256, the Flickr8k vocabulary of min count 10, captions of at most 32 words) with random 2048-d
features standing in for images. The captions are synthetic by default: the Flickr8k train
captions' length distribution (`FLICKR8K_TRAIN_LENGTHS`, 30,000 captions after the notebook's
cleaning) over a vocabulary of the same size (1,649 words besides the markers);
`--captions=PATH/Flickr8k.token.txt` trains on the real ones instead (the train split when
`Flickr_8k.trainImages.txt` lies beside it). Figures:

  train_targets_per_s          target words per second as a run's log gives them: the merge row
                               trained by `training.loop.train_steps` on `train.make_phase`'s phase
                               (tools/benchmark_training.py), timed after its first epoch
  greedy_captions_per_s        greedy captions per second (decoder trained briefly, so it ends)
  beam_captions_per_s          beam search (size 3) captions per second
  export_images_per_s          feature export (tf.data decode + resize + backbone) images/s
  backbone_images_per_s        the bare Keras backbone on the same batches, images/s
  first_step_compile_s         building the phase: every bucket's train and eval step compiled
  recompiles_after_first_epoch XLA executables made while timed (jit cache misses; must be 0)
  peak_rss_mb                  peak resident memory of the process
  device                       what JAX ran on
  matmul_peak_gflops_<dtype>   {row: [before, after]}: the 2048^3 matmul rate in the row's dtype,
                               measured around that row (a shared machine's speed drifts)
  train_mflop_per_target       hand count: the decoder's matmul work per trained word
  train_xla_mflop_per_target   XLA's cost analysis of the compiled steps over an epoch's batches,
                               per trained word (padding, elementwise work and skipped gradients
                               included)
  train_fraction_of_<f32|bf16>_peak   targets/s x the XLA work / the row's mean peak in its dtype
  attention_…, attention_bf16_…       the same for Show-Attend-Tell in float32 and bfloat16
  transformer_…                the Transformer at configs/coco_transformer.py's sizes: training
                               (targets/s, fraction of the float32 peak) and greedy decoding of
                               32 words with its cache against recomputing the prefix per word
  disk_… / coco_disk_…         training from a store on disk (each shard evicted from the page
                               cache when written, the store again when the timing starts;
                               disk_cached_share: the store's share still cached then) against a
                               store on the device

Flags: --captions, --train_seconds, --batch_size, --num_buckets, --train_embeddings, --dtype,
--log_every, --spatial_seconds, --transformer_seconds, --disk_images, --coco_disk
(--coco_images), --decode_images, --export_images, --backbone, --image_size, --scst_seconds,
--serve_workdir.
"""

from __future__ import annotations

from captioning import host

# First, before an import starts threads: glibc fixes how many malloc arenas there are when a
# thread other than the main one first allocates (captioning/host.py).
host.keep_freed_memory()

import glob
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from captioning.data import feature_store, text
from captioning.tools import benchmark_inference
from captioning.tools import benchmark_training as bt

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "captions",
    "",
    "Flickr8k.token.txt to train on (default: synthetic captions with its length distribution).",
)
flags.DEFINE_float("train_seconds", 25.0, "Seconds of timed training after the first epoch.")
flags.DEFINE_integer("batch_size", 512, "Captions per training step.")
flags.DEFINE_integer("num_buckets", 10, "Caption-length buckets (one compiled step each).")
flags.DEFINE_integer("log_every", 10, "Steps per logged window (config.train.log_every).")
flags.DEFINE_integer("decode_images", 1024, "Images decoded for the greedy/beam figures.")
flags.DEFINE_integer("export_images", 128, "Images for the export vs bare backbone figures.")
flags.DEFINE_string("backbone", "inception_v3", "Backbone for the export figures.")
flags.DEFINE_integer("image_size", 299, "Backbone input side for the export figures.")
flags.DEFINE_string("dtype", "float32", "Matmul dtype of the merge row: float32 | bfloat16.")
flags.DEFINE_float(
    "spatial_seconds",
    20.0,
    "Seconds of timed Show-Attend-Tell training at Flickr8k sizes (0: skip).",
)
flags.DEFINE_float(
    "transformer_seconds",
    20.0,
    "Seconds of timed Transformer training at configs/coco_transformer.py sizes (0: skip).",
)
flags.DEFINE_integer(
    "disk_images",
    0,
    "Also train from a store of this many random 8x8x2048 float16 images on disk against the same "
    "store on the device (30000: 7.9 GB; 0: skip).",
)
flags.DEFINE_bool(
    "coco_disk",
    False,
    "Also train from a COCO-size store on disk (--coco_images of 8x8x2048 float16: 32 GB, more "
    "than the RAM of a 24 GiB machine) against a store that fits on the device; deleted after.",
)
flags.DEFINE_integer("coco_images", 123287, "Images of the --coco_disk store (COCO's).")
flags.DEFINE_float("scst_seconds", 15.0, "Seconds of timed SCST steps (0: skip).")
flags.DEFINE_string(
    "serve_workdir", "", "A trained run to load-test the web demo with (64 requests, 16 threads)."
)
flags.DEFINE_bool(
    "train_embeddings",
    False,
    "Also train the word embeddings (default: frozen, as the seed freezes its GloVe layer).",
)

# Words per cleaned Flickr8k train caption (the Keras notebook's cleaning, >= 2 letters) -> number
# of the 30,000 train captions with that length.
FLICKR8K_TRAIN_LENGTHS = {
    1: 3, 2: 73, 3: 341, 4: 1029, 5: 2054, 6: 2987, 7: 3515, 8: 3888, 9: 3587, 10: 3234,
    11: 2623, 12: 2054, 13: 1479, 14: 1044, 15: 708, 16: 484, 17: 302, 18: 219, 19: 139, 20: 79,
    21: 53, 22: 38, 23: 28, 24: 14, 25: 8, 26: 10, 27: 3, 28: 2, 29: 1, 32: 1,
}  # fmt: skip
FLICKR8K_WORDS = 1649  # Words seen >= 10 times in those captions (the Keras notebook's).
SYNTHETIC_FOLLOW = 0.8  # Synthetic captions: chance that a word is followed by its successor.

# The Keras notebook's model and optimizer (configs/flickr8k.py), written out: no config needed.
SEED_MODEL = {
    "decoder": "merge",
    "embed_dim": 200,
    "hidden_size": 256,
    "dropout": 0.5,
    "use_image": True,
    "glove_path": "",
    "train_embeddings": False,
    "concept_loss": 0.0,
    "concept_pairs": 0,
    "attention_reg": 0.0,
    "attention_dim": 0,
    "attention_positions": False,
    "feed_dim": 0,
    "dtype": "float32",
}
SEED_TRAIN = {
    "learning_rate": 2e-3,
    "warmup_steps": 200,
    "grad_clip": 1.0,
    "weight_decay": 0.0,
}
MAX_CAPTION_LEN = 32


def flickr8k_captions(token_file: str = "") -> tuple[list[list[str]], str]:
    """Cleaned captions (Keras notebook cleaning) -> (tokenized captions, where they came from).

    token_file: a Flickr8k.token.txt (its train split when the split file lies beside it); ''
    gives synthetic captions with the Flickr8k train length distribution.
    """
    if token_file:
        from captioning.data.datasets import flickr8k

        captions = flickr8k.read_token_file(Path(token_file))
        split_file = Path(token_file).parent / "Flickr_8k.trainImages.txt"
        if split_file.is_file():
            train_ids = {line.strip() for _, line in flickr8k.read_lines(split_file)}
            captions = {k: v for k, v in captions.items() if k in train_ids}
        tokenized = [text.clean_caption(c, 2) for cs in captions.values() for c in cs]
        return tokenized, f"flickr8k captions ({token_file})"
    rng = np.random.default_rng(0)
    letters = [chr(97 + i) for i in range(26)]
    words = [a + b + c for a in letters for b in letters for c in letters][:FLICKR8K_WORDS]
    lengths = np.repeat(list(FLICKR8K_TRAIN_LENGTHS), list(FLICKR8K_TRAIN_LENGTHS.values()))
    # A Markov chain rather than independent words: each word is mostly followed by one other, so
    # the briefly trained decoder has something to learn and greedy captions run for many words
    # (with independent words the most likely first word would be <end>).
    successor = rng.permutation(FLICKR8K_WORDS)
    tokenized = []
    for length in rng.permutation(lengths):
        ids = [int(rng.integers(FLICKR8K_WORDS))]
        for _ in range(length - 1):
            follow = rng.random() < SYNTHETIC_FOLLOW
            ids.append(int(successor[ids[-1]]) if follow else int(rng.integers(FLICKR8K_WORDS)))
        tokenized.append([words[i] for i in ids])
    return tokenized, "synthetic (Flickr8k train caption lengths and vocabulary size)"


def seed_config(dtype: str) -> ml_collections.ConfigDict:
    """The fields of the Keras notebook's config that the benchmark's model and optimizer read."""
    return ml_collections.ConfigDict(
        {"model": {**SEED_MODEL, "dtype": dtype}, "train": SEED_TRAIN, "decode": {"max_len": 32}}
    )


def train_mflop_per_target(model_config, vocab_size: int) -> float:
    """Matmul MFLOP per trained word of the merge decoder: every weight matrix's forward product
    and its two backward products (2 FLOP per multiply-add x 3), as in the issue's 5.7 MFLOP."""
    embed, hidden = model_config.embed_dim, model_config.hidden_size
    weights = embed * 4 * hidden + hidden * 4 * hidden + hidden * hidden + hidden * vocab_size
    return 6 * weights / 1e6


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def caption_records(tokenized):
    """Train records of 5 captions per image (Flickr8k's) -> (vocabulary, records)."""
    records = bt.records_for(tokenized, len(tokenized) // 5, "train")
    return text.Vocabulary.build(tokenized, 10), records  # The Keras notebook's min count.


def merge_row_config(glove_path: str, dtype: str, batch_size: int, num_buckets: int, log_every):
    """configs/flickr8k.py with the Keras notebook's model and optimizer (`SEED_MODEL`,
    `SEED_TRAIN`) and the benchmark's batch: what `benchmark_main.py` also gives main.py."""
    model = {**SEED_MODEL, "dtype": dtype, "glove_path": glove_path}
    return bt.config_for(
        model, SEED_TRAIN, batch_size=batch_size, num_buckets=num_buckets, log_every=log_every
    )


def benchmark_training(
    tokenized, tmp: str, *, seconds: float, train_embeddings: bool = False, on_timing=None
):
    """The Keras notebook's merge decoder on pooled [2048] random features, random GloVe-format
    vectors for its (frozen) embeddings -> (figures, {graphdef, params}, vocab). `on_timing`:
    `bt.timed_row`'s, called when the timing starts."""
    vocab, _ = caption_records(tokenized)
    features = np.random.default_rng(0).normal(size=(len(tokenized) // 5, 2048))
    data = bt.prepared_data(tokenized, features.astype(np.float32), vocab=vocab)
    glove = bt.write_glove(
        os.path.join(tmp, f"glove.6B.{SEED_MODEL['embed_dim']}d.txt"),
        vocab.words,
        SEED_MODEL["embed_dim"],
    )
    config = merge_row_config(
        glove, FLAGS.dtype, FLAGS.batch_size, FLAGS.num_buckets, FLAGS.log_every
    )
    config.model.train_embeddings = train_embeddings
    figures, phase, state = bt.timed_row(config, data, seconds, on_timing=on_timing)
    figures["recompiles_after_first_epoch"] = figures.pop("recompiles_after_warmup")
    figures.update(
        vocab_size=len(vocab),
        batch_size=config.train.batch_size,
        embeddings="trained" if train_embeddings else "frozen (as the seed's GloVe)",
        bucket_lengths=phase.train_batches.lengths,
        steps_per_epoch=phase.steps_per_epoch,
        mean_targets_per_caption=round(float(phase.train_batches.data.lengths.mean()), 2),
    )
    return figures, state, vocab


# Show, Attend and Tell at configs/flickr8k_attention.py's sizes, and the merge decoder with
# output attention at configs/flickr8k_merge_attention.py's, over InceptionV3's 8x8x2048 map.
SPATIAL_SHAPE = (8, 8, 2048)
ATTENTION_MODEL = {
    **SEED_MODEL,
    "decoder": "attention",
    "embed_dim": 512,
    "hidden_size": 1000,
    "attention_dim": 512,
    "train_embeddings": True,
    "glove_path": "",
}
MERGE_ATTENTION_MODEL = {**SEED_MODEL, "decoder": "merge_attention", "attention_dim": 256}


def attention_mflop_per_target(
    model_config, vocab_size: int, locations: int, channels: int, words_per_caption: float
):
    """Matmul MFLOP per trained word of Show-Attend-Tell (forward + backward, 2 x 3 per
    multiply-add): the word, state and context gate inputs, the attention query, scores and
    weighted sum over the locations, the deep output and the output layer; and, shared by the
    `words_per_caption` words of a caption, its keys and initial state from the features (2 x 2:
    the features take no gradient)."""
    e, h, a = model_config.embed_dim, model_config.hidden_size, model_config.attention_dim
    per_word = e * 4 * h + h * 4 * h + channels * 4 * h + h * a + locations * (a + channels)
    per_word += h * e + channels * e + e * vocab_size
    per_caption = locations * channels * a + 2 * channels * h
    return (6 * per_word + 4 * per_caption / words_per_caption) / 1e6


SHORT = {"float32": "f32", "bfloat16": "bf16"}
DEVICE_FIT_IMAGES = 16384  # The --coco_disk row's device-resident store (4.3 GB): it fits.


def spatial_store(tmp: str, num_images: int, dtype: str = "float16", evict: bool = True) -> str:
    """A feature store of random [8, 8, 2048] rows written as the export writes them; each shard
    evicted from the page cache once written (`evict`), so a store that fits in RAM is read
    from the disk all the same."""
    store_dir = os.path.join(tmp, "store")
    os.makedirs(store_dir)
    rng = np.random.default_rng(0)
    shard_size = 1024
    for shard, start in enumerate(range(0, num_images, shard_size)):
        count = min(shard_size, num_images - start)
        rows = rng.standard_normal((count, *SPATIAL_SHAPE), np.float32).astype(dtype)
        ids = [f"img{start + i}" for i in range(count)]
        path = os.path.join(store_dir, f"shard_{shard:05d}.npz")
        feature_store._write_shard(path, ids, rows, [])
        if evict:
            bt.evict([path])
    metadata = {"num_images": num_images, "feature_shape": list(SPATIAL_SHAPE), "dtype": dtype}
    feature_store._write_json(
        os.path.join(store_dir, "metadata.json"), {**metadata, "complete": True}
    )
    return store_dir


def random_table(num_images: int) -> np.ndarray:
    """[num_images, 8, 8, 2048] float16 random rows in one aligned array, as training holds a
    store (the CPU device uses it in place)."""
    rng = np.random.default_rng(0)
    table = feature_store.aligned_empty((num_images, *SPATIAL_SHAPE), np.float16)
    for start in range(0, len(table), 1024):
        block = table[start : start + 1024]
        block[...] = rng.standard_normal(block.shape, np.float32)
    return table


def with_peak(results: dict, row: str, dtype: str, run):
    """Runs `run()` between two matmul peak measurements in `dtype`; records them under
    `matmul_peak_gflops_<dtype>[row]` and returns (run's result, the mean peak)."""
    before = bt.matmul_peak_gflops(dtype)
    out = run()
    after = bt.matmul_peak_gflops(dtype)
    results.setdefault(f"matmul_peak_gflops_{dtype}", {})[row] = [round(before, 1), round(after, 1)]
    return out, (before + after) / 2


def fraction_of_peak(targets_per_s: float, mflop_per_target: float, peak_gflops: float) -> float:
    return round(targets_per_s * mflop_per_target / 1e3 / peak_gflops, 3)


def benchmark_spatial(tokenized, seconds: float, results: dict) -> dict:
    """Show-Attend-Tell's training speed at the Flickr8k sizes (float16 device-resident features)
    in float32 and with bfloat16 matmuls, each between matmul peaks in its dtype, and the peak
    memory of the float32 training."""
    figures = {}
    vocab, _ = caption_records(tokenized)
    rss_measured = bt.reset_peak_rss()
    table = random_table(len(tokenized) // 5)
    data = bt.prepared_data(tokenized, table, vocab=vocab)
    figures["attention_store_gb"] = round(table.nbytes / 1e9, 2)
    for dtype, name in (("float32", "attention"), ("bfloat16", "attention_bf16")):
        config = bt.config_for(
            {**ATTENTION_MODEL, "dtype": dtype}, SEED_TRAIN, batch_size=64, num_buckets=10,
            log_every=FLAGS.log_every,
        )  # fmt: skip
        (row, phase, _), peak = with_peak(
            results, name, dtype, lambda c=config: bt.timed_row(c, data, seconds, warmup_steps=20)
        )
        figures[f"{name}_train_targets_per_s"] = row["train_targets_per_s"]
        figures[f"{name}_recompiles_after_warmup"] = row["recompiles_after_warmup"]
        figures[f"{name}_xla_mflop_per_target"] = row["xla_mflop_per_target"]
        figures[f"{name}_fraction_of_{SHORT[dtype]}_peak"] = fraction_of_peak(
            row["train_targets_per_s"], row["xla_mflop_per_target"], peak
        )
        if rss_measured and dtype == "float32":
            figures["attention_peak_rss_gb"] = round(bt.peak_rss_since_reset_gb(), 2)
    figures["attention_mflop_per_target"] = round(
        attention_mflop_per_target(
            config.model, len(vocab), 64, 2048, phase.train_batches.data.lengths.mean()
        ),
        1,
    )
    return figures


# configs/coco_transformer.py's decoder (6 blocks of d_model 512, 8 heads, MLP 2048) over the
# 8x8x2048 map; its batch of 100 captions.
TRANSFORMER_MODEL = {
    **SEED_MODEL,
    "decoder": "transformer",
    "embed_dim": 512,
    "hidden_size": 512,
    "num_layers": 6,
    "num_heads": 8,
    "mlp_dim": 2048,
    "dropout": 0.1,
    "attention_positions": True,
    "train_embeddings": True,
    "glove_path": "",
}


def benchmark_transformer(tokenized, seconds: float, results: dict, decode_images: int) -> dict:
    """The Transformer at configs/coco_transformer.py's sizes on Flickr8k-length captions
    (float16 device-resident features): training between float32 peaks, and greedy decoding of
    32 words for `decode_images` images with its key/value cache against recomputing the prefix."""
    vocab, _ = caption_records(tokenized)
    data = bt.prepared_data(tokenized, random_table(len(tokenized) // 5), vocab=vocab)
    config = bt.config_for(
        TRANSFORMER_MODEL, SEED_TRAIN, batch_size=100, num_buckets=4, log_every=2
    )
    (row, _, state), peak = with_peak(
        results, "transformer", "float32",
        lambda: bt.timed_row(config, data, seconds, warmup_steps=2),
    )  # fmt: skip
    features = np.asarray(data.features[:decode_images], np.float32)
    return {
        "transformer_train_targets_per_s": row["train_targets_per_s"],
        "transformer_xla_mflop_per_target": row["xla_mflop_per_target"],
        "transformer_fraction_of_f32_peak": fraction_of_peak(
            row["train_targets_per_s"], row["xla_mflop_per_target"], peak
        ),
        "transformer_recompiles_after_warmup": row["recompiles_after_warmup"],
        **benchmark_inference.benchmark_cached_decoding(
            state["graphdef"], state["params"], jax.numpy.asarray(features), MAX_CAPTION_LEN
        ),
    }


def disk_config(dtype: str, log_every: int, **train) -> ml_collections.ConfigDict:
    """The disk rows' decoder: merge with output attention (configs/flickr8k_merge_attention.py)."""
    model = {**MERGE_ATTENTION_MODEL, "dtype": dtype}
    return bt.config_for(
        model, SEED_TRAIN, **{"batch_size": 64, "num_buckets": 10, **train}, log_every=log_every
    )


def benchmark_disk(
    config, tokenized, seconds: float, num_images: int, prefix: str, device_images=None
) -> dict:
    """The merge decoder with output attention trained from a store of `num_images` random
    8x8x2048 float16 images on disk (read through the page cache's misses), against a store on
    the device: the same store read into memory, or, with `device_images`, a random one of that
    many images (a store that fits). The store is deleted after."""
    figures = {}
    vocab = text.Vocabulary.build(tokenized, 10)
    with tempfile.TemporaryDirectory(dir=os.path.expanduser("~")) as tmp:
        start = time.perf_counter()
        store_dir = spatial_store(tmp, num_images)
        shards = sorted(glob.glob(os.path.join(store_dir, "shard_*.npz")))
        store = feature_store.load_feature_store(store_dir, on_disk=True)
        figures[f"{prefix}_store_gb"] = round(store.nbytes / 1e9, 2)
        figures[f"{prefix}_store_write_s"] = round(time.perf_counter() - start, 1)
        data = bt.prepared_data(tokenized, store.features, "disk", images=num_images, vocab=vocab)
        cached = {}

        def evict_store():  # The warm-up's reads leave the timed ones nothing cached.
            bt.evict(shards)
            cached["start"] = bt.cached_share(shards)

        rss_measured = bt.reset_peak_rss()
        row, _, _ = bt.timed_row(config, data, seconds, warmup_steps=20, on_timing=evict_store)
        figures[f"{prefix}_train_targets_per_s"] = row["train_targets_per_s"]
        figures[f"{prefix}_cached_share"] = round(cached["start"], 4)
        figures[f"{prefix}_cached_share_end"] = round(bt.cached_share(shards), 4)
        if rss_measured:
            figures[f"{prefix}_peak_rss_gb"] = round(bt.peak_rss_since_reset_gb(), 2)
        del data
        # A store that fits, or the same one held once in memory, as training holds it.
        table = random_table(device_images) if device_images else store.features.read_all()
        device_data = bt.prepared_data(
            tokenized, table, images=device_images or num_images, vocab=vocab
        )
        row, _, _ = bt.timed_row(config, device_data, seconds, warmup_steps=20)
    device = "device" if prefix == "disk" else f"{prefix}_device"
    figures[f"{device}_train_targets_per_s"] = row["train_targets_per_s"]
    if device_images:
        figures[f"{device}_images"] = device_images
    figures[f"{prefix}_vs_device"] = round(
        figures[f"{prefix}_train_targets_per_s"] / row["train_targets_per_s"], 3
    )
    return figures


def main(argv):
    del argv
    tokenized, source = flickr8k_captions(FLAGS.captions)
    results = {
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        "platform": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "captions": source,
        "dtype": FLAGS.dtype,
    }

    def add(figures: dict) -> None:  # Each part's figures as soon as it ends (progress).
        results.update(figures)
        logging.info("%s", json.dumps(figures))

    with tempfile.TemporaryDirectory() as tmp:
        (train_figures, state, vocab), peak = with_peak(
            results, "train", FLAGS.dtype,
            lambda: benchmark_training(
                tokenized, tmp, seconds=FLAGS.train_seconds,
                train_embeddings=FLAGS.train_embeddings,
            ),
        )  # fmt: skip
    add(train_figures)
    config = seed_config(FLAGS.dtype)
    results["train_mflop_per_target"] = round(
        train_mflop_per_target(config.model, train_figures["vocab_size"]), 2
    )
    results["train_xla_mflop_per_target"] = train_figures["xla_mflop_per_target"]
    results[f"train_fraction_of_{SHORT[FLAGS.dtype]}_peak"] = fraction_of_peak(
        train_figures["train_targets_per_s"], train_figures["xla_mflop_per_target"], peak
    )
    if FLAGS.spatial_seconds:
        add(benchmark_spatial(tokenized, FLAGS.spatial_seconds, results))
    seconds = FLAGS.spatial_seconds or 20.0
    if FLAGS.transformer_seconds:
        add(benchmark_transformer(tokenized, FLAGS.transformer_seconds, results, 64))
    if FLAGS.disk_images:
        config = disk_config(FLAGS.dtype, FLAGS.log_every)
        add(benchmark_disk(config, tokenized, seconds, FLAGS.disk_images, "disk"))
    if FLAGS.coco_disk:
        config = disk_config(FLAGS.dtype, FLAGS.log_every)
        coco_device = min(FLAGS.coco_images, DEVICE_FIT_IMAGES)
        add(benchmark_disk(config, tokenized, seconds, FLAGS.coco_images, "coco_disk", coco_device))
    graphdef, params = state["graphdef"], state["params"]
    if FLAGS.scst_seconds:
        _, records = caption_records(tokenized)
        add(
            benchmark_inference.benchmark_scst(
                config, graphdef, params, vocab, records, FLAGS.scst_seconds
            )
        )
    add(
        benchmark_inference.benchmark_decoding(
            graphdef, params, FLAGS.decode_images, config.decode.max_len
        )
    )
    if FLAGS.serve_workdir:
        add(benchmark_inference.benchmark_serve(FLAGS.serve_workdir))
    if FLAGS.export_images:
        add(
            benchmark_inference.benchmark_export(
                FLAGS.backbone, FLAGS.image_size, FLAGS.export_images
            )
        )
    results["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    app.run(main)
