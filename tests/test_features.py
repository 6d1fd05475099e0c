"""captioning.data.backbone and captioning.data.feature_store: backbones, weights lookup, store
export, load.

Everything runs a random-weight InceptionV3 at 75 px (its smallest input) on a few Pillow-drawn
images; the compiled backbone is cached per process, so most tests reuse one build.
"""

import os

import h5py
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from captioning.data import backbone, feature_store
from captioning.data.datasets.base import DataError, ImageRecord
from configs import scenes

SHARD = 4  # Images per shard: the 7 test images make two shards.


def encoder_config(**overrides) -> ml_collections.ConfigDict:
    """The base config's encoder section as a random InceptionV3 at 75 px, pooled."""
    config = scenes.get_config().encoder
    config.update(
        backbone="inception_v3",
        layer="",
        weights="none",
        image_size=75,
        pooling="avg",
        grid=0,
        batch_size=4,
        dtype="float32",
    )
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """7 small images: JPEG and PNG, RGB, grayscale, RGBA, one already at 75x75."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (32, 48), (75, 75), (20, 20), (60, 44), (36, 36), (50, 28)]
    for i, (w, h) in enumerate(sizes):
        pixels = np.zeros([h, w, 3], np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        pixels[h // 4 : h // 2, w // 3 : w // 2] = rng.integers(0, 256, 3)  # A coloured box.
        image = Image.fromarray(pixels)
        if i == 3:
            image = image.convert("L")
        if i == 5:
            image = image.convert("RGBA")
        image.save(folder / (f"img{i}.jpg" if i % 2 == 0 else f"img{i}.png"))
    return folder


@pytest.fixture(scope="module")
def records(image_dir):
    names = sorted(os.listdir(image_dir))
    # img0 is listed twice (two splits): it must be exported once.
    recs = [ImageRecord(n, str(image_dir / n), ("a caption",), "train") for n in names]
    return recs + [ImageRecord(names[0], str(image_dir / names[0]), ("another",), "val")]


@pytest.fixture(scope="module")
def reference_store(records, tmp_path_factory):
    """An uninterrupted export with the default test encoder."""
    store_dir = str(tmp_path_factory.mktemp("reference") / "store")
    result = feature_store.export_features(records, encoder_config(), store_dir, shard_size=SHARD)
    return result, feature_store.load_feature_store(store_dir)


def test_export_pooled_shape_ids_and_metadata(records, reference_store):
    result, store = reference_store
    ids = sorted({r.image_id for r in records})
    assert (result.num_images, result.num_computed, result.skipped) == (7, 7, [])
    assert result.images_per_second > 0
    assert store.ids == ids
    assert store.features.shape == (7, 2048) and store.features.dtype == np.float32
    assert np.isfinite(store.features).all()
    assert len(store) == 7 and store.ids.index("img3.png") == 3
    meta = store.metadata
    assert meta["backbone"] == "inception_v3" and meta["weights"] == "none"
    assert (meta["image_size"], meta["pooling"], meta["dtype"], meta["seed"]) == (
        75,
        "avg",
        "float32",
        0,
    )
    assert meta["feature_shape"] == [2048] and meta["num_images"] == 7 and meta["complete"]
    assert {"tensorflow", "keras", "numpy"} <= set(meta["versions"])
    assert sorted(os.listdir(result.store_dir)) == [
        "metadata.json",
        "shard_00000.npz",
        "shard_00001.npz",
    ]


def test_encode_images_matches_store_and_reports_failures(image_dir, reference_store, tmp_path):
    _, store = reference_store
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(os.urandom(64))
    paths = [str(image_dir / "img2.jpg"), str(bad), str(tmp_path / "gone.png")]
    feats, ok, failed = backbone.encode_images(paths, encoder_config(), batch_size=4)
    assert ok == paths[:1] and [f[0] for f in failed] == paths[1:]
    assert failed[1][1] == "file not found"
    np.testing.assert_allclose(
        feats, store.features[[store.ids.index("img2.jpg")]], rtol=1e-5, atol=1e-5
    )


def test_spatial_float16_shape(image_dir):
    config = encoder_config(pooling="none", image_size=107, dtype="float16")
    paths = [str(image_dir / "img0.jpg"), str(image_dir / "img1.png")]
    feats, ok, failed = backbone.encode_images(paths, config, batch_size=2)
    assert feats.shape == (2, 2, 2, 2048) and feats.dtype == np.float16  # 107 px -> 2x2 grid.
    assert ok == paths and failed == []


@pytest.mark.parametrize(
    "name, pooling, shape", [("resnet50", "none", (2, 2, 2048)), ("vgg16", "avg", (512,))]
)
def test_other_backbones(name, pooling, shape):
    config = encoder_config(backbone=name, pooling=pooling, image_size=64)
    model, preprocess, size = backbone.build_backbone(config)
    assert model.output_shape[1:] == shape and size == 64
    module = {"resnet50": "resnet", "vgg16": "vgg16"}[name]  # ResNet50's lives in resnet.
    assert preprocess.__module__ == f"keras.src.applications.{module}"


def test_random_weights_are_deterministic(records, reference_store, tmp_path):
    backbone.clear_backbone_cache()  # Forces a fresh build with the same seed.
    result = feature_store.export_features(
        records, encoder_config(), str(tmp_path / "again"), shard_size=SHARD, seed=0
    )
    again = feature_store.load_feature_store(result.store_dir)
    np.testing.assert_array_equal(again.features, reference_store[1].features)


def test_resume_after_interruption(records, reference_store, tmp_path, monkeypatch):
    store_dir = str(tmp_path / "store")
    write_shard = feature_store._write_shard

    def crash_after_first(path, *args):
        if not path.endswith("shard_00000.npz"):
            raise KeyboardInterrupt  # What Ctrl-C during the second shard looks like.
        write_shard(path, *args)

    monkeypatch.setattr(feature_store, "_write_shard", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        feature_store.export_features(records, encoder_config(), store_dir, shard_size=SHARD)
    monkeypatch.undo()
    with pytest.raises(feature_store.FeatureStoreError, match="incomplete"):
        feature_store.load_feature_store(store_dir)
    first = os.stat(os.path.join(store_dir, "shard_00000.npz")).st_mtime_ns

    result = feature_store.export_features(records, encoder_config(), store_dir, shard_size=SHARD)
    assert result.num_computed == 3 and result.num_images == 7
    assert os.stat(os.path.join(store_dir, "shard_00000.npz")).st_mtime_ns == first
    store = feature_store.load_feature_store(store_dir)
    assert store.ids == reference_store[1].ids
    np.testing.assert_array_equal(store.features, reference_store[1].features)
    # Nothing left to compute: the rerun does not even build the backbone.
    monkeypatch.setattr(backbone, "get_runner", lambda *a: pytest.fail("backbone built"))
    rerun = feature_store.export_features(records, encoder_config(), store_dir, shard_size=SHARD)
    assert rerun.num_computed == 0 and rerun.num_images == 7
    assert feature_store.load_feature_store(store_dir).metadata["feature_shape"] == [2048]


def test_mismatched_store_settings(records, reference_store):
    store_dir = reference_store[0].store_dir
    with pytest.raises(feature_store.FeatureStoreMismatchError) as err:
        feature_store.export_features(records, encoder_config(pooling="none"), store_dir)
    message = str(err.value)
    assert "'pooling': 'avg'" in message and "'pooling': 'none'" in message
    assert store_dir in message and "delete" in message


def test_missing_image_raises_data_error(records, tmp_path):
    missing = ImageRecord("gone.jpg", str(tmp_path / "gone.jpg"), ("x",), "test")
    with pytest.raises(DataError, match="gone.jpg"):
        feature_store.export_features([*records, missing], encoder_config(), str(tmp_path / "s"))


def test_corrupt_image_raises_or_is_skipped(records, tmp_path):
    bad_path = tmp_path / "broken.jpg"
    bad_path.write_bytes(np.random.default_rng(1).bytes(300))
    recs = [*records, ImageRecord("broken.jpg", str(bad_path), ("x",), "train")]
    store_dir = str(tmp_path / "store")
    with pytest.raises(DataError, match=str(bad_path)):
        feature_store.export_features(recs, encoder_config(), store_dir, shard_size=SHARD)

    result = feature_store.export_features(
        recs, encoder_config(), store_dir, shard_size=SHARD, skip_bad_images=True
    )
    assert result.num_images == 7 and [s[0] for s in result.skipped] == ["broken.jpg"]
    assert "image file format" in result.skipped[0][1]
    store = feature_store.load_feature_store(store_dir)
    assert "broken.jpg" not in store.ids and len(store) == 7
    assert store.metadata["skipped"] == [list(s) for s in result.skipped]
    # Without skipping, a rerun retries the shard that holds the bad image.
    with pytest.raises(DataError, match="skip_bad_images"):
        feature_store.export_features(recs, encoder_config(), store_dir, shard_size=SHARD)


def test_imagenet_weights_missing_from_keras_cache(records, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    expected = str(tmp_path / "models" / backbone.BACKBONES["inception_v3"].weights_file)
    config = encoder_config(weights="imagenet")
    for call in (
        lambda: backbone.build_backbone(config),
        lambda: feature_store.export_features(records, config, str(tmp_path / "store")),
    ):
        with pytest.raises(backbone.WeightsNotFoundError) as err:
            call()
        assert expected in str(err.value) and "encoder.weights" in str(err.value)
        assert "https://storage.googleapis.com/" in str(err.value)
    assert not (tmp_path / "store").exists()  # Failed before touching the disk.


def test_imagenet_weights_loaded_from_keras_cache(
    image_dir, reference_store, tmp_path, monkeypatch
):
    # A legacy .h5 file like Keras' own download, holding the seed-0 random weights.
    from keras.src.legacy.saving import legacy_h5_format

    model = backbone.build_backbone(encoder_config(), seed=0)[0]

    (tmp_path / "models").mkdir()
    path = tmp_path / "models" / backbone.BACKBONES["inception_v3"].weights_file
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    feats, _, _ = backbone.encode_images(
        [str(image_dir / "img4.jpg")], encoder_config(weights="imagenet"), batch_size=4
    )
    np.testing.assert_allclose(
        feats, reference_store[1].features[[reference_store[1].ids.index("img4.jpg")]], atol=1e-5
    )


def test_weights_path_must_exist(tmp_path):
    config = encoder_config(weights=str(tmp_path / "mine.weights.h5"))
    with pytest.raises(backbone.WeightsNotFoundError, match="mine.weights.h5"):
        backbone.build_backbone(config)


def test_feature_store_dir_names_settings(tmp_path):
    base = feature_store.feature_store_dir(str(tmp_path), "flickr8k", encoder_config())
    assert base == str(
        tmp_path / "features" / "flickr8k" / "inception_v3_none-seed0_75px_avg_float32"
    )
    named = feature_store.feature_store_dir(
        "/c", "scenes", encoder_config(weights="/w/my net.h5", image_size=0, dtype="float16")
    )
    assert named == "/c/features/scenes/inception_v3_my-net.h5_299px_avg_float16"
    with pytest.raises(ValueError, match="config.encoder.image_size"):
        feature_store.feature_store_dir("/c", "scenes", encoder_config(image_size=60))


def test_backbone_throughput(image_dir):
    images = np.zeros([5, 75, 75, 3], np.uint8)
    assert backbone.backbone_throughput(encoder_config(), images, repeats=1) > 0


def test_mapped_features_read_the_rows_asked_for_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 2, 3)).astype(np.float16) for n in (5, 3)]
    paths = []
    for k, part in enumerate(parts):
        paths.append(str(tmp_path / f"shard_{k:05d}.npz"))
        feature_store._write_shard(paths[-1], [f"{k}_{i}" for i in range(len(part))], part, [])
    mapped = feature_store.MappedFeatures(paths)
    whole = np.concatenate(parts)
    assert mapped.shape == (8, 2, 3) and mapped.dtype == np.float16 and len(mapped) == 8
    rows = np.array([7, 0, 5, 4, 4, 2])
    np.testing.assert_array_equal(mapped[rows], whole[rows])
    np.testing.assert_array_equal(mapped[rows.reshape(2, 3)], whole[rows.reshape(2, 3)])
    # The whole store in one aligned read, which a CPU device array then uses in place.
    table = mapped.read_all()
    np.testing.assert_array_equal(table, whole)
    assert table.ctypes.data % 64 == 0 and table.dtype == np.float16
    if jax.default_backend() == "cpu":
        assert jax.device_put(table).unsafe_buffer_pointer() == table.ctypes.data
    del table
    with open(paths[1], "r+b") as f:  # A shard cut short is an error, not rows of garbage.
        f.truncate(mapped._shards[1].offset + 10)
    with pytest.raises(feature_store.FeatureStoreError, match="shorter"):
        mapped.read_all()


def test_store_on_disk_equals_the_store_in_memory(reference_store):
    result, store = reference_store
    mapped = feature_store.load_feature_store(result.store_dir, on_disk=True)
    assert isinstance(mapped.features, feature_store.MappedFeatures)
    assert mapped.ids == store.ids and mapped.nbytes == store.features.nbytes
    np.testing.assert_array_equal(mapped.features[np.arange(len(store))], store.features)


def test_shard_sizes_split_a_batch_evenly():
    assert backbone.shard_sizes(10, 4) == [3, 3, 2, 2]
    assert backbone.shard_sizes(8, 2) == [4, 4]
    assert backbone.shard_sizes(3, 8) == [1, 1, 1]  # No empty shard.
    assert backbone.shard_sizes(5, 0) == [5]


_DATA_PARALLEL_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, {repo!r})
from captioning.data import backbone
from tests.test_features import encoder_config

devices = backbone.backbone_devices()
model, preprocess, size = backbone.build_backbone(encoder_config(pooling="none"), seed=0)
parallel = backbone._compile(model, preprocess, size, 5, "float32", devices)
single = backbone._compile(model, preprocess, size, 5, "float32", devices[:1])
pixels = tf.constant(np.random.default_rng(0).uniform(0, 255, (5, 75, 75, 3)), tf.float32)
placed = {{op.device for op in parallel.graph.get_operations() if op.type == "Conv2D"}}
np.save({out!r}, np.stack([parallel(pixels), single(pixels)]))
print(json.dumps({{"devices": devices, "conv_devices": sorted(placed)}}))
"""


def test_backbone_runs_data_parallel_over_local_devices(tmp_path):
    """With two local devices (the CPU split in two logical ones, as TF would see two GPUs),
    each runs the backbone on its rows, and the features equal one device's."""
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "features.npy")
    script = _DATA_PARALLEL_SCRIPT.format(repo=repo, out=out)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["devices"]) == 2
    assert [d.rsplit(":", 1)[-1] for d in report["conv_devices"]] == ["0", "1"]
    parallel, single = np.load(out)
    assert parallel.shape == (5, 1, 1, 2048) and np.ptp(parallel[:, 0, 0, 0]) > 0
    np.testing.assert_allclose(parallel, single, rtol=1e-5, atol=1e-5)
