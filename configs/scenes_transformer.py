"""A Transformer decoder on the scenes: pre-LayerNorm blocks of causal self-attention over the
words and cross-attention over the 4x4 feature grid with learned 2-D positions.

    python main.py --config=configs/scenes_transformer.py --workdir=runs/scenes_transformer

Same data, features (ResNet50 conv2_block3_out, 4x4 grid), word weights, 11 epochs, no dropout
and checkpoint choice as configs/scenes.py; only the decoder and its learning rate differ. d_model
128 (2 blocks, 4 heads, MLP 512) keeps the step near the default LSTM's cost.

Result (2 CPU cores, AMD EPYC with AVX-512, shared with other jobs; test split, greedy; mean +-
std over seeds 0-1; chosen epochs 11 and 10 of 11): attribute accuracy 0.935 +- 0.002, relation
accuracy 0.911 +- 0.003, CIDEr 3.21 +- 0.08, BLEU-4 0.627 +- 0.003, METEOR 0.411 +- 0.002;
test_perturbed attribute accuracy 0.908 +- 0.002, relation 0.896 +- 0.036. Against the default
(seeds 0-4): relations +0.14 (test) and +0.12 (perturbed), attributes level. 8.0 minutes for
seed 1 at load average 5-6 (21 minutes for seed 0 at 9-17); its last epoch ran at about 10
steps/s on a quieter machine, about 4.5 minutes for the 2,607 steps: the 5-minute budget was not
measured on an idle machine. The issue's goals: relation >= 0.85 met; attribute >= 0.96 and
perturbed >= 0.93 not met.

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
