"""Show, Attend and Tell (Xu et al. 2015, soft attention) on Flickr8k over InceptionV3 8x8x2048.

    python main.py --config=configs/flickr8k_attention.py --workdir=runs/flickr8k_attention \
        --config.data.dir=/data/flickr8k

Reference (paper, Table 1, Flickr8k, soft attention): BLEU-1..4 67 / 44.8 / 29.9 / 19.5,
METEOR 18.9. What follows the paper and what does not:

* Features: the paper uses VGG conv5_4 (14x14x512, L=196, no fine-tuning; closest here:
  configs/flickr8k_attention_vgg16.py). This config reads InceptionV3's last map (8x8x2048,
  ImageNet weights), the backbone of the seed's merge model, so the comparison with
  configs/flickr8k.py changes only the decoder. `--config.encoder.backbone=resnet50
  --config.encoder.image_size=224` gives ResNet50's 7x7x2048.
* Decoder: as in the paper (initial state from the mean feature, additive attention, gating
  scalar beta, deep output, dropout); the attention MLP is one layer (the authors' code also has
  a two-layer option).
* Sizes: word embedding 512 and attention size = context size follow the authors' code
  (arctic-captions); LSTM 1000 units is that code's default (its COCO setting uses 1800). No
  GloVe: the paper learns the embeddings (GloVe 200-d needs embed_dim=200).
* Doubly stochastic regularization lambda = 1 (the authors' code, alpha_c=1).
* Optimizer: the paper uses RMSProp on Flickr8k (Adam on the larger sets); here Adam with
  warm-up and cosine decay (captioning/train.py), batch 64 as in the authors' code.
* Early stopping: the paper stops on validation BLEU; here on validation CIDEr (patience 5).
* Decoding: beam search (the paper's results are beam-searched; the width 3 is our choice).
"""

from configs import flickr8k


def get_config():
    config = flickr8k.get_config()
    config.encoder.layer = ""  # InceptionV3's last layer (mixed10): 8x8x2048 at 299 px.
    config.encoder.pooling = "none"  # The spatial map: L = 64 locations of 2048 features.
    config.encoder.grid = 0  # Kept as is.
    config.encoder.dtype = "float16"  # 8091 x 64 x 2048 floats: 2.1 GB as float16 (4.2 as fp32).

    config.model.decoder = "attention"  # captioning/attention.py
    config.model.embed_dim = 512  # arctic-captions dim_word.
    config.model.hidden_size = 1000  # arctic-captions dim (1800 for COCO).
    config.model.attention_dim = 512  # Attention MLP size.
    config.model.attention_positions = False  # As the paper: features only (scenes add positions).
    config.model.dropout = 0.5  # On embeddings, LSTM output and the deep output layer.
    config.model.attention_reg = 1.0  # Doubly stochastic lambda (arctic-captions alpha_c=1).
    config.model.glove_path = ""  # Embeddings learned from scratch, as in the paper.
    config.model.train_embeddings = True  # Trained with the decoder.

    config.train.batch_size = 64  # arctic-captions batch size.
    config.train.learning_rate = 1e-3  # Peak Adam learning rate for batch 64.
    config.train.warmup_steps = 500  # Warm-up steps.

    config.decode.method = "beam"  # Beam search, as the paper's results.
    config.decode.beam_size = 3  # Beam width.
    config.decode.batch_size = 64  # Beams tile the 64x2048 map per image: smaller batches.
    return config
