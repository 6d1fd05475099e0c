"""Show, Attend and Tell on the scenes: soft attention over the spatial feature map.

    python main.py --config=configs/scenes_attention.py --workdir=runs/scenes_attention

Same data, backbone layer and training schedule as configs/scenes.py (the merge decoder), so the
two runs differ only in the decoder and in reading the map instead of its pooled summary. Add
`--config.eval.attention_maps=true` to `--mode=caption` to draw what it looks at for every word.
"""

from configs import scenes


def get_config():
    config = scenes.get_config()
    config.encoder.pooling = "none"  # Spatial map [H, W, C] instead of one vector.
    # 32x32 -> 8x8 (area): 64 locations still resolve left/right/above/below for 1-3 objects
    # and 1/16 of the locations make each decoding step much cheaper.
    config.encoder.grid = 8
    config.model.decoder = "attention"  # captioning/attention.py
    config.model.attention_dim = 128  # Attention MLP size (Xu et al.'s code: the feature size).
    # Not in the paper: each location's (row, column) joins its features, so the attended context
    # says where the decoder looked; the relation words (left of, above) need it.
    config.model.attention_positions = True
    config.model.attention_reg = 1.0  # Doubly stochastic regularization lambda (paper: 1).
    return config
