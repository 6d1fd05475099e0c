"""The benchmark's merge row against `main.py` on the same sizes: both `train_targets_per_s`.

    python -m captioning.tools.benchmark_main [--epochs=3] [--train_seconds=30]

Writes a Flickr8k-layout folder of the benchmark's captions (6,000 train images of 5 captions;
empty image files, as the features are a finished store in the cache, as an export leaves it:
random 2048-d rows), a random GloVe file, and trains `main.py --config=configs/flickr8k.py` on it
with the config fields the benchmark's row sets (`benchmark.merge_row_config`) for --epochs
epochs. Its logged `train_targets_per_s` windows after the first epoch are averaged, then the
benchmark's row runs on the same captions in this process; both are printed with their ratio
(the goal: within 5 %). --num_captions trains on the first N captions (a quick check).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import ml_collections
import numpy as np
from absl import app, flags
from flax import traverse_util

from captioning.data import feature_store, prepare
from captioning.data.datasets import registry
from captioning.tools import benchmark
from captioning.tools import benchmark_training as bt

FLAGS = flags.FLAGS
flags.DEFINE_integer("epochs", 3, "main.py's epochs (the first is not timed).")
flags.DEFINE_integer("num_captions", 0, "Train on the first N captions only (0: all).")
flags.DEFINE_integer("eval_images", 64, "Images of main.py's val and test splits.")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WINDOW = re.compile(r"\[(\d+)\] .*train_targets_per_s=([0-9.e+]+)")


def write_layout(root: str, tokenized, eval_images: int) -> None:
    """Flickr8k's text files over the benchmark's train records (`records_for`) and val/test
    images that reuse the first images' captions; every image an empty file."""
    images = os.path.join(root, "Flicker8k_Dataset")
    os.makedirs(images)
    train = bt.records_for(tokenized, len(tokenized) // 5, "train")
    splits = {
        "train": [(f"{r.image_id}.jpg", r.captions) for r in train],
        "dev": [(f"dev{i}.jpg", r.captions) for i, r in enumerate(train[:eval_images])],
        "test": [(f"test{i}.jpg", r.captions) for i, r in enumerate(train[:eval_images])],
    }
    lines = []
    for split, items in splits.items():
        for name, captions in items:
            open(os.path.join(images, name), "wb").close()
            lines += [f"{name}#{k}\t{c}" for k, c in enumerate(captions)]
        with open(os.path.join(root, f"Flickr_8k.{split}Images.txt"), "w") as f:
            f.write("\n".join(name for name, _ in items) + "\n")
    with open(os.path.join(root, "Flickr8k.token.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_store(config: ml_collections.ConfigDict) -> str:
    """The finished feature store an export of `config`'s dataset would leave: random rows."""
    from captioning.data import backbone

    splits = registry.load_records(config.data, config.seed)
    store_dir = feature_store.feature_store_dir(
        config.data.cache_dir, prepare.dataset_key(config, splits), config.encoder
    )
    os.makedirs(store_dir)
    ids = sorted({r.image_id for records in splits.values() for r in records})
    rng = np.random.default_rng(0)
    for shard, start in enumerate(range(0, len(ids), 1024)):
        chunk = ids[start : start + 1024]
        rows = rng.normal(size=(len(chunk), 2048)).astype(np.float32)
        path = os.path.join(store_dir, f"shard_{shard:05d}.npz")
        feature_store._write_shard(path, chunk, rows, [])
    metadata = {
        **backbone.encoder_settings(config.encoder, config.seed),
        "feature_shape": [2048],
        "shard_size": 1024,
        "versions": feature_store._library_versions(),
        "num_images": len(ids),
        "skipped": [],
        "complete": True,
    }
    feature_store._write_json(os.path.join(store_dir, feature_store.METADATA_FILE), metadata)
    return store_dir


def overrides(config: ml_collections.ConfigDict) -> list[str]:
    """`--config.a.b=value` flags that turn configs/flickr8k.py into `config`."""
    from configs import flickr8k

    base = traverse_util.flatten_dict(flickr8k.get_config().to_dict(), sep=".")
    wanted = traverse_util.flatten_dict(config.to_dict(), sep=".")
    return [f"--config.{k}={v}" for k, v in sorted(wanted.items()) if base.get(k) != v]


def main_rates(config, workdir: str, steps_per_epoch: int) -> list[float]:
    """Trains main.py with `config`; -> its logged window rates after the first epoch."""
    command = [
        sys.executable, "main.py", "--config=configs/flickr8k.py", f"--workdir={workdir}",
        *overrides(config),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"main.py failed:\n{result.stderr[-4000:]}")
    log_every = config.train.log_every
    return [
        float(rate)
        for step, rate in WINDOW.findall(result.stderr)
        if int(step) - log_every >= steps_per_epoch  # Windows wholly after the first epoch.
    ]


def main(argv):
    del argv
    tokenized, source = benchmark.flickr8k_captions(FLAGS.captions)
    if FLAGS.num_captions:
        tokenized = tokenized[: FLAGS.num_captions]
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "flickr8k")
        write_layout(root, tokenized, FLAGS.eval_images)
        vocab, _ = benchmark.caption_records(tokenized)
        dim = benchmark.SEED_MODEL["embed_dim"]
        glove = bt.write_glove(os.path.join(tmp, f"glove.6B.{dim}d.txt"), vocab.words, dim)
        config = benchmark.merge_row_config(
            glove, FLAGS.dtype, FLAGS.batch_size, FLAGS.num_buckets, FLAGS.log_every
        )
        config.model.train_embeddings = FLAGS.train_embeddings
        config.data.dir = root
        config.data.cache_dir = os.path.join(tmp, "cache")
        config.data.feature_residency = "device"
        config.encoder.weights = "none"  # No backbone runs: the store is finished.
        config.train.num_epochs = FLAGS.epochs
        config.eval.meteor = False
        config.eval.extra_splits = ""
        write_store(config)
        figures, _, _ = benchmark.benchmark_training(
            tokenized, tmp, seconds=FLAGS.train_seconds, train_embeddings=FLAGS.train_embeddings
        )
        rates = main_rates(config, os.path.join(tmp, "run"), figures["steps_per_epoch"])
    bench_rates = figures["train_window_rates"]
    main_mean = float(np.mean(rates)) if rates else float("nan")
    bench_mean = float(np.mean(bench_rates))
    print(
        json.dumps(
            {
                "captions": source,
                "num_captions": len(tokenized),
                "benchmark_train_targets_per_s": figures["train_targets_per_s"],
                "benchmark_window_mean": round(bench_mean, 1),
                "main_window_mean": round(main_mean, 1),
                "main_windows": len(rates),
                "benchmark_windows": len(bench_rates),
                "benchmark_over_main": round(bench_mean / main_mean, 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    app.run(main)
