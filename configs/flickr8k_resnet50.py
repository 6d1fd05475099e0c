"""Flickr8k with a resnet50 encoder (ImageNet weights, 224 px, pooled).

    python main.py --config=configs/flickr8k_resnet50.py --workdir=runs/flickr8k_resnet50 \
        --config.data.dir=/data/flickr8k
"""

from configs import flickr8k


def get_config():
    config = flickr8k.get_config()
    config.encoder.backbone = "resnet50"  # keras.applications backbone.
    config.encoder.image_size = 224  # Its native input size.
    return config
