"""`config.data.dataset` -> the reader that turns it into `DatasetSplits`.

    records = load_records(config.data, config.seed, skipped=skipped)

| dataset           | reader                                  | config.data fields used            |
|-------------------|-----------------------------------------|------------------------------------|
| `scenes`          | `scenes.load_scenes` (generated)        | see configs/scenes.py              |
| `flickr8k`        | `flickr8k.read_flickr8k` (text zip)     | dir, skip_bad_images               |
| `flickr8k_kaggle` | `kaggle.read_kaggle` (captions.txt)     | dir, skip_bad_images (+ seed)      |
| `karpathy`        | `karpathy.read_karpathy` (JSON)         | dir, karpathy_json, skip_bad_images|
| `coco_tfds`       | `coco_tfds.read_coco_tfds` (TFDS)       | tfds_data_dir, cache_dir (images)  |

Images skipped with `skip_bad_images=True` are logged by the readers and appended as
`(image_id, reason)` to `skipped` when given, so the caller can write them to the workdir.

A dataset that can score generated captions itself (the scenes know every image's objects)
declares its `CaptionScore`s in `CAPTION_SCORES`; evaluation, validation, the SCST reward and the
tables then show them beside the reference metrics (`captioning.evaluation.metrics`).
"""

from __future__ import annotations

from typing import Any

from captioning.data.datasets import scene_captions
from captioning.data.datasets.base import CaptionScore, DataError, DatasetSplits

DATASETS = ("scenes", "flickr8k", "flickr8k_kaggle", "karpathy", "coco_tfds")
# Dataset name -> the scores it gives each generated caption (datasets not named: none).
CAPTION_SCORES: dict[str, tuple[CaptionScore, ...]] = {"scenes": scene_captions.CAPTION_SCORES}


def caption_scores(name: str) -> tuple[CaptionScore, ...]:
    """The caption scores dataset `name` supplies (empty for a dataset of captions alone)."""
    return CAPTION_SCORES.get(name, ())


def load_records(data_config: Any, seed: int, skipped: list | None = None) -> DatasetSplits:
    """Reads the dataset named by `data_config.dataset`; unknown names raise `DataError`."""
    name = data_config.dataset
    if name == "scenes":
        from captioning.data.datasets import scenes  # Imported here: only this branch needs it.

        return scenes.load_scenes(data_config, seed)
    if name == "coco_tfds":
        from captioning.data.datasets import coco_tfds  # Extracts the images into the cache once.

        return coco_tfds.read_coco_tfds(data_config.tfds_data_dir, data_config.cache_dir)
    common = {
        "skip_bad_images": bool(data_config.skip_bad_images),
        "skipped": skipped,
    }
    if name == "flickr8k":
        from captioning.data.datasets import flickr8k

        return flickr8k.read_flickr8k(data_config.dir, **common)
    if name == "flickr8k_kaggle":
        from captioning.data.datasets import kaggle

        return kaggle.read_kaggle(data_config.dir, seed=seed, **common)
    if name == "karpathy":
        from captioning.data.datasets import karpathy

        json_path = data_config.karpathy_json or ""
        return karpathy.read_karpathy(data_config.dir, json_path=json_path, **common)
    raise DataError(f"Unknown config.data.dataset {name!r}; valid names: {', '.join(DATASETS)}.")
