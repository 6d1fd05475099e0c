"""Show, Attend and Tell on Flickr8k with the paper's kind of features: VGG 14x14x512.

    python main.py --config=configs/flickr8k_attention_vgg16.py \
        --workdir=runs/flickr8k_attention_vgg16 --config.data.dir=/data/flickr8k

The paper reads VGG19's conv5_4 (before the last max pooling) at 224 px; keras.applications
offers VGG16 here, whose block5_conv3 has the same 14x14x512 shape (L = 196 locations). All
decoder settings as configs/flickr8k_attention.py (see its notes).
"""

from configs import flickr8k_attention


def get_config():
    config = flickr8k_attention.get_config()
    config.encoder.backbone = "vgg16"  # keras.applications VGG16, ImageNet weights.
    config.encoder.layer = "block5_conv3"  # Last conv layer before pooling: 14x14x512.
    config.encoder.image_size = 224  # VGG's native input size.
    config.model.attention_dim = 512  # = the context size, as in the authors' code.
    return config
