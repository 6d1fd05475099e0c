"""A Transformer decoder on the scenes: pre-LayerNorm blocks of causal self-attention over the
words and cross-attention over the 4x4 feature grid with learned 2-D positions.

    python main.py --config=configs/scenes_transformer.py --workdir=runs/scenes_transformer

Same data, features (ResNet50 conv2_block3_out, 4x4 grid), word weights, 11 epochs, no dropout
and checkpoint choice as configs/scenes.py; only the decoder and its learning rate differ. d_model
128 (2 blocks, 4 heads, MLP 512) keeps the step near the default LSTM's cost.

Result (the README's Results table; 2 CPU cores, AMD EPYC with AVX-512; test split, greedy,
repeats blocked; mean +- std over seeds 0-2; 4.7 minutes a run with the features cached):
attribute accuracy 0.947 +- 0.021, relation accuracy 0.896 +- 0.010, CIDEr 3.16 +- 0.11;
test_perturbed 0.919 +- 0.018 / 0.882 +- 0.035. Against the default on the same seeds: relations
+0.14, attributes -0.03. The issue's goals: relation >= 0.85 met; attribute >= 0.96 and perturbed
>= 0.93 not met. SCST from seed 0: CIDEr +20 %, attribute and relation accuracy up.

configs/notes/scenes.md, "Transformer": per-seed figures, the errors, and what was tried.
"""

from configs import scenes


def get_config():
    config = scenes.get_config()
    config.model.decoder = "transformer"  # captioning/models/transformer.py
    config.model.feed_dim = 0  # A merge_attention option.
    config.model.hidden_size = 128  # d_model: about the default LSTM's step cost.
    config.model.embed_dim = 128  # = d_model: no projection of the word vectors.
    config.model.num_layers = 2  # Decoder blocks.
    config.model.num_heads = 4  # Heads of 32.
    config.model.mlp_dim = 512  # 4 x d_model.
    config.model.dropout = 0.0  # As the default (configs/notes/scenes.md, "Transformer").
    config.train.learning_rate = 2e-3  # Adam peak (1e-3: lower perturbed attributes).
    config.train.warmup_steps = 200  # Linear warm-up steps.
    return config
