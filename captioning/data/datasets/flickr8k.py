"""Flickr8k in its original "text zip" layout (Hodosh, Young and Hockenmaier, JAIR 2013).

Accepted layout of `config.data.dir` (the text files may also sit in a subfolder such as
`Flickr8k_text/`, where unzipping `Flickr8k_text.zip` often puts them)::

    <dir>/
      Flickr8k.token.txt           <image>.jpg#<k>\\t<caption>, five captions per image
      Flickr_8k.trainImages.txt    6000 image names, one a line (official train split)
      Flickr_8k.devImages.txt      1000 image names ("dev" becomes our `val` split)
      Flickr_8k.testImages.txt     1000 image names
      Flicker8k_Dataset/           the JPEGs (sic, as in Flickr8k_Dataset.zip), or Images/

Text files may start with a UTF-8 BOM and use CRLF line endings; blank lines are ignored. Other bad
input raises `DataError` naming the file and line (or the image): a caption line without a tab, an
empty caption, bytes that are not UTF-8, an image named in a split file that has no caption, an
image listed twice in the splits, and an image file that does not exist (unless
`skip_bad_images=True`, which skips the image, logs it and appends `(image_id, reason)` to the
caller's `skipped` list).

Known quirk of the real token file: line 6731 reads `2258277193_586949ec62.jpg.1#0` (a stray `.1`
after the extension). Ids of the form `<name>.jpg.<digits>` are normalised to `<name>.jpg` with a
warning naming the line, so that image keeps its five captions. It is in none of the official splits
and its file is missing from `Flickr8k_Dataset.zip`, so it never reaches the records.

Figures from the real files: 6000/1000/1000 images and 30000/5000/5000 captions in
train/val/test; 92 captioned images belong to no split and are left out.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from absl import logging

from captioning.data.datasets.base import DataError, DatasetSplits, ImageRecord

TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")
TEXT_SUBDIRS = ("Flickr8k_text",)

WHERE_TO_GET = (
    "Flickr8k comes as Flickr8k_Dataset.zip (the images, about 1 GB) and Flickr8k_text.zip "
    "(captions and splits), from the University of Illinois request form "
    "(https://forms.illinois.edu/sec/1713398) or the Kaggle dataset 'flickr8k' (captions.txt + "
    "Images/, use config.data.dataset='flickr8k_kaggle'). Unzip both into config.data.dir."
)

_STRAY_SUFFIX = re.compile(r"^(.+\.(?:jpe?g|png))\.\d+$", re.IGNORECASE)
_MAX_NAMES_LOGGED = 20


# ----------------------------------------------------------------------------------------------
# Helpers shared with the Kaggle and Karpathy readers.


def read_text(path: str | os.PathLike) -> str:
    """Reads a UTF-8 file (BOM allowed); non-UTF-8 bytes raise `DataError` naming file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: bytes that are not UTF-8 ({data[e.start : e.end]!r}, {e.reason}). "
            "Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None


def read_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(1-based line number, line) for every non-blank line; CRLF and BOM handled."""
    lines = read_text(path).split("\n")
    out = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if line.strip():
            out.append((number, line))
    return out


def normalize_image_id(image_id: str, where: str) -> str:
    """Strips a stray `.<digits>` after the extension (Flickr8k quirk), warning with `where`."""
    match = _STRAY_SUFFIX.match(image_id)
    if match:
        logging.warning(
            "%s: image id %r has a stray suffix after the extension; read as %r.",
            where,
            image_id,
            match.group(1),
        )
        return match.group(1)
    return image_id


def require_dir(data_dir: str | os.PathLike, dataset: str, expected: str) -> Path:
    """Returns `data_dir` as an absolute Path, or raises `DataError` saying what belongs there."""
    if not str(data_dir):
        raise DataError(
            f"config.data.dir is empty: set it to the {dataset} folder holding {expected}."
        )
    path = Path(data_dir).expanduser().resolve()
    if not path.is_dir():
        raise DataError(
            f"Data folder {path} (config.data.dir) does not exist. The {dataset} reader expects "
            f"{expected} there. {WHERE_TO_GET}"
        )
    return path


def find_file(data_dir: Path, name: str) -> Path | None:
    """`name` in `data_dir`, in `Flickr8k_text/`, or in any direct subfolder (name order)."""
    candidates = [data_dir / name] + [data_dir / sub / name for sub in TEXT_SUBDIRS]
    if data_dir.is_dir():
        candidates += [sub / name for sub in sorted(data_dir.iterdir()) if sub.is_dir()]
    return next((c for c in candidates if c.is_file()), None)


def find_split_files(data_dir: Path) -> dict[str, Path] | None:
    """The three official split files, None when none exists; a partial set raises `DataError`."""
    found = {split: find_file(data_dir, name) for split, name in SPLIT_FILES.items()}
    if all(found.values()):
        return found  # type: ignore[return-value]
    if any(found.values()):
        missing = [SPLIT_FILES[s] for s, p in found.items() if p is None]
        raise DataError(
            f"Only some Flickr8k split files were found under {data_dir}; missing: "
            f"{', '.join(missing)}. They come together in Flickr8k_text.zip. {WHERE_TO_GET}"
        )
    return None


def read_split_files(split_files: dict[str, Path]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(split -> image names in file order, image -> 'file:line'); a repeated image raises."""
    where: dict[str, str] = {}
    splits: dict[str, list[str]] = {}
    for split, path in split_files.items():
        splits[split] = []
        for number, line in read_lines(path):
            name = line.strip()
            if name in where:
                raise DataError(
                    f"{path}:{number}: image {name} is already listed at {where[name]}; each image "
                    "belongs to one split. Remove the duplicate."
                )
            where[name] = f"{path}:{number}"
            splits[split].append(name)
    return splits, where


def image_lookup(folders: Sequence[Path]) -> dict[str, Path]:
    """File name -> folder, from one directory listing per folder (first folder wins)."""
    lookup: dict[str, Path] = {}
    for folder in reversed(folders):
        for name in os.listdir(folder):
            lookup[name] = folder
    return lookup


def make_records(
    items: Iterable[tuple[str, str, Sequence[str], Path | None, str]],
    *,
    skip_bad_images: bool,
    skipped: list | None,
    dataset: str,
) -> DatasetSplits:
    """Builds records from (image_id, split, captions, folder or None, folders searched) items.

    A None folder means the file is missing: raise, or skip and report when `skip_bad_images`.
    """
    splits: DatasetSplits = {"train": [], "val": [], "test": []}
    missing: list[str] = []
    missing_where = ""
    for image_id, split, captions, folder, searched in items:
        if folder is None:
            reason = f"image file not found (searched {searched})"
            if not skip_bad_images:
                raise DataError(
                    f"{dataset}: image {image_id} ({split}) not found; searched {searched}. Unzip "
                    "the images into config.data.dir, or set config.data.skip_bad_images=True to "
                    "skip missing images."
                )
            missing.append(image_id)
            missing_where = searched
            if skipped is not None:
                skipped.append((image_id, reason))
            continue
        path = str(folder / image_id)
        splits[split].append(ImageRecord(image_id, path, tuple(captions), split))
    if missing and not any(splits.values()):
        raise DataError(
            f"{dataset}: all {len(missing)} image files are missing (searched {missing_where}); "
            "config.data.dir probably points at the wrong folder, or the images are not unzipped."
        )
    if missing:
        shown = ", ".join(missing[:_MAX_NAMES_LOGGED])
        more = (
            f" and {len(missing) - _MAX_NAMES_LOGGED} more"
            if len(missing) > _MAX_NAMES_LOGGED
            else ""
        )
        logging.warning(
            "%s: skipped %d images whose file is missing (skip_bad_images=True): %s%s",
            dataset,
            len(missing),
            shown,
            more,
        )
    return splits


def attach_images(
    captions: dict[str, list[str]],
    splits: dict[str, list[str]],
    data_dir: Path,
    *,
    image_dirs: Sequence[str],
    check_images: bool,
    skip_bad_images: bool,
    skipped: list | None,
    dataset: str,
    listed_at: dict[str, str] | None = None,
) -> DatasetSplits:
    """Joins split lists with captions and image files into `DatasetSplits`."""
    folders = [data_dir / d for d in image_dirs if (data_dir / d).is_dir()]
    if check_images and not folders:
        raise DataError(
            f"No image folder in {data_dir}: expected one of {', '.join(image_dirs)}/. "
            f"{WHERE_TO_GET}"
        )
    lookup = image_lookup(folders) if check_images else {}
    default = folders[0] if folders else data_dir / image_dirs[0]
    searched = ", ".join(str(f) for f in folders)

    def items():
        for split, names in splits.items():
            for name in names:
                if name not in captions:
                    where = listed_at[name] if listed_at else f"split {split}"
                    raise DataError(
                        f"{where}: image {name} has no caption in the caption file. Check that "
                        "the split and caption files come from the same release."
                    )
                folder = lookup.get(name) if check_images else default
                yield name, split, captions[name], folder, searched

    records = make_records(
        items(), skip_bad_images=skip_bad_images, skipped=skipped, dataset=dataset
    )
    in_splits = {n for names in splits.values() for n in names}
    unused = len(set(captions) - in_splits)
    if unused:
        logging.info("%s: %d captioned images are in no split and are left out.", dataset, unused)
    logging.info(
        "%s: %s images, %s captions (train/val/test) from %s.",
        dataset,
        "/".join(str(len(records[s])) for s in records),
        "/".join(str(sum(len(r.captions) for r in records[s])) for s in records),
        data_dir,
    )
    return records


# ----------------------------------------------------------------------------------------------
# The Flickr8k text-zip reader.


def read_token_file(path: Path) -> dict[str, list[str]]:
    """Image name -> raw captions in file order, from `<image>#<k>\\t<caption>` lines."""
    captions: dict[str, list[str]] = {}
    for number, line in read_lines(path):
        key, tab, caption = line.partition("\t")
        if not tab:
            raise DataError(
                f"{path}:{number}: expected '<image>.jpg#<k><TAB><caption>', found no tab in "
                f"{line[:80]!r}. Fix the line (tabs may have become spaces in a copy)."
            )
        caption = caption.strip()
        if not caption:
            raise DataError(f"{path}:{number}: empty caption for {key!r}. Remove or fill the line.")
        image_id = key.strip().rpartition("#")[0] or key.strip()
        image_id = normalize_image_id(image_id, f"{path}:{number}")
        captions.setdefault(image_id, []).append(caption)
    return captions


def read_flickr8k(
    data_dir: str | os.PathLike,
    *,
    skip_bad_images: bool = False,
    skipped: list | None = None,
    check_images: bool = True,
) -> DatasetSplits:
    """Reads the Flickr8k text-zip layout (see the module docstring) into `DatasetSplits`.

    Args:
      data_dir: the folder (config.data.dir).
      skip_bad_images: skip images whose file is missing instead of raising.
      skipped: if given, receives `(image_id, reason)` for every skipped image.
      check_images: False builds paths without looking at the image folder (text-only use).
    """
    expected = (
        f"{TOKEN_FILE}, {', '.join(SPLIT_FILES.values())} and Flicker8k_Dataset/ (or Images/)"
    )
    root = require_dir(data_dir, "flickr8k", expected)
    token_path = find_file(root, TOKEN_FILE)
    split_files = find_split_files(root)
    if token_path is None or split_files is None:
        missing = [TOKEN_FILE] if token_path is None else []
        missing += list(SPLIT_FILES.values()) if split_files is None else []
        raise DataError(
            f"{', '.join(missing)} not found in {root} or its subfolders (e.g. Flickr8k_text/). "
            f"The flickr8k reader expects {expected}. {WHERE_TO_GET}"
        )
    logging.info(
        "flickr8k: captions from %s, splits from %s", token_path, split_files["train"].parent
    )
    splits, listed_at = read_split_files(split_files)
    return attach_images(
        read_token_file(token_path),
        splits,
        root,
        image_dirs=IMAGE_DIRS,
        check_images=check_images,
        skip_bad_images=skip_bad_images,
        skipped=skipped,
        dataset="flickr8k",
        listed_at=listed_at,
    )
