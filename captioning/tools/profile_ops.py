"""Where the benchmark's time goes: `python -m captioning.tools.profile_ops` prints one JSON object.

A tool, like `captioning.tools.benchmark`, whose merge row it profiles at the same sizes: greedy
decoding (--decode_images, 32 words, `<end>` made impossible so every caption runs them all) and
training (--train_seconds after warm-up, through the run's loop). Each part runs under
`jax.profiler.trace`; the Perfetto trace's XLA ops (its innermost events) are summed in three
kinds:

  products   dots and the fusions the CPU backend runs them in (YNNPACK, oneDNN)
  movement   copies, transposes, gathers, slices, concatenations, updates, pads
  other      elementwise fusions, reductions, random bits, the optimizer's arithmetic

and the products' FLOPs (XLA's cost analysis for training, the decoder's hand count for decoding)
are divided by their time and by the float32 matmul peak measured before and after. What a goal
needs then reads off: e.g. greedy captions per second cannot pass peak / FLOPs per caption, and
falls short of it by the products' distance from the peak plus the time of the rest.
"""

from __future__ import annotations

from captioning import host

host.keep_freed_memory()  # Before any import starts threads (captioning/host.py).

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from captioning.decoding import decode
from captioning.tools import benchmark
from captioning.tools import benchmark_inference as bi
from captioning.tools import benchmark_training as bt

FLAGS = flags.FLAGS
# The benchmark's flags (same defaults): --decode_images, --train_seconds, --batch_size, and the
# merge row's --dtype, --num_buckets, --log_every (float32, 10, 10).

PRODUCT = re.compile(r"^(dot|ynn_fusion|onednn|__onednn|custom-call|convolution)")
MOVEMENT = re.compile(
    r"^(copy|transpose|gather|scatter|dynamic-slice|dynamic-update-slice|slice|concatenate|pad|"
    r"broadcast|reverse|bitcast)"
)
CONTAINERS = re.compile(r"^(while|call|conditional)(\.\d+)?$")
HLO_NAME = re.compile(r"^[a-z][a-z0-9_\-]*(\.\d+)*$")


def op_kind(name: str) -> str:
    """An XLA op's name (e.g. `ynn_fusion`, `copy.6`, `wrapped_tanh`) -> its kind."""
    if PRODUCT.match(name):
        return "products"
    if MOVEMENT.match(name):
        return "movement"
    return "other"


def op_seconds(trace_dir: str) -> dict[str, float]:
    """Seconds of each kind of XLA op in the Perfetto trace under `trace_dir`: innermost events
    with an HLO-like name (loops' and calls' events contain their bodies' and are skipped)."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path, "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and HLO_NAME.match(e.get("name", "")):
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    seconds = {"products": 0.0, "movement": 0.0, "other": 0.0}
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        for i, e in enumerate(thread):
            end = e["ts"] + e.get("dur", 0)
            inner = i + 1 < len(thread) and thread[i + 1]["ts"] < end
            if CONTAINERS.match(e["name"]) or inner:
                continue
            seconds[op_kind(e["name"])] += e.get("dur", 0) / 1e6
    return seconds


def traced(fn):
    """Runs fn() under the profiler -> (its result, {kind: seconds}, fn's wall seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            start = time.perf_counter()
            out = jax.block_until_ready(fn())
            wall = time.perf_counter() - start
        return out, op_seconds(tmp), wall


def greedy_mflop_per_caption(model_config, vocab_size: int, words: int) -> float:
    """The merge decoder's product MFLOP per greedy caption: per word the recurrence [H, 4H],
    the merge layer [H, H] and the output layer [H, V] (the words' input part is a gathered
    table, made once per call and left out), and the image embedding [2048, H] once."""
    h = model_config.hidden_size
    per_word = h * 4 * h + h * h + h * vocab_size
    return 2 * (words * per_word + 2048 * h) / 1e6


def summary(seconds: dict[str, float], wall: float, gflop: float, peak: float) -> dict:
    """Op seconds by kind, the products' rate, and the best rate the products allow."""
    total = sum(seconds.values())
    return {
        "wall_s": round(wall, 3),
        "ops_s": round(total, 3),
        **{f"{k}_share": round(v / total, 3) for k, v in seconds.items()},
        "products_gflops": round(gflop / max(seconds["products"], 1e-9), 1),
        "products_fraction_of_f32_peak": round(gflop / max(seconds["products"], 1e-9) / peak, 3),
        "products_at_peak_s": round(gflop / peak, 3),
    }


def profile_decoding(graphdef, params, model_config, vocab_size: int) -> dict:
    """Greedy decoding of the benchmark's row, traced on its second call."""
    images, words = FLAGS.decode_images, benchmark.MAX_CAPTION_LEN
    features = jnp.asarray(np.random.default_rng(1).normal(size=(images, 2048)), jnp.float32)
    fn = decode.decode_fn(graphdef, bi.decode_config("greedy", words))
    params, key = bi.without_end(params), jax.random.key(0)
    jax.block_until_ready(fn(params, features, key))
    before = bt.matmul_peak_gflops("float32")
    _, seconds, wall = traced(lambda: fn(params, features, key))
    peak = (before + bt.matmul_peak_gflops("float32")) / 2
    gflop = images * greedy_mflop_per_caption(model_config, vocab_size, words) / 1e3
    return {
        "greedy_captions_per_s": round(images / wall, 1),
        "greedy_ceiling_captions_per_s": round(peak * images / gflop, 1),
        "matmul_peak_gflops_float32": round(peak, 1),
        **{f"greedy_{k}": v for k, v in summary(seconds, wall, gflop, peak).items()},
    }


def profile_training(tokenized, tmp: str) -> tuple[dict, dict, object]:
    """The benchmark's merge row (`benchmark.benchmark_training`), its timed windows traced."""
    trace_dir = os.path.join(tmp, "trace")
    before = bt.matmul_peak_gflops("float32")
    start = {}

    def on_timing():
        start["t"] = time.perf_counter()
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)

    figures, state, vocab = benchmark.benchmark_training(
        tokenized, tmp, seconds=FLAGS.train_seconds, on_timing=on_timing
    )
    wall = time.perf_counter() - start["t"]
    jax.profiler.stop_trace()
    peak = (before + bt.matmul_peak_gflops("float32")) / 2
    seconds = op_seconds(trace_dir)
    targets = figures["train_targets_per_s"] * sum(seconds.values())
    gflop = targets * figures["xla_mflop_per_target"] / 1e3
    result = {
        "train_targets_per_s": figures["train_targets_per_s"],
        "train_xla_mflop_per_target": figures["xla_mflop_per_target"],
        "train_ceiling_targets_per_s": round(peak * 1e3 / figures["xla_mflop_per_target"], 1),
        "matmul_peak_gflops_float32": round(peak, 1),
        **{f"train_{k}": v for k, v in summary(seconds, wall, gflop, peak).items()},
    }
    return result, state, vocab


def main(argv):
    del argv
    tokenized, _ = benchmark.flickr8k_captions("")
    results = {"device": str(jax.devices()[0])}
    with tempfile.TemporaryDirectory() as tmp:
        results["training"], state, vocab = profile_training(tokenized, tmp)
    model_config = benchmark.seed_config("float32").model
    results["decoding"] = profile_decoding(
        state["graphdef"], state["params"], model_config, len(vocab)
    )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    app.run(main)
