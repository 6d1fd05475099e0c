"""The seed's merge decoder on the scenes: one pooled image vector joins the LSTM's output.

    python main.py --config=configs/scenes_merge.py --workdir=runs/scenes_merge

Same data, backbone layer and schedule as configs/scenes.py; the decoder reads the map's mean and
max over locations instead of looking things up in it. The baseline the default improves on.
"""

from configs import scenes


def get_config():
    config = scenes.get_config()
    config.encoder.pooling = "avgmax"  # [2C]: the mean, and the max that says a pattern occurs.
    config.encoder.grid = 0  # Unused with pooled features.
    config.model.decoder = "merge"  # captioning/models.py: the seed's architecture.
    return config
