"""Flickr30k, Karpathy splits (29,000 / 1,014 / 1,000 images, five captions each), from
`dataset_flickr30k.json`; the encoder and decoder of configs/coco.py (InceptionV3 ImageNet
8x8x2048 maps, `merge_attention`, why in configs/notes/coco.md).

    python main.py --config=configs/flickr30k.py --workdir=runs/flickr30k \
        --config.data.dir=/data/flickr30k

`data.dir` holds `dataset_flickr30k.json` (from Karpathy's caption_datasets.zip) and the images
in `flickr30k-images/` (the Flickr30k release, about 4 GB of JPEGs). `--mode=export_features`
exports the feature store alone: 31,014 x 8 x 8 x 2048 float16 values, about 7.6 GiB, which fits
in host memory here (23 GiB) but is worth keeping off small accelerators.

Schedule: the author of self-critical.pytorch's own Flickr30k cross-entropy command
(ruotianluo/self-critical.pytorch issue #251): Adam 5e-4 decayed from the start, batches of 50
images x 5 captions, 30 epochs; early stopping on validation CIDEr (patience 5) may end it
sooner. Result: not measured (no Flickr30k images on this machine). Reference: Show, Attend and
Tell (Table 1, Flickr30k, soft attention) reports BLEU-1..4 66.7 / 43.4 / 28.8 / 19.1, METEOR
18.49.
"""

from configs import coco


def get_config():
    config = coco.get_config()  # Encoder, decoder, vocabulary rule and decoding of COCO.
    config.data.dataset = "karpathy"  # Karpathy JSON + image folder (captioning/data/datasets).
    config.data.karpathy_json = "dataset_flickr30k.json"  # In data.dir (or an absolute path).
    config.data.max_caption_len = 20  # Our choice: Flickr30k captions run longer than COCO's.

    config.encoder.dtype = "float16"  # 31,014 x 64 x 2048: 7.6 GiB (15 GiB as float32).

    config.train.batch_size = 250  # Issue #251: batch_size 50 images x seq_per_img 5.
    config.train.learning_rate = 5e-4  # Issue #251: learning_rate 5e-4.
    config.train.num_epochs = 30  # Issue #251: max_epochs 30.
    config.train.warmup_steps = 500  # Our choice: most of an epoch (580 steps/epoch).
    config.train.log_every = 100  # Steps between log lines.
    return config
