"""COCO captions from tensorflow-datasets (`coco_tfds`) and the COCO / Flickr30k configs.

Nothing is downloaded: one test writes a tiny real `coco_captions` TFDS dataset (the builder's own
features and split names, examples of our own), the others mock TFDS with
`tfds.testing.mock_data`.
"""

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from captioning.data.datasets import coco_tfds, registry
from captioning.data.datasets.base import DataError
from tests.test_datasets_real import data_config

SIZES = {"train": 3, "restval": 2, "val": 1, "test": 1}
PREFIX = {"train": "COCO_train2014", "restval": "COCO_val2014", "val": "COCO_val2014"}


def jpeg_bytes(index: int, size=(12, 16)) -> bytes:
    pixels = np.zeros((*size, 3), np.uint8)
    pixels[2:8, 3 : 5 + index] = (200, 40 * index % 255, 90)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def fake_examples(split: str, n: int | None = None) -> list[dict]:
    """COCO-like examples of one TFDS split: file names, ids, JPEG bytes, five raw captions."""
    offset = list(SIZES).index(split) * 100
    out = []
    for i in range(SIZES[split] if n is None else n):
        coco_id = offset + i
        name = f"{PREFIX.get(split, 'COCO_val2014')}_{coco_id:012d}.jpg"
        captions = [f"A {split} photo number {i} , caption {k} . " for k in range(5)]
        captions[0] = f"  A man rides a horse in picture {coco_id}.\n"  # Raw COCO has such spaces.
        out.append(
            {"filename": name, "id": coco_id, "jpeg": jpeg_bytes(coco_id), "captions": captions}
        )
    return out


def sizes(splits) -> tuple[int, ...]:
    return tuple(len(splits[s]) for s in ("train", "val", "test"))


def extraction_log(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "images extracted" in r.getMessage()]


# --------------------------------------------------------------------------------------------
# A real prepared coco_captions folder (TFRecords written by TFDS).


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory) -> Path:
    """<data_dir>/coco_captions/2014/1.1.0 with the real builder's features, our examples."""
    # tensorflow-datasets 4.9.10 imports importlib_resources while building, but declares it
    # only for Python < 3.9 (requirements.txt installs it).
    import importlib_resources  # noqa: F401
    from tensorflow_datasets.object_detection import coco_captions

    with tfds.core.registered.skip_registration():

        class TinyCocoCaptions(coco_captions.CocoCaptions):
            """The real builder (name, config, version, features), fed our examples."""

            name = "coco_captions"

            def _split_generators(self, dl_manager):
                return {split: self._examples(split) for split in SIZES}

            def _examples(self, split):
                for ex in fake_examples(split):
                    yield (
                        ex["filename"],
                        {
                            "image": io.BytesIO(ex["jpeg"]),
                            "image/filename": ex["filename"],
                            "image/id": ex["id"],
                            "objects": [],
                            "captions": [
                                {"id": k, "text": c} for k, c in enumerate(ex["captions"])
                            ],
                        },
                    )

    data_dir = tmp_path_factory.mktemp("tfds")
    TinyCocoCaptions(data_dir=str(data_dir), config="2014").download_and_prepare()
    return data_dir


def test_prepared_tfds_split_mapping_raw_captions_and_unchanged_jpegs(prepared_dir, tmp_path):
    splits = coco_tfds.read_coco_tfds(str(prepared_dir), tmp_path / "cache")
    assert sizes(splits) == (5, 1, 1)  # train + restval -> train.
    expected = {s: {ex["filename"]: ex for ex in fake_examples(s)} for s in SIZES}
    train_ids = {r.image_id for r in splits["train"]}
    assert train_ids == set(expected["train"]) | set(expected["restval"])
    folder = tmp_path / "cache" / "tfds_images" / "coco_captions"
    for split, records in splits.items():
        for record in records:
            tfds_split = record.meta["tfds_split"]
            assert record.split == split == coco_tfds.SPLIT_MAP[tfds_split]
            ex = expected[tfds_split][record.image_id]
            assert record.image_path == str(folder.resolve() / tfds_split / record.image_id)
            assert Path(record.image_path).read_bytes() == ex["jpeg"]  # Not re-encoded.
            assert record.meta["coco_id"] == ex["id"]
            assert record.captions == tuple(c.strip() for c in ex["captions"])
    assert splits["val"][0].captions[0] == "A man rides a horse in picture 200."


def test_prepared_tfds_second_call_reuses_and_resumes(prepared_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cache = tmp_path / "cache"
    first = coco_tfds.read_coco_tfds(str(prepared_dir), cache)
    assert "val: 1 images extracted, 0 found" in " ".join(extraction_log(caplog))
    caplog.clear()
    assert coco_tfds.read_coco_tfds(str(prepared_dir), cache) == first
    assert extraction_log(caplog) == []  # Every split is listed in its manifest: TFDS not read.
    # An interrupted extraction: one image and the train manifest gone, a temp file left over.
    folder = cache / "tfds_images" / "coco_captions"
    gone = Path(first["train"][1].image_path)
    gone.unlink()
    (folder / "train.json").unlink()
    (gone.parent / f".{gone.name}.x.tmp").write_bytes(b"half")
    caplog.clear()
    assert coco_tfds.read_coco_tfds(str(prepared_dir), cache) == first
    assert extraction_log(caplog) == [
        f"coco_tfds: train: 1 images extracted, 2 found already in {gone.parent}."
    ]
    assert gone.is_file()


# --------------------------------------------------------------------------------------------
# tfds.testing.mock_data.
#
# mock_data's random examples do not serve this reader as they are: with `decoders` given it
# encodes them, and encoding fails for coco_captions' `objects` (sequence fields of unequal
# random lengths) and, even with the PartialDecoding the reader uses, for `captions/text`
# (tf.data: "Unsupported object type numpy.ndarray"); it also yields the same examples for every
# split. SkipDecoding itself works under mock_data (the image comes back as JPEG bytes). So the
# mock gets our own examples through `as_dataset_fn`: JPEG bytes encoded with PIL, COCO file names
# that differ per split, in the shape the reader's decoders produce.


def mock_as_dataset(num_examples: int, seen: list):
    def as_dataset_fn(builder, split, decoders=None, read_config=None, shuffle_files=False):
        del builder, read_config, shuffle_files
        seen.append((split, decoders))
        examples = fake_examples(split, num_examples)

        def generate():
            for ex in examples:
                yield {
                    "image": ex["jpeg"],
                    "image/filename": ex["filename"],
                    "image/id": ex["id"],
                    "captions": {"text": ex["captions"]},
                }

        signature = {
            "image": tf.TensorSpec((), tf.string),
            "image/filename": tf.TensorSpec((), tf.string),
            "image/id": tf.TensorSpec((), tf.int64),
            "captions": {"text": tf.TensorSpec((None,), tf.string)},
        }
        ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
        return ds.apply(tf.data.experimental.assert_cardinality(len(examples)))

    return as_dataset_fn


def test_mock_data_through_the_registry(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    seen = []
    config = data_config(
        dataset="coco_tfds", tfds_data_dir=str(tmp_path / "tfds"), cache_dir=str(tmp_path / "c")
    )
    with tfds.testing.mock_data(num_examples=2, as_dataset_fn=mock_as_dataset(2, seen)):
        splits = registry.load_records(config, seed=0)
        assert sizes(splits) == (4, 2, 2)
        assert [split for split, _ in seen] == ["train", "restval", "val", "test"]
        decoders = seen[0][1]
        assert isinstance(decoders, tfds.decode.PartialDecoding)
        assert isinstance(decoders.decoders["image"], tfds.decode.SkipDecoding)
        for record in splits["train"] + splits["val"] + splits["test"]:
            with Image.open(record.image_path) as image:
                assert image.format == "JPEG" and image.size == (16, 12)
            assert len(record.captions) == 5
        assert {r.meta["tfds_split"] for r in splits["train"]} == {"train", "restval"}
        assert splits["test"][0].image_id.startswith("COCO_val2014_")
        caplog.clear()
        assert registry.load_records(config, seed=0) == splits
        assert extraction_log(caplog) == []
        assert len(seen) == 4  # The second call reads the manifests, not TFDS.


# --------------------------------------------------------------------------------------------
# Not prepared.


def test_not_prepared_says_how_to_build(tmp_path):
    empty = tmp_path / "empty_tfds"
    empty.mkdir()
    config = data_config(dataset="coco_tfds", tfds_data_dir=str(empty), cache_dir=str(tmp_path))
    with pytest.raises(DataError) as info:
        registry.load_records(config, seed=0)
    message = str(info.value)
    assert f"tfds build coco_captions --data_dir={empty}" in message
    assert "config.data.tfds_data_dir" in message
    assert str(empty / "coco_captions" / "2014") in message
    assert "--manual_dir" in message and "internet" in message


def test_registry_lists_coco_tfds():
    assert "coco_tfds" in registry.DATASETS
    with pytest.raises(DataError, match=r"valid names: .*karpathy, coco_tfds"):
        registry.load_records(data_config(dataset="coco"), seed=0)


# --------------------------------------------------------------------------------------------
# Configs (tests/test_configs.py checks every config's fields against the base).


@pytest.mark.parametrize("name", ["coco", "flickr30k"])
def test_configs_read_spatial_inception_features(name):
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.model.decoder in ("attention", "merge_attention")
    assert (config.encoder.pooling, config.encoder.grid, config.encoder.layer) == ("none", 0, "")
    assert (config.encoder.backbone, config.encoder.image_size) == ("inception_v3", 299)
    assert (config.encoder.weights, config.encoder.dtype) == ("imagenet", "float16")
    dataset = {"coco": ("coco_tfds", ""), "flickr30k": ("karpathy", "dataset_flickr30k.json")}
    assert (config.data.dataset, config.data.karpathy_json) == dataset[name]
