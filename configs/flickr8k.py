"""The seed's experiment on real Flickr8k: InceptionV3 (ImageNet) pooled features, GloVe 200-d,
merge LSTM 256, greedy decoding, min count 10.

    python main.py --config=configs/flickr8k.py --workdir=runs/flickr8k \
        --config.data.dir=/data/flickr8k --config.model.glove_path=/data/glove/glove.6B.200d.txt

Needs the Flickr8k images and text files in `data.dir`, the Keras ImageNet weights of the
backbone (see README, "Real data and weights") and, for GloVe, the glove.6B file. Variants:
`--config.encoder.backbone=resnet50 --config.encoder.image_size=224` (or vgg16), or the small
config files configs/flickr8k_resnet50.py and configs/flickr8k_vgg16.py.
"""

from configs import scenes


def get_config():
    config = scenes.get_config()
    config.data.dataset = "flickr8k"  # Flickr8k text-zip layout (see README for others).
    config.data.dir = ""  # Folder with Flickr8k.token.txt, the split files and the images.
    config.data.min_word_len = 2  # The seed's cleaning: words of at least two letters.
    config.data.min_count = 10  # The seed's threshold: 1649 words besides the markers.
    config.data.max_caption_len = 32  # The longest cleaned Flickr8k caption has 32 words.

    config.encoder.backbone = "inception_v3"  # The seed's encoder.
    config.encoder.layer = ""  # The last layer (mixed10), average pooled: [2048].
    config.encoder.weights = "imagenet"  # Keras cache file, or a path to a local .h5 file.
    config.encoder.image_size = 299  # InceptionV3's native input size.
    config.encoder.pooling = "avg"  # One vector per image for the merge decoder.
    config.encoder.grid = 0  # Unused with pooled features.

    config.model.decoder = "merge"  # The seed's merge architecture.
    config.model.embed_dim = 200  # GloVe 200-d.
    config.model.hidden_size = 256  # The seed's LSTM size.
    config.model.dropout = 0.5  # The seed's dropout (real photos overfit fast).
    config.model.glove_path = ""  # e.g. /data/glove/glove.6B.200d.txt ('' = learned from scratch).
    config.model.train_embeddings = False  # The seed freezes the GloVe embedding layer.

    config.train.num_epochs = 20  # About the seed's budget, much faster per epoch.
    config.train.batch_size = 256  # Captions per step.
    config.train.learning_rate = 2e-3  # Peak Adam learning rate.
    config.train.warmup_steps = 200  # Warm-up steps.
    config.train.log_every = 100  # Steps between log lines.
    config.train.patience = 5  # Early stopping on validation CIDEr.

    config.decode.max_len = 32  # Longest generated caption.
    config.eval.num_samples = 12  # Images in samples.png.
    return config
