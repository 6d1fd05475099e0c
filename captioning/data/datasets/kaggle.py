"""Flickr8k as distributed on Kaggle ("flickr8k": `captions.txt` + `Images/`).

Accepted layout of `config.data.dir`::

    <dir>/
      captions.txt     CSV, header `image,caption`, one row per caption:
                         1000268201_693b08cb0e.jpg,A child in a pink dress is climbing up ...
                         1001773457_577c3a7d70.jpg,"A black dog and a spotted dog are fighting"
      Images/          the JPEGs

Captions containing commas should be quoted (the csv module reads them); an unquoted row with extra
fields is read as image + the remaining fields joined by commas. BOM and CRLF are accepted; a row
without a caption, an empty caption or non-UTF-8 bytes raise `DataError` naming file and line.

Which split (logged as `split_source=...`):
  * `official`: the Flickr8k split files (`Flickr_8k.trainImages.txt`, `Flickr_8k.devImages.txt`,
    `Flickr_8k.testImages.txt`, from Flickr8k_text.zip) when they are in `<dir>` or a subfolder;
  * `seeded`: otherwise the sorted image names are shuffled with the run's seed and cut into
    6000 train / 1000 val / the rest test (for fewer than 8000 images: 75 % / 12.5 % / the rest).
    The same seed and image set always give the same split; it is NOT the official split, so scores
    are not comparable with published Flickr8k numbers.
"""

from __future__ import annotations

import csv
import os

import numpy as np
from absl import logging

from captioning.data.datasets import flickr8k
from captioning.data.datasets.base import DataError, DatasetSplits

CAPTIONS_FILE = "captions.txt"
IMAGE_DIRS = ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset")
NUM_TRAIN, NUM_VAL = 6000, 1000


def read_captions_csv(path: os.PathLike) -> dict[str, list[str]]:
    """Image name -> raw captions in file order, from a CSV with header `image,caption`."""
    lines = flickr8k.read_text(path).split("\n")
    reader = csv.reader(line.rstrip("\r") + "\n" for line in lines)
    captions: dict[str, list[str]] = {}
    header_seen = False
    last_line = 0
    for row in reader:
        number, last_line = last_line + 1, reader.line_num  # A row starts after the previous one.
        if not any(field.strip() for field in row):
            continue
        if not header_seen:
            if [f.strip().lower() for f in row] != ["image", "caption"]:
                raise DataError(
                    f"{path}:{number}: expected the header 'image,caption', found {row!r}. Is this "
                    "the Kaggle flickr8k captions.txt?"
                )
            header_seen = True
            continue
        if any("\n" in field for field in row):
            raise DataError(
                f"{path}:{number}: a quoted field runs over several lines (an unclosed quote?). "
                "Close the quote or remove it."
            )
        if len(row) < 2:
            raise DataError(
                f"{path}:{number}: expected 'image,caption', found {row!r} (no caption field)."
            )
        image_id = row[0].strip()
        caption = ",".join(row[1:]).strip()
        if not image_id:
            raise DataError(f"{path}:{number}: empty image name. Fix or remove the row.")
        if not caption:
            raise DataError(
                f"{path}:{number}: empty caption for {image_id}. Fix or remove the row."
            )
        image_id = flickr8k.normalize_image_id(image_id, f"{path}:{number}")
        captions.setdefault(image_id, []).append(caption)
    if not header_seen:
        raise DataError(f"{path} is empty; expected the header 'image,caption' and caption rows.")
    return captions


def seeded_split(names: list[str], seed: int) -> dict[str, list[str]]:
    """Deterministic split of the sorted names: 6000/1000/rest (75/12.5/rest % below 8000)."""
    names = sorted(names)
    n = len(names)
    num_train = min(NUM_TRAIN, round(0.75 * n))
    num_val = min(NUM_VAL, round(0.125 * n))
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [names[i] for i in order]
    return {
        "train": shuffled[:num_train],
        "val": shuffled[num_train : num_train + num_val],
        "test": shuffled[num_train + num_val :],
    }


def read_kaggle(
    data_dir: str | os.PathLike,
    *,
    seed: int,
    skip_bad_images: bool = False,
    skipped: list | None = None,
    check_images: bool = True,
) -> DatasetSplits:
    """Reads the Kaggle layout (see the module docstring) into `DatasetSplits`.

    Args:
      data_dir: the folder (config.data.dir).
      seed: seeds the split when the official split files are absent.
      skip_bad_images: skip images whose file is missing instead of raising.
      skipped: if given, receives `(image_id, reason)` for every skipped image.
      check_images: False builds paths without looking at the image folder (text-only use).
    """
    expected = f"{CAPTIONS_FILE} (CSV 'image,caption') and Images/"
    root = flickr8k.require_dir(data_dir, "flickr8k_kaggle", expected)
    path = root / CAPTIONS_FILE
    if not path.is_file():
        raise DataError(
            f"{path} not found. The flickr8k_kaggle reader expects {expected} in config.data.dir "
            f"(the Kaggle dataset 'flickr8k'). {flickr8k.WHERE_TO_GET}"
        )
    captions = read_captions_csv(path)
    split_files = flickr8k.find_split_files(root)
    listed_at = None
    if split_files:
        splits, listed_at = flickr8k.read_split_files(split_files)
        logging.info(
            "flickr8k_kaggle: split_source=official (Flickr8k split files in %s).",
            split_files["train"].parent,
        )
    else:
        splits = seeded_split(list(captions), seed)
        logging.warning(
            "flickr8k_kaggle: split_source=seeded (seed=%d): no Flickr_8k.*Images.txt in %s, so "
            "the sorted images are shuffled and cut %d/%d/%d. This is not the official split; put "
            "the split files from Flickr8k_text.zip in the folder to use it.",
            seed,
            root,
            *(len(splits[s]) for s in ("train", "val", "test")),
        )
    return flickr8k.attach_images(
        captions,
        splits,
        root,
        image_dirs=IMAGE_DIRS,
        check_images=check_images,
        skip_bad_images=skip_bad_images,
        skipped=skipped,
        dataset="flickr8k_kaggle",
        listed_at=listed_at,
    )
