"""Keras CNN backbones: image files -> features, with the same pixels every time.

The decoders never see pixels: every image goes once through a frozen `keras.applications`
backbone (InceptionV3, ResNet50 or VGG16 without its classifier), and
`captioning.data.feature_store` keeps the output on disk.

* `build_backbone` builds the model and says which `preprocess_input` and input size go with it.
  `config.encoder.weights` is 'none' (random init, seeded), 'imagenet' (only from the local Keras
  cache: this code never downloads) or a path to a weights file.
* `encoder_settings` are the settings that decide the features (and name a feature store).
* `get_runner` compiles (and caches) the backbone for one batch shape; `iter_features` runs it over
  image files; `encode_images` returns the features of new image files (caption mode, the demo).

Pixels: decoded as RGB (JPEG, PNG, GIF, BMP), resized to a square `image_size` with bilinear
antialiased resizing (the aspect ratio is not kept, as in Keras' `load_img(target_size=...)`), then
the backbone's own `preprocess_input`. Decoding and resizing run in parallel in `tf.data`, between
model calls rather than beside them: the backbone runs on the same CPU cores, and background
decoding stalls its multi-threaded ops. The model runs as one `tf.function` with a fixed batch
shape, data parallel over the local devices TensorFlow sees (`backbone_devices`): each device
runs the same frozen model on its slice of the batch. main.py lets TensorFlow see the GPUs in
`--mode=export_features` only; otherwise they stay JAX's and the backbone runs on the CPU.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import logging

if TYPE_CHECKING:
    import keras

POOLINGS = ("avg", "avgmax", "none")
DTYPES = ("float32", "float16")
_KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


class WeightsNotFoundError(FileNotFoundError):
    """The weights named by `config.encoder.weights` are not on this machine."""


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one `keras.applications` backbone and where its ImageNet weights live."""

    constructor: str  # Attribute of keras.applications, e.g. 'InceptionV3'.
    module: str  # Submodule holding its preprocess_input, e.g. 'inception_v3'.
    default_size: int  # Input side the ImageNet weights were trained at.
    min_size: int  # Smallest input side the architecture accepts.
    weights_file: str  # Keras cache file name of the ImageNet weights without the top.
    weights_url: str  # Where Keras downloads that file from.


BACKBONES: dict[str, BackboneSpec] = {
    "inception_v3": BackboneSpec(
        constructor="InceptionV3",
        module="inception_v3",
        default_size=299,
        min_size=75,
        weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        weights_url=_KERAS_WEIGHTS_URL
        + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    "resnet50": BackboneSpec(
        constructor="ResNet50",
        module="resnet50",
        default_size=224,
        min_size=32,
        weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        weights_url=_KERAS_WEIGHTS_URL
        + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    "vgg16": BackboneSpec(
        constructor="VGG16",
        module="vgg16",
        default_size=224,
        min_size=32,
        weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        weights_url=_KERAS_WEIGHTS_URL + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
}


# ---------------------------------------------------------------------------------------------
# Encoder settings and weights
# ---------------------------------------------------------------------------------------------


def backbone_spec(encoder_config) -> BackboneSpec:
    name = encoder_config.backbone
    if name not in BACKBONES:
        raise ValueError(
            f"config.encoder.backbone={name!r} is not supported; use one of {sorted(BACKBONES)}."
        )
    return BACKBONES[name]


def _image_size(encoder_config) -> int:
    """The backbone input side: `encoder.image_size`, or the backbone default when 0/None."""
    spec = backbone_spec(encoder_config)
    size = int(encoder_config.image_size or spec.default_size)
    if size < spec.min_size:
        raise ValueError(
            f"config.encoder.image_size={size} is too small for {encoder_config.backbone}; "
            f"use at least {spec.min_size} (the default is {spec.default_size})."
        )
    return size


def _weights_kind(encoder_config) -> str:
    """'none', 'imagenet' or 'file'."""
    weights = str(encoder_config.weights)
    if weights.lower() in ("none", ""):
        return "none"
    return "imagenet" if weights == "imagenet" else "file"


def _resolve_seed(encoder_config, seed: int | None) -> int | None:
    """The init seed; only random ('none') weights depend on it, so it is None otherwise."""
    if _weights_kind(encoder_config) != "none":
        return None
    return int(seed or 0)


def keras_weights_dirs() -> list[str]:
    """Folders where Keras' `get_file(..., cache_subdir='models')` keeps downloaded weights.

    `$KERAS_HOME/models` (default `~/.keras/models`); Keras falls back to `/tmp/.keras/models`
    when that home folder is missing or read-only, so that one is searched too. Read at call
    time (Keras reads KERAS_HOME once, at import).
    """
    home = os.environ.get("KERAS_HOME")
    if home is None:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    home = os.path.expanduser(home)
    dirs = [os.path.join(home, "models")]
    if not os.access(home, os.W_OK):
        dirs.append(os.path.join("/tmp", ".keras", "models"))
    return list(dict.fromkeys(dirs))


def resolve_weights(encoder_config) -> str | None:
    """The weights file to load (None = random init); raises `WeightsNotFoundError` if absent.

    Never downloads: on an offline machine Keras' download would hang or fail late.
    """
    kind = _weights_kind(encoder_config)
    if kind == "none":
        return None
    spec = backbone_spec(encoder_config)
    if kind == "imagenet":
        dirs = keras_weights_dirs()
        for folder in dirs:
            path = os.path.join(folder, spec.weights_file)
            if os.path.isfile(path):
                return path
        expected = os.path.join(dirs[0], spec.weights_file)
        also = f" (nor in {dirs[1]}, Keras' fallback)" if len(dirs) > 1 else ""
        raise WeightsNotFoundError(
            f"config.encoder.weights='imagenet' needs the ImageNet weights of "
            f"{encoder_config.backbone} without its top, but {expected} does not exist{also}, "
            f"and this code never downloads. On a connected machine download {spec.weights_url} "
            f"and copy it to {expected} (the folder is $KERAS_HOME/models, default "
            f"~/.keras/models); or set config.encoder.weights to the path of a local .h5/.keras "
            f"weights file; or set config.encoder.weights='none' for random weights."
        )
    path = os.path.abspath(os.path.expanduser(str(encoder_config.weights)))
    if not os.path.isfile(path):
        raise WeightsNotFoundError(
            f"config.encoder.weights={encoder_config.weights!r}: no such file {path}. Point "
            f"config.encoder.weights at a .h5/.keras/.weights.h5 file of {encoder_config.backbone} "
            f"without its top, or use 'imagenet' (Keras cache) or 'none' (random weights)."
        )
    return path


def encoder_settings(encoder_config, seed: int | None = None) -> dict[str, Any]:
    """The settings that name a feature store and must match to reuse it."""
    pooling = str(encoder_config.pooling)
    if pooling not in POOLINGS:
        raise ValueError(f"config.encoder.pooling={pooling!r}: use one of {POOLINGS}.")
    dtype = str(encoder_config.dtype)
    if dtype not in DTYPES:
        raise ValueError(f"config.encoder.dtype={dtype!r}: use one of {DTYPES}.")
    kind = _weights_kind(encoder_config)
    weights = os.path.basename(str(encoder_config.weights)) if kind == "file" else kind
    return {
        "backbone": encoder_config.backbone,
        "weights": weights,
        "image_size": _image_size(encoder_config),
        "pooling": pooling,
        "dtype": dtype,
        "seed": _resolve_seed(encoder_config, seed),
        "layer": str(encoder_config.layer or ""),
        # The grid resizes spatial maps only; pooled stores ignore it (and share one store).
        "grid": int(encoder_config.grid or 0) if pooling == "none" else 0,
    }


def _feature_head(model, settings: dict[str, Any], encoder_config):
    """Cuts the backbone at `encoder.layer` (if set) and pools: avg -> [C], avgmax -> [2C]
    (mean and max over locations concatenated), none -> [H, W, C].

    With pooling 'none' and `encoder.grid` > 0 the map is area-resized to grid x grid, which
    keeps attention affordable for backbones with fine maps.
    """
    import keras

    output = model.output
    if settings["layer"]:
        try:
            output = model.get_layer(settings["layer"]).output
        except ValueError as e:
            raise ValueError(
                f"config.encoder.layer={settings['layer']!r} is not a layer of "
                f"{encoder_config.backbone}; use '' for the last layer or a name from "
                f"keras.applications.{model.name}.summary() (e.g. 'mixed5', 'conv3_block4_out')."
            ) from e
    if settings["pooling"] == "avg":
        output = keras.layers.GlobalAveragePooling2D()(output)
    elif settings["pooling"] == "avgmax":  # [2C]: mean says how much, max says whether.
        output = keras.layers.Concatenate()(
            [
                keras.layers.GlobalAveragePooling2D()(output),
                keras.layers.GlobalMaxPooling2D()(output),
            ]
        )
    elif settings["grid"]:
        grid = settings["grid"]
        output = keras.layers.Resizing(grid, grid, interpolation="area")(output)
    return keras.Model(model.input, output, name=f"{model.name}_features")


def build_backbone(
    encoder_config, *, seed: int | None = None
) -> tuple[keras.Model, Callable[[Any], Any], int]:
    """Builds the frozen backbone of `encoder_config`.

    Returns:
      model: [batch, size, size, 3] float preprocessed pixels -> [batch, D] (pooling 'avg') or
        [batch, H, W, C] (pooling 'none').
      preprocess: the backbone's `preprocess_input`: [..., 3] RGB floats in 0..255 -> model input.
      image_size: the input side `size`.

    Random weights ('none') are seeded with `keras.utils.set_random_seed(seed)` (which also seeds
    Python, NumPy and TF globally), so the same seed gives the same features in every process.
    """
    import keras

    spec = backbone_spec(encoder_config)
    size = _image_size(encoder_config)
    settings = encoder_settings(encoder_config, seed)
    weights_path = resolve_weights(encoder_config)
    if weights_path is None:
        keras.utils.set_random_seed(settings["seed"])
    constructor = getattr(keras.applications, spec.constructor)
    # Built without weights and loaded below, so Keras never reaches its download code.
    model = constructor(include_top=False, weights=None, input_shape=(size, size, 3))
    model.trainable = False
    if weights_path is not None:
        try:
            model.load_weights(weights_path)
        except Exception as e:  # Keras raises many types (ValueError, OSError, KeyError...).
            raise ValueError(
                f"Cannot load weights file {weights_path} into {encoder_config.backbone} "
                f"(include_top=False): {e}. Set config.encoder.weights to a weights file of this "
                f"backbone without its top (e.g. Keras' {spec.weights_file})."
            ) from e
    model = _feature_head(model, settings, encoder_config)
    preprocess = getattr(keras.applications, spec.module).preprocess_input
    return model, preprocess, size


# ---------------------------------------------------------------------------------------------
# The compiled model call, cached per process
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
    """A backbone compiled for one batch shape: [batch, size, size, 3] pixels -> features."""

    image_size: int
    batch_size: int
    dtype: str
    feature_shape: tuple[int, ...]
    fn: Callable[[Any], np.ndarray]
    devices: tuple[str, ...] = ()  # The TF devices each batch is split over.

    def __call__(self, images) -> np.ndarray:
        """images: [batch_size, size, size, 3] float32 RGB in 0..255 -> [batch_size, *shape]."""
        return self.fn(images)


_RUNNERS: collections.OrderedDict[tuple, Runner] = collections.OrderedDict()
_MAX_RUNNERS = 2  # A training run uses one backbone; two allow export + caption side by side.


def clear_backbone_cache() -> None:
    """Forgets the cached compiled backbones (the next call rebuilds and re-seeds)."""
    _RUNNERS.clear()


def _weights_key(encoder_config) -> tuple:
    path = resolve_weights(encoder_config)
    if path is None:
        return ("none",)
    stat = os.stat(path)  # A replaced file must not reuse the old model.
    return (path, stat.st_mtime_ns, stat.st_size)


def get_runner(encoder_config, batch_size: int, seed: int | None) -> Runner:
    """Builds (or reuses) the backbone and its compiled call for a fixed batch size.

    Cached because building and tracing InceptionV3 takes seconds, and captioning new images
    calls this again and again with the same encoder.
    """
    settings = encoder_settings(encoder_config, seed)
    key = (tuple(settings.items()), _weights_key(encoder_config), int(batch_size))
    if key in _RUNNERS:
        _RUNNERS.move_to_end(key)
        return _RUNNERS[key]
    model, preprocess, size = build_backbone(encoder_config, seed=seed)
    devices = backbone_devices()
    fn = _compile(model, preprocess, size, int(batch_size), settings["dtype"], devices)
    if len(devices) > 1:
        logging.info("Backbone data parallel over %d devices: %s.", len(devices), devices)
    runner = Runner(
        size, int(batch_size), settings["dtype"], model.output_shape[1:], fn, tuple(devices)
    )
    _RUNNERS[key] = runner
    while len(_RUNNERS) > _MAX_RUNNERS:
        _RUNNERS.popitem(last=False)
    return runner


def backbone_devices() -> list[str]:
    """The TensorFlow devices a batch is split over: every GPU TensorFlow sees, else its CPUs
    (one, unless the CPU was split into logical devices)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return []
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def shard_sizes(batch_size: int, num_devices: int) -> list[int]:
    """Rows of a batch per device, as even as possible, no empty shard: (10, 4) -> [3, 3, 2, 2]."""
    num_shards = max(1, min(batch_size, num_devices))
    base, extra = divmod(batch_size, num_shards)
    return [base + (i < extra) for i in range(num_shards)]


def _compile(
    model, preprocess, size: int, batch_size: int, dtype: str, devices: Sequence[str] = ()
) -> Callable:
    """preprocess + model + cast as one call with a fixed input shape (no retracing), the batch
    split over `devices` (data parallel: each runs the whole model on its rows)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec([batch_size, size, size, 3], tf.float32)
        sizes = shard_sizes(batch_size, len(devices))

        def features(images):
            return tf.cast(model(preprocess(images), training=False), dtype)

        @tf.function(input_signature=[spec])
        def predict(images):
            if len(sizes) == 1:
                return features(images)
            parts = []
            for device, rows in zip(devices, tf.split(images, sizes), strict=False):
                with tf.device(device):  # Ops placed apart run concurrently in the graph.
                    parts.append(features(rows))
            return tf.concat(parts, axis=0)

        # Trace now, and run once: TF optimises a graph on its first run (seconds for
        # InceptionV3), a one-off cost like XLA compilation that should not stall the first batch
        # of an export or count against its throughput.
        predict(tf.zeros(spec.shape, spec.dtype))

        def run(images):
            return predict(images).numpy()

        run.graph = predict.get_concrete_function().graph  # Where each op runs (tests).
        return run

    # Other Keras backends (jax, torch): Keras compiles predict_on_batch itself.
    def predict_other(images):
        x = preprocess(np.array(images, dtype=np.float32))
        return np.asarray(model.predict_on_batch(x)).astype(dtype)

    return predict_other


# ---------------------------------------------------------------------------------------------
# Decoding pipeline shared by export and encode_images
# ---------------------------------------------------------------------------------------------


def _load_image(path, size: int):
    """path: scalar string tensor -> [size, size, 3] float32 RGB in 0..255."""
    import tensorflow as tf

    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    # Antialiased resizing costs more than decoding; images already at size skip it.
    return tf.cond(
        tf.logical_and(tf.equal(height, size), tf.equal(width, size)),
        lambda: tf.cast(image, tf.float32),
        lambda: tf.image.resize(image, [size, size], method="bilinear", antialias=True),
    )


def _failure_reason(path: str, size: int) -> str:
    """Why `path` could not be read: re-decodes it eagerly to get TF's own message."""
    import tensorflow as tf

    if not os.path.isfile(path):
        return "file not found"
    try:
        _load_image(tf.constant(path), size)
    except (tf.errors.OpError, ValueError) as e:
        message = getattr(e, "message", str(e))
        # Drop TF's '{{function_node ...}}' prefix and op suffix: keep the human part.
        message = re.sub(r"\{\{[^}]*\}\}\s*", "", message).split(" [Op:")[0]
        return message.strip().splitlines()[0] if message.strip() else type(e).__name__
    return "could not be decoded (reading it again worked: check the storage)"


def _image_dataset(paths: Sequence[str], size: int, batch_size: int):
    """tf.data of (positions [b] int64, images [batch_size, size, size, 3] float32).

    Unreadable files are dropped (`ignore_errors`) rather than failing the whole pipeline; the
    caller finds them as gaps in `positions` and names them. The last batch is zero-padded to
    `batch_size` (b <= batch_size real rows) so the compiled model never retraces.
    """
    import tensorflow as tf

    positions = tf.range(len(paths), dtype=tf.int64)
    ds = tf.data.Dataset.from_tensor_slices((positions, tf.constant(list(paths), tf.string)))
    ds = ds.map(
        lambda i, p: (i, _load_image(p, size)),
        num_parallel_calls=os.cpu_count() or 1,
        deterministic=True,  # Keeps order, so gaps in positions are exactly the failures.
    )
    ds = ds.ignore_errors()

    def pad(i, images):
        missing = batch_size - tf.shape(images)[0]
        return i, tf.pad(images, [[0, missing], [0, 0], [0, 0], [0, 0]])

    # No prefetch: the next batch is decoded when asked for, on all cores, instead of competing
    # with the backbone for them (see the module docstring). No autotuning either: its thread
    # can hold up the end of the iteration (as in input_pipeline.fixed_options).
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.batch(batch_size).map(pad).with_options(options)


def iter_features(
    paths: Sequence[str], runner: Runner
) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]], int]]:
    """Runs the backbone over `paths` in order.

    Yields (positions [b] int, features [b, *shape], failures [(position, reason)], done) where
    every position < done has been either yielded or reported as a failure.
    """
    if not paths:
        return
    expected = 0
    for positions_t, images in _image_dataset(paths, runner.image_size, runner.batch_size):
        positions = positions_t.numpy()
        features = runner(images)[: len(positions)]
        gaps = np.setdiff1d(np.arange(expected, positions[-1] + 1), positions)
        failures = [(int(p), _failure_reason(paths[p], runner.image_size)) for p in gaps]
        expected = int(positions[-1]) + 1
        yield positions, features, failures, expected
    failures = [
        (p, _failure_reason(paths[p], runner.image_size)) for p in range(expected, len(paths))
    ]
    if failures:
        yield (
            np.zeros([0], np.int64),
            np.zeros((0, *runner.feature_shape), runner.dtype),
            failures,
            len(paths),
        )


def encode_images(
    paths: Sequence[str], encoder_config, *, batch_size: int, seed: int | None = None
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Features of new image files, with the same decoding and model as `export_features`.

    With random weights pass the `seed` the store was exported with (default: encoder.seed or 0).

    Returns:
      features: [M, D] or [M, H, W, C] in `encoder.dtype`, one row per readable image.
      paths: the M readable paths, in input order.
      failures: (path, reason) for each missing or undecodable file.
    """
    runner = get_runner(encoder_config, batch_size, seed)
    chunks, ok, failed = [], [], []
    for positions, features, failures, _ in iter_features(list(paths), runner):
        chunks.append(features)
        ok.extend(paths[p] for p in positions)
        failed.extend((paths[p], reason) for p, reason in failures)
    empty = np.zeros((0, *runner.feature_shape), runner.dtype)
    return (np.concatenate(chunks) if chunks else empty), ok, failed


def backbone_throughput(encoder_config, images_uint8: np.ndarray, repeats: int = 3) -> float:
    """Images/s of the bare compiled backbone on in-memory pixels (the export's upper bound).

    images_uint8: [N, size, size, 3] uint8 RGB at the backbone input size. Runs in batches of
    `encoder.batch_size` (last one padded, as in export), fetching each output to host memory.
    """
    import tensorflow as tf

    runner = get_runner(encoder_config, encoder_config.batch_size, None)
    size, batch = runner.image_size, runner.batch_size
    if images_uint8.ndim != 4 or images_uint8.shape[1:] != (size, size, 3):
        raise ValueError(f"images_uint8 must be [N, {size}, {size}, 3], got {images_uint8.shape}.")
    n = len(images_uint8)
    padded = np.zeros([-(-n // batch) * batch, size, size, 3], np.float32)
    padded[:n] = images_uint8
    batches = [tf.constant(padded[i : i + batch]) for i in range(0, len(padded), batch)]
    start = time.perf_counter()
    for _ in range(repeats):
        for images in batches:
            runner(images)
    return n * repeats / (time.perf_counter() - start)
