"""The Keras notebook's experiment on real Flickr8k: InceptionV3 (ImageNet) pooled features, GloVe
200-d frozen, merge LSTM 256, greedy decoding, min count 10.

    python main.py --config=configs/flickr8k.py --workdir=runs/flickr8k \
        --config.data.dir=/data/flickr8k --config.model.glove_path=/data/glove/glove.6B.200d.txt

Backbone variants (ImageNet weights, pooled): `--config=configs/flickr8k.py:resnet50` or
`:vgg16` (224 px); the default is `:inception_v3` (299 px).

Needs the Flickr8k images and text files in `data.dir` and the Keras ImageNet weights of the
backbone (README, "Real data and weights"). Result: none measured; neither could be downloaded on
the machines this project is developed on. Its training speed at these sizes is the README's
Benchmark table; configs/notes/flickr8k.md has what is measured and the references (Show, Attend
and Tell reports BLEU-1..4 67 / 44.8 / 29.9 / 19.5 on Flickr8k, soft attention).
"""

from configs import scenes

# backbone -> its native input size (keras.applications, ImageNet weights).
BACKBONE_SIZES = {"inception_v3": 299, "resnet50": 224, "vgg16": 224}


def get_config(backbone: str | None = None):
    backbone = backbone or "inception_v3"
    if backbone not in BACKBONE_SIZES:
        raise ValueError(
            f"configs/flickr8k.py:{backbone}: use one of {sorted(BACKBONE_SIZES)} after the colon."
        )
    config = scenes.get_config()
    config.data.dataset = "flickr8k"  # Flickr8k text-zip layout (see README for others).
    config.data.min_word_len = 2  # The Keras notebook's cleaning: two letters or more.
    config.data.min_count = 10  # The Keras notebook's: 1649 words besides the markers.
    config.data.max_caption_len = 32  # The longest cleaned Flickr8k caption has 32 words.

    config.encoder.backbone = backbone  # The Keras notebook's encoder is InceptionV3.
    config.encoder.layer = ""  # The last layer (mixed10 for InceptionV3), average pooled.
    config.encoder.weights = "imagenet"  # Keras cache file, or a path to a local .h5 file.
    config.encoder.image_size = BACKBONE_SIZES[backbone]  # The backbone's native input size.
    config.encoder.pooling = "avg"  # One vector per image for the merge decoder.

    config.model.decoder = "merge"  # The Keras notebook's merge architecture.
    config.model.feed_dim = 0  # A merge_attention option (configs/scenes.py); off.
    config.model.dropout = 0.5  # The Keras notebook's (real photos overfit fast).
    config.model.train_embeddings = False  # The Keras notebook freezes its GloVe layer.

    config.train.num_epochs = 20  # About the Keras notebook's budget.
    config.train.batch_size = 256  # Captions per step.
    config.train.learning_rate = 2e-3  # Peak Adam learning rate.
    config.train.warmup_steps = 200  # Warm-up steps.
    config.train.log_every = 100  # Steps between log lines.
    config.train.patience = 5  # Early stopping on validation CIDEr.
    config.train.val_metric = "CIDEr"  # Real captions: no object accuracies to select by.
    config.train.word_weights = ""  # Real captions: every word weighs the same.

    config.decode.max_len = 32  # Longest generated caption.
    return config
