"""The benchmark's training rows, timed on the path `main.py` trains on.

Each row builds a `PreparedData` over generated captions and features (in memory, or a store on
disk), the phase with `training.train.make_phase` (standardisation on the device, one compiled
step per bucket, the mesh) and runs it with `training.loop.train_steps`, the epoch loop of every
run: statistics read back one step late, a clu writer logging each `train.log_every` window. A
row's `train_targets_per_s` is the sum of the timed windows' target words over the sum of their
seconds: the figures a user's log prints, pooled.

Also here: XLA's FLOP count of the compiled steps, a counter of XLA compilations, the matmul peak
in a given dtype, and page-cache eviction and residency of files (the disk rows).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers

from captioning import parallel
from captioning.data import text
from captioning.data.datasets.base import ImageRecord
from captioning.data.prepare import FeatureStats, PreparedData
from captioning.training import loop, train

# The events that make an executable: an XLA compilation, or a read of one from the persistent
# compilation cache (the tests count with `count_compiles` too).
EXECUTABLE_EVENTS = (
    "/jax/core/compile/backend_compile_duration",
    "/jax/compilation_cache/cache_retrieval_time_sec",
)
STATS_ROWS = 2048  # Rows the feature statistics are computed on (a disk store may exceed RAM).


@contextlib.contextmanager
def count_compiles() -> Iterator[list[str]]:
    """Counts executables made inside the block (jit cache misses): yields a list that fills."""
    events: list[str] = []

    def listener(name, *_, **__):
        if name in EXECUTABLE_EVENTS:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def matmul_peak_gflops(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` [size, size] x [size, size] matmul rate with inputs in `dtype` and a
    float32 result, the product the decoders run (`models.layers.matmul`), on the default device,
    GFLOP/s. (A bfloat16 result takes another, slower path on CPUs.)"""
    a = jnp.ones((size, size), dtype)
    product = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    product(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def compiled_flops(compiled) -> float:
    """XLA's FLOP count of a compiled executable (`cost_analysis()`: a dict, or in some JAX
    versions a list of one dict per computation). XLA counts a while loop's body once, not once
    per iteration: a `lax.scan` over T words counts one word (`compiled_dot_flops` does not)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, dict):
        analysis = [analysis]
    return float(sum(a.get("flops", 0.0) for a in analysis))


_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \((.*)\) -> .*\{$")
_VALUE = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (?:\w+\[([\d,]*)\])?")
_PARAM = re.compile(r"([\w.\-]+): \w+\[([\d,]*)\]")
_CALLEE = re.compile(r"(?:calls|body|to_apply)=%([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def compiled_dot_flops(compiled) -> float:
    """The matrix products' FLOPs (2 per multiply-add) of a compiled executable, read from its
    optimised HLO, each while loop's body counted `known_trip_count` times: what XLA computes,
    every scanned word included."""
    shapes: dict[str, dict[str, list[int]]] = {}
    dots: dict[str, float] = {}
    calls: dict[str, list[tuple[str, int]]] = {}
    entry, name = None, None
    for line in compiled.as_text().splitlines():
        header = _COMPUTATION.match(line)
        if header:
            name = header.group(1)
            entry = name if line.startswith("ENTRY") else entry
            shapes[name] = {p: _dims(d) for p, d in _PARAM.findall(header.group(2))}
            dots[name], calls[name] = 0.0, []
            continue
        value = _VALUE.match(line)
        if name is None or value is None:
            continue
        shapes[name][value.group(1)] = _dims(value.group(2) or "")  # Tuples: [].
        trips = _TRIPS.search(line)
        for callee in _CALLEE.findall(line):
            calls[name].append((callee, int(trips.group(1)) if trips and " while(" in line else 1))
        if " dot(" in line:
            lhs = re.search(r" dot\([^%]*%([\w.\-]+)", line).group(1)
            contracting = _dims(re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1))
            k = math.prod(shapes[name][lhs][d] for d in contracting)
            dots[name] += 2.0 * math.prod(_dims(value.group(2))) * k

    def total(computation: str) -> float:
        return dots[computation] + sum(n * total(c) for c, n in calls[computation] if c in dots)

    return total(entry)


def xla_mflop_per_target(
    phase: train.CrossEntropyPhase, count: Callable = compiled_dot_flops
) -> tuple[float, float]:
    """The FLOPs of one epoch's steps (`count` of every bucket's compiled step x its batches)
    per target word trained -> (MFLOP per real target, MFLOP per position computed, padding
    included)."""
    batches = phase.train_batches
    lengths = np.asarray(batches.lengths)
    bucket_of = np.searchsorted(lengths, batches.data.lengths)
    flops = positions = 0.0
    for b, length in enumerate(lengths):
        steps = math.ceil(np.sum(bucket_of == b) / batches.batch_size)
        flops += steps * count(phase.compiled_train[int(length)])
        positions += steps * batches.batch_size * int(length)
    targets = float(np.sum(batches.data.lengths))
    return flops / targets / 1e6, flops / positions / 1e6


def write_glove(path: str, words, dim: int, seed: int = 0) -> str:
    """A GloVe-format text file of random vectors for `words` (stands in for glove.6B)."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for word in words:
            f.write(word + " " + " ".join(f"{v:.4f}" for v in rng.normal(0, 0.4, dim)) + "\n")
    return path


def records_for(tokenized: list[list[str]], num_images: int, split: str) -> list[ImageRecord]:
    """Caption k goes to image k % num_images; at least one caption per image (cycled)."""
    count = max(len(tokenized), num_images)
    captions: list[list[str]] = [[] for _ in range(num_images)]
    for k in range(count):
        captions[k % num_images].append(" ".join(tokenized[k % len(tokenized)]))
    return [ImageRecord(f"img{i}", "", tuple(c), split) for i, c in enumerate(captions)]


def prepared_data(
    tokenized, features, residency: str = "device", *, images: int | None = None, vocab=None
) -> PreparedData:
    """`PreparedData` as `prepare_data` gives it, over generated rows: `images` images (default:
    5 captions each, as Flickr8k) share `tokenized`; `features` [N, ...] is an array or a
    `MappedFeatures` (disk); the first 8 images are also the validation split."""
    images = images or len(tokenized) // 5
    records = records_for(tokenized, images, "train")
    image_row = {r.image_id: i for i, r in enumerate(records)}
    if vocab is None:
        vocab = text.Vocabulary.build(tokenized, 10)  # The Keras notebook's min count.
    rows = np.arange(min(images, STATS_ROWS))
    stats = FeatureStats.compute(features, rows)
    val = [ImageRecord(r.image_id, "", r.captions, "val") for r in records[:8]]
    splits = {"train": records, "val": val}
    return PreparedData(splits, vocab, features, stats, image_row, {}, residency)


def config_for(model: dict, train_fields: dict, **train_overrides) -> ml_collections.ConfigDict:
    """configs/flickr8k.py with the model's and optimizer's fields replaced."""
    from configs import flickr8k

    config = flickr8k.get_config()
    config.model.update(model)
    config.train.update({**train_fields, **train_overrides})
    return config


def timed_row(
    config: ml_collections.ConfigDict,
    data: PreparedData,
    seconds: float,
    *,
    warmup_steps: int | None = None,
    on_timing: Callable[[], None] | None = None,
    logdir: str | None = None,
) -> tuple[dict, train.CrossEntropyPhase, dict]:
    """Builds the run's phase over `data` and trains it as a run does (`loop.train_steps`, a clu
    writer logging each window) for `warmup_steps` (default: one epoch; rounded up to a
    window), then times whole windows until `seconds` have passed. `on_timing` runs when the
    timing starts (e.g. evicting a store from the page cache).

    -> (figures, phase, the trained {graphdef, params}). Figures: train_targets_per_s (the
    timed windows' targets / their seconds), train_wall_targets_per_s (the same over the wall
    time, the writes between windows included), train_window_rates (each timed window's logged
    rate), train_steps_timed, train_loss_last, first_step_compile_s (the phase: model, and every
    bucket's train and eval step compiled), recompiles_after_warmup (executables made while
    timed: jit cache misses on the users' path), xla_mflop_per_target and its per-position twin.
    """
    start = time.perf_counter()
    phase, graphdef, state = train.make_phase(config, data)
    compile_s = time.perf_counter() - start
    log_every = config.train.log_every
    warmup = phase.steps_per_epoch if warmup_steps is None else warmup_steps
    warmup = -(-max(warmup, 1) // log_every) * log_every
    params, opt_state = phase.place(state["params"]), phase.place(state["opt_state"])
    timed = {"targets": 0.0, "seconds": 0.0, "rates": [], "start": None}
    with contextlib.ExitStack() as stack:
        tmp = logdir or stack.enter_context(tempfile.TemporaryDirectory())
        writer = metric_writers.create_default_writer(tmp, asynchronous=False)
        log_window = loop.window_writer(phase, writer)
        events = stack.enter_context(count_compiles())
        compiles_before = [0]

        def on_window(step: int, window, window_seconds: float) -> bool:
            log_window(step, window, window_seconds)
            if timed["start"] is not None:
                timed["targets"] += window.targets
                timed["seconds"] += window_seconds
                timed["rates"].append(round(window.targets / window_seconds, 1))
                return time.perf_counter() - timed["start"] >= seconds
            if step >= warmup:
                if on_timing is not None:
                    on_timing()
                compiles_before[0] = len(events)
                timed["start"] = time.perf_counter()
            return False

        step, epoch = 0, 0
        while True:
            params, opt_state, step, stats = loop.train_steps(
                phase, params, opt_state, epoch, step, log_every, on_window
            )
            epoch += 1
            if timed["start"] is not None and time.perf_counter() - timed["start"] >= seconds:
                break
        jax.block_until_ready(params)
        wall = time.perf_counter() - timed["start"]
        recompiles = len(events) - compiles_before[0]
        writer.close()
    per_target, per_position = xla_mflop_per_target(phase)
    figures = {
        "train_targets_per_s": round(timed["targets"] / max(timed["seconds"], 1e-9), 1),
        "train_wall_targets_per_s": round(timed["targets"] / wall, 1),
        "train_window_rates": timed["rates"],
        "train_steps_timed": len(timed["rates"]) * log_every,
        "train_loss_last": round(stats.loss_sum / max(stats.count, 1.0), 3),
        "first_step_compile_s": round(compile_s, 2),
        "recompiles_after_warmup": recompiles,
        "xla_mflop_per_target": round(per_target, 3),
        "xla_mflop_per_position": round(per_position, 3),
    }
    return figures, phase, {"graphdef": graphdef, "params": parallel.local(params)}


# --------------------------------------------------------------------------------------------
# The page cache (disk rows)
# --------------------------------------------------------------------------------------------


def evict(paths) -> None:
    """Writes `paths` to disk and drops their pages from the page cache, so the next reads go to
    the disk (`POSIX_FADV_DONTNEED` drops clean pages only, hence the fsync, and no page a
    process maps: `MappedFeatures` reads rows with `pread`, mapping none)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_share(paths) -> float:
    """The share of the files' pages in the page cache (mincore(2) over a mapping of each)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = os.sysconf("SC_PAGE_SIZE")
    cached = total = 0
    for path in paths:
        size = os.path.getsize(path)
        if not size:
            continue
        pages = -(-size // page)
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
            try:
                vector = ctypes.create_string_buffer(pages)
                if libc.mincore(addr, size, vector) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
                cached += sum(b & 1 for b in vector.raw)
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        total += pages
    return cached / max(total, 1)


def reset_peak_rss() -> bool:
    """Restarts the kernel's count of this process's peak RSS (VmHWM); False where not Linux."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            return f.write("5") > 0
    except OSError:
        return False


def peak_rss_since_reset_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1e6
