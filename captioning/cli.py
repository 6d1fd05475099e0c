"""Mode dispatch for main.py (kept out of main.py so main stays a page)."""

from __future__ import annotations

import os

import ml_collections
from absl import logging

from captioning import train


def _config_or_run_config(config: ml_collections.ConfigDict | None, workdir: str):
    """--config when given (its overrides apply), else the config the run was trained with."""
    if config is not None:
        return config
    return train.load_run_config(workdir)


def run(
    mode: str,
    config: ml_collections.ConfigDict | None,
    workdir: str,
    *,
    images: str | None = None,
    output: str | None = None,
) -> object:
    """Runs one mode of main.py and returns its result (a report dict or None)."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if mode == "train":
        if config is None:
            raise ValueError("--mode=train needs --config=configs/<experiment>.py")
        return train.train_and_evaluate(config, workdir)
    if mode == "evaluate":
        config = _config_or_run_config(config, workdir)
        return train.evaluate(config, workdir, split=config.eval.split)
    if mode == "export_features":
        if config is None:
            raise ValueError("--mode=export_features needs --config=configs/<experiment>.py")
        os.makedirs(workdir, exist_ok=True)
        data = train.prepare_data(config, workdir)
        logging.info("Feature store ready: %s", data.feature_metadata)
        return data.feature_metadata
    if mode == "caption":
        if not images:
            raise ValueError("--mode=caption needs --images=FILE|FOLDER|GLOB")
        from captioning import caption

        config = _config_or_run_config(config, workdir)
        return caption.caption_images(config, workdir, images, output=output)
    raise ValueError(f"Unknown --mode={mode!r}")
