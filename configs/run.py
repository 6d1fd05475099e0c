"""The config a finished run was trained with, so its fields can be overridden later.

    python main.py --mode=evaluate --workdir=runs/scenes --config=configs/run.py:runs/scenes \
        --config.decode.method=beam --config.eval.split=val
"""

import ml_collections

from captioning.run_dir import RunDir


def get_config(workdir: str) -> ml_collections.ConfigDict:
    return RunDir(workdir).config("after 'configs/run.py:' give")
