"""The config a finished run was trained with, so its fields can be overridden later.

    python main.py --mode=evaluate --workdir=runs/scenes --config=configs/run.py:runs/scenes \
        --config.decode.method=beam --config.eval.split=val
"""

import json
import os

import ml_collections


def get_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.expanduser(workdir), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: after 'configs/run.py:' give a run directory written by training."
        )
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))
