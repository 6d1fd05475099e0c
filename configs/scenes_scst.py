"""Self-critical sequence training (SCST) on the scenes, after the cross-entropy default.

    python main.py --config=configs/scenes.py --workdir=runs/scenes
    python main.py --config=configs/scenes_scst.py --workdir=runs/scenes_scst \
        --config.scst.init_from=runs/scenes

`:merge` fine-tunes a configs/scenes_merge.py run instead (the seed's merge decoder):
`--config=configs/scenes_scst.py:merge --config.scst.init_from=runs/scenes_merge`.
Data, features and decoder must be the starting run's (captioning/scst.py refuses others).
"""

from configs import scenes, scenes_merge


def get_config(start: str | None = None):
    bases = {"default": scenes, "merge": scenes_merge}
    start = start or "default"
    if start not in bases:
        raise ValueError(f"configs/scenes_scst.py:{start}: use one of {sorted(bases)}.")
    config = bases[start].get_config()
    config.scst.init_from = ""  # Give the finished run: --config.scst.init_from=runs/scenes.
    config.scst.learning_rate = 5e-5  # Small, as the anchors (2e-5 to 5e-5).
    config.scst.num_epochs = 3  # Passes over the 3,000 training scenes (60 steps each).
    return config
