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

Training speed at these sizes (`python -m captioning.tools.benchmark`: batch 64, synthetic captions
with Flickr8k's lengths, 6,000 random float16 8x8x2048 feature maps on the device; 2 CPU cores; 104
MFLOP a target word). Goal: 1,500 words/s, peak RSS at most the store + 3 GB.
* 2-core AMD EPYC with AVX-512 (avx512_bf16, no AMX), 2026-12-06, four benchmark runs (matmul
  peak 193-198, 198-201, 212-219, 194-213 GFLOP/s; the last a full run, 25 s of training each):
  float32 915, 973, 988 and 1,025 words/s (0.49, 0.51, 0.48, 0.52 of the float32 peak: short of
  the goal), `--config.model.dtype=bfloat16` 1,511, 1,708, 1,553 and 1,769 (0.80, 0.89, 0.75,
  0.90 of the float32 peak; a 2048^3 bfloat16 product runs at about 385 GFLOP/s here); peak RSS
  4.21, 4.23, 4.22 and 4.48 GB with the 1.57 GB store. Earlier the same day: 838 / 1,005
  (float32 / bfloat16) before the first change below, 961 / 1,126 after the second.
* Intel Xeon with AMX, 2026-12-01 (matmul peak 256 GFLOP/s in a slow spell): 901 / 1,204, before
  the changes below.
float32 stays the default: bfloat16 training has not been compared with float32 on Flickr8k's
images here. What each change gave (separate processes on the same data; this VM's speed drifts
by about 10 %):
* The recurrence's products with the weights as the left operand (`layers.weights_first_matmul`):
  a [64, 3048] x [3048, 4000] product repacks the whole weight matrix at every word; as
  [4000, 3048] x [3048, 64] it ran at 340-380 GFLOP/s in bfloat16 (220 before) and 190-205 in
  float32 (150). A bfloat16 step of 13 words 770-830 -> 560-600 ms, float32 about 5 % faster.
* bfloat16 gradients of every other product in bfloat16 too (`layers.matmul`): autodiff's
  multiplied the float32 output gradient with a float32 copy of the weights: the ops of a
  profiled 13-word bfloat16 step summed to 596 ms before, 540 after.
* bfloat16 backward products in the layouts the CPU multiplies fastest (`layers.gradient_matmul`,
  `input_gradient_matmul`): XLA makes a transpose a change of layout, and a weight gradient x^T d
  read so ran at 110-175 GFLOP/s against 240-365 on a row-major copy of x^T (the keys' [2048,
  4096] x [4096, 512] 79 -> 36 ms, the gate weights' 121 -> 77 ms); d w^T at half the speed of
  the weights-first product. Benchmark 1,126 -> 1,372 bfloat16 words/s; float32 bitwise unchanged.
* One malloc arena for every thread (`captioning/host.py`): XLA threads' buffers over 64 MB were
  otherwise mmapped and faulted in anew at every step (4.2-4.3 M page faults per run of the timed
  training against 0.40 M). bfloat16 1,401 and 1,292 -> 1,452 and 1,557 words/s (alternating
  runs of the attention part alone), peak RSS 3.92-4.04 -> 4.03 GB. Before the change above it was
  tried and reverted (float32 no faster; the peak RSS of one benchmark run 4.81 GB); with it the
  conversions and copies of a profiled 13-word bfloat16 step fell from 187 to 39 ms, and the
  step is now mostly products near the bfloat16 peak (the gate weights' gradient at 387 GFLOP/s).
* The recurrence's hand-written backward pass (`attention.attention_recurrence`: weight gradients
  as one product after the reverse loop instead of a read-modify-write of the [C + H, 4H] gate
  weights at every word, the [B, L, A] attention activations recomputed instead of stacked): a
  float32 step of 14 words 866 -> 732 ms; contracting dgates with the gate weights as they are,
  rather than with a transposed copy, another 5-10 % (one-process A/B, both orders).
* Keeping freed memory (`captioning/host.py`): once a tf.data pipeline had run in the process,
  every step faulted its large temporaries in again (1.76 M page faults in 8 steps against 0.46 M
  before; the same steps 1.45x slower); bucketed bfloat16 training 859 -> 1,315 words/s (Intel).
* bfloat16 matmuls: AMX makes the step's [64, 3048] x [3048, 4000] products 3-4x faster, the
  step about 1.4x (Intel).
* Tried and not kept: projecting the features to the gates once per image (alpha_t @ (a W_z))
  saves multiply-adds but reads a [B, L, 4H] tensor every step, about 2x slower; the features
  kept in bfloat16 for the weighted sums (XLA's CPU dots convert them back to float32: more
  conversions); one float32 copy of the gathered features behind a barrier; a faster transpose
  of the gate weights (tiled, or in float32: 29-49 ms either way); XLA flags (oneDNN, XNNPACK or
  YNNPACK fusions of the products, 512-bit vectors): no measurable gain.
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
