"""Show and Tell (Vinyals et al. 2015), the inject decoder, on Flickr8k: the image embedding is
the LSTM's first input.

    python main.py --config=configs/flickr8k_inject.py --workdir=runs/flickr8k_inject \
        --config.data.dir=/data/flickr8k

Follows the paper and its TensorFlow release (im2txt) where they apply: InceptionV3 pooled
features (im2txt's encoder), word embedding and LSTM size 512, dropout 0.3 (im2txt's keep
probability 0.7), beam search of width 3. Not followed: im2txt trains with SGD and fine-tunes
the CNN later; here the backbone stays frozen and the decoder trains with Adam. Paper, Flickr8k:
BLEU-1 63. Result: not measured (no Flickr8k images or ImageNet weights on this machine;
configs/notes/flickr8k.md).
"""

from configs import flickr8k


def get_config(backbone: str | None = None):
    config = flickr8k.get_config(backbone)
    config.model.decoder = "inject"  # models.InjectDecoder
    config.model.embed_dim = 512  # Show and Tell / im2txt embedding size.
    config.model.hidden_size = 512  # Show and Tell / im2txt LSTM size.
    config.model.dropout = 0.3  # im2txt: LSTM dropout keep probability 0.7.
    config.model.train_embeddings = True  # Learned with the decoder, as in the paper.
    config.decode.method = "beam"  # Beam search (width decode.beam_size = 3), as im2txt.
    return config
