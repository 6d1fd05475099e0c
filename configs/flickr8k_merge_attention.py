"""The Keras notebook's merge model with spatial attention at its output (Lu et al. 2017, "Knowing
When to Look", section 2.2) on Flickr8k over InceptionV3 8x8x2048.

    python main.py --config=configs/flickr8k_merge_attention.py \
        --workdir=runs/flickr8k_merge_attention --config.data.dir=/data/flickr8k \
        --config.model.glove_path=/data/glove/glove.6B.200d.txt

Everything but the features and the decoder is configs/flickr8k.py (GloVe 200-d frozen, LSTM 256,
dropout 0.5, Adam schedule, early stopping), so the two runs compare the pooled vector with a
context each word's LSTM state looks up in the map. The scenes default uses this decoder
(configs/notes/scenes.md says why). Not in the paper: the LSTM never sees the image (merge), and
the context is added to the pooled image vector and the LSTM output instead of replacing the
pooled vector; no visual sentinel. Result: not measured (no Flickr8k images or ImageNet weights
here; configs/notes/flickr8k.md).
"""

from configs import flickr8k, flickr8k_attention


def get_config(backbone: str | None = None):
    config = flickr8k.get_config(backbone)
    config.encoder.layer = flickr8k_attention.SPATIAL_LAYERS[config.encoder.backbone]  # The map.
    config.encoder.pooling = "none"  # InceptionV3: L = 64 locations of 2048 features.
    config.encoder.grid = 0  # The map as it is.
    config.encoder.dtype = "float16"  # 8,000 x 64 x 2048 floats: 2.1 GB (4.2 GB as float32).
    config.model.decoder = "merge_attention"  # captioning/models/merge_attention.py
    config.model.attention_dim = 256  # Attention MLP size (the LSTM's size).
    config.model.attention_positions = False  # Features only, as the paper.
    return config
