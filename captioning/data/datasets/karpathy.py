"""Karpathy split JSON files (Flickr8k, Flickr30k, MS-COCO), as in `caption_datasets.zip`.

Accepted layout of `config.data.dir` (`config.data.karpathy_json` may name the JSON file, absolute
or relative to the folder; otherwise the folder must hold exactly one of the three names below)::

    <dir>/
      dataset_flickr8k.json | dataset_flickr30k.json | dataset_coco.json
      Images/ | Flicker8k_Dataset/ | flickr30k-images/   Flickr images, by `filename`
      <filepath>/<filename>                         COCO images, e.g. val2014/COCO_val2014_...jpg

    {"images": [{"filename": "1000268201_693b08cb0e.jpg", "split": "train",
                 "sentences": [{"raw": "A child in a pink dress ...", "tokens": [...]}, ...]},
                ...]}

Split `restval` becomes `train` (the usual "Karpathy train" of 113k COCO images); `val` and `test`
stay. A sentence without `raw` falls back to its `tokens` joined by spaces. Missing fields, unknown
splits, empty captions and invalid JSON raise `DataError` naming the file and image (or line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from absl import logging

from captioning.data.datasets import flickr8k
from captioning.data.datasets.base import DataError, DatasetSplits

JSON_FILES = ("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json")
IMAGE_DIRS = (
    "Images",
    "Flicker8k_Dataset",
    "Flickr8k_Dataset",
    "flickr30k-images",
    "flickr30k_images",
)
SPLIT_MAP = {"train": "train", "restval": "train", "val": "val", "test": "test"}
WHERE_TO_GET = (
    "The Karpathy split files come in caption_datasets.zip "
    "(https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip, also mirrored on "
    "Kaggle); the images come from each dataset's own release."
)


def find_json(root: Path, json_path: str = "") -> Path:
    """The JSON named by `json_path` (absolute or relative to `root`) or the one found in `root`."""
    if json_path:
        path = Path(json_path).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise DataError(
                f"{path} (config.data.karpathy_json) not found. Point it at one of "
                f"{', '.join(JSON_FILES)}. {WHERE_TO_GET}"
            )
        return path
    found = [root / name for name in JSON_FILES if (root / name).is_file()]
    if len(found) == 1:
        return found[0]
    if found:
        raise DataError(
            f"Several Karpathy files in {root}: {', '.join(p.name for p in found)}. Set "
            "config.data.karpathy_json to the one to use."
        )
    raise DataError(
        f"No Karpathy JSON in {root}: expected one of {', '.join(JSON_FILES)} (or set "
        f"config.data.karpathy_json). {WHERE_TO_GET}"
    )


def _field(entry: dict, name: str, path: Path, index: int) -> Any:
    if name not in entry:
        raise DataError(f"{path}: images[{index}] has no '{name}' field. Is this a Karpathy file?")
    return entry[name]


def parse_images(path: Path) -> list[tuple[str, str, str, list[str]]]:
    """(filename, filepath or '', split, raw captions) per image, validated."""
    try:
        data = json.loads(flickr8k.read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); the file may be truncated, "
            "download it again."
        ) from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: no 'images' list at the top level. Is this a Karpathy file?")
    out = []
    for index, entry in enumerate(images):
        filename = str(_field(entry, "filename", path, index))
        where = f"{path}: images[{index}] ({filename})"
        split = _field(entry, "split", path, index)
        if split not in SPLIT_MAP:
            raise DataError(f"{where}: unknown split {split!r}; expected one of {list(SPLIT_MAP)}.")
        sentences = _field(entry, "sentences", path, index)
        if not sentences:
            raise DataError(f"{where}: no sentences. Remove the image or add its captions.")
        captions = []
        for k, sentence in enumerate(sentences):
            raw = sentence.get("raw")
            if raw is None and sentence.get("tokens"):
                raw = " ".join(sentence["tokens"])
            if not raw or not str(raw).strip():
                raise DataError(f"{where}: sentences[{k}] is empty (no 'raw' text or 'tokens').")
            captions.append(str(raw).strip())
        out.append((filename, str(entry.get("filepath", "")), SPLIT_MAP[split], captions))
    return out


def read_karpathy(
    data_dir: str | os.PathLike,
    *,
    json_path: str = "",
    skip_bad_images: bool = False,
    skipped: list | None = None,
    check_images: bool = True,
) -> DatasetSplits:
    """Reads a Karpathy JSON and its images (see the module docstring) into `DatasetSplits`.

    Args:
      data_dir: the folder (config.data.dir).
      json_path: the JSON file (config.data.karpathy_json); '' finds it in `data_dir`.
      skip_bad_images: skip images whose file is missing instead of raising.
      skipped: if given, receives `(image_id, reason)` for every skipped image.
      check_images: False builds paths without looking at the images (text-only use).
    """
    root = flickr8k.require_dir(data_dir, "karpathy", f"one of {', '.join(JSON_FILES)} and images")
    path = find_json(root, json_path)
    images = parse_images(path)
    flat_folders = [root / d for d in IMAGE_DIRS if (root / d).is_dir()]
    needs_flat = any(not filepath for _, filepath, _, _ in images)
    if check_images and needs_flat and not flat_folders:
        raise DataError(
            f"No image folder in {root} for {path.name}: expected one of {', '.join(IMAGE_DIRS)}/. "
            f"{WHERE_TO_GET}"
        )
    lookup = flickr8k.image_lookup(flat_folders) if check_images and needs_flat else {}
    default = flat_folders[0] if flat_folders else root / IMAGE_DIRS[0]
    flat_searched = ", ".join(str(f) for f in flat_folders)

    seen: set[str] = set()

    def items():
        for filename, filepath, split, captions in images:
            if filename in seen:
                raise DataError(f"{path}: image {filename} appears twice. Remove the duplicate.")
            seen.add(filename)
            if filepath:  # COCO style: <dir>/<filepath>/<filename>.
                folder = root / filepath
                found = not check_images or (folder / filename).is_file()
                yield filename, split, captions, folder if found else None, str(folder)
            else:
                folder = lookup.get(filename) if check_images else default
                yield filename, split, captions, folder, flat_searched

    records = flickr8k.make_records(
        items(), skip_bad_images=skip_bad_images, skipped=skipped, dataset=f"karpathy:{path.name}"
    )
    logging.info(
        "karpathy: %s images, %s captions (train incl. restval/val/test) from %s.",
        "/".join(str(len(records[s])) for s in records),
        "/".join(str(sum(len(r.captions) for r in records[s])) for s in records),
        path,
    )
    return records
