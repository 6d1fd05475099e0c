"""Show, Attend and Tell (Xu et al. 2015, soft attention) on Flickr8k over InceptionV3 8x8x2048.

    python main.py --config=configs/flickr8k_attention.py --workdir=runs/flickr8k_attention \
        --config.data.dir=/data/flickr8k

`--config=configs/flickr8k_attention.py:vgg16` reads the paper's kind of features: VGG16's
block5_conv3 at 224 px, 14x14x512 (L = 196; the paper uses VGG19's conv5_4, same shape);
`:resnet50` gives ResNet50's 7x7x2048.

As the paper (initial state from the mean feature, additive attention, gating scalar beta, deep
output, dropout, doubly stochastic lambda 1), with the authors' sizes (arctic-captions: word
embedding 512, LSTM 1000, attention 512; embeddings learned, no GloVe); not as the paper: Adam
with warm-up and cosine decay instead of RMSProp, early stopping on CIDEr instead of BLEU, beam 3.
The features are the Keras notebook's InceptionV3, so the comparison with configs/flickr8k.py
changes only the decoder. Paper (Table 1, Flickr8k): BLEU-1..4 67 / 44.8 / 29.9 / 19.5, METEOR 18.9.

Result: no Flickr8k score (no Flickr8k images or ImageNet weights on this machine). Training speed
(the README's Benchmark table; `python -m captioning.tools.benchmark`, batch 64, synthetic
captions with Flickr8k's lengths, float16 features on the device; 2 CPU cores, AMD EPYC with
AVX-512, four runs): float32 915-1,025 words/s (0.48-0.52 of the matmul peak), with
`--config.model.dtype=bfloat16` 1,511-1,769; peak RSS 4.21-4.48 GB with the 1.57 GB store. The
goal (1,500 words/s, peak RSS at most the store + 3 GB) is met in bfloat16, not in float32, which
stays the default: bfloat16 training has not been compared with float32 on Flickr8k's images.

configs/notes/flickr8k.md: what follows the paper in detail, and what each speed change gave.
"""

from configs import flickr8k

# Spatial map per backbone: the last layer, except VGG16's last conv before its pooling.
SPATIAL_LAYERS = {"inception_v3": "", "resnet50": "", "vgg16": "block5_conv3"}


def get_config(backbone: str | None = None):
    config = flickr8k.get_config(backbone)
    config.encoder.layer = SPATIAL_LAYERS[config.encoder.backbone]  # The spatial map to attend.
    config.encoder.pooling = "none"  # InceptionV3: L = 64 locations of 2048 features.
    config.encoder.grid = 0  # The map as it is.
    config.encoder.dtype = "float16"  # 8,000 x 64 x 2048 floats: 2.1 GB (4.2 GB as float32).

    config.model.decoder = "attention"  # captioning/models/show_attend_tell.py
    config.model.embed_dim = 512  # arctic-captions dim_word.
    config.model.hidden_size = 1000  # arctic-captions dim (1800 for COCO).
    config.model.attention_dim = 512  # Attention MLP size.
    config.model.attention_positions = False  # As the paper: features only.
    config.model.attention_reg = 1.0  # Doubly stochastic lambda (arctic-captions alpha_c=1).
    config.model.train_embeddings = True  # Learned with the decoder, as in the paper.

    config.train.batch_size = 64  # arctic-captions batch size.
    config.train.learning_rate = 1e-3  # Peak Adam learning rate for batch 64.
    config.train.warmup_steps = 500  # Warm-up steps.

    config.decode.method = "beam"  # Beam search, as the paper's results.
    config.decode.batch_size = 64  # Beams tile the 64x2048 map per image: smaller batches.
    return config
