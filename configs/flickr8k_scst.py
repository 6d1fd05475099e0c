"""Self-critical sequence training (SCST) on Flickr8k, after the Keras notebook's cross-entropy run.

    python main.py --config=configs/flickr8k.py --workdir=runs/flickr8k \
        --config.data.dir=/data/flickr8k --config.model.glove_path=/data/glove/glove.6B.200d.txt
    python main.py --config=configs/flickr8k_scst.py --workdir=runs/flickr8k_scst \
        --config.data.dir=/data/flickr8k --config.model.glove_path=/data/glove/glove.6B.200d.txt \
        --config.scst.init_from=runs/flickr8k

As ruotianluo/self-critical.pytorch on COCO: 5 samples per image, the mean of the other samples
as baseline, Adam at 5e-5 (constant), batch of 50 images; the anchors report +9 to 15 CIDEr points
over cross-entropy training. Result: not measured (no Flickr8k images or ImageNet weights on this
machine; the scenes' SCST runs are in configs/notes/scst.md). Backbone variants as
configs/flickr8k.py (`:resnet50`, `:vgg16`), matching the start.
"""

from configs import flickr8k


def get_config(backbone: str | None = None):
    config = flickr8k.get_config(backbone)
    config.scst.init_from = ""  # Give the finished run: --config.scst.init_from=runs/flickr8k.
    config.scst.learning_rate = 5e-5  # The anchors' SCST learning rate.
    config.scst.num_epochs = 20  # Passes over the 6,000 training images.
    config.scst.batch_size = 50  # Images per step (250 sampled captions).
    return config
