"""Speed benchmark: `python -m captioning.tools.benchmark` prints one JSON object.

A tool, not part of a run: nothing in the package imports it. Defaults use the Keras notebook's
sizes (`SEED_MODEL`, "seed" meaning that notebook: GloVe-sized 200-d frozen embeddings, merge LSTM
256, the Flickr8k vocabulary of min count 10, captions of at most 32 words) with random 2048-d
features standing in for images. The captions are synthetic by default: the Flickr8k train
captions' length distribution (`FLICKR8K_TRAIN_LENGTHS`, 30,000 captions after the notebook's
cleaning) over a vocabulary of the same size (1,649 words besides the markers);
`--captions=PATH/Flickr8k.token.txt` trains on the real ones instead (the train split when
`Flickr_8k.trainImages.txt` lies beside it). Figures:

  train_targets_per_s          non-pad target words trained per second, steady state
  greedy_captions_per_s        greedy captions per second (decoder trained briefly, so it ends)
  beam_captions_per_s          beam search (size 3) captions per second
  export_images_per_s          feature export (tf.data decode + resize + backbone) images/s
  backbone_images_per_s        the bare Keras backbone on the same batches, images/s
  first_step_compile_s         compiling every bucket's train step before step 1
  recompiles_after_first_step  XLA compilations during the timed training steps (must be 0)
  peak_rss_mb                  peak resident memory of the process
  device                       what JAX ran on
  matmul_peak_gflops           float32 2048^3 matmul rate, measured before and after the timed
                               training (a shared machine's speed drifts)
  train_mflop_per_target       the decoder's matmul work per trained word (forward + backward)
  train_fraction_of_peak       train_targets_per_s x that work / the mean measured peak: the
                               code's efficiency, comparable across slow and fast spells

Flags: --captions, --train_seconds, --batch_size, --num_buckets, --train_embeddings, --dtype,
--decode_images, --export_images, --backbone, --image_size.
"""

from __future__ import annotations

from captioning import host

# First, before an import starts threads: glibc fixes how many malloc arenas there are when a
# thread other than the main one first allocates (captioning/host.py).
host.keep_freed_memory()

import dataclasses
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from captioning import models
from captioning.data import input_pipeline, text
from captioning.data.datasets.base import ImageRecord
from captioning.tools import benchmark_inference
from captioning.training import train

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "captions",
    "",
    "Flickr8k.token.txt to train on (default: synthetic captions with its length distribution).",
)
flags.DEFINE_float("train_seconds", 25.0, "Seconds of timed, steady-state training.")
flags.DEFINE_integer("batch_size", 512, "Captions per training step.")
flags.DEFINE_integer("num_buckets", 10, "Caption-length buckets (one compiled step each).")
flags.DEFINE_integer("decode_images", 1024, "Images decoded for the greedy/beam figures.")
flags.DEFINE_integer("export_images", 128, "Images for the export vs bare backbone figures.")
flags.DEFINE_string("backbone", "inception_v3", "Backbone for the export figures.")
flags.DEFINE_integer("image_size", 299, "Backbone input side for the export figures.")
flags.DEFINE_string("dtype", "float32", "Matmul dtype: float32 | bfloat16.")
flags.DEFINE_float(
    "spatial_seconds",
    20.0,
    "Seconds of timed Show-Attend-Tell training at Flickr8k sizes (0: skip).",
)
flags.DEFINE_integer(
    "disk_images",
    0,
    "Also train from a store of this many random 8x8x2048 float16 images on disk against the same "
    "store on the device (30000: 7.9 GB; 0: skip).",
)
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


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` float32 [size, size] x [size, size] matmul rate on the default device."""
    a = jnp.ones((size, size), jnp.float32)
    product = jax.jit(lambda x, y: x @ y)
    product(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def train_mflop_per_target(model_config, vocab_size: int) -> float:
    """Matmul MFLOP per trained word of the merge decoder: every weight matrix's forward product
    and its two backward products (2 FLOP per multiply-add x 3), as in the issue's 5.7 MFLOP."""
    embed, hidden = model_config.embed_dim, model_config.hidden_size
    weights = embed * 4 * hidden + hidden * 4 * hidden + hidden * hidden + hidden * vocab_size
    return 6 * weights / 1e6


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _CompileCounter:
    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self)

    def __call__(self, name, *_, **__):
        if self.active and name == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def caption_batches(tokenized, batch_size: int, num_buckets: int):
    """Synthetic train records of 5 captions per image -> (vocab, CaptionData, batches, records)."""
    vocab = text.Vocabulary.build(tokenized, 10)  # The Keras notebook's min count.
    num_images = len(tokenized) // 5
    records = [
        ImageRecord(
            f"img{i}", "", tuple(" ".join(w) for w in tokenized[5 * i : 5 * i + 5]), "train"
        )
        for i in range(num_images)
    ]
    rows = {r.image_id: i for i, r in enumerate(records)}
    data = input_pipeline.build_caption_data(
        records, rows, vocab, max_len=MAX_CAPTION_LEN, min_word_len=2
    )
    return vocab, data, records


def timed_training(config, vocab, batches, features, seconds, *, freeze, stats=None, shape=None):
    """Trains `config.model` on `batches` for `seconds` after every bucket ran twice.

    features: the store on the device ([N, ...], rows gathered by the step), or None when the
    batches carry their rows (host or disk residency; `shape` is then a row's shape).
    -> (figures, graphdef, params).
    """
    shape = features.shape[1:] if features is not None else shape
    model = models.create_model(config.model, len(vocab), shape, rngs=nnx.Rngs(0))
    graphdef, state, tx, _ = train.init_train_state(
        config, model, total_steps=10_000, freeze_embeddings=freeze
    )
    train_step, _ = train.make_steps(
        graphdef, tx, config.model, stats=stats, freeze_embeddings=freeze
    )
    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    params, opt_state = state["params"], state["opt_state"]
    key = jax.random.key(0)

    start = time.perf_counter()
    compiled = train.compile_for_buckets(
        train_step, lambda b: (params, opt_state, features, b, key, 0), batches
    )
    compile_s = time.perf_counter() - start

    counter = _CompileCounter()
    step, timed_start, timed_targets = 0, None, 0
    warmup_steps = 2 * len(compiled)  # Every bucket runs at least once before timing.
    epoch = 0
    while True:
        for batch in batches.epoch(epoch):
            params, opt_state, step_stats = compiled[batch["inputs"].shape[1]](
                params, opt_state, features, batch, key, step
            )
            real = int((batch["targets"] != text.PAD_ID).sum())  # Host-side: no device sync.
            step += 1
            if step == warmup_steps:
                jax.block_until_ready(params)
                timed_start, timed_targets = time.perf_counter(), 0
                counter.active = True
            elif timed_start is not None:
                timed_targets += real
                if time.perf_counter() - timed_start > seconds:
                    break
        else:
            epoch += 1
            continue
        break
    jax.block_until_ready(params)
    elapsed = time.perf_counter() - timed_start
    counter.active = False
    figures = {
        "train_targets_per_s": round(timed_targets / elapsed, 1),
        "train_steps_timed": step - warmup_steps,
        "train_loss_last": round(float(step_stats["loss_sum"] / step_stats["count"]), 3),
        "first_step_compile_s": round(compile_s, 2),
        "recompiles_after_first_step": counter.count,
    }
    return figures, graphdef, params


def benchmark_training(config, tokenized, batch_size, num_buckets, seconds, train_embeddings):
    """The Keras notebook's merge decoder on pooled [2048] features -> (figures, graphdef, params,
    vocab)."""
    vocab, data, _ = caption_batches(tokenized, batch_size, num_buckets)
    batches = input_pipeline.CaptionBatches(
        data, batch_size=batch_size, num_buckets=num_buckets, seed=0, shuffle=True
    )
    num_images = len(tokenized) // 5
    features = jnp.asarray(np.random.default_rng(0).normal(size=(num_images, 2048)), jnp.float32)
    # Random vectors stand in for the Keras notebook's frozen GloVe matrix.
    figures, graphdef, params = timed_training(
        config, vocab, batches, features, seconds, freeze=not train_embeddings
    )
    figures.update(
        vocab_size=len(vocab),
        batch_size=batch_size,
        embeddings="trained" if train_embeddings else "frozen (as the seed's GloVe)",
        bucket_lengths=batches.lengths,
        mean_targets_per_caption=round(float(data.lengths.mean()), 2),
    )
    return figures, graphdef, params, vocab


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
}
MERGE_ATTENTION_MODEL = {**SEED_MODEL, "decoder": "merge_attention", "attention_dim": 256}


def attention_mflop_per_target(model_config, vocab_size: int, locations: int, channels: int):
    """Matmul MFLOP per trained word of Show-Attend-Tell (forward + backward, 2 x 3 per
    multiply-add): the word, state and context gate inputs, the attention query, scores and
    weighted sum over the locations, the deep output and the output layer (the per-image keys
    are left out: about 1/T of the rest)."""
    e, h, a = model_config.embed_dim, model_config.hidden_size, model_config.attention_dim
    per_word = e * 4 * h + h * 4 * h + channels * 4 * h + h * a + locations * (a + channels)
    per_word += h * e + channels * e + e * vocab_size
    return 6 * per_word / 1e6


def spatial_store(tmp: str, num_images: int, dtype: str = "float16") -> str:
    """A feature store of random [8, 8, 2048] rows written as the export writes them."""
    from captioning.data import feature_store

    store_dir = os.path.join(tmp, "store")
    os.makedirs(store_dir)
    rng = np.random.default_rng(0)
    shard_size = 1024
    for shard, start in enumerate(range(0, num_images, shard_size)):
        count = min(shard_size, num_images - start)
        rows = rng.standard_normal((count, *SPATIAL_SHAPE), np.float32).astype(dtype)
        ids = [f"img{start + i}" for i in range(count)]
        feature_store._write_shard(os.path.join(store_dir, f"shard_{shard:05d}.npz"), ids, rows, [])
    metadata = {"num_images": num_images, "feature_shape": list(SPATIAL_SHAPE), "dtype": dtype}
    feature_store._write_json(
        os.path.join(store_dir, "metadata.json"), {**metadata, "complete": True}
    )
    return store_dir


def _reset_peak_rss() -> bool:
    """Restarts the kernel's count of this process's peak RSS (VmHWM); False where not Linux."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            return f.write("5") > 0
    except OSError:
        return False


def _peak_rss_since_reset_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1e6


def benchmark_spatial(tokenized, seconds: float, disk_images: int) -> dict:
    """Show-Attend-Tell's training speed at the Flickr8k sizes (float16 device-resident features)
    in float32 and with bfloat16 matmuls, back to back, and the peak memory of that training;
    with `disk_images`, the merge decoder with output attention trained from a store of that many
    random images read from disk against the same store resident on the device."""
    from captioning.data import feature_store

    figures = {}
    vocab, data, _ = caption_batches(tokenized, 64, 10)
    config = seed_config(FLAGS.dtype)
    config.model.update(ATTENTION_MODEL)
    batches = input_pipeline.CaptionBatches(
        data, batch_size=64, num_buckets=10, seed=0, shuffle=True
    )
    rss_measured = _reset_peak_rss()
    rng = np.random.default_rng(0)
    # As training holds the store: one aligned host array that the CPU device uses in place.
    table = feature_store.aligned_empty((len(tokenized) // 5, *SPATIAL_SHAPE), np.float16)
    for start in range(0, len(table), 1024):
        block = table[start : start + 1024]
        block[...] = rng.standard_normal(block.shape, np.float32)
    features = jax.device_put(table)
    figures["attention_store_gb"] = round(table.nbytes / 1e9, 2)
    for dtype, name in (("float32", "attention"), ("bfloat16", "attention_bf16")):
        config.model.dtype = dtype
        sat, _, _ = timed_training(config, vocab, batches, features, seconds, freeze=False)
        figures[f"{name}_train_targets_per_s"] = sat["train_targets_per_s"]
        figures[f"{name}_recompiles_after_first_step"] = sat["recompiles_after_first_step"]
        if rss_measured and dtype == "float32":
            figures["attention_peak_rss_gb"] = round(_peak_rss_since_reset_gb(), 2)
    config.model.dtype = FLAGS.dtype
    figures["attention_mflop_per_target"] = round(
        attention_mflop_per_target(config.model, len(vocab), 64, 2048), 1
    )
    del features, table
    if not disk_images:
        return figures
    config.model.update(MERGE_ATTENTION_MODEL)
    config.model.dtype = FLAGS.dtype
    with tempfile.TemporaryDirectory(dir=os.path.expanduser("~")) as tmp:
        start = time.perf_counter()
        store = feature_store.load_feature_store(spatial_store(tmp, disk_images), on_disk=True)
        figures["disk_store_gb"] = round(store.nbytes / 1e9, 2)
        figures["disk_store_write_s"] = round(time.perf_counter() - start, 1)
        rows = np.arange(len(data)) % disk_images  # Captions spread over the whole store.
        spread = dataclasses.replace(data, image_index=rows.astype(np.int32))
        for residency in ("disk", "device"):
            on_disk = residency == "disk"
            batches = input_pipeline.CaptionBatches(
                spread,
                batch_size=64,
                num_buckets=10,
                seed=0,
                shuffle=True,
                features=store.features if on_disk else None,
            )
            # The device side holds the store once (as training does), not a copy of a copy.
            table = None if on_disk else jax.device_put(store.features.read_all())
            result, _, _ = timed_training(
                config, vocab, batches, table, seconds, freeze=False, shape=SPATIAL_SHAPE
            )
            figures[f"{residency}_train_targets_per_s"] = result["train_targets_per_s"]
            del table
    figures["disk_vs_device"] = round(
        figures["disk_train_targets_per_s"] / figures["device_train_targets_per_s"], 3
    )
    return figures


def main(argv):
    del argv
    config = seed_config(FLAGS.dtype)
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

    peak_before = matmul_peak_gflops()
    train_figures, graphdef, params, vocab = benchmark_training(
        config, tokenized, FLAGS.batch_size, FLAGS.num_buckets, FLAGS.train_seconds,
        FLAGS.train_embeddings,
    )  # fmt: skip
    peak_after = matmul_peak_gflops()
    add(train_figures)
    peak = (peak_before + peak_after) / 2

    def fraction_of_peak(targets_per_s: float, mflop_per_target: float) -> float:
        return round(targets_per_s * mflop_per_target / 1e3 / peak, 3)  # float32 peak.

    work = train_mflop_per_target(config.model, train_figures["vocab_size"])
    results["matmul_peak_gflops"] = [round(peak_before, 1), round(peak_after, 1)]
    results["train_mflop_per_target"] = round(work, 2)
    results["train_fraction_of_peak"] = fraction_of_peak(train_figures["train_targets_per_s"], work)
    if FLAGS.spatial_seconds:
        spatial = benchmark_spatial(tokenized, FLAGS.spatial_seconds, FLAGS.disk_images)
        for name in ("attention", "attention_bf16"):
            spatial[f"{name}_train_fraction_of_peak"] = fraction_of_peak(
                spatial[f"{name}_train_targets_per_s"], spatial["attention_mflop_per_target"]
            )
        add(spatial)
    if FLAGS.scst_seconds:
        _, _, records = caption_batches(tokenized, FLAGS.batch_size, FLAGS.num_buckets)
        add(
            benchmark_inference.benchmark_scst(
                seed_config(FLAGS.dtype), graphdef, params, vocab, records, FLAGS.scst_seconds
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
