"""Show and Tell (Vinyals et al. 2015), the inject decoder, on Flickr8k: the image embedding is
the LSTM's first input.

    python main.py --config=configs/flickr8k_inject.py --workdir=runs/flickr8k_inject \
        --config.data.dir=/data/flickr8k

Follows the paper and its TensorFlow release (im2txt) where they apply: InceptionV3 pooled
features (im2txt's encoder), word embedding and LSTM size 512, dropout, beam search (im2txt
decodes with width 3). Not followed: im2txt trains with SGD and fine-tunes the CNN later; here
the backbone stays frozen and the decoder trains with Adam. Paper, Flickr8k: BLEU-1 63.
"""

from configs import flickr8k


def get_config():
    config = flickr8k.get_config()
    config.encoder.pooling = "avg"  # One 2048-d vector per image.
    config.model.decoder = "inject"  # models.InjectDecoder
    config.model.embed_dim = 512  # Show and Tell / im2txt embedding size.
    config.model.hidden_size = 512  # Show and Tell / im2txt LSTM size.
    config.model.dropout = 0.3  # im2txt: LSTM dropout keep probability 0.7.
    config.model.glove_path = ""  # Embeddings learned from scratch, as in the paper.
    config.model.train_embeddings = True  # Trained with the decoder.
    config.decode.method = "beam"  # Beam search, as im2txt.
    config.decode.beam_size = 3  # im2txt's default width.
    return config
