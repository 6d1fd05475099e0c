"""Dataset records shared by every reader: one record per image.

Every reader (scenes, Flickr8k, Kaggle, Karpathy JSON) returns `DatasetSplits`, a mapping from the
split names `train`, `val` and `test` to lists of `ImageRecord`. Everything downstream (feature
export, vocabulary, input pipeline, evaluation) only sees these records. A dataset that knows more
about its images than their captions may also score generated captions itself (`CaptionScore`,
declared in `registry.CAPTION_SCORES`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad or missing dataset input; the message names the file, line or image and what to do."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image and its reference captions.

    Attributes:
      image_id: unique key of the image inside its dataset (e.g. `1000268201_693b08cb0e.jpg`).
      image_path: absolute path of the image file.
      captions: the raw reference captions, as written by the annotators (not cleaned).
      split: one of `train`, `val`, `test`.
      meta: dataset-specific extras (the scenes set keeps its true objects here).
    """

    image_id: str
    image_path: str
    captions: tuple[str, ...]
    split: str
    meta: dict[str, Any] | None = None


DatasetSplits = dict[str, list[ImageRecord]]


@dataclasses.dataclass(frozen=True)
class CaptionScore:
    """A score a dataset gives one generated caption from what it knows of the image, such as the
    scenes' attribute accuracy (`ImageRecord.meta` holds the true objects).

    Attributes:
      name: the metric's name in reports, `train.val_metric` and `scst.reward`.
      score: (caption, its image's record) -> the caption's score, or None when this caption
        cannot be judged (it is then left out of the split's mean and earns 0 as a reward).
    """

    name: str
    score: Callable[[str, ImageRecord], float | None]
