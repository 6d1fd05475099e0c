"""MS-COCO 2014 captions in the Karpathy splits, from tensorflow-datasets' `coco_captions` builder.

    config.data.dataset = "coco_tfds"
    config.data.tfds_data_dir = "/data/tensorflow_datasets"  # '' = TFDS default

Preparing the TFDS data, once, on a machine with internet (the builder downloads COCO itself)::

    pip install tensorflow-datasets
    tfds build coco_captions --data_dir=/data/tensorflow_datasets

The build downloads about 40 GB of zips (train2014, val2014, test2014 and test2015 images, the
annotations, Karpathy's caption_datasets.zip), needs about 100 GB free while it runs and leaves
about 19 GiB of TFRecords in `<data_dir>/coco_captions/2014/1.1.0/`; copy
`<data_dir>/coco_captions/` to the training machine. Zips already at hand go into one folder passed
as `--manual_dir=<folder>` (with their published names, e.g. train2014.zip); TFDS then uses them
instead of downloading.

Fields read (a `PartialDecoding`, so the `objects` boxes are never decoded): `image` (the JPEG
bytes as stored, `SkipDecoding`), `image/filename` (e.g. `COCO_val2014_000000391895.jpg`, the
record's `image_id`), `image/id` (the COCO id, kept in `meta['coco_id']`) and `captions/text`
(the raw captions, surrounding whitespace stripped as the Karpathy reader does). Splits: TFDS
`train` (82,783 images) + `restval` (30,504) -> `train` (113,287, as big_vision trains), `val`
(5,000) -> `val`, `test` (5,000) -> `test`.

Why images are written to disk: the feature export reads image FILES (`ImageRecord.image_path`),
so each image's JPEG bytes are written once, unchanged (no re-encoding), to
`<data.cache_dir>/tfds_images/coco_captions/<split>/<file name>`: about 19 GiB of disk for COCO
2014, on top of the TFDS copy (which may be deleted afterwards). Extraction resumes: files already
there are kept, and each file is written to a temporary name and renamed, so an interrupted run
leaves no half-written image. Once a split is complete, `<split>.json` next to its folder lists its
images and captions, and later runs read that instead of passing over the 19 GiB of TFRecords.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from absl import logging

from captioning.data.datasets.base import DataError, DatasetSplits, ImageRecord

BUILDER = "coco_captions/2014"
SPLIT_MAP = {"train": "train", "restval": "train", "val": "val", "test": "test"}
IMAGES_SUBDIR = os.path.join("tfds_images", "coco_captions")

# (filename, COCO id, raw captions) of one image.
Row = tuple[str, int, list[str]]


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"config.data.dataset='coco_tfds' needs tensorflow-datasets ({e}). Install it with "
            "`pip install tensorflow-datasets`, or read dataset_coco.json and the COCO image "
            "folders with config.data.dataset='karpathy' (see configs/coco.py)."
        ) from None
    return tfds


def _data_dir_root(builder: Any, tfds_data_dir: str) -> str:
    """The TFDS data_dir in use: `builder.data_dir` is `<root>/coco_captions/2014/<version>`."""
    if tfds_data_dir:
        return os.path.abspath(os.path.expanduser(tfds_data_dir))
    return str(Path(builder.data_dir).parents[2])


def not_prepared_message(builder: Any, tfds_data_dir: str, detail: str = "") -> str:
    """What to do when the TFDS data is missing: the command, where it goes, the config field."""
    root = _data_dir_root(builder, tfds_data_dir)
    which = repr(tfds_data_dir) if tfds_data_dir else "'' (the TFDS default)"
    return (
        f"coco_tfds: TFDS dataset {BUILDER} is not prepared in {root} (looked for "
        f"{builder.data_dir}; config.data.tfds_data_dir={which}){detail}.\n"
        "Prepare it once on a machine with internet (the builder downloads COCO 2014 itself, "
        "about 40 GB of zips; allow 100 GB free while it builds):\n"
        f"    pip install tensorflow-datasets && tfds build coco_captions --data_dir={root}\n"
        f"then copy {root}/coco_captions/ (about 19 GiB) to this machine and set "
        "config.data.tfds_data_dir to the folder that holds it. COCO zips you already have "
        "(train2014.zip, val2014.zip, test2014.zip, test2015.zip, annotations_trainval2014.zip, "
        "image_info_test2014.zip, image_info_test2015.zip, caption_datasets.zip) go into one "
        "folder; add `--manual_dir=<folder>` to that command and TFDS uses them instead of "
        "downloading them. Without TFDS: config.data.dataset='karpathy' reads dataset_coco.json "
        "and the image folders."
    )


def _decoders(tfds: Any) -> Any:
    """Only the fields used; the image stays the JPEG bytes stored in the TFRecords."""
    return tfds.decode.PartialDecoding(
        {"image": True, "image/filename": True, "image/id": True, "captions": {"text": True}},
        decoders={"image": tfds.decode.SkipDecoding()},
    )


def _write_atomic(path: Path, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it to `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_manifest(path: Path, version: str, folder: Path) -> list[Row] | None:
    """The rows of a complete split, or None when the manifest is absent, stale or incomplete."""
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        rows = [(str(f), int(i), list(c)) for f, i, c in manifest["images"]]
        manifest_version = manifest["version"]
    except (ValueError, KeyError, TypeError) as e:
        logging.warning("coco_tfds: ignoring unreadable %s (%s); reading TFDS again.", path, e)
        return None
    if manifest_version != version:
        logging.info(
            "coco_tfds: %s is for %s %s, not %s.", path, BUILDER, manifest_version, version
        )
        return None
    missing = sum(not (folder / f).is_file() for f, _, _ in rows)
    if missing:
        logging.info("coco_tfds: %d images of %s are missing; extracting again.", missing, path)
        return None
    return rows


def _extract_split(tfds: Any, builder: Any, split: str, folder: Path, tfds_data_dir: str):
    """Reads one TFDS split, writing each image not yet in `folder`; returns its rows."""
    from tqdm import tqdm

    try:
        ds = builder.as_dataset(split=split, decoders=_decoders(tfds), shuffle_files=False)
    except AssertionError:  # How TFDS says the data is not prepared.
        raise DataError(not_prepared_message(builder, tfds_data_dir)) from None
    except FileNotFoundError as e:  # Prepared, but files are missing (an incomplete copy).
        detail = f": {e}"
        raise DataError(not_prepared_message(builder, tfds_data_dir, detail)) from None
    total = int(ds.cardinality())
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    extracted = found = 0
    desc = f"coco_captions {split}: images -> {folder}"
    for example in tqdm(
        tfds.as_numpy(ds), total=total if total >= 0 else None, desc=desc, unit="img", delay=2.0
    ):
        filename = example["image/filename"].decode("utf-8")
        if not filename or os.path.basename(filename) != filename:
            raise DataError(f"coco_tfds: {split}: unexpected image/filename {filename!r}.")
        path = folder / filename
        if path.is_file():
            found += 1
        else:
            _write_atomic(path, example["image"])
            extracted += 1
        captions = [t.decode("utf-8").strip() for t in example["captions"]["text"]]
        rows.append((filename, int(example["image/id"]), captions))
    logging.info(
        "coco_tfds: %s: %d images extracted, %d found already in %s.",
        split,
        extracted,
        found,
        folder,
    )
    return rows


def _split_rows(tfds: Any, builder: Any, split: str, images_dir: Path, tfds_data_dir: str):
    folder = images_dir / split
    manifest = images_dir / f"{split}.json"
    version = str(builder.version)
    rows = _read_manifest(manifest, version, folder)
    if rows is not None:
        logging.info(
            "coco_tfds: %s: %d images listed in %s, all present.", split, len(rows), manifest
        )
        return rows, folder
    rows = _extract_split(tfds, builder, split, folder, tfds_data_dir)
    data = {"builder": BUILDER, "version": version, "split": split, "images": rows}
    _write_atomic(manifest, json.dumps(data, ensure_ascii=False).encode("utf-8"))
    return rows, folder


def read_coco_tfds(tfds_data_dir: str, cache_dir: str | os.PathLike) -> DatasetSplits:
    """Reads `coco_captions` (see the module docstring) into `DatasetSplits`.

    Args:
      tfds_data_dir: TFDS data_dir holding `coco_captions/` (config.data.tfds_data_dir; '' = the
        TFDS default, $TFDS_DATA_DIR or ~/tensorflow_datasets).
      cache_dir: config.data.cache_dir; images go to `<cache_dir>/tfds_images/coco_captions/`.
    """
    tfds = _import_tfds()
    try:
        builder = tfds.builder(BUILDER, data_dir=os.path.expanduser(tfds_data_dir) or None)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"coco_tfds: this tensorflow-datasets has no {BUILDER} builder ({e}). Upgrade it: "
            "`pip install -U tensorflow-datasets`."
        ) from None
    images_dir = Path(os.path.expanduser(cache_dir)).resolve() / IMAGES_SUBDIR
    splits: DatasetSplits = {"train": [], "val": [], "test": []}
    seen: dict[str, str] = {}
    for tfds_split, split in SPLIT_MAP.items():
        rows, folder = _split_rows(tfds, builder, tfds_split, images_dir, tfds_data_dir)
        for filename, coco_id, captions in rows:
            where = f"coco_tfds: {tfds_split}: image {filename}"
            if filename in seen:
                raise DataError(f"{where} is also in TFDS split {seen[filename]}.")
            seen[filename] = tfds_split
            if not captions or not all(captions):
                raise DataError(f"{where} has an empty caption or none; rebuild the TFDS data.")
            meta = {"coco_id": coco_id, "tfds_split": tfds_split}
            record = ImageRecord(filename, str(folder / filename), tuple(captions), split, meta)
            splits[split].append(record)
    logging.info(
        "coco_tfds: %s images, %s captions (train incl. restval/val/test) from %s.",
        "/".join(str(len(splits[s])) for s in splits),
        "/".join(str(sum(len(r.captions) for r in splits[s])) for s in splits),
        _data_dir_root(builder, tfds_data_dir),
    )
    return splits
