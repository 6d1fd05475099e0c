"""Mode dispatch for main.py (kept out of main.py so main stays a page).

Each mode imports only what it needs: evaluation and caption mode never build the trainer.
"""

from __future__ import annotations

import os

import ml_collections
from absl import logging

MODES = ("train", "evaluate", "caption", "export_features", "serve")


def _require_config(config: ml_collections.ConfigDict | None, mode: str):
    if config is None:
        raise ValueError(f"--mode={mode} needs --config=configs/<experiment>.py")
    return config


def _config_or_run_config(config: ml_collections.ConfigDict | None, workdir: str):
    """--config when given (its overrides apply), else the config the run was trained with."""
    if config is not None:
        return config
    from captioning.run_dir import RunDir

    return RunDir(workdir).config()


def run(
    mode: str,
    config: ml_collections.ConfigDict | None,
    workdir: str,
    *,
    images: str | None = None,
    output: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_upload_mb: float = 10,
) -> object:
    """Runs one mode of main.py and returns its result (a report, captions or store metadata)."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if mode == "train":
        config = _require_config(config, mode)
        if config.scst.init_from:  # The self-critical phase after a cross-entropy run.
            from captioning.training import scst

            return scst.train_and_evaluate(config, workdir)
        from captioning.training import train

        return train.train_and_evaluate(config, workdir)
    if mode == "evaluate":
        from captioning.evaluation import evaluate

        config = _config_or_run_config(config, workdir)
        return evaluate.evaluate(config, workdir, split=config.eval.split)
    if mode == "export_features":
        from captioning.data import prepare as data

        os.makedirs(workdir, exist_ok=True)
        _, result = data.export_store(_require_config(config, mode), workdir)
        logging.info("Feature store ready: %s (%d images).", result.store_dir, result.num_images)
        return result
    if mode == "caption":
        if not images:
            raise ValueError("--mode=caption needs --images=FILE|FOLDER|GLOB")
        from captioning import caption

        config = _config_or_run_config(config, workdir)
        return caption.caption_images(config, workdir, images, output=output)
    if mode == "serve":
        checkpoint = None
        if config is not None:
            logging.warning(
                "--mode=serve uses the run's own config.json; of --config only "
                "eval.checkpoint counts."
            )
            checkpoint = str(config.eval.get("checkpoint", "best"))
        from captioning import serve  # Gradio: imported only by this mode.

        return serve.serve(
            workdir, host=host, port=port, max_upload_mb=max_upload_mb, checkpoint=checkpoint
        )
    raise ValueError(f"Unknown --mode={mode!r}; use one of {MODES}.")
