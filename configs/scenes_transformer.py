"""A Transformer decoder on the scenes: pre-LayerNorm blocks of causal self-attention over the
words and cross-attention over the 4x4 feature grid with learned 2-D positions.

    python main.py --config=configs/scenes_transformer.py --workdir=runs/scenes_transformer

Same data, features (ResNet50 conv2_block3_out, 4x4 grid), word weights, schedule length and
checkpoint choice as configs/scenes.py; only the decoder and its optimiser settings differ.

Result: not measured yet.
"""

from configs import scenes


def get_config():
    config = scenes.get_config()
    config.model.decoder = "transformer"  # captioning/models/transformer.py
    config.model.feed_dim = 0  # A merge_attention option.
    config.model.hidden_size = 128  # d_model: as fast a step as the default's LSTM.
    config.model.embed_dim = 128  # = d_model: no projection of the word vectors.
    config.model.num_layers = 2  # Decoder blocks.
    config.model.num_heads = 4  # Heads of 32.
    config.model.mlp_dim = 512  # 4 x d_model.
    config.model.dropout = 0.1  # On the memory, the word inputs and every residual branch.
    config.train.learning_rate = 1e-3  # Adam peak for a pre-LN Transformer.
    config.train.warmup_steps = 200  # Linear warm-up steps.
    return config
