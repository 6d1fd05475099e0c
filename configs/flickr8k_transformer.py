"""A Transformer decoder on Flickr8k over InceptionV3's 8x8x2048 map (the self-critical.pytorch
TransformerModel recipe, scaled to Flickr8k's 30,000 training captions).

    python main.py --config=configs/flickr8k_transformer.py --workdir=runs/flickr8k_transformer \
        --config.data.dir=/data/flickr8k

Features, splits and beam search as configs/flickr8k_attention.py. Kept from the recipe (its
scripts/configs: d_model 512, d_ff 2048, 8 heads, dropout 0.1, no label smoothing, words learned
with the decoder, Adam with a Noam warm-up to about 4e-4): the sizes of a block, the dropout and
the peak learning rate. Changed: 3 decoder blocks instead of 6 and no 6-layer encoder over the
regions (Flickr8k has a fourteenth of COCO's captions; the decoder's cross-attention reads the 64
projected cells, each with a learned row and column embedding, where the recipe's bottom-up regions
carry no positions; `--config.model.encoder_layers=1` adds one encoder block, which lifted the
scenes' accuracies, at a larger step: 64 cells a caption); the Noam decay (step^-1/2) becomes our
cosine decay after a linear warm-up; batch 100 captions (20 images x 5, the recipe's scripts).

Result: not measured (no Flickr8k images or ImageNet weights on this machine).
"""

from configs import flickr8k_attention


def get_config(backbone: str | None = None):
    config = flickr8k_attention.get_config(backbone)
    config.model.decoder = "transformer"  # captioning/models/transformer.py
    config.model.embed_dim = 512  # = d_model: no projection of the word vectors.
    config.model.hidden_size = 512  # d_model.
    config.model.num_layers = 3  # Half the recipe's 6: Flickr8k is small.
    config.model.num_heads = 8  # Heads of 64.
    config.model.mlp_dim = 2048  # d_ff.
    config.model.dropout = 0.1  # The recipe's.
    config.model.attention_positions = True  # 2-D positions: a grid, not unordered regions.
    config.model.attention_reg = 0.0  # No doubly stochastic term (a Show-Attend-Tell idea).
    config.train.batch_size = 100  # 20 images x 5 captions.
    config.train.learning_rate = 4e-4  # Noam's peak: 512^-0.5 x 10,000^-0.5.
    config.train.warmup_steps = 2000  # About seven epochs of Flickr8k at batch 100.
    config.decode.batch_size = 64  # Beams tile the 64 cells' keys and values per image.
    return config
