"""The default (the README's first command): a Transformer on the scenes. One encoder block over
the 4x4 feature grid (learned 2-D positions), then two pre-LayerNorm decoder blocks of causal
self-attention over the words and cross-attention over the encoded cells.

    python main.py --config=configs/scenes_transformer.py --workdir=runs/scenes

Data, features (ResNet50 conv2_block3_out, 4x4 grid), word weights, learning rate, 11 epochs, no
dropout and checkpoint choice as configs/scenes.py (the LSTM); d_model 128, 4 heads, MLP 256 and
bfloat16 matmuls keep a run with a fresh cache within 5 minutes on 2 cores.

Result (the README's Results table; 2 CPU cores, AMD EPYC with AVX-512; test split, greedy, repeats
blocked; mean +- std over seeds 0-4; 4.4-5.0 minutes with a fresh cache, as the machine's speed
varies): attribute accuracy 0.963 +- 0.013 (no seed below 0.957), relation accuracy 0.964 +-
0.008, CIDEr 3.19 +- 0.15; test_perturbed 0.943 +- 0.006 / 0.940 +- 0.010; beam 3 0.977 +- 0.013 /
0.973 +- 0.007 / 3.30 +- 0.15. The LSTM on the same seeds: 0.956 / 0.763. SCST from each seed's run
(configs/scenes_scst.py): CIDEr +12 to +22 %, accuracies 0.965 / 0.968.

configs/notes/scenes.md, "Transformer": per-seed figures, the errors, and what was tried (the
encoder block, its sizes, bfloat16, the learning rate).
"""

from configs import scenes


def get_config():
    config = scenes.get_config()
    config.model.decoder = "transformer"  # captioning/models/transformer.py
    config.model.feed_dim = 0  # A merge_attention option.
    config.model.hidden_size = 128  # d_model (256: about 4x the step).
    config.model.embed_dim = 128  # = d_model: no projection of the word vectors.
    config.model.num_layers = 2  # Decoder blocks.
    config.model.num_heads = 4  # Heads of 32.
    config.model.encoder_layers = 1  # The 16 cells attend to each other before the words do.
    config.model.mlp_dim = 256  # 2 x d_model: with the encoder, the step of a run in budget.
    config.model.dropout = 0.0  # As the LSTM (configs/notes/scenes.md, "Transformer").
    config.model.dtype = "bfloat16"  # Matmuls; the state, loss and optimizer stay float32.
    config.train.learning_rate = 3e-3  # Adam peak, as the LSTM (2e-3: lower accuracies).
    config.train.warmup_steps = 200  # Linear warm-up steps.
    return config
