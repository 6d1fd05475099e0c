"""The seed's merge model with spatial attention at its output (Lu et al. 2017, "Knowing When to
Look", the spatial attention of section 2.2) on Flickr8k over InceptionV3 8x8x2048.

    python main.py --config=configs/flickr8k_merge_attention.py \
        --workdir=runs/flickr8k_merge_attention --config.data.dir=/data/flickr8k \
        --config.model.glove_path=/data/glove/glove.6B.200d.txt

Everything but the features and the decoder is configs/flickr8k.py (GloVe 200-d frozen, LSTM 256,
dropout 0.5, Adam schedule, early stopping), so the two runs compare the pooled vector with a
context each word's LSTM state looks up in the map. The scenes default uses this decoder
(configs/scenes.py: attribute accuracy 0.84 against 0.63 for the merge decoder). Not in the paper:
the LSTM never sees the image (merge), and the context is added to the pooled image vector and
the LSTM output instead of replacing the pooled vector; no visual sentinel (the paper's adaptive
part).
"""

from configs import flickr8k


def get_config():
    config = flickr8k.get_config()
    config.encoder.layer = ""  # InceptionV3's last layer (mixed10): 8x8x2048 at 299 px.
    config.encoder.pooling = "none"  # The spatial map: L = 64 locations of 2048 features.
    config.encoder.grid = 0  # Kept as is.
    config.encoder.dtype = "float16"  # 8091 x 64 x 2048 floats: 2.1 GB as float16 (4.2 as fp32).

    config.model.decoder = "merge_attention"  # captioning/attention.py
    config.model.attention_dim = 256  # Attention MLP size (the LSTM's size).
    config.model.attention_positions = False  # Features only, as the paper.
    config.model.attention_reg = 0.0  # No doubly stochastic term (the paper has none).
    return config
