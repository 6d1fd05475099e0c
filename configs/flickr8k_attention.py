"""Show, Attend and Tell (Xu et al. 2015, soft attention) on Flickr8k over InceptionV3 8x8x2048.

    python main.py --config=configs/flickr8k_attention.py --workdir=runs/flickr8k_attention \
        --config.data.dir=/data/flickr8k

`--config=configs/flickr8k_attention.py:vgg16` reads the paper's kind of features: VGG16's
block5_conv3 at 224 px, 14x14x512 (L = 196; the paper uses VGG19's conv5_4, same shape);
`:resnet50` gives ResNet50's 7x7x2048.

Reference (paper, Table 1, Flickr8k, soft attention): BLEU-1..4 67 / 44.8 / 29.9 / 19.5,
METEOR 18.9. Not measured here (no Flickr8k images or ImageNet weights on this machine). What
follows the paper and what does not:
* Features: InceptionV3's last map (ImageNet weights), the backbone of the seed's merge model, so
  the comparison with configs/flickr8k.py changes only the decoder; stored as float16.
* Decoder: as the paper (initial state from the mean feature, additive attention, gating scalar
  beta, deep output, dropout); a one-layer attention MLP (the authors' code has a two-layer
  option); word embedding 512, LSTM 1000 and attention size 512 follow the authors' code
  (arctic-captions); embeddings learned, no GloVe.
* Doubly stochastic regularisation lambda = 1 (arctic-captions alpha_c=1).
* Optimizer: Adam with warm-up and cosine decay, batch 64 (the paper: RMSProp on Flickr8k).
* Early stopping on validation CIDEr (the paper: BLEU); beam search of width 3 (our choice).

Training speed at these sizes (`python -m captioning.benchmark`: batch 64, synthetic captions with
Flickr8k's lengths, 6,000 random float16 8x8x2048 feature maps on the device; 2 CPU cores, Intel
Xeon with AMX, 2026-12-01, in a slow spell of the VM: matmul peak 256 GFLOP/s against 293 an
hour before): 901 target words/s in float32 (0.37 of the float32 peak, counting 104 MFLOP a
word), 1,204 with `--config.model.dtype=bfloat16`; the goal, 1,500, is not reached. Peak RSS
4.12 GB with the 1.57 GB store (goal: store + 3 GB). On a 2-core AMD EPYC with AVX-512
(avx512_bf16, no AMX), 2026-12-06: 838 / 1,005 words/s (float32 / bfloat16, matmul peak 205-207)
before the first two changes below, 961 (0.48 of the peak) / 1,126 (0.56) after (peak 208-210),
peak RSS 4.23 GB. Still short of 1,500. What each change gave (separate processes on the same
data; this VM's speed drifts by about 10 %):
* The recurrence's products with the weights as the left operand (`weights_first_matmul`): a
  [64, 3048] x [3048, 4000] product repacks the whole weight matrix at every word; as
  [4000, 3048] x [3048, 64] it ran at 340-380 GFLOP/s in bfloat16 (220 before) and 190-205 in
  float32 (150). A bfloat16 step of 13 words 770-830 -> 560-600 ms, float32 about 5 % faster.
* bfloat16 gradients of every other product in bfloat16 too (`layers.matmul`): autodiff's
  multiplied the float32 output gradient with a float32 copy of the weights: the ops of a
  profiled 13-word bfloat16 step summed to 596 ms before, 540 after.
* The recurrence's hand-written backward pass (`attention.attention_recurrence`: weight gradients
  as one product after the reverse loop instead of a read-modify-write of the [C + H, 4H] gate
  weights at every word, the [B, L, A] attention activations recomputed instead of stacked): a
  float32 step of 14 words 866 -> 732 ms; contracting dgates with the gate weights as they are,
  rather than with a transposed copy, another 5-10 % (one-process A/B, both orders).
* Projecting the features to the gates once per image (alpha_t @ (a W_z)) saves multiply-adds
  but reads and accumulates a [B, L, 4H] tensor every step: about 2x slower (autodiff version).
* Keeping freed memory (`captioning/host.py`): once a tf.data pipeline had run in the process,
  every step faulted its large temporaries in again (1.76 M page faults in 8 steps against 0.46 M
  before; the same steps 1.45x slower); bucketed bfloat16 training 859 -> 1,315 words/s.
* bfloat16 matmuls: AMX makes the step's [64, 3048] x [3048, 4000] products 3-4x faster, the
  step about 1.4x: what remains is memory-bound (Adam over 23 M parameters, the features'
  conversions, the [B, L, A] tanh). On the AMD EPYC (avx512_bf16) a 2048^3 bfloat16 product runs
  at 385 GFLOP/s against 205 in float32. float32 stays the default: bfloat16 training has not been
  compared with float32 on Flickr8k's images here.
* The one-off costs of a step (optimizer, per-image keys [64 x 64, 2048] x [2048, 512], gathering
  and converting the features) are about a third of a 10-word step; the loop's elementwise work
  (tanh and softmax over [64, 64, 512], the weighted sums over 64 x 2048) most of the rest. After
  the changes above (AMD, bfloat16, a profiled 13-word step summing to 540 ms): the loop's
  products 167 ms, its other ops 43, the one-off products 122 (the keys 36), optimizer and other
  one-off ops 81, conversions, copies and broadcasts 128.
* Tried and not kept: one malloc arena for every thread (MALLOC_ARENA_MAX=1: XLA threads' buffers
  over 64 MB are otherwise mmapped and faulted in anew every step, 4.5 M page faults per run of
  the timed training against 0.48 M; the conversions above fell to 52 ms). bfloat16 1,178 and
  1,228 -> 1,378 and 1,429 words/s (alternating runs of the attention part alone), float32 no
  faster (0.533 / 0.495 of the peak against 0.536 / 0.498), and the peak RSS of training rose
  from 4.08-4.09 to 4.45-4.47 GB (4.81 in one benchmark run: over the store + 3 GB goal).
* Tried without a measurable gain: one float32 copy of the gathered features for the mean, keys
  and weighted sums (an optimization barrier), XLA flags (oneDNN, XNNPACK or YNNPACK fusions of
  the products, 512-bit vectors).
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

    config.model.decoder = "attention"  # captioning/attention.py
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
